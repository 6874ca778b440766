-- Webhook leases: before a POST, a worker leases the (event, subscriber) pair
-- (lease_owner, lease_until) in a statement of its own and commits, so that
-- no row lock and no pooled connection is held while the receiver answers;
-- the outcome is recorded afterwards and ends the lease. A lease outlives
-- the POST's timeout by a margin: a worker that died holding one is replaced
-- once it runs out. See docs/rules.md "Notifications".
ALTER TABLE notification_deliveries
    ADD COLUMN lease_owner uuid,
    ADD COLUMN lease_until timestamptz,
    ADD CONSTRAINT notification_deliveries_lease_whole
        CHECK ((lease_owner IS NULL) = (lease_until IS NULL));

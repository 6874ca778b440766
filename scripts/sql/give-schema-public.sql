-- Gives schema public of the current database, and every table, view,
-- sequence, function and type in it (sqlx's _sqlx_migrations included), to
-- the role named by the setting entrip.new_owner; objects it owns already
-- are not touched (no locks taken), objects of extensions are left alone.
-- Used by scripts/lib.sh (databases created by older scripts as postgres)
-- and entrip_testkit (a test database handed to a non-superuser role):
--   BEGIN; SET LOCAL entrip.new_owner = 'entrip'; \i this file; COMMIT;
DO $give$
DECLARE
    new_owner text := current_setting('entrip.new_owner');
    owner_oid oid := (SELECT oid FROM pg_roles WHERE rolname = new_owner);
    o record;
    n int := 0;
BEGIN
    IF owner_oid IS NULL THEN
        RAISE EXCEPTION 'role % does not exist', new_owner;
    END IF;
    IF (SELECT nspowner FROM pg_namespace WHERE nspname = 'public') <> owner_oid THEN
        EXECUTE format('ALTER SCHEMA public OWNER TO %I', new_owner);
        n := n + 1;
    END IF;
    -- Relations; a sequence that belongs to a column (serial, identity)
    -- follows its table.
    FOR o IN
        SELECT c.oid::regclass AS name,
               CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                              WHEN 'S' THEN 'SEQUENCE' WHEN 'f' THEN 'FOREIGN TABLE'
                              ELSE 'TABLE' END AS kind
          FROM pg_class c
         WHERE c.relnamespace = 'public'::regnamespace
           AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
           AND c.relowner <> owner_oid
           AND NOT EXISTS (SELECT FROM pg_depend d
                            WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                              AND (d.deptype = 'e' OR (c.relkind = 'S' AND d.deptype IN ('a', 'i'))))
    LOOP
        EXECUTE format('ALTER %s %s OWNER TO %I', o.kind, o.name, new_owner);
        n := n + 1;
    END LOOP;
    -- Functions, procedures, aggregates.
    FOR o IN
        SELECT p.oid::regprocedure AS name
          FROM pg_proc p
         WHERE p.pronamespace = 'public'::regnamespace
           AND p.proowner <> owner_oid
           AND NOT EXISTS (SELECT FROM pg_depend d
                            WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
    LOOP
        EXECUTE format('ALTER ROUTINE %s OWNER TO %I', o.name, new_owner);
        n := n + 1;
    END LOOP;
    -- Enums, ranges and their multiranges (which do not follow the range),
    -- domains and standalone composite types (array types and the row
    -- types of tables follow their owners).
    FOR o IN
        SELECT t.oid::regtype AS name,
               CASE t.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END AS kind
          FROM pg_type t
         WHERE t.typnamespace = 'public'::regnamespace
           AND t.typtype IN ('c', 'd', 'e', 'r', 'm')
           AND (t.typtype <> 'c' OR (SELECT c.relkind FROM pg_class c WHERE c.oid = t.typrelid) = 'c')
           AND t.typowner <> owner_oid
           AND NOT EXISTS (SELECT FROM pg_depend d
                            WHERE d.classid = 'pg_type'::regclass AND d.objid = t.oid AND d.deptype = 'e')
    LOOP
        EXECUTE format('ALTER %s %s OWNER TO %I', o.kind, o.name, new_owner);
        n := n + 1;
    END LOOP;
    IF n > 0 THEN
        RAISE NOTICE 'gave % object(s) of schema public of database % to %', n, current_database(), new_owner;
    END IF;
END
$give$;

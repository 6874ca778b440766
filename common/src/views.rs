//! The JSON views of the entities: what the HTTP API answers, what an AMQP
//! reply carries and what an event's `data` holds. One struct per view, so
//! that ingest, the workers and the contracts in `docs/` (OpenAPI, AsyncAPI,
//! JSON Schema) cannot drift apart: a renamed field or status breaks the
//! build, not settlement at run time. The store's rows render them
//! (`store::*::view`); consumers read them back with [`EntityView::parse`].

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::domain::{
    AggregateType, ApprovalStatus, BookingStatus, Currency, Decision, EventType, PaymentMethod,
    PaymentStatus,
};

/// A user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserView {
    pub id: Uuid,
    pub name: String,
    pub email: String,
    pub phone: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A booking, as its events carry it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BookingView {
    pub id: Uuid,
    pub code: String,
    pub user_id: Uuid,
    pub customer_name: String,
    pub customer_phone: String,
    pub itinerary_from: String,
    pub itinerary_to: String,
    pub depart_at: DateTime<Utc>,
    pub arrive_at: DateTime<Utc>,
    pub currency: Currency,
    /// The price, a decimal string at the currency's scale.
    #[schema(pattern = r"^[0-9]+(\.[0-9]{1,2})?$", example = "350000")]
    pub amount: String,
    pub requires_approval: bool,
    pub status: BookingStatus,
    pub cancel_reason: Option<String>,
    pub canceled_at: Option<DateTime<Utc>>,
    pub confirmed_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A booking with its current payment, approval and settlement (each null
/// when there is none): the answer of `GET /v1/bookings/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BookingDetail {
    #[serde(flatten)]
    pub booking: BookingView,
    pub payment: Option<PaymentView>,
    pub approval: Option<ApprovalView>,
    pub settlement: Option<SettlementView>,
}

/// A payment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PaymentView {
    pub id: Uuid,
    pub booking_id: Uuid,
    pub method: PaymentMethod,
    /// A decimal string at the currency's scale.
    #[schema(pattern = r"^[0-9]+(\.[0-9]{1,2})?$", example = "350000")]
    pub amount: String,
    /// A decimal string at the currency's scale.
    #[schema(pattern = r"^[0-9]+(\.[0-9]{1,2})?$", example = "0")]
    pub tax: String,
    pub currency: Currency,
    pub status: PaymentStatus,
    /// The gateway's approval id, once APPROVED.
    pub approval_id: Option<String>,
    /// Why the payment FAILED, when the gateway said.
    pub reason: Option<String>,
    pub decided_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One approver's decision on one step of an approval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DecisionView {
    pub step: i16,
    pub approver_id: Uuid,
    pub decision: Decision,
    pub reason: Option<String>,
    pub decided_at: DateTime<Utc>,
}

/// An approval with its decisions so far, in step order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalView {
    pub id: Uuid,
    pub booking_id: Uuid,
    pub requester_id: Uuid,
    pub title: String,
    pub reason: String,
    pub steps: i16,
    pub current_step: i16,
    pub status: ApprovalStatus,
    pub decisions: Vec<DecisionView>,
    pub decided_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The settlement of a booking: gross and tax from its approved payment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SettlementView {
    pub id: Uuid,
    pub booking_id: Uuid,
    pub payment_id: Uuid,
    pub approval_id: Option<Uuid>,
    #[schema(pattern = r"^[0-9]+(\.[0-9]{1,2})?$", example = "350000")]
    pub gross: String,
    #[schema(pattern = r"^[0-9]+(\.[0-9]{1,2})?$", example = "0")]
    pub tax: String,
    /// gross - tax.
    #[schema(pattern = r"^-?[0-9]+(\.[0-9]{1,2})?$", example = "350000")]
    pub net: String,
    pub currency: Currency,
    pub settled_at: DateTime<Utc>,
}

/// The entity an answer or an event is about: serialized as the view alone
/// (no tag), because its kind is already in the route or the event type.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum EntityView {
    User(UserView),
    Booking(BookingView),
    Payment(PaymentView),
    Approval(ApprovalView),
    Settlement(SettlementView),
}

impl EntityView {
    /// The kind of entity this is.
    pub fn aggregate(&self) -> AggregateType {
        match self {
            Self::User(_) => AggregateType::User,
            Self::Booking(_) => AggregateType::Booking,
            Self::Payment(_) => AggregateType::Payment,
            Self::Approval(_) => AggregateType::Approval,
            Self::Settlement(_) => AggregateType::Settlement,
        }
    }

    /// Reads an event's `data` as the view its type carries.
    pub fn parse(event: EventType, data: serde_json::Value) -> Result<Self, serde_json::Error> {
        Ok(match event.aggregate() {
            AggregateType::User => Self::User(serde_json::from_value(data)?),
            AggregateType::Booking => Self::Booking(serde_json::from_value(data)?),
            AggregateType::Payment => Self::Payment(serde_json::from_value(data)?),
            AggregateType::Approval => Self::Approval(serde_json::from_value(data)?),
            AggregateType::Settlement => Self::Settlement(serde_json::from_value(data)?),
        })
    }

    /// The booking the entity belongs to (none for a user).
    pub fn booking_id(&self) -> Option<Uuid> {
        match self {
            Self::User(_) => None,
            Self::Booking(b) => Some(b.id),
            Self::Payment(p) => Some(p.booking_id),
            Self::Approval(a) => Some(a.booking_id),
            Self::Settlement(s) => Some(s.booking_id),
        }
    }
}

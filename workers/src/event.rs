//! Parsing the CloudEvents envelope of an incoming message once.

use entrip_common::{domain::EventType, views::EntityView};
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use crate::runtime::Message;

/// The fields the workers rely on; the rest of the envelope is ignored.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Event {
    pub(crate) id: Uuid,
    #[serde(rename = "type")]
    pub(crate) kind: String,
    #[serde(default)]
    pub(crate) data: Value,
}

impl Event {
    /// The envelope, or why the message is poison.
    pub(crate) fn parse(msg: &Message) -> Result<Self, String> {
        let event: Event = serde_json::from_slice(&msg.body)
            .map_err(|e| format!("not a CloudEvents JSON object with id and type: {e}"))?;
        if let Some(kind) = &msg.kind
            && kind != &event.kind
        {
            return Err(format!(
                "type property {kind} differs from the body's {}",
                event.kind
            ));
        }
        Ok(event)
    }

    /// The event's type, or why the message is poison (a type this build
    /// does not know).
    pub(crate) fn event_type(&self) -> Result<EventType, String> {
        EventType::parse(&self.kind).map_err(|e| format!("unknown event type {}: {e}", self.kind))
    }

    /// `data` as the typed view the event's type carries, or why the
    /// message is poison.
    pub(crate) fn view(&self) -> Result<EntityView, String> {
        let kind = self.event_type()?;
        EntityView::parse(kind, self.data.clone()).map_err(|e| {
            format!(
                "{}: data is not the {} view of the type: {e}",
                self.kind,
                kind.aggregate()
            )
        })
    }
}

//! Parsing the CloudEvents envelope of an incoming message once.

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

    /// A UUID field of `data`, or why the message is poison.
    pub(crate) fn data_uuid(&self, field: &str) -> Result<Uuid, String> {
        self.data
            .get(field)
            .and_then(Value::as_str)
            .and_then(|s| Uuid::parse_str(s).ok())
            .ok_or_else(|| format!("{}: data.{field} is missing or not a UUID", self.kind))
    }
}

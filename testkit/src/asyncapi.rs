//! The messaging contract, `docs/asyncapi.yaml`, as a test oracle: checks a
//! message the fleet published (its AMQP properties, its headers table and
//! its body) against the messages the contract lists for a channel.
//!
//! The contract's own `$ref`s (`#/components/...`) and its references to
//! `docs/schemas/**.json` resolve locally; nothing is fetched. A message's
//! traits are applied as AsyncAPI 3.0 says (the message's own fields win),
//! and `x-amqp-properties` is the contract's object for the AMQP properties
//! (docs/asyncapi.yaml's description says why).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Mutex, OnceLock},
};

use jsonschema::{Registry, Validator};
use lapin::{
    BasicProperties,
    message::Delivery,
    types::{AMQPValue, FieldTable},
};
use serde_json::{Map, Value, json};

/// A consumed AMQP message, as JSON for the contract's schemas.
#[derive(Debug, Clone)]
pub struct AmqpMessage {
    /// The basic properties that are set, by their AMQP names
    /// (`message_id`, `type`, `content_type`, …).
    pub properties: Value,
    /// The headers table (an empty object when there is none).
    pub headers: Value,
    pub body: Vec<u8>,
}

impl AmqpMessage {
    pub fn of(delivery: &Delivery) -> Self {
        Self::new(&delivery.properties, &delivery.data)
    }

    pub fn new(props: &BasicProperties, body: &[u8]) -> Self {
        let mut p = Map::new();
        let mut text = |name: &str, v: Option<&lapin::types::ShortString>| {
            if let Some(v) = v {
                p.insert(name.into(), Value::String(v.as_str().to_owned()));
            }
        };
        text("content_type", props.content_type().as_ref());
        text("content_encoding", props.content_encoding().as_ref());
        text("correlation_id", props.correlation_id().as_ref());
        text("reply_to", props.reply_to().as_ref());
        text("expiration", props.expiration().as_ref());
        text("message_id", props.message_id().as_ref());
        text("type", props.kind().as_ref());
        text("user_id", props.user_id().as_ref());
        text("app_id", props.app_id().as_ref());
        text("cluster_id", props.cluster_id().as_ref());
        if let Some(mode) = props.delivery_mode() {
            p.insert("delivery_mode".into(), json!(mode));
        }
        if let Some(priority) = props.priority() {
            p.insert("priority".into(), json!(priority));
        }
        if let Some(ts) = props.timestamp() {
            p.insert("timestamp".into(), json!(ts));
        }
        Self {
            properties: Value::Object(p),
            headers: props.headers().as_ref().map_or(json!({}), table),
            body: body.to_vec(),
        }
    }

    /// The body as JSON, or (not JSON) as a string of its bytes: a schema
    /// that constrains the body then refuses it, one that does not (a DLQ
    /// keeps poison as it came) accepts it.
    fn body_value(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&self.body).into_owned()))
    }
}

fn table(t: &FieldTable) -> Value {
    Value::Object(
        t.inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), amqp_value(v)))
            .collect(),
    )
}

fn amqp_value(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Float(f) => json!(f),
        AMQPValue::Double(f) => json!(f),
        AMQPValue::DecimalValue(d) => json!(format!("{d:?}")),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(amqp_value).collect()),
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::FieldTable(t) => table(t),
        AMQPValue::ByteArray(b) => json!(b.as_slice()),
        AMQPValue::Void => Value::Null,
    }
}

/// `docs/asyncapi.yaml`, loaded once per test binary.
pub struct AsyncApi {
    doc: Value,
    uri: String,
    registry: Registry<'static>,
    validators: Mutex<HashMap<String, std::sync::Arc<Validator>>>,
}

/// The contract of this checkout.
pub fn contract() -> &'static AsyncApi {
    static CONTRACT: OnceLock<AsyncApi> = OnceLock::new();
    CONTRACT.get_or_init(|| {
        AsyncApi::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/asyncapi.yaml"))
            .unwrap_or_else(|e| panic!("docs/asyncapi.yaml: {e}"))
    })
}

fn file_uri(path: &Path) -> Result<String, String> {
    let path = path
        .canonicalize()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    url::Url::from_file_path(&path)
        .map(String::from)
        .map_err(|()| format!("{} is not an absolute path", path.display()))
}

fn json_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
    for entry in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.is_dir() {
            json_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "json") {
            out.push(path);
        }
    }
    Ok(())
}

/// A `$ref` of the contract, made absolute (validators are compiled from
/// fragments of it, which have no base of their own).
fn absolute_refs(schema: &Value, base: &str) -> Value {
    match schema {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => (k.clone(), json!(resolve(base, r))),
                    _ => (k.clone(), absolute_refs(v, base)),
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(|v| absolute_refs(v, base)).collect()),
        other => other.clone(),
    }
}

fn resolve(base: &str, reference: &str) -> String {
    url::Url::parse(base)
        .and_then(|b| b.join(reference))
        .map_or_else(|_| reference.to_owned(), String::from)
}

/// Whether `name` fits `address`, each `{parameter}` of which stands for
/// one or more characters.
fn address_matches(address: &str, name: &str) -> bool {
    match address.split_once('{') {
        None => address == name,
        Some((head, rest)) => {
            let Some(tail) = name.strip_prefix(head) else {
                return false;
            };
            let rest = rest.split_once('}').map_or("", |(_, r)| r);
            (1..=tail.len())
                .filter(|&i| tail.is_char_boundary(i))
                .any(|i| address_matches(rest, &tail[i..]))
        }
    }
}

impl AsyncApi {
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        let doc: Value = serde_norway::from_str(&text).map_err(|e| e.to_string())?;
        let uri = file_uri(path)?;
        let mut files = Vec::new();
        let dir = path.parent().ok_or("no directory")?;
        json_files(&dir.join("schemas"), &mut files)?;
        let mut builder = Registry::new()
            .add(uri.as_str(), doc.clone())
            .map_err(|e| e.to_string())?;
        for file in files {
            let schema: Value = serde_json::from_slice(
                &std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?,
            )
            .map_err(|e| format!("{}: {e}", file.display()))?;
            builder = builder
                .add(file_uri(&file)?.as_str(), schema)
                .map_err(|e| e.to_string())?;
        }
        let registry = builder.prepare().map_err(|e| e.to_string())?;
        Ok(Self {
            doc,
            uri,
            registry,
            validators: Mutex::new(HashMap::new()),
        })
    }

    /// The object a local `$ref` (`#/…`) points at, or `v` itself.
    fn deref<'a>(&'a self, v: &'a Value) -> Result<&'a Value, String> {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) if r.starts_with("#/") => self
                .doc
                .pointer(&r[1..])
                .ok_or_else(|| format!("dangling $ref {r}")),
            _ => Ok(v),
        }
    }

    /// The validator of a schema found at `pointer` in the contract.
    fn validator(&self, pointer: &str) -> Result<std::sync::Arc<Validator>, String> {
        let mut cache = self.validators.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = cache.get(pointer) {
            return Ok(v.clone());
        }
        let schema = self
            .doc
            .pointer(pointer)
            .ok_or_else(|| format!("nothing at {pointer}"))?;
        let validator = jsonschema::draft202012::options()
            .should_validate_formats(true)
            .with_registry(&self.registry)
            .build(&absolute_refs(schema, &self.uri))
            .map_err(|e| format!("{pointer}: {e}"))?;
        let validator = std::sync::Arc::new(validator);
        cache.insert(pointer.to_owned(), validator.clone());
        Ok(validator)
    }

    fn errors(&self, pointer: &str, instance: &Value) -> Result<Vec<String>, String> {
        Ok(self
            .validator(pointer)?
            .iter_errors(instance)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect())
    }

    /// Checks `msg` against one message of the contract, by its key under
    /// `components/messages`: every error, or none.
    pub fn check_message(&self, key: &str, msg: &AmqpMessage) -> Result<Vec<String>, String> {
        let base = format!("/components/messages/{key}");
        let message = self
            .doc
            .pointer(&base)
            .ok_or_else(|| format!("no message {key} in the contract"))?;
        // Where each part is specified: the message's own field, else that of
        // its first trait that has one (AsyncAPI 3.0: the message wins).
        let mut sources = vec![base.clone()];
        for t in message
            .get("traits")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            match t.get("$ref").and_then(Value::as_str) {
                Some(r) if r.starts_with("#/") => sources.push(r[1..].to_owned()),
                _ => return Err(format!("{key}: a trait that is not a local $ref: {t}")),
            }
        }
        let find = |field: &str| -> Option<String> {
            sources
                .iter()
                .find(|s| {
                    self.doc
                        .pointer(&format!("{s}/{field}"))
                        .is_some_and(|v| !v.is_null())
                })
                .map(|s| format!("{s}/{field}"))
        };
        let mut errors = Vec::new();
        if let Some(p) = find("payload") {
            errors.extend(
                self.errors(&p, &msg.body_value())?
                    .into_iter()
                    .map(|e| format!("body: {e}")),
            );
        }
        match find("headers") {
            Some(p) => errors.extend(
                self.errors(&p, &msg.headers)?
                    .into_iter()
                    .map(|e| format!("headers: {e}")),
            ),
            None if msg.headers.as_object().is_some_and(|h| !h.is_empty()) => {
                errors.push(format!("headers: none specified, got {}", msg.headers));
            }
            None => {}
        }
        if let Some(p) = find("x-amqp-properties") {
            errors.extend(
                self.errors(&p, &msg.properties)?
                    .into_iter()
                    .map(|e| format!("properties: {e}")),
            );
        }
        if let Some(p) = find("contentType") {
            let want = self.doc.pointer(&p);
            let got = msg.properties.get("content_type");
            if want != got {
                errors.push(format!("content_type {got:?}, the contract says {want:?}"));
            }
        }
        Ok(errors)
    }

    /// Checks `msg` against the messages of channel `channel` (its key under
    /// `channels`): the key of the one it matches, or why it matches none.
    pub fn check(&self, channel: &str, msg: &AmqpMessage) -> Result<String, String> {
        let messages = self
            .doc
            .pointer(&format!("/channels/{channel}/messages"))
            .and_then(Value::as_object)
            .ok_or_else(|| format!("no channel {channel} with messages in the contract"))?;
        let mut why = Vec::new();
        for m in messages.values() {
            let key = match m.get("$ref").and_then(Value::as_str) {
                Some(r) => r
                    .strip_prefix("#/components/messages/")
                    .ok_or_else(|| format!("{channel}: a message that is not a component: {r}"))?,
                None => return Err(format!("{channel}: an inline message: {m}")),
            };
            self.deref(m)?;
            let errors = self.check_message(key, msg)?;
            if errors.is_empty() {
                return Ok(key.to_owned());
            }
            why.push(format!("{key}: {}", errors.join("; ")));
        }
        Err(format!(
            "matches none of channel {channel}'s messages:\n  {}\nthe message: properties {} headers {} body {}",
            why.join("\n  "),
            msg.properties,
            msg.headers,
            String::from_utf8_lossy(&msg.body),
        ))
    }

    /// The channel of queue `queue` (its `address`, where a `{parameter}`
    /// stands for any text), for [`Self::check`].
    pub fn queue_channel(&self, queue: &str) -> Result<String, String> {
        let channels = self
            .doc
            .get("channels")
            .and_then(Value::as_object)
            .ok_or("no channels")?;
        channels
            .iter()
            .filter(|(_, c)| {
                c.pointer("/bindings/amqp/is").and_then(Value::as_str) == Some("queue")
            })
            .find(|(_, c)| {
                c.get("address")
                    .and_then(Value::as_str)
                    .is_some_and(|a| address_matches(a, queue))
            })
            .map(|(k, _)| k.clone())
            .ok_or_else(|| format!("no channel of the contract is queue {queue}"))
    }

    /// The `name` of message `key` (for an event, its type).
    pub fn message_name(&self, key: &str) -> Option<&str> {
        self.doc
            .pointer(&format!("/components/messages/{key}/name"))
            .and_then(Value::as_str)
    }

    /// A message taken from queue `queue`, checked against the messages of
    /// its channel; panics with the reasons.
    pub fn assert_from_queue(&self, queue: &str, msg: &AmqpMessage) -> String {
        let channel = self.queue_channel(queue).unwrap_or_else(|e| panic!("{e}"));
        self.assert(&channel, msg)
    }

    /// [`Self::check`], panicking with the reasons.
    pub fn assert(&self, channel: &str, msg: &AmqpMessage) -> String {
        self.check(channel, msg).unwrap_or_else(|e| panic!("{e}"))
    }
}

#[cfg(test)]
mod tests {
    //! The oracle itself: what it accepts and what it refuses, so that a
    //! test leaning on it cannot pass for want of a check.
    use lapin::types::{AMQPValue, FieldTable, LongString};

    use super::*;

    fn user() -> Value {
        json!({
            "id": "0192e4a0-0000-7000-8000-000000000001",
            "name": "Kim Minji",
            "email": "kim@example.com",
            "phone": "+82 10 1234 5678",
            "createdAt": "2026-12-01T00:00:00.000000Z",
            "updatedAt": "2026-12-01T00:00:00.000000Z",
        })
    }

    fn headers(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    fn reply(content_type: &str, status: AMQPValue, body: &Value) -> AmqpMessage {
        let props = BasicProperties::default()
            .with_content_type(content_type.into())
            .with_correlation_id("c-1".into())
            .with_headers(headers(&[("x-entrip-status", status)]));
        AmqpMessage::new(&props, body.to_string().as_bytes())
    }

    #[test]
    fn every_message_of_every_channel_compiles() {
        let c = contract();
        let channels = c.doc["channels"].as_object().unwrap();
        let empty = AmqpMessage::new(&BasicProperties::default(), b"");
        let mut checked = 0;
        for (name, channel) in channels {
            for m in channel["messages"].as_object().unwrap().values() {
                let key = m["$ref"]
                    .as_str()
                    .unwrap()
                    .strip_prefix("#/components/messages/")
                    .unwrap();
                c.check_message(key, &empty)
                    .unwrap_or_else(|e| panic!("{name}/{key}: {e}"));
                checked += 1;
            }
        }
        assert!(checked >= 20, "{checked} messages");
    }

    #[test]
    fn a_reply_matches_by_its_body_and_nothing_else_passes() {
        let c = contract();
        let ok = reply("application/json", AMQPValue::LongInt(201), &user());
        assert_eq!(c.check("ingestReplies", &ok), Ok("userReply".into()));

        let mut missing = user();
        missing.as_object_mut().unwrap().remove("phone");
        let wrong_status = AMQPValue::LongString(LongString::from("201"));
        let bad = [
            reply("application/json", AMQPValue::LongInt(201), &missing),
            reply("application/json", wrong_status, &user()),
            reply("application/problem+json", AMQPValue::LongInt(201), &user()),
            AmqpMessage::new(
                &BasicProperties::default().with_content_type("application/json".into()),
                user().to_string().as_bytes(),
            ),
            reply(
                "application/json",
                AMQPValue::LongInt(201),
                &json!("not an object"),
            ),
        ];
        for msg in bad {
            let err = c.check("ingestReplies", &msg).unwrap_err();
            assert!(err.contains("matches none"), "{err}");
        }
    }

    #[test]
    fn a_forwarded_message_needs_a_reason_or_the_brokers_history() {
        let c = contract();
        let forwarded = |h: FieldTable| {
            AmqpMessage::new(
                &BasicProperties::default().with_headers(h),
                b"\xff not json",
            )
        };
        let ours = forwarded(headers(&[
            ("x-entrip-attempt", AMQPValue::LongLongInt(2)),
            ("x-entrip-error", AMQPValue::LongString("503 x".into())),
        ]));
        assert_eq!(
            c.assert_from_queue("entrip.settlement.retry.1000ms", &ours),
            "forwardedEvent"
        );
        let mut death = FieldTable::default();
        death.insert(
            "queue".into(),
            AMQPValue::LongString("entrip.settlement".into()),
        );
        death.insert(
            "reason".into(),
            AMQPValue::LongString("delivery_limit".into()),
        );
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        let brokers = forwarded(headers(&[(
            "x-death",
            AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
        )]));
        assert_eq!(
            c.assert_from_queue("entrip.settlement.dlq", &brokers),
            "forwardedEvent"
        );
        for bad in [
            forwarded(FieldTable::default()),
            forwarded(headers(&[("x-entrip-attempt", AMQPValue::LongLongInt(-1))])),
            forwarded(headers(&[
                ("x-entrip-attempt", AMQPValue::LongLongInt(-1)),
                ("x-entrip-error", AMQPValue::LongString("x".into())),
            ])),
        ] {
            assert!(c.check("settlementDlq", &bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_event_is_checked_against_its_own_type() {
        let c = contract();
        let event = |kind: &str, data: Value| {
            let props = BasicProperties::default()
                .with_message_id("0192e4a0-0000-7000-8000-0000000000aa".into())
                .with_type(kind.into())
                .with_content_type("application/cloudevents+json".into())
                .with_delivery_mode(2)
                .with_timestamp(1_764_547_200);
            let body = json!({
                "specversion": "1.0",
                "id": "0192e4a0-0000-7000-8000-0000000000aa",
                "source": "/entrip/ingest",
                "type": kind,
                "subject": data["id"],
                "time": "2026-12-01T00:00:00.000000Z",
                "datacontenttype": "application/json",
                "data": data,
            });
            AmqpMessage::new(&props, body.to_string().as_bytes())
        };
        let matched = c.assert("events", &event("user.created", user()));
        assert_eq!(c.message_name(&matched), Some("user.created"));
        // A user's data under a booking's type, and a user missing a field.
        assert!(
            c.check("events", &event("booking.created", user()))
                .is_err()
        );
        let mut partial = user();
        partial.as_object_mut().unwrap().remove("email");
        assert!(c.check("events", &event("user.created", partial)).is_err());
    }

    #[test]
    fn addresses_with_parameters() {
        assert!(address_matches("a.retry.{d}ms", "a.retry.1000ms"));
        assert!(!address_matches("a.retry.{d}ms", "a.retry.ms"));
        assert!(!address_matches("a.retry.{d}ms", "b.retry.1ms"));
        assert!(address_matches("a.dlq", "a.dlq"));
        assert!(!address_matches("a.dlq", "a.dlq2"));
        let c = contract();
        assert_eq!(c.queue_channel("entrip.ingest.dlq"), Ok("ingestDlq".into()));
        assert_eq!(
            c.queue_channel("entrip.notifications.retry.300000ms"),
            Ok("notificationsRetry".into())
        );
        assert!(c.queue_channel("entrip.nothing").is_err());
    }
}

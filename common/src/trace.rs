//! W3C trace context (`traceparent`) carried from a request to everything it
//! causes: the outbox row, the published message, the workers' spans, the
//! events the workers emit and the webhook request (docs/DESIGN.md, "HTTP
//! API" and "Events"). Ingest stores the request's value as it came; each
//! worker hop keeps the trace id and names itself as the parent with a span
//! id of its own (docs/rules.md, "One trace from request to webhook").

use std::fmt;

/// The header that carries it, in HTTP and in AMQP messages alike.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// A valid `traceparent` value: `version-traceid-parentid-flags`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    version: String,
    trace_id: String,
    parent_id: String,
    flags: String,
}

impl TraceParent {
    /// The header's value if it is a valid W3C `traceparent`; an invalid
    /// one is ignored, as the W3C recommendation says.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts: Vec<&str> = value.trim().split('-').collect();
        // A later version may add fields after the four that 00 defines.
        if parts.len() > 4 && parts[0] != "00" {
            parts.truncate(4);
        }
        let hex = |s: &str, n: usize| {
            s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
        let [version, trace_id, parent_id, flags] = parts[..] else {
            return None;
        };
        let valid = hex(version, 2)
            && version != "ff"
            && hex(trace_id, 32)
            && nonzero(trace_id)
            && hex(parent_id, 16)
            && nonzero(parent_id)
            && hex(flags, 2);
        valid.then(|| Self {
            version: version.to_owned(),
            trace_id: trace_id.to_owned(),
            parent_id: parent_id.to_owned(),
            flags: flags.to_owned(),
        })
    }

    /// The same trace, with a new span of this hop as the parent: what a
    /// worker passes on to the events it emits and the requests it makes.
    pub fn child(&self) -> Self {
        let mut id = [0u8; 8];
        // Without randomness the hop reuses its parent's span id: the
        // trace still joins up, only one span is not told apart.
        let parent_id = match getrandom::fill(&mut id) {
            Ok(()) if id != [0; 8] => hex::encode(id),
            _ => self.parent_id.clone(),
        };
        // Version 00 defines only the sampled bit; the others are zeroed.
        let sampled = u8::from_str_radix(&self.flags, 16).map_or(0, |f| f & 1);
        Self {
            version: "00".to_owned(),
            trace_id: self.trace_id.clone(),
            parent_id,
            flags: format!("{sampled:02x}"),
        }
    }

    /// The caller's span id (16 hex digits).
    pub fn parent_id(&self) -> &str {
        &self.parent_id
    }

    /// Whether the caller sampled the trace (flag bit 0).
    pub fn sampled(&self) -> bool {
        u8::from_str_radix(&self.flags, 16).is_ok_and(|f| f & 1 == 1)
    }

    /// The 32 hex digits that every hop of the trace shares.
    pub fn trace_id(&self) -> &str {
        &self.trace_id
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}-{}-{}-{}",
            self.version, self.trace_id, self.parent_id, self.flags
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_valid_and_ignores_invalid() {
        let tp = TraceParent::parse(TP).unwrap();
        assert_eq!(tp.to_string(), TP);
        assert_eq!(tp.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        ] {
            assert!(TraceParent::parse(bad).is_none(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_child_keeps_the_trace_and_has_its_own_span() {
        let tp = TraceParent::parse(TP).unwrap();
        let child = tp.child();
        assert_eq!(child.trace_id(), tp.trace_id());
        assert_ne!(child.parent_id, tp.parent_id);
        assert_eq!(child.flags, "01");
        assert_eq!(TraceParent::parse(&child.to_string()), Some(child));
        // A later version's extra field is ignored; unknown flags are not
        // passed on as version 00's.
        let later =
            TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03-extra")
                .unwrap();
        assert_eq!(later.child().flags, "01");
        assert!(TraceParent::parse(&format!("{TP}-extra")).is_none());
    }
}

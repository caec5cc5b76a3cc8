//! W3C trace context as it travels between requester, node and agent in NATS headers, and the
//! record of a function call's span that an agent hands back to the node.
//!
//! Agents do not export spans themselves (a micro-VM guest cannot reach the operator's
//! collector, and the agent links no exporter): they time each call and name its span, and the
//! node, which holds the exporter, records the span with the agent's ids and times.

use serde::{Deserialize, Serialize};

/// The W3C trace context header.
pub const TRACEPARENT: &str = "traceparent";
/// Header on an agent's trigger reply: the span of the call (see [`CallSpan::to_header`]).
pub const HEADER_SPAN: &str = "x-nex-span";

/// A parsed `traceparent`: `00-<trace id, 32 hex>-<parent span id, 16 hex>-<flags, 2 hex>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    pub span_id: u64,
    pub sampled: bool,
}

impl TraceParent {
    /// Parses the header; `None` for anything that is not version 00 with non-zero ids.
    pub fn parse(s: &str) -> Option<TraceParent> {
        let mut p = s.trim().split('-');
        let (v, t, sp, f) = (p.next()?, p.next()?, p.next()?, p.next()?);
        if p.next().is_some() || v != "00" || t.len() != 32 || sp.len() != 16 || f.len() != 2 {
            return None;
        }
        let trace_id = u128::from_str_radix(t, 16).ok().filter(|&t| t != 0)?;
        let span_id = u64::from_str_radix(sp, 16).ok().filter(|&s| s != 0)?;
        let flags = u8::from_str_radix(f, 16).ok()?;
        Some(TraceParent { trace_id, span_id, sampled: flags & 1 == 1 })
    }

    /// The header value.
    pub fn to_header(&self) -> String {
        format!("00-{:032x}-{:016x}-{:02x}", self.trace_id, self.span_id, u8::from(self.sampled))
    }
}

/// A fresh non-zero span id.
pub fn new_span_id() -> u64 {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return id;
        }
    }
}

/// A fresh non-zero trace id.
pub fn new_trace_id() -> u128 {
    loop {
        let id: u128 = rand::random();
        if id != 0 {
            return id;
        }
    }
}

/// One function call as the agent ran it: the span the node records for it.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CallSpan {
    /// Trace the call belongs to (hex, as in `traceparent`).
    #[serde(with = "hex128")]
    pub trace_id: u128,
    /// The span the call ran under, 0 when it started the trace.
    #[serde(with = "hex64", default)]
    pub parent_span_id: u64,
    /// The call's own span: host-service calls made during it have it as parent.
    #[serde(with = "hex64")]
    pub span_id: u64,
    /// Start and end, in nanoseconds since the Unix epoch.
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
}

impl CallSpan {
    /// A call that starts now under `parent` (a new trace when `None`).
    pub fn begin(parent: Option<TraceParent>) -> CallSpan {
        let (trace_id, parent_span_id) = match parent {
            Some(p) => (p.trace_id, p.span_id),
            None => (new_trace_id(), 0),
        };
        CallSpan { trace_id, parent_span_id, span_id: new_span_id(), start_unix_nanos: unix_nanos(), end_unix_nanos: 0 }
    }

    /// Marks the end of the call.
    pub fn end(&mut self) {
        self.end_unix_nanos = unix_nanos().max(self.start_unix_nanos);
    }

    /// The context host-service calls made during this call carry.
    pub fn traceparent(&self) -> String {
        TraceParent { trace_id: self.trace_id, span_id: self.span_id, sampled: true }.to_header()
    }

    /// `<span id> <start> <end>` for [`HEADER_SPAN`] (the trace and parent are the request's).
    pub fn to_header(&self) -> String {
        format!("{:016x} {} {}", self.span_id, self.start_unix_nanos, self.end_unix_nanos)
    }

    /// Reads [`HEADER_SPAN`] of a reply to a request sent with `parent`.
    pub fn from_header(parent: TraceParent, s: &str) -> Option<CallSpan> {
        let mut p = s.split(' ');
        let span_id = u64::from_str_radix(p.next()?, 16).ok().filter(|&s| s != 0)?;
        let start_unix_nanos = p.next()?.parse().ok()?;
        let end_unix_nanos = p.next()?.parse().ok()?;
        let span = CallSpan {
            trace_id: parent.trace_id,
            parent_span_id: parent.span_id,
            span_id,
            start_unix_nanos,
            end_unix_nanos,
        };
        (p.next().is_none() && span.is_plausible()).then_some(span)
    }

    /// Non-zero ids, an end not before the start, and times within a day of now: what the node
    /// checks before it records a span an agent (a process it does not trust) described.
    pub fn is_plausible(&self) -> bool {
        const DAY: u64 = 86_400 * 1_000_000_000;
        let now = unix_nanos();
        self.trace_id != 0
            && self.span_id != 0
            && self.end_unix_nanos >= self.start_unix_nanos
            && self.start_unix_nanos + DAY > now
            && self.end_unix_nanos < now + DAY
    }
}

fn unix_nanos() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

mod hex128 {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &u128, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:032x}"))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        let s = String::deserialize(d)?;
        u128::from_str_radix(&s, 16).map_err(serde::de::Error::custom)
    }
}

mod hex64 {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:016x}"))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = String::deserialize(d)?;
        u64::from_str_radix(&s, 16).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_rejects_what_w3c_rejects() {
        let h = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let p = TraceParent::parse(h).unwrap();
        assert_eq!(p.to_header(), h);
        assert!(p.sampled);
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-zzf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_call_span_header_is_read_back_and_implausible_ones_are_refused() {
        let parent = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let mut s = CallSpan::begin(Some(parent));
        s.end();
        assert_eq!(s.trace_id, parent.trace_id);
        assert_eq!(s.parent_span_id, parent.span_id);
        assert_eq!(CallSpan::from_header(parent, &s.to_header()), Some(s));
        assert!(TraceParent::parse(&s.traceparent()).is_some());
        assert_eq!(CallSpan::from_header(parent, "0000000000000000 1 2"), None);
        assert_eq!(CallSpan::from_header(parent, &format!("{:016x} 5 4", s.span_id)), None);
        assert_eq!(CallSpan::from_header(parent, &format!("{:016x} 1 2", s.span_id)), None, "1970 is not now");
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<CallSpan>(&json).unwrap(), s);
    }
}

//! The Push API's requests as data (docs/protocol.md §6): which operation an
//! `x-sora-target` names, and the validated body of each. No socket here:
//! the server's HTTP shell and the fuzz targets call the same functions.
//!
//! The body is read as a map of raw JSON values: `data` is checked to be
//! an object and passed on as the text the backend sent (key order, big
//! integers, `1e400` and all), never parsed into a tree and printed again.

use crate::Role;
use serde_json::value::RawValue;
use std::collections::HashMap;

/// Which connections a target addresses, by the key it names them with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Channel,
    Client,
    Connection,
    ChannelByRole,
}

/// What an `x-sora-target` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Push(Scope),
    Disconnect(Scope),
    /// `ListConnections` (every connection) or `ListChannelConnections`
    /// (`Scope::Channel`: one channel's).
    List(Option<Scope>),
    /// `GetStatsReport`: server-wide counters.
    StatsReport,
    /// hato's `PushBatch`: several pushes in one call, in order.
    Batch,
    /// hato's `GetChannelHistory`: a channel's kept pushes.
    History,
    /// hato's `Drain`: this node takes no new connections.
    Drain,
}

/// The most pushes one batch may carry.
pub const MAX_BATCH: usize = 1000;

/// Every target hato implements, by name.
pub const TARGETS: [(&str, Operation); 14] = [
    ("Sora_20160711.PushChannel", Operation::Push(Scope::Channel)),
    ("Sora_20160711.PushClient", Operation::Push(Scope::Client)),
    (
        "Sora_20160711.PushConnection",
        Operation::Push(Scope::Connection),
    ),
    (
        "Sora_20201120.PushChannelByRole",
        Operation::Push(Scope::ChannelByRole),
    ),
    (
        "Sora_20151104.DisconnectChannel",
        Operation::Disconnect(Scope::Channel),
    ),
    (
        "Sora_20151104.DisconnectClient",
        Operation::Disconnect(Scope::Client),
    ),
    (
        "Sora_20151104.DisconnectConnection",
        Operation::Disconnect(Scope::Connection),
    ),
    (
        "Sora_20201120.DisconnectChannelByRole",
        Operation::Disconnect(Scope::ChannelByRole),
    ),
    ("Sora_20201013.ListConnections", Operation::List(None)),
    (
        "Sora_20201013.ListChannelConnections",
        Operation::List(Some(Scope::Channel)),
    ),
    ("Sora_20171010.GetStatsReport", Operation::StatsReport),
    ("Hato_20261201.PushBatch", Operation::Batch),
    ("Hato_20261201.GetChannelHistory", Operation::History),
    ("Hato_20261201.Drain", Operation::Drain),
];

impl Operation {
    pub fn from_target(target: &str) -> Option<Operation> {
        TARGETS.iter().find(|(t, _)| *t == target).map(|(_, o)| *o)
    }

    /// The scope whose keys the body must carry; `None` for a
    /// parameterless target, whose body may be empty.
    pub fn scope(self) -> Option<Scope> {
        match self {
            Operation::Push(s) | Operation::Disconnect(s) => Some(s),
            Operation::List(s) => s,
            Operation::StatsReport | Operation::Batch | Operation::History | Operation::Drain => {
                None
            }
        }
    }
}

/// A body that cannot be served: a Sora-style `error_type` and a readable
/// message (always a 400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyError {
    pub error_type: &'static str,
    pub message: String,
}

fn bad(error_type: &'static str, message: impl Into<String>) -> BodyError {
    BodyError {
        error_type,
        message: message.into(),
    }
}

/// Who a call addresses in its channel: everyone, every connection of one
/// `client_id`, one `connection_id`, or one role. Owned (`String`) in a
/// parsed call and between nodes, borrowed (`&str`) for a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "scope", content = "key", rename_all = "lowercase")]
pub enum Audience<S = String> {
    Channel,
    Client(S),
    Connection(S),
    Role(Role),
}

impl<S: AsRef<str>> Audience<S> {
    /// The same audience, borrowed.
    pub fn as_ref(&self) -> Audience<&str> {
        match self {
            Audience::Channel => Audience::Channel,
            Audience::Client(id) => Audience::Client(id.as_ref()),
            Audience::Connection(id) => Audience::Connection(id.as_ref()),
            Audience::Role(role) => Audience::Role(*role),
        }
    }

    /// The same audience, owned.
    pub fn to_owned(&self) -> Audience {
        match self {
            Audience::Channel => Audience::Channel,
            Audience::Client(id) => Audience::Client(id.as_ref().to_owned()),
            Audience::Connection(id) => Audience::Connection(id.as_ref().to_owned()),
            Audience::Role(role) => Audience::Role(*role),
        }
    }
}

/// A validated request body.
#[derive(Debug)]
pub struct Call<'a> {
    pub channel_id: String,
    pub audience: Audience,
    /// For a push: `data`, a JSON object, as sent (its text, unparsed).
    pub data: Option<&'a RawValue>,
    /// For a disconnect: the answer, the keys that named the connections
    /// as sent (`{"channel_id":…,"client_id":…}`).
    pub echo: String,
}

/// Validates the body of `operation`. A parameterless target takes an
/// empty body as `{}` (the Sora SDKs and exporters send none).
pub fn parse(operation: Operation, body: &[u8]) -> Result<Call<'_>, BodyError> {
    let Some(scope) = operation.scope() else {
        if !body.iter().all(u8::is_ascii_whitespace) {
            parse_object(body)?;
        }
        return Ok(Call {
            channel_id: String::new(),
            audience: Audience::Channel,
            data: None,
            echo: String::new(),
        });
    };
    let map = parse_object(body)?;
    parse_scoped(operation, scope, map)
}

fn parse_object(body: &[u8]) -> Result<HashMap<String, &RawValue>, BodyError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| bad("INVALID-JSON", format!("the body is not UTF-8: {e}")))?;
    let value: &RawValue = serde_json::from_str(text)
        .map_err(|e| bad("INVALID-JSON", format!("the body is not JSON: {e}")))?;
    if !is_object(value) {
        return Err(bad("INVALID-BODY", "the body must be a JSON object"));
    }
    serde_json::from_str(value.get())
        .map_err(|e| bad("INVALID-JSON", format!("the body is not JSON: {e}")))
}

fn parse_scoped<'a>(
    operation: Operation,
    scope: Scope,
    map: HashMap<String, &'a RawValue>,
) -> Result<Call<'a>, BodyError> {
    let string = |key: &str| -> Result<String, BodyError> {
        match map.get(key) {
            Some(raw) => serde_json::from_str::<String>(raw.get())
                .map_err(|_| bad("INVALID-TYPE", format!("{key} must be a string"))),
            None => Err(bad("MISSING-KEY", format!("{key} is missing"))),
        }
    };
    let channel_id = string("channel_id")?;
    let audience = match scope {
        Scope::Channel => Audience::Channel,
        Scope::Client => Audience::Client(string("client_id")?),
        Scope::Connection => Audience::Connection(string("connection_id")?),
        Scope::ChannelByRole => {
            let role = string("role")?;
            Audience::Role(Role::parse(&role).ok_or_else(|| {
                bad(
                    "INVALID-ROLE",
                    format!("role must be sendrecv, sendonly or recvonly, not {role:?}"),
                )
            })?)
        }
    };
    let mut call = Call {
        channel_id,
        audience,
        data: None,
        echo: String::new(),
    };
    match operation {
        Operation::Push(_) => {
            call.data = Some(match map.get("data") {
                Some(data) if is_object(data) => *data,
                Some(_) => return Err(bad("INVALID-DATA", "data must be a JSON object")),
                None => return Err(bad("MISSING-KEY", "data is missing")),
            })
        }
        Operation::List(_)
        | Operation::StatsReport
        | Operation::Batch
        | Operation::History
        | Operation::Drain => {}
        Operation::Disconnect(_) => {
            let mut echo = String::from("{");
            for key in ["channel_id", "client_id", "connection_id", "role"] {
                if let Some(v) = map.get(key) {
                    if echo.len() > 1 {
                        echo.push(',');
                    }
                    echo.push('"');
                    echo.push_str(key);
                    echo.push_str("\":");
                    echo.push_str(v.get());
                }
            }
            echo.push('}');
            call.echo = echo;
        }
    }
    Ok(call)
}

/// One item of a batch: its push target and its validated body.
#[derive(Debug)]
pub struct BatchItem<'a> {
    pub target: &'static str,
    pub scope: Scope,
    pub call: Call<'a>,
}

/// The most pushes one `GetChannelHistory` answer carries.
pub const MAX_HISTORY_LIMIT: u64 = 1000;

/// A validated `GetChannelHistory` body.
#[derive(Debug, PartialEq, Eq)]
pub struct HistoryQuery {
    pub channel_id: String,
    /// Pushes after this offset (default 0: from the oldest kept).
    pub since_offset: u64,
    /// At most this many (default 100, at most [`MAX_HISTORY_LIMIT`]).
    pub limit: usize,
}

/// Validates a `GetChannelHistory` body: `channel_id`, and optionally
/// `since_offset` and `limit`.
pub fn parse_history(body: &[u8]) -> Result<HistoryQuery, BodyError> {
    let map = parse_object(body)?;
    let channel_id = match map.get("channel_id") {
        Some(raw) => serde_json::from_str::<String>(raw.get())
            .map_err(|_| bad("INVALID-TYPE", "channel_id must be a string"))?,
        None => return Err(bad("MISSING-KEY", "channel_id is missing")),
    };
    let number = |key: &str, default: u64, max: u64| -> Result<u64, BodyError> {
        match map.get(key) {
            None => Ok(default),
            Some(raw) => serde_json::from_str::<u64>(raw.get())
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| {
                    bad(
                        "INVALID-TYPE",
                        format!("{key} must be an integer from 0 to {max}"),
                    )
                }),
        }
    };
    Ok(HistoryQuery {
        channel_id,
        since_offset: number("since_offset", 0, u64::MAX)?,
        limit: number("limit", 100, MAX_HISTORY_LIMIT)? as usize,
    })
}

/// Validates a `PushBatch` body, `{"pushes": [{"target": …, …that
/// target's body}, …]}`: every item before any is carried out. An error
/// names the item (`pushes[3]: data is missing`).
pub fn parse_batch(body: &[u8]) -> Result<Vec<BatchItem<'_>>, BodyError> {
    let map = parse_object(body)?;
    let items: Vec<&RawValue> = match map.get("pushes") {
        Some(raw) => serde_json::from_str(raw.get())
            .map_err(|_| bad("INVALID-TYPE", "pushes must be an array of objects"))?,
        None => return Err(bad("MISSING-KEY", "pushes is missing")),
    };
    if items.is_empty() || items.len() > MAX_BATCH {
        return Err(bad(
            "INVALID-BATCH",
            format!(
                "pushes must hold 1 to {MAX_BATCH} items, not {}",
                items.len()
            ),
        ));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let at = |e: BodyError| BodyError {
                error_type: e.error_type,
                message: format!("pushes[{i}]: {}", e.message),
            };
            let fields = parse_object(item.get().as_bytes()).map_err(at)?;
            let name = match fields.get("target") {
                Some(raw) => serde_json::from_str::<String>(raw.get())
                    .map_err(|_| at(bad("INVALID-TYPE", "target must be a string")))?,
                None => return Err(at(bad("MISSING-KEY", "target is missing"))),
            };
            let Some((target, Operation::Push(scope))) = TARGETS
                .iter()
                .find(|(t, _)| *t == name)
                .map(|(t, o)| (*t, *o))
            else {
                return Err(at(bad(
                    "UNKNOWN-TARGET",
                    format!("{name:?} is not a push target"),
                )));
            };
            let call = parse_scoped(Operation::Push(scope), scope, fields).map_err(at)?;
            Ok(BatchItem {
                target,
                scope,
                call,
            })
        })
        .collect()
}

/// Whether a (valid) JSON text is an object.
fn is_object(value: &RawValue) -> bool {
    value.get().trim_start().starts_with('{')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_is_passed_through_as_sent() {
        let body = br#"{"channel_id":"c","data":{"z":1, "n":12345678901234567890123,"x":1e400}}"#;
        let call = parse(Operation::Push(Scope::Channel), body).unwrap();
        assert_eq!(
            call.data.map(RawValue::get),
            Some(r#"{"z":1, "n":12345678901234567890123,"x":1e400}"#)
        );
    }

    #[test]
    fn every_rule_has_its_error_type() {
        let push = Operation::Push(Scope::ChannelByRole);
        for (body, want) in [
            (&b"\xff"[..], "INVALID-JSON"),
            (b"{", "INVALID-JSON"),
            (b"[]", "INVALID-BODY"),
            (br#"{"role":"recvonly","data":{}}"#, "MISSING-KEY"),
            (
                br#"{"channel_id":1,"role":"recvonly","data":{}}"#,
                "INVALID-TYPE",
            ),
            (
                br#"{"channel_id":"c","role":"x","data":{}}"#,
                "INVALID-ROLE",
            ),
            (
                br#"{"channel_id":"c","role":"recvonly","data":[]}"#,
                "INVALID-DATA",
            ),
            (br#"{"channel_id":"c","role":"recvonly"}"#, "MISSING-KEY"),
        ] {
            assert_eq!(parse(push, body).unwrap_err().error_type, want, "{body:?}");
        }
    }

    #[test]
    fn parameterless_targets_take_an_empty_body() {
        for body in [&b""[..], b"  ", b"{}", br#"{"x":1}"#] {
            assert!(parse(Operation::StatsReport, body).is_ok(), "{body:?}");
            assert!(parse(Operation::List(None), body).is_ok(), "{body:?}");
        }
        assert_eq!(
            parse(Operation::List(None), b"[").unwrap_err().error_type,
            "INVALID-JSON"
        );
        let list = Operation::List(Some(Scope::Channel));
        assert_eq!(parse(list, b"").unwrap_err().error_type, "INVALID-JSON");
        assert_eq!(
            parse(list, br#"{"channel_id":"c"}"#).unwrap().channel_id,
            "c"
        );
    }

    #[test]
    fn a_batch_is_validated_whole_and_names_the_bad_item() {
        let ok = br#"{"pushes":[{"target":"Sora_20160711.PushChannel","channel_id":"c","data":{"n":1}},
            {"target":"Sora_20160711.PushConnection","channel_id":"c","connection_id":"x","data":{"n":2}}]}"#;
        let items = parse_batch(ok).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[1].call.data.map(RawValue::get), Some(r#"{"n":2}"#));
        let bad_item =
            br#"{"pushes":[{"target":"Sora_20160711.PushChannel","channel_id":"c","data":{}},
            {"target":"Sora_20160711.PushChannel","channel_id":"c"}]}"#;
        let e = parse_batch(bad_item).unwrap_err();
        assert_eq!(
            (e.error_type, e.message.as_str()),
            ("MISSING-KEY", "pushes[1]: data is missing")
        );
        let not_push =
            br#"{"pushes":[{"target":"Sora_20151104.DisconnectChannel","channel_id":"c"}]}"#;
        assert_eq!(
            parse_batch(not_push).unwrap_err().error_type,
            "UNKNOWN-TARGET"
        );
        assert_eq!(
            parse_batch(br#"{"pushes":[]}"#).unwrap_err().error_type,
            "INVALID-BATCH"
        );
    }

    #[test]
    fn history_queries_take_defaults_and_refuse_bad_numbers() {
        assert_eq!(
            parse_history(br#"{"channel_id":"c"}"#).unwrap(),
            HistoryQuery {
                channel_id: "c".into(),
                since_offset: 0,
                limit: 100
            }
        );
        let q = parse_history(br#"{"channel_id":"c","since_offset":7,"limit":1000}"#).unwrap();
        assert_eq!((q.since_offset, q.limit), (7, 1000));
        for bad in [
            &br#"{"channel_id":"c","limit":1001}"#[..],
            br#"{"channel_id":"c","since_offset":-1}"#,
            br#"{"channel_id":"c","limit":"5"}"#,
        ] {
            assert_eq!(parse_history(bad).unwrap_err().error_type, "INVALID-TYPE");
        }
        assert_eq!(parse_history(b"{}").unwrap_err().error_type, "MISSING-KEY");
    }

    #[test]
    fn disconnect_echoes_the_keys_as_sent() {
        let body = br#"{"client_id":"a\u0062","channel_id":"c","x":1}"#;
        let call = parse(Operation::Disconnect(Scope::Client), body).unwrap();
        assert_eq!(call.audience, Audience::Client("ab".into()));
        assert_eq!(call.echo, r#"{"channel_id":"c","client_id":"a\u0062"}"#);
    }
}

//! Messages on the signaling WebSocket and the system DataChannels.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The DataChannels hato opens for DataChannel signaling, in the order they
/// are created, with their `direction` as the client sees it (§4.1).
pub const SYSTEM_LABELS: [(&str, &str); 4] = [
    ("signaling", "sendrecv"),
    ("notify", "recvonly"),
    ("push", "recvonly"),
    ("stats", "sendrecv"),
];

/// A client → server message, on the WebSocket or a DataChannel.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage {
    /// Kept as JSON: it is validated by [`crate::ConnectRequest`].
    Connect(Value),
    Answer {
        sdp: String,
    },
    Candidate(Candidate),
    Pong,
    /// `stats` on the `stats` DataChannel (CPP's reply to a stats ping).
    Stats,
    Disconnect {
        reason: Option<String>,
    },
    ReAnswer {
        sdp: String,
    },
    /// A known JSON object whose `type` hato does not act on.
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Candidate {
    #[serde(default)]
    pub candidate: String,
    #[serde(rename = "sdpMid")]
    pub sdp_mid: Option<String>,
    #[serde(rename = "sdpMLineIndex")]
    pub sdp_mline_index: Option<u16>,
    #[serde(rename = "usernameFragment")]
    pub username_fragment: Option<String>,
}

/// Why a client message could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageError(pub String);

impl std::fmt::Display for MessageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MessageError {}

fn field<T: serde::de::DeserializeOwned>(
    v: &Value,
    key: &str,
    ty: &str,
) -> Result<T, MessageError> {
    let raw = v
        .get(key)
        .ok_or_else(|| MessageError(format!("{ty} without {key}")))?;
    serde_json::from_value(raw.clone()).map_err(|e| MessageError(format!("{ty}.{key}: {e}")))
}

impl ClientMessage {
    /// Parses one text (or inflated binary) frame.
    pub fn parse(bytes: &[u8]) -> Result<ClientMessage, MessageError> {
        let v: Value = serde_json::from_slice(bytes)
            .map_err(|e| MessageError(format!("invalid JSON: {e}")))?;
        let ty = v
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| MessageError("message without a string \"type\"".into()))?
            .to_owned();
        Ok(match ty.as_str() {
            "connect" => ClientMessage::Connect(v),
            "answer" => ClientMessage::Answer {
                sdp: field(&v, "sdp", "answer")?,
            },
            "re-answer" => ClientMessage::ReAnswer {
                sdp: field(&v, "sdp", "re-answer")?,
            },
            "candidate" => ClientMessage::Candidate(
                serde_json::from_value(v).map_err(|e| MessageError(format!("candidate: {e}")))?,
            ),
            "pong" => ClientMessage::Pong,
            "stats" => ClientMessage::Stats,
            "disconnect" => ClientMessage::Disconnect {
                reason: v.get("reason").and_then(Value::as_str).map(str::to_owned),
            },
            _ => ClientMessage::Other(ty),
        })
    }
}

/// One entry of the offer's `data_channels` (§2.1: CPP needs `label` and
/// `compress`, RS also `direction`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DataChannelSpec {
    pub label: String,
    pub direction: String,
    pub compress: bool,
    pub ordered: bool,
}

impl DataChannelSpec {
    pub fn system(compress: bool) -> Vec<DataChannelSpec> {
        SYSTEM_LABELS
            .iter()
            .map(|(label, direction)| DataChannelSpec {
                label: (*label).to_owned(),
                direction: (*direction).to_owned(),
                compress,
                ordered: true,
            })
            .collect()
    }
}

/// The server's `offer` (§2.1), with every field some SDK requires.
#[derive(Debug, Clone, Serialize)]
pub struct Offer {
    #[serde(rename = "type")]
    pub ty: &'static str,
    pub sdp: String,
    pub channel_id: String,
    pub session_id: String,
    pub connection_id: String,
    pub client_id: String,
    pub bundle_id: String,
    pub simulcast: bool,
    pub spotlight: bool,
    pub multistream: bool,
    pub config: Value,
    pub data_channel_signaling: bool,
    pub ignore_disconnect_websocket: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_channels: Option<Vec<DataChannelSpec>>,
    /// The auth webhook's `metadata`, for the client (§7.1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    pub version: &'static str,
}

impl Offer {
    /// `config.iceServers` is an empty array: CPP crashes on a STUN entry
    /// without `username`/`credential`, and hato needs no relay (§2.1).
    pub fn ice_config() -> Value {
        json!({ "iceServers": [] })
    }
}

/// `{"type":"ping","stats":false}`; `stats` is always a bool (§3.4).
pub fn ping() -> String {
    r#"{"type":"ping","stats":false}"#.to_owned()
}

/// `{"type":"switched","ignore_disconnect_websocket":…}` (§3.9).
pub fn switched(ignore_disconnect_websocket: bool) -> String {
    json!({"type": "switched", "ignore_disconnect_websocket": ignore_disconnect_websocket})
        .to_string()
}

/// `{"type":"redirect","location":…}`: connect there instead (§3.10).
pub fn redirect(location: &str) -> String {
    json!({"type": "redirect", "location": location}).to_string()
}

/// `{"type":"close","code":…,"reason":…}` on the `signaling` DataChannel (§3.11).
pub fn close(code: u16, reason: &str) -> String {
    json!({"type": "close", "code": code, "reason": reason}).to_string()
}

/// `{"type":"push","data":…,"hato":{"epoch":…,"offset":…}}`, serialised
/// once per push: `data` exactly as the API received it (its text), then
/// the push's place in its channel's order (§3.7).
pub fn push_json(data_json: &str, epoch: &str, offset: u64) -> String {
    let epoch = serde_json::to_string(epoch).expect("a string serialises");
    let mut out = String::with_capacity(data_json.len() + epoch.len() + 64);
    out.push_str(r#"{"type":"push","data":"#);
    out.push_str(data_json);
    out.push_str(r#","hato":{"epoch":"#);
    out.push_str(&epoch);
    out.push_str(r#","offset":"#);
    out.push_str(&offset.to_string());
    out.push_str("}}");
    out
}

/// What a joiner that asked to recover is told first, as a `push` with
/// an empty `data`: whether everything it missed follows (`gap` null), and
/// the channel's position as it joined.
pub fn recovery_json(gap: Option<&str>, epoch: &str, offset: u64) -> String {
    json!({
        "type": "push",
        "data": {},
        "hato": {"recovery": {"complete": gap.is_none(), "gap": gap, "epoch": epoch, "offset": offset}},
    })
    .to_string()
}

/// Fields of one connection as `notify` messages describe it (§3.6).
#[derive(Debug, Clone)]
pub struct NotifyConnection<'a> {
    pub role: crate::Role,
    pub session_id: &'a str,
    pub channel_id: &'a str,
    pub client_id: &'a str,
    pub bundle_id: &'a str,
    pub connection_id: &'a str,
    pub meta: &'a NotifyMetadata,
}

/// What `notify` shows of a connection besides its ids: its
/// `signaling_notify_metadata` (as `metadata`) and what the auth webhook
/// said of it (`authn_metadata`, `authz_metadata`).
///
/// Serialisable, for the nodes of a cluster to tell each other.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NotifyMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authn_metadata: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authz_metadata: Option<Value>,
}

impl NotifyMetadata {
    /// Sets the keys present on a `notify` or a `data` entry.
    pub fn write_into(&self, v: &mut Value, with_metadata: bool) {
        if let (Some(m), true) = (&self.metadata, with_metadata) {
            v["metadata"] = m.clone();
        }
        if let Some(m) = &self.authn_metadata {
            v["authn_metadata"] = m.clone();
        }
        if let Some(m) = &self.authz_metadata {
            v["authz_metadata"] = m.clone();
        }
    }
}

/// Channel head-counts after the event, as `channel_*_connections`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelCounts {
    pub all: usize,
    pub sendrecv: usize,
    pub sendonly: usize,
    pub recvonly: usize,
}

/// A `notify` for a `connection.*` event. `data` is the list of connections
/// already present, sent only in a peer's own `connection.created`.
pub fn notify_connection(
    event_type: &str,
    who: &NotifyConnection<'_>,
    counts: ChannelCounts,
    timestamp: &str,
    data: Option<Vec<Value>>,
) -> String {
    let mut v = json!({
        "type": "notify",
        "event_type": event_type,
        "role": who.role.as_str(),
        "timestamp": timestamp,
        "session_id": who.session_id,
        "channel_id": who.channel_id,
        "client_id": who.client_id,
        "bundle_id": who.bundle_id,
        "connection_id": who.connection_id,
        "audio": false,
        "video": false,
        "minutes": 0,
        "channel_connections": counts.all,
        "channel_sendrecv_connections": counts.sendrecv,
        "channel_sendonly_connections": counts.sendonly,
        "channel_recvonly_connections": counts.recvonly,
        "turn_transport_type": "udp",
    });
    who.meta.write_into(&mut v, true);
    if let Some(d) = data {
        v["data"] = Value::Array(d);
    }
    v.to_string()
}

/// The metadata of others that one joiner's own `connection.created`
/// carries at most, in bytes of JSON; the entries beyond carry their ids.
pub const PRESENT_METADATA_BUDGET: usize = 256 * 1024;

/// The `data` of a joiner's own `connection.created` (§4.2): everyone
/// present, `(client_id, connection_id, metadata)` each, with their
/// `signaling_notify_metadata` while the `budget` in bytes lasts, so that
/// joining a big channel cannot build a message of N × the metadata
/// limit. Returns the list and how many entries went without metadata.
pub fn present_list<'a>(
    present: impl Iterator<Item = (&'a str, &'a str, &'a NotifyMetadata)>,
    mut budget: usize,
) -> (Vec<Value>, usize) {
    let mut without_metadata = 0;
    let list = present
        .map(|(client_id, connection_id, meta)| {
            let mut v = json!({"client_id": client_id, "connection_id": connection_id});
            let mut with_metadata = true;
            if let Some(m) = &meta.metadata {
                let len = m.to_string().len();
                if len <= budget {
                    budget -= len;
                } else {
                    with_metadata = false;
                    without_metadata += 1;
                }
            }
            meta.write_into(&mut v, with_metadata);
            v
        })
        .collect();
    (list, without_metadata)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_present_list_carries_metadata_within_its_budget() {
        let meta = |m: Option<Value>| NotifyMetadata {
            metadata: m,
            authn_metadata: Some(json!("n")),
            authz_metadata: None,
        };
        let small = meta(Some(json!("12345678"))); // 10 bytes of JSON
        let none = meta(None);
        let entries = [
            ("a", "1", &small),
            ("b", "2", &none),
            ("c", "3", &small),
            ("d", "4", &small),
        ];
        let (list, without) = present_list(entries.iter().map(|&(c, i, m)| (c, i, m)), 25);
        assert_eq!(without, 1);
        assert_eq!(list[0]["metadata"], "12345678");
        assert!(list[1].get("metadata").is_none());
        assert_eq!(list[2]["metadata"], "12345678");
        // Over the budget: ids and the webhook's metadata, not its own.
        assert!(list[3].get("metadata").is_none());
        assert_eq!(list[3]["connection_id"], "4");
        assert_eq!(list[3]["authn_metadata"], "n");
    }

    #[test]
    fn candidates_from_every_sdk() {
        // JS: toJSON() plus a type.
        let js = br#"{"type":"candidate","candidate":"candidate:1 1 udp 2122260223 127.0.0.1 5000 typ host","sdpMid":"0","sdpMLineIndex":0,"usernameFragment":"abcd"}"#;
        match ClientMessage::parse(js).unwrap() {
            ClientMessage::Candidate(c) => {
                assert_eq!(c.sdp_mid.as_deref(), Some("0"));
                assert_eq!(c.sdp_mline_index, Some(0));
            }
            other => panic!("{other:?}"),
        }
        // CPP/PY and RS: only the candidate line.
        let cpp = br#"{"type":"candidate","candidate":"candidate:1 1 udp 1 127.0.0.1 5 typ host"}"#;
        assert!(
            matches!(ClientMessage::parse(cpp).unwrap(), ClientMessage::Candidate(c) if c.sdp_mid.is_none())
        );
        // Firefox's empty end-of-candidates.
        let empty = br#"{"type":"candidate","candidate":""}"#;
        assert!(
            matches!(ClientMessage::parse(empty).unwrap(), ClientMessage::Candidate(c) if c.candidate.is_empty())
        );
    }

    #[test]
    fn bad_messages_are_errors_not_panics() {
        for bad in [
            &b"not json"[..],
            b"[]",
            b"{}",
            b"{\"type\":5}",
            b"{\"type\":\"answer\"}",
            b"{\"type\":\"answer\",\"sdp\":1}",
            b"{\"type\":\"candidate\",\"candidate\":7}",
            b"\xff\xfe",
        ] {
            assert!(
                ClientMessage::parse(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            ClientMessage::parse(br#"{"type":"whatever"}"#).unwrap(),
            ClientMessage::Other("whatever".into())
        );
        assert_eq!(
            ClientMessage::parse(br#"{"type":"disconnect","reason":"NO-ERROR"}"#).unwrap(),
            ClientMessage::Disconnect {
                reason: Some("NO-ERROR".into())
            }
        );
    }

    #[test]
    fn offer_has_every_required_field() {
        let offer = Offer {
            ty: "offer",
            sdp: "v=0".into(),
            channel_id: "c".into(),
            session_id: "s".into(),
            connection_id: "id".into(),
            client_id: "id".into(),
            bundle_id: "id".into(),
            simulcast: false,
            spotlight: false,
            multistream: false,
            config: Offer::ice_config(),
            data_channel_signaling: true,
            ignore_disconnect_websocket: false,
            data_channels: Some(DataChannelSpec::system(false)),
            metadata: None,
            version: "hato",
        };
        let v: Value = serde_json::to_value(&offer).unwrap();
        assert_eq!(v["type"], "offer");
        assert!(v["config"]["iceServers"].as_array().unwrap().is_empty());
        assert_eq!(v["simulcast"], false);
        let dcs = v["data_channels"].as_array().unwrap();
        let labels: Vec<_> = dcs.iter().map(|d| d["label"].as_str().unwrap()).collect();
        assert_eq!(labels, ["signaling", "notify", "push", "stats"]);
        for dc in dcs {
            assert!(dc["compress"].is_boolean());
            assert!(dc["direction"].is_string());
        }
    }

    #[test]
    fn push_keeps_data_as_sent_and_carries_its_place() {
        let data = r#"{ "a":1,"b":"ü\"","c":[null]}"#;
        let text = push_json(data, "ep\"och", 42);
        assert!(text.starts_with(&format!(r#"{{"type":"push","data":{data},"#)));
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v,
            json!({"type": "push", "data": {"a": 1, "b": "ü\"", "c": [null]},
                   "hato": {"epoch": "ep\"och", "offset": 42}})
        );
        let r: Value = serde_json::from_str(&recovery_json(Some("expired"), "e", 7)).unwrap();
        assert_eq!(r["data"], json!({}));
        assert_eq!(
            r["hato"]["recovery"],
            json!({"complete": false, "gap": "expired", "epoch": "e", "offset": 7})
        );
    }

    #[test]
    fn notify_carries_event_type_and_connection_id() {
        let who = NotifyConnection {
            role: crate::Role::Recvonly,
            session_id: "s",
            channel_id: "c",
            client_id: "cl",
            bundle_id: "b",
            connection_id: "id",
            meta: &NotifyMetadata::default(),
        };
        let counts = ChannelCounts {
            all: 1,
            recvonly: 1,
            ..Default::default()
        };
        let v: Value = serde_json::from_str(&notify_connection(
            "connection.created",
            &who,
            counts,
            "2026-01-01T00:00:00Z",
            Some(vec![]),
        ))
        .unwrap();
        assert_eq!(v["event_type"], "connection.created");
        assert_eq!(v["connection_id"], "id");
        assert_eq!(v["channel_recvonly_connections"], 1);
        assert_eq!(v["data"], json!([]));
    }
}

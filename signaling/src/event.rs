//! The event webhook's payloads (docs/protocol.md §7.2): what a backend
//! is told when a connection is created, destroyed, or failed before it
//! was ever up.

use crate::message::ChannelCounts;
use crate::session::Mode;
use crate::Role;
use serde_json::{json, Value};

/// Which event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Created,
    Destroyed,
    /// The session ended before the peer joined the table.
    Failed,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Created => "connection.created",
            Kind::Destroyed => "connection.destroyed",
            Kind::Failed => "connection.failed",
        }
    }
}

/// Who the connection is.
pub struct Identity<'a> {
    pub role: Role,
    pub channel_id: &'a str,
    pub session_id: &'a str,
    pub client_id: &'a str,
    pub bundle_id: &'a str,
    pub connection_id: &'a str,
    /// The auth webhook's `event_metadata`, sent with every event.
    pub event_metadata: Option<&'a Value>,
}

/// Where the server and the moment come from.
pub struct Stamp<'a> {
    pub node_name: &'a str,
    pub version: &'a str,
    pub timestamp: &'a str,
    pub id: &'a str,
}

/// What happened to the connection.
pub struct Facts<'a> {
    pub counts: ChannelCounts,
    pub mode: Mode,
    /// When it joined, and whole minutes since (once it was up).
    pub joined: Option<(&'a str, u64)>,
    /// Why it ended (destroyed and failed).
    pub reason: Option<String>,
}

/// The event's JSON body.
pub fn payload(kind: Kind, who: &Identity<'_>, stamp: &Stamp<'_>, facts: Facts<'_>) -> String {
    let mut data = json!({
        "audio": false,
        "video": false,
        "channel_connections": facts.counts.all,
        "channel_sendrecv_connections": facts.counts.sendrecv,
        "channel_sendonly_connections": facts.counts.sendonly,
        "channel_recvonly_connections": facts.counts.recvonly,
        "turn_transport_type": "udp",
        "data_channel_signaling": facts.mode.data_channel_signaling,
        "ignore_disconnect_websocket": facts.mode.ignore_disconnect_websocket,
    });
    if let Some((created, minutes)) = facts.joined {
        data["created_time"] = json!(created);
        data["minutes"] = json!(minutes);
    }
    if let Some(reason) = facts.reason {
        data["reason"] = json!(reason);
        if kind == Kind::Destroyed {
            data["destroyed_time"] = json!(stamp.timestamp);
        }
    }
    let mut event = json!({
        "type": kind.as_str(),
        "timestamp": stamp.timestamp,
        "id": stamp.id,
        "label": "hato",
        "node_name": stamp.node_name,
        "version": stamp.version,
        "role": who.role.as_str(),
        "channel_id": who.channel_id,
        "session_id": who.session_id,
        "client_id": who.client_id,
        "bundle_id": who.bundle_id,
        "connection_id": who.connection_id,
        "multistream": false,
        "simulcast": false,
        "spotlight": false,
        "data": data,
    });
    if let Some(m) = who.event_metadata {
        event["event_metadata"] = m.clone();
    }
    event.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(kind: Kind, joined: Option<(&str, u64)>, reason: Option<&str>) -> Value {
        let meta = json!({"k": 1});
        let who = Identity {
            role: Role::Recvonly,
            channel_id: "ch",
            session_id: "s",
            client_id: "c",
            bundle_id: "b",
            connection_id: "id",
            event_metadata: Some(&meta),
        };
        let stamp = Stamp {
            node_name: "n",
            version: "1",
            timestamp: "T",
            id: "E",
        };
        let facts = Facts {
            counts: ChannelCounts {
                all: 2,
                sendrecv: 0,
                sendonly: 1,
                recvonly: 1,
            },
            mode: Mode {
                data_channel_signaling: true,
                ignore_disconnect_websocket: false,
                compress: false,
                libwebrtc: false,
            },
            joined,
            reason: reason.map(str::to_owned),
        };
        serde_json::from_str(&payload(kind, &who, &stamp, facts)).unwrap()
    }

    #[test]
    fn each_event_carries_what_happened() {
        let created = body(Kind::Created, Some(("C", 0)), None);
        assert_eq!(created["type"], "connection.created");
        assert_eq!(created["event_metadata"]["k"], 1);
        assert_eq!(created["data"]["created_time"], "C");
        assert_eq!(created["data"]["channel_sendonly_connections"], 1);
        assert_eq!(created["data"]["data_channel_signaling"], true);
        assert!(created["data"].get("reason").is_none());
        let destroyed = body(Kind::Destroyed, Some(("C", 3)), Some("NO-ERROR"));
        assert_eq!(destroyed["data"]["minutes"], 3);
        assert_eq!(destroyed["data"]["reason"], "NO-ERROR");
        assert_eq!(destroyed["data"]["destroyed_time"], "T");
        // Failed: never up, so no created_time, and no destroyed_time.
        let failed = body(Kind::Failed, None, Some("4490"));
        assert_eq!(failed["type"], "connection.failed");
        assert!(failed["data"].get("created_time").is_none());
        assert!(failed["data"].get("destroyed_time").is_none());
    }
}

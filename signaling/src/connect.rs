//! Validation of the client's `connect` message (docs/protocol.md §1.2).
//!
//! Only the fields a push server acts on are typed; every media option and
//! unknown key is accepted and ignored, because the SDKs send them by
//! default (JS: `audio: true`, `video: true`, `sdp`, `metadata: null`).

use serde::Deserialize;
use serde_json::Value;
use std::fmt;

/// Longest `channel_id`, `client_id` or `bundle_id` Sora accepts, in bytes.
pub const MAX_ID_BYTES: usize = 255;

/// A connection's role. A push server treats all three alike except for
/// `PushChannelByRole` routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Sendrecv,
    Sendonly,
    Recvonly,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Sendrecv, Role::Sendonly, Role::Recvonly];

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "sendrecv" => Some(Role::Sendrecv),
            "sendonly" => Some(Role::Sendonly),
            "recvonly" => Some(Role::Recvonly),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Sendrecv => "sendrecv",
            Role::Sendonly => "sendonly",
            Role::Recvonly => "recvonly",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a `connect` was refused; the text becomes the WebSocket close reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectError(pub String);

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConnectError {}

/// The wire shape; `Option<Value>` where the SDKs disagree on the type so
/// that the error message can say which key was wrong.
#[derive(Deserialize)]
struct RawConnect {
    role: Option<Value>,
    channel_id: Option<Value>,
    client_id: Option<Value>,
    bundle_id: Option<Value>,
    // `metadata` is not kept (unknown keys are skipped): the server reads
    // it from the message text, as sent, for the auth webhook only.
    signaling_notify_metadata: Option<Value>,
    data_channel_signaling: Option<Value>,
    ignore_disconnect_websocket: Option<Value>,
    sora_client: Option<Value>,
    libwebrtc: Option<Value>,
    redirect: Option<Value>,
}

/// A validated `connect`.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectRequest {
    pub role: Role,
    pub channel_id: String,
    /// `None` when absent or empty: the server then uses the connection id.
    pub client_id: Option<String>,
    pub bundle_id: Option<String>,
    pub signaling_notify_metadata: Option<Value>,
    /// `None` when the client left the choice to the server's default.
    pub data_channel_signaling: Option<bool>,
    pub ignore_disconnect_websocket: Option<bool>,
    pub sora_client: Option<String>,
    /// The libwebrtc version the native SDKs (C++, Python, Rust, iOS,
    /// Android) name; browsers do not send it.
    pub libwebrtc: Option<String>,
    /// `"redirect": true`: sent again after a `redirect` (§3.10).
    pub redirect: bool,
}

fn optional_id(value: Option<Value>, key: &str) -> Result<Option<String>, ConnectError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if s.len() > MAX_ID_BYTES => Err(ConnectError(format!(
            "{key} is longer than {MAX_ID_BYTES} bytes"
        ))),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ConnectError(format!("{key} must be a string"))),
    }
}

fn optional_bool(value: Option<Value>, key: &str) -> Result<Option<bool>, ConnectError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(b)),
        Some(_) => Err(ConnectError(format!("{key} must be a boolean"))),
    }
}

impl ConnectRequest {
    /// The transports this connect gets: DataChannel signaling, and
    /// `ignore_disconnect_websocket`, each as the connect (or the auth
    /// webhook's override of it) says, else the server's default; the
    /// second only ever with the first (docs/protocol.md §4).
    pub fn transports(&self, default_dc: bool, default_ignore: bool) -> (bool, bool) {
        let dc = self.data_channel_signaling.unwrap_or(default_dc);
        let ignore = dc && self.ignore_disconnect_websocket.unwrap_or(default_ignore);
        (dc, ignore)
    }

    /// Validates a parsed JSON object whose `type` is `connect`.
    pub fn from_value(value: Value) -> Result<ConnectRequest, ConnectError> {
        if !value.is_object() {
            return Err(ConnectError("connect must be a JSON object".into()));
        }
        let raw: RawConnect =
            serde_json::from_value(value).map_err(|e| ConnectError(format!("bad connect: {e}")))?;
        let role = match raw.role {
            Some(Value::String(s)) => Role::parse(&s).ok_or_else(|| {
                // Not echoed whole: the reason goes into a log line.
                let shown: String = s.chars().take(16).collect();
                ConnectError(format!(
                    "role must be sendrecv, sendonly or recvonly, not {shown:?}{}",
                    if shown.len() < s.len() { "…" } else { "" }
                ))
            })?,
            Some(_) => return Err(ConnectError("role must be a string".into())),
            None => return Err(ConnectError("role is missing".into())),
        };
        let channel_id = match raw.channel_id {
            Some(Value::String(s)) if s.is_empty() => {
                return Err(ConnectError("channel_id is empty".into()))
            }
            Some(Value::String(s)) if s.len() > MAX_ID_BYTES => {
                return Err(ConnectError(format!(
                    "channel_id is longer than {MAX_ID_BYTES} bytes"
                )))
            }
            Some(Value::String(s)) => s,
            Some(_) => return Err(ConnectError("channel_id must be a string".into())),
            None => return Err(ConnectError("channel_id is missing".into())),
        };
        let redirect = optional_bool(raw.redirect, "redirect")?.unwrap_or(false);
        Ok(ConnectRequest {
            redirect,
            role,
            channel_id,
            client_id: optional_id(raw.client_id, "client_id")?,
            bundle_id: optional_id(raw.bundle_id, "bundle_id")?,
            signaling_notify_metadata: raw.signaling_notify_metadata.filter(|v| !v.is_null()),
            data_channel_signaling: optional_bool(
                raw.data_channel_signaling,
                "data_channel_signaling",
            )?,
            ignore_disconnect_websocket: optional_bool(
                raw.ignore_disconnect_websocket,
                "ignore_disconnect_websocket",
            )?,
            sora_client: match raw.sora_client {
                Some(Value::String(s)) => Some(s),
                _ => None,
            },
            libwebrtc: match raw.libwebrtc {
                Some(Value::String(s)) => Some(s),
                _ => None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<ConnectRequest, ConnectError> {
        ConnectRequest::from_value(v)
    }

    /// What the connect says wins over the defaults; without DataChannel
    /// signaling there is no WebSocket to ignore.
    #[test]
    fn transports_take_the_defaults_only_where_the_connect_is_silent() {
        let c = |extra: Value| {
            let mut v = json!({"type": "connect", "role": "recvonly", "channel_id": "c"});
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            parse(v).unwrap()
        };
        assert_eq!(c(json!({})).transports(false, true), (false, false));
        assert_eq!(c(json!({})).transports(true, true), (true, true));
        let dc = c(json!({"data_channel_signaling": true}));
        assert_eq!(dc.transports(false, false), (true, false));
        let both = c(json!({"data_channel_signaling": true, "ignore_disconnect_websocket": true}));
        assert_eq!(both.transports(false, false), (true, true));
        let ignore_only = c(json!({"ignore_disconnect_websocket": true}));
        assert_eq!(ignore_only.transports(false, false), (false, false));
        let no_dc = c(json!({"data_channel_signaling": false}));
        assert_eq!(no_dc.transports(true, true), (false, false));
    }

    /// The shape sora-js-sdk 2026.1 sends (`createSignalingMessage`):
    /// `metadata: null`, `audio`/`video` true, a throwaway `sdp`.
    #[test]
    fn js_sdk_connect() {
        let c = parse(json!({
            "type": "connect", "role": "recvonly", "channel_id": "sora",
            "metadata": null, "sdp": "v=0\r\n...", "audio": true, "video": true,
            "sora_client": "Sora JavaScript SDK 2026.1.0",
            "environment": "Mozilla/5.0 ...", "data_channel_signaling": false
        }))
        .unwrap();
        assert_eq!(c.role, Role::Recvonly);
        assert_eq!(c.channel_id, "sora");
        assert_eq!(c.client_id, None);
        assert_eq!(c.data_channel_signaling, Some(false));
        assert_eq!(
            c.sora_client.as_deref(),
            Some("Sora JavaScript SDK 2026.1.0")
        );
    }

    /// The shape sora-cpp-sdk (and so the Python SDK) sends: media options
    /// as objects, `libwebrtc`, no `sdp`, DC flags explicit.
    #[test]
    fn python_cpp_sdk_connect() {
        let c = parse(json!({
            "type": "connect", "role": "sendrecv", "channel_id": "ch",
            "client_id": "c1", "sora_client": "Sora Python SDK 2025.5.0",
            "libwebrtc": "Shiguredo-build M138", "environment": "[x86_64] Linux",
            "audio": {"codec_type": "OPUS", "opus_params": {"channels": 2}},
            "video": false, "multistream": true,
            "data_channel_signaling": true, "ignore_disconnect_websocket": true,
            "data_channels": [{"label": "#spam", "direction": "sendrecv"}]
        }))
        .unwrap();
        assert_eq!(c.role, Role::Sendrecv);
        assert_eq!(c.client_id.as_deref(), Some("c1"));
        assert_eq!(c.data_channel_signaling, Some(true));
        assert_eq!(c.ignore_disconnect_websocket, Some(true));
        assert_eq!(c.libwebrtc.as_deref(), Some("Shiguredo-build M138"));
    }

    /// sora-rust-sdk may omit `audio`, `video` and `metadata` entirely.
    #[test]
    fn rust_sdk_connect() {
        let c = parse(json!({
            "type": "connect", "role": "sendonly", "channel_id": "ch",
            "sora_client": "Sora Rust SDK", "libwebrtc": "m138",
            "signaling_notify_metadata": {"name": "x"}
        }))
        .unwrap();
        assert_eq!(c.role, Role::Sendonly);
        assert_eq!(c.data_channel_signaling, None);
        assert_eq!(c.signaling_notify_metadata, Some(json!({"name": "x"})));
    }

    #[test]
    fn rejections_say_why() {
        let cases = [
            (json!({"role": "recvonly"}), "channel_id is missing"),
            (
                json!({"role": "recvonly", "channel_id": ""}),
                "channel_id is empty",
            ),
            (
                json!({"role": "recvonly", "channel_id": 5}),
                "channel_id must be a string",
            ),
            (json!({"role": "x", "channel_id": "a"}), "role must be"),
            (json!({"channel_id": "a"}), "role is missing"),
            (
                json!({"role": "recvonly", "channel_id": "a".repeat(256)}),
                "longer than 255",
            ),
            (
                json!({"role": "recvonly", "channel_id": "a", "client_id": "b".repeat(256)}),
                "client_id is longer",
            ),
            (
                json!({"role": "recvonly", "channel_id": "a", "bundle_id": 1}),
                "bundle_id must be a string",
            ),
            (
                json!({"role": "recvonly", "channel_id": "a", "data_channel_signaling": "yes"}),
                "data_channel_signaling must be a boolean",
            ),
            (json!([1]), "JSON object"),
        ];
        for (v, want) in cases {
            let err = parse(v.clone()).unwrap_err();
            assert!(err.0.contains(want), "{v}: {err} lacks {want}");
        }
    }

    #[test]
    fn limits_are_inclusive() {
        let ok = json!({"role": "recvonly", "channel_id": "a".repeat(255), "client_id": "c".repeat(255)});
        assert!(parse(ok).is_ok());
        let empty_client = parse(json!({"role": "recvonly", "channel_id": "a", "client_id": ""}));
        assert_eq!(empty_client.unwrap().client_id, None);
    }
}

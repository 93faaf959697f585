//! Before the offer: from the client's first message to the decision to
//! offer, as plain functions (docs/protocol.md §1.2, §7.1).
//!
//! [`read`] validates `connect` and its metadata limits; the shell then
//! asks the auth webhook (if any) with [`Pending::auth_request`] and hands
//! the answer back as a [`Verdict`] to [`Pending::decide`], which applies
//! the overrides and decides the connection's [`Mode`] once. The shell
//! does the waiting (the address's turn, the webhook call) and nothing
//! else; every refusal's reason is decided here.

use crate::connect::ConnectRequest;
use crate::message::{ChannelCounts, ClientMessage};
use crate::session::Mode;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

/// The server's settings that decide admission.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// `metadata` of `connect`, at most, in bytes as sent.
    pub connect_metadata_limit: usize,
    /// `signaling_notify_metadata`, at most, in bytes of JSON.
    pub notify_metadata_limit: usize,
    /// Defaults for a `connect` silent on the transports.
    pub data_channel_signaling: bool,
    pub ignore_disconnect_websocket: bool,
    /// System DataChannels zlib-framed when DataChannel signaling is on.
    pub compress: bool,
}

/// What a joiner asks to be given of the pushes it missed
/// (`metadata.hato_recover`, or the auth webhook's `hato_recover`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recover {
    /// `{"epoch": …, "offset": …}`: every push after that one, the last it
    /// saw.
    After { epoch: String, offset: u64 },
    /// `{"last": n}`: the last `n` pushes kept.
    Last(usize),
}

/// The most pushes `{"last": n}` asks for.
pub const MAX_LAST: u64 = 1 << 20;

impl Recover {
    pub fn from_value(v: &Value) -> Result<Recover, String> {
        let bad = || {
            "hato_recover must be {\"epoch\": string, \"offset\": integer} or {\"last\": integer}"
                .to_owned()
        };
        let map = v.as_object().ok_or_else(bad)?;
        match (map.get("epoch"), map.get("offset"), map.get("last")) {
            (Some(Value::String(epoch)), Some(offset), None) if epoch.len() <= 64 => {
                Ok(Recover::After {
                    epoch: epoch.clone(),
                    offset: offset.as_u64().ok_or_else(bad)?,
                })
            }
            (None, None, Some(last)) => match last.as_u64() {
                Some(n) if n <= MAX_LAST => Ok(Recover::Last(n as usize)),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

/// A `connect` that passed validation, waiting for its verdict.
#[derive(Debug)]
pub struct Pending<'a> {
    pub connect: ConnectRequest,
    recover: Option<Recover>,
    /// `metadata.access_token`, when it is a string.
    access_token: Option<String>,
    /// `metadata` exactly as the client sent it: only the auth webhook
    /// reads it, spliced into its request, never parsed and printed again.
    metadata: Option<&'a str>,
    environment: Option<Value>,
}

/// The auth webhook's answer, as the shell received it.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// `{"allowed": true, …}`: the rest of the object are the overrides.
    Allowed(Map<String, Value>),
    /// `{"allowed": false, "reason": …}`.
    Denied(String),
    /// No usable answer (timeout, error status, not JSON): the reason the
    /// client sees.
    Failed(String),
}

impl Verdict {
    /// Reads the webhook's 200 answer: an object whose `allowed` is a
    /// boolean (§7.1); anything else is a failure.
    pub fn from_answer(bytes: &[u8]) -> Verdict {
        let Ok(Value::Object(mut map)) = serde_json::from_slice::<Value>(bytes) else {
            return Verdict::bad_answer();
        };
        match map.remove("allowed") {
            Some(Value::Bool(true)) => Verdict::Allowed(map),
            Some(Value::Bool(false)) => Verdict::Denied(match map.remove("reason") {
                Some(Value::String(r)) if !r.is_empty() => r,
                _ => "AUTH-WEBHOOK-DENIED".into(),
            }),
            _ => Verdict::bad_answer(),
        }
    }

    fn bad_answer() -> Verdict {
        Verdict::Failed(
            "AUTH-WEBHOOK-ERROR: the answer is not a JSON object with a boolean allowed".into(),
        )
    }
}

/// Why a connect is refused, and the reason the client sees (close code
/// 4490).
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not a valid `connect`, or over a limit.
    Invalid(String),
    /// The auth webhook said no.
    Denied(String),
    /// The auth webhook gave no usable answer.
    WebhookFailed(String),
    /// The webhook allowed it with an override hato cannot apply.
    BadOverride(String),
}

impl Refusal {
    pub fn reason(&self) -> &str {
        match self {
            Refusal::Invalid(r)
            | Refusal::Denied(r)
            | Refusal::WebhookFailed(r)
            | Refusal::BadOverride(r) => r,
        }
    }
}

/// What the auth webhook granted beyond `connect`'s own fields.
#[derive(Debug, Default)]
pub struct Granted {
    /// The offer's `metadata`.
    pub offer_metadata: Option<Value>,
    pub authn_metadata: Option<Value>,
    pub authz_metadata: Option<Value>,
    /// Sent with every event webhook of the connection.
    pub event_metadata: Option<Value>,
    /// `signaling_notify: false`: told nothing of others' joins and leaves.
    pub no_notify: bool,
}

/// A connection hato will offer to.
#[derive(Debug)]
pub struct Admitted {
    pub connect: ConnectRequest,
    pub granted: Granted,
    /// What the joiner is replayed before the live pushes.
    pub recover: Option<Recover>,
    /// Decided here, once, from `connect`, the overrides and the defaults.
    pub mode: Mode,
}

/// What the shell knows that the auth webhook's request carries.
pub struct Context<'a> {
    pub connection_id: &'a str,
    pub node_name: &'a str,
    pub version: &'a str,
    pub timestamp: &'a str,
    pub request_id: &'a str,
    /// The channel's connections now.
    pub counts: ChannelCounts,
}

/// Validates the client's first message: a `connect` (§1.2) within the
/// metadata limits.
pub fn read<'a>(text: &'a str, settings: &Settings) -> Result<Pending<'a>, Refusal> {
    let connect = match ClientMessage::parse(text.as_bytes()) {
        Ok(ClientMessage::Connect(v)) => {
            ConnectRequest::from_value(v).map_err(|e| Refusal::Invalid(e.0))?
        }
        Ok(_) => return Err(Refusal::Invalid("the first message must be connect".into())),
        Err(e) => return Err(Refusal::Invalid(e.0)),
    };
    #[derive(serde::Deserialize)]
    struct Raw<'a> {
        #[serde(borrow)]
        metadata: Option<&'a RawValue>,
        environment: Option<Value>,
    }
    let raw: Option<Raw<'_>> = serde_json::from_str(text).ok();
    let (metadata, environment) = match raw {
        Some(r) => (r.metadata.map(RawValue::get), r.environment),
        None => (None, None),
    };
    let metadata_len = metadata.map_or(0, str::len);
    if metadata_len > settings.connect_metadata_limit {
        return Err(Refusal::Invalid(format!(
            "metadata is {metadata_len} bytes; at most {} (--connect-metadata-limit)",
            settings.connect_metadata_limit
        )));
    }
    if let Some(m) = &connect.signaling_notify_metadata {
        let len = serde_json::to_string(m).map_or(usize::MAX, |t| t.len());
        if len > settings.notify_metadata_limit {
            return Err(Refusal::Invalid(format!(
                "signaling_notify_metadata is {len} bytes; at most {} (--notify-metadata-limit)",
                settings.notify_metadata_limit
            )));
        }
    }
    // `hato_recover` and `access_token` in metadata; the rest of metadata
    // is the webhook's.
    let object = metadata
        .filter(|m| m.contains("hato_recover") || m.contains("access_token"))
        .and_then(|m| match serde_json::from_str::<Value>(m) {
            Ok(Value::Object(o)) => Some(o),
            _ => None,
        });
    let recover = match object.as_ref().and_then(|o| o.get("hato_recover")) {
        None | Some(Value::Null) => None,
        Some(v) => Some(Recover::from_value(v).map_err(Refusal::Invalid)?),
    };
    let access_token = object
        .as_ref()
        .and_then(|o| o.get("access_token"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    Ok(Pending {
        connect,
        recover,
        access_token,
        metadata,
        environment,
    })
}

impl Pending<'_> {
    /// `metadata.access_token`, if the client sent one.
    pub fn access_token(&self) -> Option<&str> {
        self.access_token.as_deref()
    }

    /// The auth webhook's request (§7.1): what hato knows of the peer, and
    /// `metadata` as the client sent it.
    pub fn auth_request(&self, settings: &Settings, cx: &Context<'_>) -> String {
        let connect = &self.connect;
        let (dc, ignore_ws) = connect.transports(
            settings.data_channel_signaling,
            settings.ignore_disconnect_websocket,
        );
        let rest = json!({
            "timestamp": cx.timestamp,
            "id": cx.request_id,
            "label": "hato",
            "version": cx.version,
            "node_name": cx.node_name,
            "role": connect.role.as_str(),
            "channel_id": connect.channel_id,
            "client_id": connect.client_id,
            "bundle_id": connect.bundle_id,
            "connection_id": cx.connection_id,
            "signaling_notify_metadata": connect.signaling_notify_metadata,
            "data_channel_signaling": dc,
            "ignore_disconnect_websocket": ignore_ws,
            "sora_client": {
                "raw": connect.sora_client,
                "libwebrtc": connect.libwebrtc,
                "environment": self.environment,
            },
            "audio": false,
            "video": false,
            "multistream": false,
            "simulcast": false,
            "spotlight": false,
            "e2ee": false,
            "channel_connections": cx.counts.all,
            "channel_sendrecv_connections": cx.counts.sendrecv,
            "channel_sendonly_connections": cx.counts.sendonly,
            "channel_recvonly_connections": cx.counts.recvonly,
        })
        .to_string();
        // `rest` is a non-empty object: `{"metadata":<as sent>,` + its keys.
        let metadata = self.metadata.unwrap_or("null");
        format!(r#"{{"metadata":{metadata},{}"#, &rest[1..])
    }

    /// Admits or refuses the connect on the webhook's verdict (`None`
    /// without an auth webhook), and decides its mode.
    pub fn decide(
        self,
        verdict: Option<Verdict>,
        settings: &Settings,
    ) -> Result<Admitted, Refusal> {
        let mut connect = self.connect;
        let mut recover = self.recover;
        let granted = match verdict {
            None => Granted::default(),
            Some(Verdict::Allowed(mut overrides)) => {
                match overrides.remove("hato_recover") {
                    None => {}
                    Some(Value::Null) => recover = None,
                    Some(v) => {
                        recover = Some(Recover::from_value(&v).map_err(|e| {
                            Refusal::BadOverride(format!("AUTH-WEBHOOK-ERROR: {e}"))
                        })?)
                    }
                }
                apply_overrides(&mut connect, overrides).map_err(Refusal::BadOverride)?
            }
            Some(Verdict::Denied(reason)) => return Err(Refusal::Denied(reason)),
            Some(Verdict::Failed(reason)) => return Err(Refusal::WebhookFailed(reason)),
        };
        let (dc, ignore_ws) = connect.transports(
            settings.data_channel_signaling,
            settings.ignore_disconnect_websocket,
        );
        let mode = Mode {
            data_channel_signaling: dc,
            ignore_disconnect_websocket: ignore_ws,
            compress: dc && settings.compress,
            libwebrtc: connect.libwebrtc.is_some(),
        };
        Ok(Admitted {
            connect,
            granted,
            recover,
            mode,
        })
    }
}

/// Applies an `allowed: true` answer's overrides to `connect`; returns
/// the rest. A wrongly typed override refuses the connection: the backend
/// meant something hato cannot do.
fn apply_overrides(
    connect: &mut ConnectRequest,
    mut overrides: Map<String, Value>,
) -> Result<Granted, String> {
    let wrong = |key: &str, want: &str| format!("AUTH-WEBHOOK-ERROR: {key} must be {want}");
    for key in ["client_id", "bundle_id"] {
        match overrides.remove(key) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if !s.is_empty() && s.len() <= crate::connect::MAX_ID_BYTES => {
                if key == "client_id" {
                    connect.client_id = Some(s);
                } else {
                    connect.bundle_id = Some(s);
                }
            }
            Some(_) => return Err(wrong(key, "a string of 1 to 255 bytes")),
        }
    }
    for key in ["data_channel_signaling", "ignore_disconnect_websocket"] {
        match overrides.remove(key) {
            None | Some(Value::Null) => {}
            Some(Value::Bool(b)) => {
                if key == "data_channel_signaling" {
                    connect.data_channel_signaling = Some(b);
                } else {
                    connect.ignore_disconnect_websocket = Some(b);
                }
            }
            Some(_) => return Err(wrong(key, "a boolean")),
        }
    }
    if let Some(m) = overrides.remove("signaling_notify_metadata") {
        connect.signaling_notify_metadata = Some(m).filter(|m| !m.is_null());
    }
    let no_notify = match overrides.remove("signaling_notify") {
        None | Some(Value::Null) | Some(Value::Bool(true)) => false,
        Some(Value::Bool(false)) => true,
        Some(_) => return Err(wrong("signaling_notify", "a boolean")),
    };
    Ok(Granted {
        no_notify,
        offer_metadata: overrides.remove("metadata"),
        authn_metadata: overrides.remove("authn_metadata"),
        authz_metadata: overrides.remove("authz_metadata"),
        event_metadata: overrides.remove("event_metadata"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: Settings = Settings {
        connect_metadata_limit: 32,
        notify_metadata_limit: 16,
        data_channel_signaling: false,
        ignore_disconnect_websocket: false,
        compress: true,
    };

    fn cx(counts: ChannelCounts) -> Context<'static> {
        Context {
            connection_id: "CID",
            node_name: "n1",
            version: "1.0",
            timestamp: "2026-12-05T00:00:00Z",
            request_id: "RID",
            counts,
        }
    }

    fn allowed(v: Value) -> Option<Verdict> {
        Some(Verdict::Allowed(v.as_object().unwrap().clone()))
    }

    const JS: &str = r#"{"type":"connect","role":"recvonly","channel_id":"ch","sdp":"v=0",
        "metadata":{ "b": 1 ,"a":[2]},"environment":{"ua":"x"},"data_channel_signaling":true,
        "sora_client":"Sora JavaScript SDK 2025.1.0"}"#;

    #[test]
    fn answers_read_as_verdicts() {
        assert_eq!(
            Verdict::from_answer(br#"{"allowed":true,"client_id":"x"}"#),
            Verdict::Allowed(serde_json::from_str(r#"{"client_id":"x"}"#).unwrap())
        );
        assert_eq!(
            Verdict::from_answer(br#"{"allowed":false,"reason":"no"}"#),
            Verdict::Denied("no".into())
        );
        assert_eq!(
            Verdict::from_answer(br#"{"allowed":false}"#),
            Verdict::Denied("AUTH-WEBHOOK-DENIED".into())
        );
        for garbage in [&br#"{"allowed":"yes"}"#[..], b"[]", b"nope", b"{}"] {
            assert!(matches!(Verdict::from_answer(garbage), Verdict::Failed(_)));
        }
    }

    #[test]
    fn the_first_message_must_be_a_valid_connect() {
        let bad = |t: &str| match read(t, &SETTINGS) {
            Err(Refusal::Invalid(r)) => r,
            other => panic!("{t}: {other:?}"),
        };
        assert!(bad("not json").contains("JSON"), "{}", bad("not json"));
        assert_eq!(
            bad(r#"{"type":"pong"}"#),
            "the first message must be connect"
        );
        assert!(bad(r#"{"type":"connect","role":"x","channel_id":"c"}"#).contains("role"));
        assert!(read(JS, &SETTINGS).is_ok());
    }

    #[test]
    fn metadata_limits_count_bytes_as_sent() {
        // 31 bytes as sent (spaces included) fits 32; 33 does not.
        let with = |m: &str| {
            format!(r#"{{"type":"connect","role":"recvonly","channel_id":"c","metadata":{m}}}"#)
        };
        let m31 = format!(r#""{}""#, "x".repeat(29));
        assert!(read(&with(&m31), &SETTINGS).is_ok());
        let m33 = format!(r#""{}""#, "x".repeat(31));
        let Err(Refusal::Invalid(r)) = read(&with(&m33), &SETTINGS) else {
            panic!()
        };
        assert_eq!(
            r,
            "metadata is 33 bytes; at most 32 (--connect-metadata-limit)"
        );
        let notify = r#"{"type":"connect","role":"recvonly","channel_id":"c","signaling_notify_metadata":{"k":"0123456789"}}"#;
        let Err(Refusal::Invalid(r)) = read(notify, &SETTINGS) else {
            panic!()
        };
        assert!(
            r.starts_with("signaling_notify_metadata is 18 bytes"),
            "{r}"
        );
    }

    #[test]
    fn the_webhook_request_splices_metadata_as_sent() {
        let p = read(JS, &SETTINGS).unwrap();
        let counts = ChannelCounts {
            all: 3,
            sendrecv: 1,
            sendonly: 0,
            recvonly: 2,
        };
        let body = p.auth_request(&SETTINGS, &cx(counts));
        assert!(
            body.starts_with(r#"{"metadata":{ "b": 1 ,"a":[2]},"#),
            "{body}"
        );
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["connection_id"], "CID");
        assert_eq!(v["data_channel_signaling"], true);
        assert_eq!(v["ignore_disconnect_websocket"], false);
        assert_eq!(v["sora_client"]["environment"]["ua"], "x");
        assert_eq!(v["channel_connections"], 3);
        assert_eq!(v["channel_recvonly_connections"], 2);
        let none = read(
            r#"{"type":"connect","role":"sendonly","channel_id":"c"}"#,
            &SETTINGS,
        )
        .unwrap()
        .auth_request(&SETTINGS, &cx(ChannelCounts::default()));
        assert!(none.starts_with(r#"{"metadata":null,"#));
    }

    #[test]
    fn the_verdict_decides_and_the_mode_is_decided_once() {
        let p = || read(JS, &SETTINGS).unwrap();
        // No webhook: connect and the defaults.
        let a = p().decide(None, &SETTINGS).unwrap();
        assert!(a.mode.data_channel_signaling && a.mode.compress);
        assert!(!a.mode.ignore_disconnect_websocket && !a.mode.libwebrtc);
        // The webhook turns DataChannel signaling off: no compression either.
        let a = p()
            .decide(
                allowed(json!({"data_channel_signaling": false, "client_id": "c9",
                    "metadata": {"m": 1}, "signaling_notify": false, "event_metadata": 5})),
                &SETTINGS,
            )
            .unwrap();
        assert!(!a.mode.data_channel_signaling && !a.mode.compress);
        assert_eq!(a.connect.client_id.as_deref(), Some("c9"));
        assert_eq!(a.granted.offer_metadata, Some(json!({"m": 1})));
        assert_eq!(a.granted.event_metadata, Some(json!(5)));
        assert!(a.granted.no_notify);
        assert_eq!(
            p().decide(Some(Verdict::Denied("no".into())), &SETTINGS)
                .unwrap_err(),
            Refusal::Denied("no".into())
        );
        assert_eq!(
            p().decide(
                Some(Verdict::Failed("AUTH-WEBHOOK-ERROR: 500".into())),
                &SETTINGS
            )
            .unwrap_err()
            .reason(),
            "AUTH-WEBHOOK-ERROR: 500"
        );
    }

    #[test]
    fn a_recovery_is_asked_in_metadata_or_by_the_webhook() {
        let with = |m: &str| {
            format!(r#"{{"type":"connect","role":"recvonly","channel_id":"c","metadata":{m}}}"#)
        };
        let s = Settings {
            connect_metadata_limit: 1024,
            ..SETTINGS
        };
        let t = with(r#"{"token":"x","hato_recover":{"epoch":"e1","offset":41}}"#);
        let a = read(&t, &s).unwrap().decide(None, &s).unwrap();
        assert_eq!(
            a.recover,
            Some(Recover::After {
                epoch: "e1".into(),
                offset: 41
            })
        );
        let t = with(r#"{"hato_recover":{"last":5}}"#);
        let p = read(&t, &s).unwrap();
        let a = p
            .decide(
                allowed(json!({"hato_recover": {"epoch": "e2", "offset": 0}})),
                &s,
            )
            .unwrap();
        assert!(matches!(a.recover, Some(Recover::After { offset: 0, .. })));
        let p = read(&t, &s).unwrap();
        let a = p
            .decide(allowed(json!({"hato_recover": null})), &s)
            .unwrap();
        assert_eq!(a.recover, None);
        assert_eq!(read(&with(r#"{"a":1}"#), &s).unwrap().recover, None);
        for bad in [
            r#"{"hato_recover":{"epoch":"e","offset":-1}}"#,
            r#"{"hato_recover":{"last":"5"}}"#,
            r#"{"hato_recover":{"epoch":"e","offset":1,"last":2}}"#,
            r#"{"hato_recover":7}"#,
        ] {
            match read(&with(bad), &s) {
                Err(Refusal::Invalid(r)) => assert!(r.starts_with("hato_recover must be"), "{r}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        let p = read(&t, &s).unwrap();
        assert!(matches!(
            p.decide(allowed(json!({"hato_recover": {"last": true}})), &s),
            Err(Refusal::BadOverride(_))
        ));
    }

    #[test]
    fn an_override_hato_cannot_apply_refuses() {
        let p = || read(JS, &SETTINGS).unwrap();
        for (bad, key) in [
            (json!({"client_id": 5}), "client_id"),
            (json!({"bundle_id": ""}), "bundle_id"),
            (json!({"client_id": "x".repeat(256)}), "client_id"),
            (
                json!({"ignore_disconnect_websocket": "yes"}),
                "ignore_disconnect_websocket",
            ),
            (json!({"signaling_notify": 0}), "signaling_notify"),
        ] {
            match p().decide(allowed(bad.clone()), &SETTINGS) {
                Err(Refusal::BadOverride(r)) => {
                    assert!(
                        r.starts_with(&format!("AUTH-WEBHOOK-ERROR: {key} must be")),
                        "{r}"
                    )
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
        // null means "as connect said".
        let a = p()
            .decide(
                allowed(json!({"client_id": null, "signaling_notify_metadata": null})),
                &SETTINGS,
            )
            .unwrap();
        assert_eq!(a.connect.client_id, None);
        assert_eq!(a.connect.signaling_notify_metadata, None);
    }
}

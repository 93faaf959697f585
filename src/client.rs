//! A Sora-protocol client: the WebSocket signaling of the SDKs plus the
//! answering side of `hato-datachannel`. The tests and `hato-load` use it
//! to play SDK peers against hato (or against Sora itself).
//!
//! Pings are answered, compressed labels inflated, and everything else is
//! reported as a [`ClientEvent`] with the transport it came on.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hato_datachannel::{Engine, EngineConfig, Peer, PeerEvent};
use hato_signaling::zlib;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// How to connect, and the `connect` message to send.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub url: String,
    pub channel_id: String,
    pub role: String,
    pub client_id: Option<String>,
    pub data_channel_signaling: Option<bool>,
    pub ignore_disconnect_websocket: Option<bool>,
    /// More keys for `connect`, to mimic a particular SDK.
    pub extra: Map<String, Value>,
    /// The engine the client's PeerConnection runs on.
    pub engine: Engine,
    /// Limit on WebSocket connect plus the wait for the offer.
    pub timeout: Duration,
    /// After `switched` with `ignore_disconnect_websocket: true`, close
    /// the WebSocket (a Close frame without a code), as sora-js-sdk does.
    pub close_websocket_after_switch: bool,
    /// Walk away mid-handshake without a word (churn tests):
    /// [`Client::connect`] then returns [`ClientError::Abandoned`].
    pub abandon: Option<Abandon>,
    /// SDP lines added to the end of the answer (tests of what hato does
    /// with an answer's candidates).
    pub extra_answer_lines: String,
    /// The address the signaling TCP connection is made from (a loopback
    /// alias, so that many virtual peers are many clients to the
    /// server's per-address limits). None: the system's choice.
    pub source_ip: Option<std::net::IpAddr>,
}

/// Where a client vanishes during the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abandon {
    /// Once the offer is in, before answering: the WebSocket just drops.
    AfterOffer,
    /// Once the answer is sent: the WebSocket drops and the PeerConnection
    /// is forgotten without a word.
    AfterAnswer,
}

impl ClientOptions {
    pub fn new(url: &str, channel_id: &str, role: &str) -> ClientOptions {
        ClientOptions {
            url: url.to_owned(),
            channel_id: channel_id.to_owned(),
            role: role.to_owned(),
            client_id: None,
            data_channel_signaling: None,
            ignore_disconnect_websocket: None,
            extra: Map::new(),
            engine: default_engine(),
            timeout: Duration::from_secs(10),
            close_websocket_after_switch: false,
            abandon: None,
            extra_answer_lines: String::new(),
            source_ip: None,
        }
    }

    /// The `connect` message, shaped like sora-js-sdk's unless `extra` says otherwise.
    pub fn connect_message(&self) -> Value {
        let mut m = json!({
            "type": "connect",
            "role": self.role,
            "channel_id": self.channel_id,
            "sora_client": "hato client",
            "metadata": null,
            "audio": false,
            "video": false,
        });
        if let Some(c) = &self.client_id {
            m["client_id"] = json!(c);
        }
        if let Some(b) = self.data_channel_signaling {
            m["data_channel_signaling"] = json!(b);
        }
        if let Some(b) = self.ignore_disconnect_websocket {
            m["ignore_disconnect_websocket"] = json!(b);
        }
        for (k, v) in &self.extra {
            m[k] = v.clone();
        }
        m
    }
}

/// The process's client engine, started on first use: a loopback address
/// per peer, one shard per core, shared by every client of the process.
pub fn default_engine() -> Engine {
    static ENGINE: std::sync::OnceLock<Engine> = std::sync::OnceLock::new();
    ENGINE
        .get_or_init(|| Engine::start(EngineConfig::client()).expect("a client WebRTC engine"))
        .clone()
}

/// Which transport a message arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Via {
    WebSocket,
    DataChannel,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::WebSocket => "websocket",
            Via::DataChannel => "datachannel",
        }
    }
}

#[derive(Debug)]
pub enum ClientEvent {
    /// ICE and DTLS are up.
    Connected,
    /// A `ping` on a DataChannel; those on the WebSocket are answered with
    /// `pong` and not reported.
    Ping,
    /// A `push`, as received (the raw JSON text), and when, in µs since the
    /// epoch; `stamp` is what a load test reads of it, taken in the same scan.
    Push {
        text: Bytes,
        via: Via,
        at_us: u64,
        stamp: Stamp,
    },
    Notify {
        message: Value,
        via: Via,
    },
    Switched {
        ignore_disconnect_websocket: bool,
    },
    /// A DataChannel opened.
    Open(String),
    /// The WebSocket closed: the server's code and reason, or 1006 when the
    /// connection dropped without a Close frame.
    WebSocketClosed {
        code: u16,
        reason: String,
    },
    /// `{"type":"close"}` on the `signaling` DataChannel.
    ServerClose {
        code: u16,
        reason: String,
    },
    ChannelClosed(String),
    PeerFailed(String),
    /// Anything else (label or "websocket", raw text).
    Other {
        on: String,
        text: String,
    },
}

#[derive(Debug)]
pub enum ClientError {
    /// The server closed the WebSocket before the offer.
    Refused {
        code: u16,
        reason: String,
    },
    Failed(String),
    /// The server said to connect to another node instead (followed by
    /// [`Client::connect`]).
    Redirected(String),
    /// [`ClientOptions::abandon`] said to walk away, and it did.
    Abandoned,
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Refused { code, reason } => write!(f, "refused with {code} {reason}"),
            ClientError::Failed(e) => f.write_str(e),
            ClientError::Redirected(to) => write!(f, "redirected to {to}"),
            ClientError::Abandoned => f.write_str("abandoned mid-handshake, as asked"),
        }
    }
}

impl std::error::Error for ClientError {}

enum Command {
    Text(String),
    Close(u16, String),
    /// Drop the TCP connection without a Close frame (as CPP does).
    Drop,
    /// Hand pushes to this function instead of the events channel.
    PushSink(PushSink),
}

/// Takes each push a client receives, on the client's own task: its
/// stamp, the transport it came on and when (µs since the epoch).
pub type PushSink = Arc<dyn Fn(&Stamp, Via, u64) + Send + Sync>;

/// A connected client.
pub struct Client {
    pub connection_id: String,
    pub offer: Value,
    /// The answer SDP it sent (its candidate: the address it sends from).
    pub answer: String,
    /// When the offer arrived.
    pub offer_at: std::time::Instant,
    pub events: mpsc::UnboundedReceiver<ClientEvent>,
    peer: Arc<Peer>,
    commands: mpsc::UnboundedSender<Command>,
    compress: bool,
}

/// Wall-clock µs since the epoch: receive times here, send times in `hato-load`.
/// An answer SDP written by hand for hato's DataChannel offer, as a peer
/// that runs no WebRTC stack of its own would send: ICE ufrag `attk` with
/// password `pwd`, a fingerprint no certificate has, DTLS role `setup`
/// (`active` or `passive`), and `extra` lines (candidates, a
/// max-message-size) or none. The attack tools use it.
pub fn hand_made_answer(pwd: &str, setup: &str, extra: &[&str]) -> String {
    let mut lines = vec![
        "v=0".to_owned(),
        "o=- 1 2 IN IP4 127.0.0.1".to_owned(),
        "s=-".to_owned(),
        "t=0 0".to_owned(),
        "a=group:BUNDLE 0".to_owned(),
        "m=application 9 UDP/DTLS/SCTP webrtc-datachannel".to_owned(),
        "c=IN IP4 0.0.0.0".to_owned(),
        "a=mid:0".to_owned(),
        "a=ice-ufrag:attk".to_owned(),
        format!("a=ice-pwd:{pwd}"),
        format!("a=fingerprint:sha-256 {}", ["AB"; 32].join(":")),
        format!("a=setup:{setup}"),
        "a=sctp-port:5000".to_owned(),
    ];
    lines.extend(extra.iter().map(|l| (*l).to_owned()));
    lines.push(String::new());
    lines.join("\r\n")
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn fail(e: impl std::fmt::Display) -> ClientError {
    ClientError::Failed(e.to_string())
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the signaling WebSocket, from `opts.source_ip` when set.
async fn open(
    opts: &ClientOptions,
) -> Result<
    (
        Ws,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    ClientError,
> {
    // tungstenite's default 128 KiB read buffer is zeroed for every read:
    // at 400 000 pushes/s over 1 000 connections that memset was a quarter
    // of hato-load's CPU. Pushes are small; the buffer grows for a larger
    // frame.
    let mut config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default();
    config.read_buffer_size = 4096;
    config.write_buffer_size = 16 * 1024;
    let Some(ip) = opts.source_ip else {
        return tokio_tungstenite::connect_async_with_config(&opts.url, Some(config), false)
            .await
            .map_err(fail);
    };
    let authority = opts
        .url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .ok_or_else(|| fail("a signaling URL without a host"))?;
    let server = tokio::net::lookup_host(authority)
        .await
        .map_err(fail)?
        .next()
        .ok_or_else(|| fail("the signaling host has no address"))?;
    let sock = if ip.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(fail)?;
    sock.bind(std::net::SocketAddr::new(ip, 0)).map_err(fail)?;
    let tcp = sock.connect(server).await.map_err(fail)?;
    let _ = tcp.set_nodelay(true);
    tokio_tungstenite::client_async_with_config(
        opts.url.as_str(),
        tokio_tungstenite::MaybeTlsStream::Plain(tcp),
        Some(config),
    )
    .await
    .map_err(fail)
}

impl Client {
    /// Connects, sends `connect`, answers the offer, following a `redirect`
    /// as the SDKs do (§3.10: to `location`, with `"redirect": true`).
    /// Returns once the answer is sent; watch [`Client::events`] for the
    /// rest.
    pub async fn connect(opts: &ClientOptions) -> Result<Client, ClientError> {
        let mut redirected = opts.clone();
        for _ in 0..3 {
            match Client::connect_once(&redirected).await {
                Err(ClientError::Redirected(location)) => {
                    redirected.url = location;
                    redirected
                        .extra
                        .insert("redirect".into(), Value::Bool(true));
                }
                done => return done,
            }
        }
        Err(fail("redirected more than three times"))
    }

    async fn connect_once(opts: &ClientOptions) -> Result<Client, ClientError> {
        let (mut ws, _) = tokio::time::timeout(opts.timeout, open(opts))
            .await
            .map_err(|_| fail("WebSocket connect timed out"))??;
        ws.send(Message::text(opts.connect_message().to_string()))
            .await
            .map_err(fail)?;
        let offer = tokio::time::timeout(opts.timeout, async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => {
                        let v: Value = serde_json::from_str(&t).map_err(fail)?;
                        if v["type"] == "offer" {
                            return Ok(v);
                        }
                        if let ("redirect", Some(location)) = (
                            v["type"].as_str().unwrap_or_default(),
                            v["location"].as_str(),
                        ) {
                            return Err(ClientError::Redirected(location.to_owned()));
                        }
                        return Err(fail(format!("{} before the offer", v["type"])));
                    }
                    Some(Ok(Message::Close(frame))) => {
                        return Err(ClientError::Refused {
                            code: frame.as_ref().map_or(1005, |f| f.code.into()),
                            reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                        })
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(fail(e)),
                    None => return Err(fail("WebSocket closed before the offer")),
                }
            }
        })
        .await
        .map_err(|_| fail("no offer before the timeout"))??;
        let offer_at = std::time::Instant::now();
        if opts.abandon == Some(Abandon::AfterOffer) {
            return Err(ClientError::Abandoned);
        }
        let sdp = offer["sdp"]
            .as_str()
            .ok_or_else(|| fail("offer without sdp"))?;
        let (peer, mut answer, peer_events) = opts.engine.answer(sdp).await.map_err(fail)?;
        answer.push_str(&opts.extra_answer_lines);
        ws.send(Message::text(
            json!({"type": "answer", "sdp": &answer}).to_string(),
        ))
        .await
        .map_err(fail)?;
        if opts.abandon == Some(Abandon::AfterAnswer) {
            peer.vanish();
            return Err(ClientError::Abandoned);
        }
        let compress = offer["data_channels"]
            .as_array()
            .is_some_and(|dcs| dcs.iter().any(|d| d["compress"] == true));
        let peer = Arc::new(peer);
        let (events_tx, events) = mpsc::unbounded_channel();
        let (commands, commands_rx) = mpsc::unbounded_channel();
        tokio::spawn(run(
            ws,
            peer_events,
            commands_rx,
            events_tx,
            compress,
            opts.close_websocket_after_switch,
        ));
        Ok(Client {
            connection_id: offer["connection_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            offer,
            answer,
            offer_at,
            events,
            peer,
            commands,
            compress,
        })
    }

    /// Sends a text frame on the WebSocket.
    pub fn send_ws(&self, text: impl Into<String>) {
        let _ = self.commands.send(Command::Text(text.into()));
    }

    /// Sends a Close frame with `code` (1005: none) and keeps reading.
    pub fn close_ws(&self, code: u16, reason: &str) {
        let _ = self.commands.send(Command::Close(code, reason.to_owned()));
    }

    /// From now on, pushes go to `sink` (on the client's task) instead of
    /// [`Client::events`]: a load test counts them there without a
    /// channel send and a task wake per push. Everything else still
    /// arrives as events.
    pub fn on_push(&self, sink: PushSink) {
        let _ = self.commands.send(Command::PushSink(sink));
    }

    /// Drops the WebSocket's TCP connection without a Close frame.
    pub fn drop_ws(&self) {
        let _ = self.commands.send(Command::Drop);
    }

    /// Sends a JSON message on a DataChannel as the SDKs do: zlib-framed
    /// binary when the label is compressed, else `text` or binary.
    pub fn send_dc(&self, label: &str, message: &str, text: bool) {
        if self.compress {
            let data = zlib::compress(message.as_bytes());
            self.peer.send(label, data.into(), false);
        } else {
            let data = Bytes::copy_from_slice(message.as_bytes());
            self.peer.send(label, data, text);
        }
    }

    /// Sends raw bytes on a DataChannel, unframed.
    pub fn send_dc_raw(&self, label: &str, data: &[u8], text: bool) {
        self.peer.send(label, Bytes::copy_from_slice(data), text);
    }

    /// The next event, or `None` after `timeout`.
    pub async fn next_event(&mut self, timeout: Duration) -> Option<ClientEvent> {
        tokio::time::timeout(timeout, self.events.recv())
            .await
            .ok()
            .flatten()
    }

    /// Reads events until one matches, discarding the rest.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        mut want: impl FnMut(&ClientEvent) -> bool,
    ) -> Option<ClientEvent> {
        let until = tokio::time::Instant::now() + timeout;
        loop {
            let ev = tokio::time::timeout_at(until, self.events.recv())
                .await
                .ok()??;
            if want(&ev) {
                return Some(ev);
            }
        }
    }

    /// Waits for this connection's own `connection.created`, the SDKs'
    /// sign of being connected.
    pub async fn wait_connected(&mut self, timeout: Duration) -> bool {
        let id = self.connection_id.clone();
        self.wait_for(timeout, |e| {
            matches!(e, ClientEvent::Notify { message, .. }
                if message["event_type"] == "connection.created" && message["connection_id"] == id.as_str())
        })
        .await
        .is_some()
    }

    /// Neither sends nor receives anything on the PeerConnection for `d`,
    /// as a client whose network is down for a while; then carries on.
    pub fn freeze_peer(&self, d: std::time::Duration) {
        self.peer.freeze(d);
    }

    /// As [`freeze_peer`](Self::freeze_peer), and sends a datagram that is
    /// not STUN from the peer's address in place of each STUN message
    /// (`hato_datachannel::Peer::freeze_forging`).
    pub fn freeze_peer_forging(&self, d: std::time::Duration) {
        self.peer.freeze_forging(d);
    }

    /// Stops reading and acknowledging anything on the PeerConnection, as
    /// a frozen client would, while keeping it open.
    pub fn stall_peer(&self) {
        self.peer.stall();
    }

    /// Opens a DataChannel from the client's side (hato must refuse it);
    /// later `send_dc` on `label` use it.
    pub fn open_channel(&self, label: &str) {
        self.peer.open_channel(label);
    }

    /// Closes one DataChannel from the client's side.
    pub fn close_channel(&self, label: &str) {
        self.peer.close_channel(label);
    }

    /// Vanishes: the PeerConnection is forgotten without a word and the
    /// WebSocket drops without a Close frame, as when a host goes away.
    pub fn vanish(self) {
        self.peer.vanish();
    }

    /// Ends the PeerConnection from this side.
    pub fn close_peer(&self) {
        self.peer.close();
    }
}

/// A message's `type`, and of a push what hato-load reads: its `data`'s
/// `seq` and `ts` and hato's `offset`. The rest is skipped without being
/// built, so a push costs one scan, not a tree of values.
#[derive(serde::Deserialize)]
struct Head<'a> {
    #[serde(rename = "type", borrow)]
    ty: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, deserialize_with = "stamp_of_any")]
    data: Stamp,
    #[serde(default, deserialize_with = "stamp_of_any")]
    hato: Stamp,
}

/// What a load test reads of a push: `data.seq` and `data.ts` (µs since
/// the epoch) as hato-load sends them, and `hato.offset`; each `None`
/// where absent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stamp {
    pub seq: Option<u64>,
    pub ts: Option<u64>,
    pub offset: Option<u64>,
}

/// `seq`, `ts` and `offset` of an object, whichever it has; any other
/// value is skipped and gives none of them (a push's `data` is whatever
/// its sender made it).
fn stamp_of_any<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Stamp, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Stamp;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Stamp, A::Error> {
            let mut s = Stamp::default();
            while let Some(key) = m.next_key::<std::borrow::Cow<'de, str>>()? {
                let slot = match &*key {
                    "seq" => &mut s.seq,
                    "ts" => &mut s.ts,
                    "offset" => &mut s.offset,
                    _ => {
                        m.next_value::<serde::de::IgnoredAny>()?;
                        continue;
                    }
                };
                *slot = m.next_value::<serde_json::Value>()?.as_u64();
            }
            Ok(s)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut q: A) -> Result<Stamp, A::Error> {
            while q.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok(Stamp::default())
        }
        fn visit_bool<E>(self, _: bool) -> Result<Stamp, E> {
            Ok(Stamp::default())
        }
        fn visit_i64<E>(self, _: i64) -> Result<Stamp, E> {
            Ok(Stamp::default())
        }
        fn visit_u64<E>(self, _: u64) -> Result<Stamp, E> {
            Ok(Stamp::default())
        }
        fn visit_f64<E>(self, _: f64) -> Result<Stamp, E> {
            Ok(Stamp::default())
        }
        fn visit_str<E>(self, _: &str) -> Result<Stamp, E> {
            Ok(Stamp::default())
        }
        fn visit_unit<E>(self) -> Result<Stamp, E> {
            Ok(Stamp::default())
        }
    }
    d.deserialize_any(V)
}

fn parse_event(text: Bytes, via: Via, on: &str) -> ClientEvent {
    let at_us = now_us();
    if let Ok(h) = serde_json::from_slice::<Head<'_>>(&text) {
        if h.ty.as_deref() == Some("push") {
            let stamp = Stamp {
                seq: h.data.seq,
                ts: h.data.ts,
                offset: h.hato.offset,
            };
            return ClientEvent::Push {
                text,
                via,
                at_us,
                stamp,
            };
        }
    }
    let Ok(v) = serde_json::from_slice::<Value>(&text) else {
        return ClientEvent::Other {
            on: on.to_owned(),
            text: String::from_utf8_lossy(&text).into_owned(),
        };
    };
    match v["type"].as_str() {
        Some("notify") => ClientEvent::Notify { message: v, via },
        Some("ping") => ClientEvent::Ping,
        Some("switched") => ClientEvent::Switched {
            ignore_disconnect_websocket: v["ignore_disconnect_websocket"] == true,
        },
        Some("close") if on == "signaling" => ClientEvent::ServerClose {
            code: v["code"].as_u64().unwrap_or(0) as u16,
            reason: v["reason"].as_str().unwrap_or_default().to_owned(),
        },
        _ => ClientEvent::Other {
            on: on.to_owned(),
            text: String::from_utf8_lossy(&text).into_owned(),
        },
    }
}

async fn run(
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    mut peer_events: mpsc::Receiver<PeerEvent>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<ClientEvent>,
    compress: bool,
    close_after_switch: bool,
) {
    let mut ws = Some(ws);
    let mut sink: Option<PushSink> = None;
    // A push to the sink when there is one, else an event.
    let hand = |sink: &Option<PushSink>, ev: ClientEvent| match (sink, ev) {
        (
            Some(sink),
            ClientEvent::Push {
                via, at_us, stamp, ..
            },
        ) => {
            sink(&stamp, via, at_us);
            true
        }
        (_, ev) => events.send(ev).is_ok(),
    };
    loop {
        tokio::select! {
            msg = async { ws.as_mut().unwrap().next().await }, if ws.is_some() => {
                match msg {
                    Some(Ok(Message::Text(t))) => {
                        let bytes = Bytes::copy_from_slice(t.as_bytes());
                        match parse_event(bytes, Via::WebSocket, "websocket") {
                            ClientEvent::Ping => {
                                let pong = Message::text(r#"{"type":"pong"}"#);
                                let _ = ws.as_mut().unwrap().send(pong).await;
                            }
                            ev @ ClientEvent::Switched { ignore_disconnect_websocket: true } if close_after_switch => {
                                let _ = events.send(ev);
                                if let Some(mut w) = ws.take() {
                                    let _ = w.send(Message::Close(None)).await;
                                }
                            }
                            ev => {
                                hand(&sink, ev);
                            }
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        let _ = events.send(ClientEvent::WebSocketClosed {
                            code: frame.as_ref().map_or(1005, |f| f.code.into()),
                            reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                        });
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => {
                        let _ = events.send(ClientEvent::WebSocketClosed { code: 1006, reason: String::new() });
                        ws = None;
                    }
                }
            }
            ev = peer_events.recv() => {
                let ev = match ev {
                    None => return,
                    Some(PeerEvent::Connected) => ClientEvent::Connected,
                    Some(PeerEvent::Failed(r)) => ClientEvent::PeerFailed(r),
                    Some(PeerEvent::Open(l)) => ClientEvent::Open(l.to_string()),
                    Some(PeerEvent::Closed(l)) => ClientEvent::ChannelClosed(l.to_string()),
                    Some(PeerEvent::AssociationClosed) => ClientEvent::PeerFailed("the SCTP association closed".into()),
                    Some(PeerEvent::Writable(_) | PeerEvent::Backlog(_) | PeerEvent::SendFailed { .. }) => continue,
                    Some(PeerEvent::Message(m)) => {
                        let hato_datachannel::Incoming { label, data, text } = *m;
                        let data = if compress && !text {
                            match zlib::decompress(&data, 16 << 20) {
                                Ok(d) => Bytes::from(d),
                                Err(e) => {
                                    let _ = events.send(ClientEvent::Other { on: label.to_string(), text: e.to_string() });
                                    continue;
                                }
                            }
                        } else {
                            data
                        };
                        parse_event(data, Via::DataChannel, &label)
                    }
                };
                if !hand(&sink, ev) {
                    return;
                }
            }
            cmd = commands.recv() => match cmd {
                None => return,
                Some(Command::Text(t)) => {
                    if let Some(w) = ws.as_mut() {
                        let _ = w.send(Message::text(t)).await;
                    }
                }
                Some(Command::Close(code, reason)) => {
                    if let Some(w) = ws.as_mut() {
                        let frame = (code != 1005).then(|| CloseFrame { code: CloseCode::from(code), reason: reason.into() });
                        let _ = w.send(Message::Close(frame)).await;
                    }
                }
                Some(Command::Drop) => ws = None,
                Some(Command::PushSink(s)) => sink = Some(s),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp_of(text: &str) -> Option<Stamp> {
        match parse_event(
            Bytes::copy_from_slice(text.as_bytes()),
            Via::WebSocket,
            "ws",
        ) {
            ClientEvent::Push { stamp, .. } => Some(stamp),
            _ => None,
        }
    }

    /// A push's stamp is read in the one scan that finds its type; any
    /// other `data` gives an empty stamp, and a message that is not a push
    /// is none.
    #[test]
    fn a_push_is_read_once_for_its_type_and_stamp() {
        let full = r#"{"data":{"pad":"x","seq":7,"ts":123},"hato":{"epoch":"e","offset":8},"type":"push"}"#;
        assert_eq!(
            stamp_of(full),
            Some(Stamp {
                seq: Some(7),
                ts: Some(123),
                offset: Some(8)
            })
        );
        for other in [
            r#"{"type":"push","data":[1,{"seq":2}]}"#,
            r#"{"type":"push","data":{"seq":"7","n":{"ts":1}}}"#,
            r#"{"type":"push","data":null}"#,
        ] {
            assert_eq!(stamp_of(other), Some(Stamp::default()), "{other}");
        }
        let notify =
            r#"{"type":"notify","event_type":"connection.created","data":[{"connection_id":"a"}]}"#;
        assert_eq!(stamp_of(notify), None);
    }
}

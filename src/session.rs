//! One peer's session: the signaling WebSocket and its WebRTC peer, from
//! `connect` to teardown.
//!
//! `connect` → `offer` → `answer` → `candidate`s → ICE/DTLS up → the peer
//! joins the connection table and everyone in the channel gets `notify` →
//! with DataChannel signaling, all four channels open → `switched`.
//! Every wait is bounded; every way out goes through [`Session::finish`],
//! which leaves the table, the tasks and the sockets as they were.

use crate::limits::{self, Throttle, Ticket};
use crate::outbox::{truncate_reason, Encoded, Inlet, Kill, Out, Outbox};
use crate::proxy_protocol;
use crate::table::Conn;
use crate::tls::{ReadLimit, Stream};
use crate::Shared;
use futures_util::stream::SplitStream;
use futures_util::{SinkExt, StreamExt};
use hato_datachannel::{Incoming, Peer, PeerEvent};
use hato_signaling::event::{self, Kind};
use hato_signaling::message::{self, ChannelCounts, NotifyMetadata};
use hato_signaling::session::{Action, End, Machine, Rules, Stop};
use hato_signaling::{admit, id, time, DataChannelSpec, Offer, Role};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::Instrument;

pub use hato_signaling::session::SIGNALING_ERROR;

pub use hato_signaling::message::PRESENT_METADATA_BUDGET;

/// How long a DataChannel peer gets to close its side after hato closed
/// the channels, before hato ends the association itself.
const CLIENT_CLOSE_GRACE: Duration = Duration::from_secs(2);

/// How long what was sent on the DataChannels may take to be acknowledged
/// before hato closes them anyway.
const CHANNEL_DRAIN_LIMIT: Duration = Duration::from_millis(500);

type WsStream = SplitStream<WebSocketStream<Stream>>;

/// Accepts signaling WebSockets on `/signaling` until the task is aborted.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    static ACCEPT_ERRORS: Throttle = Throttle::new(Duration::from_secs(1));
    loop {
        let (tcp, addr) = limits::accept(&listener, "signaling", &ACCEPT_ERRORS).await;
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tcp = tcp;
            // Through a trusted proxy, the client's address is in its
            // PROXY header (--proxy-protocol) or else in the request's
            // X-Forwarded-For, for which admission waits. Anyone else is
            // admitted (or refused) at accept.
            let proxied = shared.config.trusted_proxy.contains(&addr.ip());
            let client = if proxied && shared.config.proxy_protocol {
                match proxy_protocol::read(&mut tcp, shared.config.first_byte_timeout()).await {
                    Ok(proxy_protocol::Header::Client(ip)) => Some(ip),
                    Ok(proxy_protocol::Header::Local) => Some(addr.ip()),
                    Err(why) => {
                        shared
                            .admission
                            .bad_proxy_headers
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if let Some(folded) = PROXY_ERRORS.hit() {
                            tracing::warn!(%addr, why, closed_since_last_line = folded, "connection from a trusted proxy closed: bad PROXY header");
                        }
                        return;
                    }
                }
            } else {
                (!proxied).then_some(addr.ip())
            };
            let at_accept = client.map(|ip| (ip, shared.admission.admit(ip)));
            let decided: std::sync::Mutex<Option<Admitted>> = Default::default();
            let mut config = WebSocketConfig::default();
            config.max_message_size = Some(shared.config.client_message_limit);
            config.max_frame_size = Some(shared.config.client_message_limit);
            // Clients send a few small messages; tungstenite's default
            // 128 KiB read buffer per connection was most of each peer's RSS
            // (heaptrack). It grows when a frame needs more.
            config.read_buffer_size = 4096;
            // Frames are buffered up to this much before a write; the
            // buffer never shrinks, so tungstenite's 128 KiB default let
            // a connect storm's notifies leave that much in every peer.
            config.write_buffer_size = 16 * 1024;
            #[allow(clippy::result_large_err)] // the error type is tungstenite's
            let callback = |req: &Request, resp: Response| {
                let (ip, admitted) = match at_accept {
                    Some(admitted) => admitted,
                    None => {
                        let ip =
                            forwarded_for(req, &shared.config.trusted_proxy).unwrap_or(addr.ip());
                        (ip, shared.admission.admit(ip))
                    }
                };
                let refusal = admitted.as_ref().err().map(|r| r.reason(&shared.admission));
                let answer = upgrade(req, resp, refusal.as_deref());
                *decided.lock().unwrap() = Some(Admitted {
                    ip,
                    ticket: admitted.ok(),
                    refusal,
                });
                answer
            };
            // What the connection may send until its `connect` is taken:
            // the upgrade request and the `connect` itself.
            let before_connect = ReadLimit::new(
                shared.config.before_connect_limit(),
                "more bytes before connect than --connect-metadata-limit allows",
            );
            // The TLS handshake (with --tls-cert) and the upgrade share the
            // connect timeout; the first byte must come sooner.
            let handshake = async {
                let first_byte = shared.config.first_byte_timeout();
                if tokio::time::timeout(first_byte, tcp.readable())
                    .await
                    .is_err()
                {
                    return Err(tokio_tungstenite::tungstenite::Error::Io(
                        std::io::ErrorKind::TimedOut.into(),
                    ));
                }
                let mut stream = Stream::accept(shared.tls.as_deref(), tcp)
                    .await
                    .map_err(tokio_tungstenite::tungstenite::Error::Io)?;
                stream.limit_reads(before_connect.clone());
                tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config))
                    .await
            };
            let result = tokio::time::timeout(shared.config.connect_timeout(), handshake).await;
            let decided = decided.into_inner().unwrap();
            let client = decided.as_ref().map_or(addr.ip(), |d| d.ip);
            match (result, decided) {
                (
                    Ok(Ok(ws)),
                    Some(Admitted {
                        ticket: Some(ticket),
                        ..
                    }),
                ) => run(shared, ws, ticket, before_connect).await,
                (Ok(Ok(_)), _) => unreachable!("a refused upgrade never completes"),
                (
                    Ok(Err(_)),
                    Some(Admitted {
                        refusal: Some(reason),
                        ..
                    }),
                ) => {
                    if let Some(folded) = REFUSALS.hit() {
                        tracing::warn!(%addr, %client, reason, refused_since_last_line = folded, "signaling connection refused (503)");
                    }
                }
                (Ok(Err(e)), _) => tracing::debug!(%addr, error = %e, "WebSocket handshake failed"),
                (Err(_), _) => tracing::debug!(%addr, "WebSocket handshake timed out"),
            }
        });
    }
}

static REFUSALS: Throttle = Throttle::new(Duration::from_secs(1));
static PROXY_ERRORS: Throttle = Throttle::new(Duration::from_secs(1));

/// Where admission put a connection, decided when its upgrade request
/// came in.
struct Admitted {
    /// The client's address: the peer's, or through a trusted proxy the
    /// one it forwarded.
    ip: std::net::IpAddr,
    ticket: Option<Ticket>,
    refusal: Option<String>,
}

/// The client's address a trusted proxy forwarded: the rightmost address
/// of `X-Forwarded-For` (every such header, in order) that is not itself
/// a trusted proxy. Addresses left of it are the client's own word.
fn forwarded_for(req: &Request, trusted: &[std::net::IpAddr]) -> Option<std::net::IpAddr> {
    let hops: Vec<std::net::IpAddr> = req
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|hop| {
            let hop = hop.trim();
            hop.parse()
                .or_else(|_| hop.parse::<std::net::SocketAddr>().map(|a| a.ip()))
                .ok()
        })
        .collect();
    hops.into_iter().rev().find(|ip| !trusted.contains(ip))
}

/// The upgrade callback: only `/signaling` is served (anything else is
/// 404), and a connection over a limit gets 503 with a JSON reason.
#[allow(clippy::result_large_err)] // the error type is tungstenite's
fn upgrade(
    req: &Request,
    resp: Response,
    refusal: Option<&str>,
) -> Result<Response, ErrorResponse> {
    let (status, error_type, message) = match refusal {
        _ if req.uri().path() != "/signaling" => (
            StatusCode::NOT_FOUND,
            "NOT-FOUND",
            "only /signaling is served".to_owned(),
        ),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            reason.split(':').next().unwrap_or(reason),
            reason.to_owned(),
        ),
        None => return Ok(resp),
    };
    let body = json!({"error_type": error_type, "message": message}).to_string();
    let mut err = ErrorResponse::new(Some(body));
    *err.status_mut() = status;
    err.headers_mut().insert(
        tokio_tungstenite::tungstenite::http::header::CONTENT_TYPE,
        tokio_tungstenite::tungstenite::http::HeaderValue::from_static("application/json"),
    );
    if status == StatusCode::SERVICE_UNAVAILABLE {
        err.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::header::RETRY_AFTER,
            tokio_tungstenite::tungstenite::http::HeaderValue::from_static("1"),
        );
    }
    Err(err)
}

async fn refuse(ws: WebSocketStream<Stream>, shared: &Shared, kind: &'static str, reason: &str) {
    shared
        .metrics
        .refused_connects
        .get_or_create(&crate::metrics::Reason {
            reason: kind.into(),
        })
        .inc();
    tracing::info!(reason, kind, "connect refused");
    close_before_offer(ws, SIGNALING_ERROR, reason).await;
}

/// Closes a WebSocket that has no outbox yet, waiting (bounded) for the
/// client's Close so that it sees a clean close.
async fn close_before_offer(mut ws: WebSocketStream<Stream>, code: u16, reason: &str) {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: truncate_reason(reason).into(),
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = ws.send(Message::Close(Some(frame))).await;
        await_client_close(&mut ws).await;
    })
    .await;
}

/// What hato reads of a client after sending its own Close, at most:
/// what an honest client had in flight, then its Close.
const AFTER_CLOSE_MESSAGES: usize = 16;

/// After hato's Close: reads until the client's Close comes back, so
/// that its close is clean — but at most [`AFTER_CLOSE_MESSAGES`]: a
/// client that goes on sending instead (2 000 trickled candidates after
/// the 65th ended its session) is dropped, not read.
async fn await_client_close<S, E>(stream: &mut S)
where
    S: futures_util::Stream<Item = Result<Message, E>> + Unpin,
{
    for _ in 0..AFTER_CLOSE_MESSAGES {
        match stream.next().await {
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
            Some(Ok(_)) => {}
        }
    }
}

/// Reads the first text frame. `Err(None)`: the socket went away quietly;
/// `Err(Some(reason))`: refuse with `reason`.
async fn first_text(ws: &mut WebSocketStream<Stream>) -> Result<String, Option<String>> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(t.to_string()),
            Some(Ok(Message::Binary(_))) => {
                return Err(Some(
                    "binary frames are not accepted; send JSON text".into(),
                ))
            }
            Some(Ok(Message::Close(_))) | None => return Err(None),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(Some(format!("bad WebSocket frame: {e}"))),
        }
    }
}

/// Resolves once the server is shutting down.
async fn shutting_down(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped here, not held by the caller.
    let _ = shutdown.wait_for(|down| *down).await;
}

/// Counts a session as live for as long as it exists.
struct Live(Arc<Shared>);

impl Drop for Live {
    fn drop(&mut self) {
        let before = self
            .0
            .sessions
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        if before == 1 {
            // The last session is gone: what every peer's session held is
            // free, and the allocator can hand it back to the kernel.
            hato_datachannel::give_back_memory();
        }
    }
}

async fn run(
    shared: Arc<Shared>,
    mut ws: WebSocketStream<Stream>,
    ticket: Ticket,
    before_connect: Arc<ReadLimit>,
) {
    shared
        .sessions
        .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    let live = Live(shared.clone());
    let cfg = &shared.config;
    let mut shutdown = shared.shutdown.subscribe();
    let first = tokio::select! {
        first = tokio::time::timeout(cfg.connect_timeout(), first_text(&mut ws)) => first,
        () = shutting_down(&mut shutdown) => {
            return close_before_offer(ws, 1000, "SHUTDOWN").await;
        }
    };
    let text = match first {
        Ok(Ok(text)) => text,
        Ok(Err(None)) => return,
        Ok(Err(Some(reason))) => return refuse(ws, &shared, "invalid", &reason).await,
        Err(_) => {
            return refuse(
                ws,
                &shared,
                "no_connect",
                "no connect message before the timeout",
            )
            .await
        }
    };
    let settings = admit::Settings {
        connect_metadata_limit: cfg.connect_metadata_limit,
        notify_metadata_limit: cfg.notify_metadata_limit,
        data_channel_signaling: cfg.data_channel_signaling,
        ignore_disconnect_websocket: cfg.ignore_disconnect_websocket,
        compress: cfg.data_channel_compress,
    };
    let pending = match admit::read(&text, &settings) {
        Ok(p) => p,
        Err(refusal) => return refuse(ws, &shared, "invalid", refusal.reason()).await,
    };
    // Another node instead (§3.10): this one drains, or is full.
    if let Some(location) = shared.redirect_for(pending.connect.redirect) {
        tracing::info!(location, "connect redirected");
        let redirect = message::redirect(&location);
        if ws.send(Message::text(redirect)).await.is_ok() {
            // The SDKs go at once; C++ waits for the server to close.
            return close_before_offer(ws, 1000, "REDIRECT").await;
        }
        return;
    }
    if shared.draining() {
        return refuse(
            ws,
            &shared,
            "draining",
            "DRAINING: this node takes no new connections",
        )
        .await;
    }

    // Its address's turn (--max-connects-per-ip-per-second): the costly
    // part, the auth webhook and the PeerConnection, comes after.
    if !ticket.wait.is_zero() {
        tokio::select! {
            () = tokio::time::sleep(ticket.wait) => {}
            () = shutting_down(&mut shutdown) => {
                return close_before_offer(ws, 1000, "SHUTDOWN").await;
            }
        }
    }

    let connection_id: Arc<str> = id::new_id().into();
    // An access token, when hato checks them, decides alone: a valid one
    // needs no webhook call, an invalid one is refused. Without one, the
    // auth webhook decides (or, with no webhook, the connect is refused).
    let token_verdict = shared.jwt.as_ref().and_then(|keys| {
        let connect = &pending.connect;
        match pending.access_token() {
            Some(token) => Some(match keys.check(token, &connect.channel_id, connect.role) {
                Ok(overrides) => admit::Verdict::Allowed(overrides),
                Err(why) => admit::Verdict::Denied(why),
            }),
            None if shared.auth_webhook.is_none() => Some(admit::Verdict::Denied(
                "ACCESS-TOKEN-MISSING: metadata.access_token is required".into(),
            )),
            None => None,
        }
    });
    let verdict = match (&shared.auth_webhook, token_verdict) {
        (_, Some(v)) => Some(v),
        (None, None) => None,
        (Some(hook), None) => {
            let (timestamp, request_id) = (time::now_rfc3339(), id::new_id());
            let context = admit::Context {
                connection_id: &connection_id,
                node_name: &cfg.node_name(),
                version: env!("CARGO_PKG_VERSION"),
                timestamp: &timestamp,
                request_id: &request_id,
                counts: shared.table.counts(&pending.connect.channel_id),
            };
            let body = pending.auth_request(&settings, &context);
            let asked = std::time::Instant::now();
            tokio::select! {
                v = hook.ask(&body, &connection_id) => {
                    shared.metrics.auth_webhook_seconds.observe(asked.elapsed().as_secs_f64());
                    Some(v)
                }
                () = shutting_down(&mut shutdown) => {
                    return close_before_offer(ws, 1000, "SHUTDOWN").await;
                }
            }
        }
    };
    let admit::Admitted {
        connect,
        mut granted,
        recover,
        mode,
    } = match pending.decide(verdict, &settings) {
        Ok(admitted) => admitted,
        Err(refusal) => {
            let reason = refusal.reason();
            let kind = match &refusal {
                admit::Refusal::Denied(_) => {
                    tracing::info!(%connection_id, reason, "connection denied");
                    "denied"
                }
                admit::Refusal::WebhookFailed(_) => {
                    tracing::warn!(%connection_id, reason, "auth webhook failed; connection refused");
                    "webhook_failed"
                }
                admit::Refusal::BadOverride(_) => {
                    tracing::warn!(%connection_id, reason, "auth webhook overrides refused");
                    "bad_override"
                }
                admit::Refusal::Invalid(_) => "invalid",
            };
            return refuse(ws, &shared, kind, reason).await;
        }
    };
    let (dc_signaling, ignore_ws, compress) = (
        mode.data_channel_signaling,
        mode.ignore_disconnect_websocket,
        mode.compress,
    );
    let labels: Vec<&str> = if dc_signaling {
        message::SYSTEM_LABELS.iter().map(|(l, _)| *l).collect()
    } else {
        Vec::new()
    };
    // In a cluster, this node hears the channel's pushes from the other
    // nodes before the peer can join it.
    // Nothing of `connect` beyond its fields is needed after this: the
    // text (up to --connect-metadata-limit of metadata) goes now, not
    // when the session ends; from here on the peer may send whole
    // messages.
    drop(text);
    before_connect.lift();
    let channel_guard = match &shared.cluster {
        Some(cluster) => Some(cluster.enter(&connect.channel_id).await),
        None => None,
    };
    // Where the cluster's stream keeps the history: what the joiner asks
    // for is read from it now, and kept with what follows until it joins.
    let recovery_hold = match (&shared.cluster, &recover) {
        (Some(cluster), Some(ask)) => cluster.prefetch(&shared, &connect.channel_id, ask).await,
        _ => None,
    };
    let (peer, offer_sdp, events) = match shared.engine.offer(&labels).await {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "could not create a PeerConnection");
            return refuse(
                ws,
                &shared,
                "internal",
                "INTERNAL-ERROR: could not create a PeerConnection",
            )
            .await;
        }
    };
    let peer = Arc::new(peer);

    let client_id: Arc<str> = connect
        .client_id
        .clone()
        .map_or_else(|| connection_id.clone(), Into::into);
    let bundle_id: Arc<str> = connect
        .bundle_id
        .clone()
        .map_or_else(|| connection_id.clone(), Into::into);
    let offer = Offer {
        ty: "offer",
        sdp: offer_sdp,
        channel_id: connect.channel_id.clone(),
        session_id: shared.session_id.to_string(),
        connection_id: connection_id.to_string(),
        client_id: client_id.to_string(),
        bundle_id: bundle_id.to_string(),
        simulcast: false,
        spotlight: false,
        multistream: false,
        config: Offer::ice_config(),
        data_channel_signaling: dc_signaling,
        ignore_disconnect_websocket: ignore_ws,
        data_channels: dc_signaling.then(|| DataChannelSpec::system(compress)),
        metadata: granted.offer_metadata.take(),
        version: concat!("hato/", env!("CARGO_PKG_VERSION")),
    };
    let offer_json = serde_json::to_string(&offer).expect("an offer always serialises");

    let (sink, stream) = ws.split();
    let (kill_tx, kill_rx) = mpsc::unbounded_channel();
    let outbox = Outbox::spawn(
        sink,
        peer.clone(),
        compress,
        cfg.outbox_capacity,
        cfg.outbox_capacity_bytes,
        connection_id.clone(),
        kill_tx,
    );
    let inlet = outbox.inlet.clone();
    inlet.deliver(Out::Ws(offer_json));
    tracing::info!(
        %connection_id, channel_id = %connect.channel_id, role = %connect.role,
        dc_signaling, ignore_ws, "offer sent"
    );

    let rules = Rules {
        answer_timeout: cfg.answer_timeout(),
        establish_timeout: cfg.establish_timeout(),
        ping_interval: cfg.ping_interval(),
        pong_timeout: cfg.pong_timeout(),
        client_message_limit: cfg.client_message_limit,
        data_channel_message_limit: cfg.data_channel_message_limit,
        max_candidates: cfg.max_remote_candidates,
    };
    let mut session = Session {
        shared: shared.clone(),
        connection_id,
        client_id,
        bundle_id,
        channel_id: connect.channel_id.as_str().into(),
        role: connect.role,
        notify_metadata: NotifyMetadata {
            metadata: connect.signaling_notify_metadata.clone(),
            authn_metadata: granted.authn_metadata,
            authz_metadata: granted.authz_metadata,
        },
        machine: Machine::new(std::time::Instant::now(), rules, mode),
        peer,
        outbox: Some(outbox),
        inlet,
        conn: None,
        ticket,
        event_metadata: granted.event_metadata,
        no_notify: granted.no_notify,
        recover,
        joined: None,
        offer_at: std::time::Instant::now(),
        _channel_guard: channel_guard,
        recovery_hold,
    };
    // Every line of the session carries who it is (in JSON logs, as the
    // `span` object).
    let span = tracing::info_span!(
        "session",
        connection_id = %session.connection_id,
        channel_id = %session.channel_id,
        client_id = %session.client_id,
    );
    // The connected phase runs in a task of its own. This one (the
    // accept, the upgrade and admission: a state machine of ~12 KB, sized
    // for its largest step) ends here and its memory goes with it; a
    // connected peer keeps only the drive loop's.
    let drive = async move {
        let _live = live;
        let end = session.drive(stream, events, kill_rx).await;
        session.finish(end).await;
    }
    .instrument(span);
    tokio::spawn(drive);
}

/// The I/O shell of one connection: it feeds the sockets' events to the
/// [`Machine`] (`hato_signaling::session`), which holds every protocol
/// rule, and carries out the actions it returns.
struct Session {
    shared: Arc<Shared>,
    connection_id: Arc<str>,
    client_id: Arc<str>,
    bundle_id: Arc<str>,
    channel_id: Arc<str>,
    role: Role,
    notify_metadata: NotifyMetadata,
    machine: Machine,
    peer: Arc<Peer>,
    outbox: Option<Outbox>,
    inlet: Arc<Inlet>,
    /// Set once the peer is in the table.
    conn: Option<Arc<Conn>>,
    /// The auth webhook's `event_metadata`, for the event webhooks.
    event_metadata: Option<Value>,
    /// The auth webhook said `signaling_notify: false`.
    no_notify: bool,
    /// What it asked to be replayed as it joins.
    recover: Option<admit::Recover>,
    /// When it joined the table.
    joined: Option<(String, std::time::Instant)>,
    /// When its offer was sent.
    offer_at: std::time::Instant,
    /// This connection's place under the admission limits.
    ticket: Ticket,
    /// Its channel's cluster subscription, held for the session.
    _channel_guard: Option<crate::cluster::ChannelGuard>,
    /// In a cluster with history: its channel's log kept for it until it
    /// has joined ([`crate::cluster::Cluster::prefetch`]).
    recovery_hold: Option<crate::history::Hold>,
}

/// A session that unwinds (a panic) or is dropped before `finish` still
/// leaves the table: no ghost connection keeps receiving pushes.
impl Drop for Session {
    fn drop(&mut self) {
        if self.conn.is_some() {
            tracing::error!(connection_id = %self.connection_id, "session dropped without finishing; removed from the table");
            self.leave_table();
        }
    }
}

struct Drive {
    end: End,
    /// None once the WebSocket has closed.
    stream: Option<WsStream>,
    events: mpsc::Receiver<PeerEvent>,
}

impl Session {
    /// Queues on this connection's own outbox; a full queue ends it.
    fn queue(&self, out: Out) {
        self.inlet.deliver(out);
    }

    async fn drive(
        &mut self,
        stream: WsStream,
        mut events: mpsc::Receiver<PeerEvent>,
        mut kill_rx: mpsc::UnboundedReceiver<Kill>,
    ) -> Drive {
        let mut shutdown = self.shared.shutdown.subscribe();
        let mut stream = Some(stream);
        // Once the engine has dropped its end, the arm is off: a closed
        // channel would otherwise be ready on every turn.
        let mut events_open = true;
        loop {
            let deadline = self.machine.poll_timeout();
            let sleep = async {
                match deadline {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            let now = || std::time::Instant::now();
            tokio::select! {
                msg = async { stream.as_mut().unwrap().next().await }, if stream.is_some() => match msg {
                    Some(Ok(Message::Text(t))) => self.machine.on_ws_text(now(), t.as_bytes()),
                    Some(Ok(Message::Binary(_))) => self.machine.on_ws_binary(),
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                        // Dropping the reading half lets the socket and its
                        // buffers go as soon as the outbox has dropped the
                        // writing half (at once after a switch with
                        // ignore_disconnect_websocket).
                        stream = None;
                        self.machine.on_ws_closed();
                        if !self.machine.ws_in_use() && self.machine.switched() {
                            tracing::debug!(connection_id = %self.connection_id, "WebSocket gone after switch, as expected");
                        }
                    }
                    Some(Ok(_)) => {}
                },
                ev = events.recv(), if events_open => {
                    events_open = ev.is_some();
                    self.on_peer(ev);
                }
                Some(kill) = kill_rx.recv() => self.machine.on_server_end(match kill {
                    Kill::Overflow => Stop::OutboxOverflow,
                    Kill::Api => Stop::Api,
                }),
                () = shutting_down(&mut shutdown) => self.machine.on_server_end(Stop::Shutdown),
                () = sleep => self.machine.handle_timeout(now()),
            }
            while let Some(action) = self.machine.poll_action() {
                match action {
                    Action::ApplyAnswer(sdp) => {
                        let result = self.peer.apply_answer(&sdp).await.map_err(|e| e.0);
                        self.machine.answer_applied(now(), result);
                    }
                    Action::AddCandidate(c) => self.peer.add_candidate(&c),
                    Action::SendPing => self.queue(Out::Ws(message::ping())),
                    Action::Register { message_limit } => self.register(message_limit),
                    Action::Switch {
                        ignore_disconnect_websocket,
                    } => {
                        self.queue(Out::Switch {
                            ignore_disconnect_websocket,
                        });
                        tracing::info!(connection_id = %self.connection_id, "switched");
                    }
                    Action::End(end) => {
                        return Drive {
                            end,
                            stream,
                            events,
                        }
                    }
                }
            }
        }
    }

    fn on_peer(&mut self, ev: Option<PeerEvent>) {
        let Some(ev) = ev else {
            return self
                .machine
                .on_transport_failed("the WebRTC engine stopped".into());
        };
        match ev {
            PeerEvent::Connected => self.machine.on_transport_connected(),
            PeerEvent::Failed(reason) => self.machine.on_transport_failed(reason),
            PeerEvent::AssociationClosed => self
                .machine
                .on_transport_failed("the SCTP association closed".into()),
            PeerEvent::Open(label) => {
                if &*label == "push" {
                    self.shared
                        .metrics
                        .offer_to_push_open
                        .observe(self.offer_at.elapsed().as_secs_f64());
                }
                self.machine.on_channel_open(&label)
            }
            PeerEvent::Message(m) => {
                let Incoming { label, data, text } = *m;
                if let Err(why) =
                    self.machine
                        .on_dc_message(std::time::Instant::now(), &label, &data, text)
                {
                    tracing::warn!(connection_id = %self.connection_id, %label, error = %why, "DataChannel message dropped");
                }
            }
            PeerEvent::Closed(label) => {
                tracing::debug!(connection_id = %self.connection_id, %label, "DataChannel closed by the peer");
                self.machine
                    .on_channel_closed(std::time::Instant::now(), &label);
            }
            PeerEvent::SendFailed { label, error } => {
                tracing::debug!(connection_id = %self.connection_id, %label, %error, "DataChannel send failed");
                self.machine.on_send_failed(std::time::Instant::now());
            }
            PeerEvent::Writable(_) => {}
            PeerEvent::Backlog(label) => {
                tracing::warn!(connection_id = %self.connection_id, %label, "DataChannel not acknowledged, disconnecting (OUTBOX-OVERFLOW)");
                self.shared
                    .table
                    .stats
                    .outbox_overflows
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.machine.on_server_end(Stop::OutboxOverflow);
            }
        }
    }

    /// ICE and DTLS are up: join the table, then `connection.created` to
    /// the new peer (with the list of those present) and to the others.
    fn register(&mut self, message_limit: Option<usize>) {
        let conn = Conn::new(
            self.connection_id.clone(),
            self.client_id.clone(),
            self.bundle_id.clone(),
            self.channel_id.clone(),
            self.shared.session_id.clone(),
            self.role,
            self.notify_metadata.clone(),
            message_limit,
            !self.machine.mode().ignore_disconnect_websocket,
            self.inlet.clone(),
        );
        let conn = Arc::new(if self.no_notify {
            conn.without_notify()
        } else {
            conn
        });
        self.ticket.handshake_done();
        // A joiner that recovers is replayed what it missed and enters the
        // table under its channel's lock: every push is either replayed or
        // delivered live, once.
        let log = self
            .recover
            .as_ref()
            .map(|_| self.shared.history.log(&self.channel_id));
        let mut held = log.as_ref().map(|l| l.lock().unwrap());
        if let (Some(log), Some(ask)) = (held.as_mut(), self.recover.take()) {
            let r = log.recover(std::time::Instant::now(), &ask, &conn.identity);
            let status = Arc::new(Encoded::new(message::recovery_json(
                r.gap.map(crate::history::Gap::as_str),
                &r.now.epoch,
                r.now.offset,
            )));
            crate::hub::replay(
                &self.shared,
                &conn,
                std::iter::once(&status).chain(&r.messages),
            );
            self.shared.history.counted(r.gap.is_none());
            tracing::info!(
                connection_id = %self.connection_id,
                replayed = r.messages.len(),
                gap = r.gap.map(crate::history::Gap::as_str),
                "recovery"
            );
        }
        let joined = self.shared.table.insert(conn.clone());
        drop(held);
        self.recovery_hold = None;
        if let Some(cluster) = &self.shared.cluster {
            cluster.joined(&conn);
        }
        let (others, counts) = (joined.others, joined.counts);
        if let Some(announce) = joined.announce {
            announce.send();
        }
        self.joined = Some((conn.created_time.clone(), std::time::Instant::now()));
        self.conn = Some(conn.clone());
        // The joiner's own connection.created lists everyone present (on
        // every node), their metadata within a budget.
        let (present, without_metadata) = message::present_list(
            others
                .iter()
                .map(|o| (&*o.client_id, &*o.connection_id, &o.notify_metadata))
                .chain(
                    joined
                        .remote
                        .iter()
                        .map(|m| (&*m.client_id, &*m.connection_id, &m.notify_metadata)),
                ),
            PRESENT_METADATA_BUDGET,
        );
        if without_metadata > 0 {
            tracing::info!(
                connection_id = %self.connection_id,
                without_metadata,
                "connection.created lists the channel with its first {} KiB of metadata",
                PRESENT_METADATA_BUDGET / 1024
            );
        }
        let now = time::now_rfc3339();
        let own = message::notify_connection(
            "connection.created",
            &conn.who(),
            counts,
            &now,
            Some(present),
        );
        self.queue(Out::Notify(Arc::new(Encoded::new(own))));
        let metrics = &self.shared.metrics;
        metrics.connects.inc();
        metrics
            .offer_to_connected
            .observe(self.offer_at.elapsed().as_secs_f64());
        self.send_event(Kind::Created, counts, None);
        tracing::info!(connection_id = %self.connection_id, channel_id = %self.channel_id, "connected");
    }

    /// Leaves the table (once) and tells the channel: `connection.destroyed`.
    /// Returns the channel's counts after, when it was in the table.
    fn leave_table(&mut self) -> Option<ChannelCounts> {
        let conn = self.conn.take()?;
        let (counts, announce) = self.shared.table.remove(&conn)?;
        if let Some(cluster) = &self.shared.cluster {
            cluster.left(&conn);
        }
        if let Some(announce) = announce {
            announce.send();
        }
        Some(counts)
    }

    /// Queues an event webhook (docs/protocol.md §7.2) if one is configured.
    fn send_event(&self, kind: Kind, counts: ChannelCounts, end: Option<&End>) {
        let Some(hook) = &self.shared.event_webhook else {
            return;
        };
        let (timestamp, id) = (time::now_rfc3339(), id::new_id());
        let who = event::Identity {
            role: self.role,
            channel_id: &self.channel_id,
            session_id: &self.shared.session_id,
            client_id: &self.client_id,
            bundle_id: &self.bundle_id,
            connection_id: &self.connection_id,
            event_metadata: self.event_metadata.as_ref(),
        };
        let stamp = event::Stamp {
            node_name: &self.shared.config.node_name(),
            version: env!("CARGO_PKG_VERSION"),
            timestamp: &timestamp,
            id: &id,
        };
        let facts = event::Facts {
            counts,
            mode: *self.machine.mode(),
            joined: self
                .joined
                .as_ref()
                .map(|(created, at)| (created.as_str(), at.elapsed().as_secs() / 60)),
            reason: end.map(End::reason),
        };
        hook.send(
            &self.connection_id,
            event::payload(kind, &who, &stamp, facts),
        );
    }

    async fn finish(mut self, drive: Drive) {
        let Drive {
            end,
            mut stream,
            mut events,
        } = drive;
        tracing::info!(connection_id = %self.connection_id, ?end, "session ends");
        self.shared
            .metrics
            .disconnects
            .get_or_create(&crate::metrics::Reason {
                reason: end.kind().into(),
            })
            .inc();
        if let Some(stop) = end.stop().filter(|s| s.lost_a_channel()) {
            let reason = stop.reason();
            tracing::warn!(connection_id = %self.connection_id, reason, "a DataChannel was lost mid-session; the session ends so that nothing is lost without a word");
            self.shared
                .table
                .stats
                .channel_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        match self.leave_table() {
            Some(counts) => self.send_event(Kind::Destroyed, counts, Some(&end)),
            None => {
                let counts = self.shared.table.counts(&self.channel_id);
                self.send_event(Kind::Failed, counts, Some(&end));
            }
        }
        let closing = self.machine.closing(&end);
        let websocket_closed = closing.websocket.is_some();
        let close_channels = closing.close_channels;
        if let Some(outbox) = self.outbox.take() {
            outbox.close(closing).await;
        }
        if let (true, Some(stream)) = (websocket_closed, stream.as_mut()) {
            // Let the client's Close frame come back, so its close is clean.
            let _ = tokio::time::timeout(Duration::from_secs(1), await_client_close(stream)).await;
        }
        drop(stream);
        if close_channels {
            // Close each channel (an SCTP stream reset each) and let the
            // client finish: the SDKs wait for every `onclose`, then close
            // their PeerConnection. Ending the association first would turn
            // those closes into `onerror` (an abnormal disconnect in JS).
            // The engine closes them once what was sent on them (the
            // `close` message included) is acknowledged.
            self.peer.close_channels(CHANNEL_DRAIN_LIMIT);
            // The client closing its PeerConnection shows as the end of the
            // association (a DTLS close_notify does not change the core's
            // connection state); the engine reports both.
            let _ = tokio::time::timeout(CLIENT_CLOSE_GRACE, async {
                while let Some(ev) = events.recv().await {
                    if matches!(ev, PeerEvent::Failed(_) | PeerEvent::AssociationClosed) {
                        break;
                    }
                }
            })
            .await;
        }
        self.peer.close();
        tracing::debug!(connection_id = %self.connection_id, "PeerConnection closed");
    }
}

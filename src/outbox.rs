//! The per-connection outbox: one FIFO queue and one task that owns the
//! connection's sending side, so one connection's messages leave in the
//! order they were queued, whatever transport each one takes.
//!
//! Before `switched` everything goes over the WebSocket. `Out::Switch` sends
//! `switched` there and flips the task to DataChannels; since the flip
//! is itself a queue item, no push is lost or reordered across the switch.
//!
//! Once switched, pushes stop passing through this task at all: the
//! connection's [`Route`] becomes [`Route::DataChannel`] and the hub hands
//! them straight to the WebRTC engine, one command per shard for a whole
//! fan-out. The task drains what was queued before, on the DataChannel,
//! while it holds the route's lock, so nothing queued earlier can be
//! overtaken by a push routed directly.

use bytes::Bytes;
use futures_util::stream::SplitSink;
use futures_util::SinkExt;
use hato_datachannel::Peer;
use hato_signaling::session::Closing;
use hato_signaling::{message, zlib};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

pub type WsSink = SplitSink<WebSocketStream<crate::tls::Stream>, Message>;

/// A server → client message serialised once and shared by every
/// recipient; its zlib form is made on first use, once.
#[derive(Debug)]
pub struct Encoded {
    text: Utf8Bytes,
    zlib: OnceLock<Bytes>,
}

impl Encoded {
    pub fn new(text: String) -> Encoded {
        Encoded {
            text: text.into(),
            zlib: OnceLock::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.text.len()
    }

    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    fn zlib(&self) -> &Bytes {
        self.zlib
            .get_or_init(|| zlib::compress(self.text.as_bytes()).into())
    }

    /// The bytes a DataChannel carries: the zlib form on compressed
    /// labels (sent binary), else the text (sent as a string).
    pub fn bytes(&self, compress: bool) -> Bytes {
        if compress {
            self.zlib().clone()
        } else {
            self.text.clone().into()
        }
    }
}

/// One item of a connection's queue.
#[derive(Debug)]
pub enum Out {
    /// A signaling message that only ever travels on the WebSocket
    /// (`offer`, `ping`).
    Ws(String),
    /// A `push`: on the `push` DataChannel after the switch, else the WebSocket.
    Push(Arc<Encoded>),
    /// A `push` larger than this peer's DataChannel takes: on the
    /// WebSocket whatever the switch (hybrid mode keeps it open).
    PushWs(Arc<Encoded>),
    /// A `notify`: on the `notify` DataChannel after the switch, else the WebSocket.
    Notify(Arc<Encoded>),
    /// Send `switched` on the WebSocket, then use the DataChannels.
    Switch { ignore_disconnect_websocket: bool },
}

impl Out {
    /// The bytes this item holds for its connection, for the byte bound
    /// of the queue.
    fn len(&self) -> usize {
        match self {
            Out::Ws(text) => text.len(),
            Out::Push(frame) | Out::PushWs(frame) | Out::Notify(frame) => frame.len(),
            Out::Switch { .. } => 0,
        }
    }
}

/// Why a session is being ended from outside its own task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kill {
    /// Its outbox was full: it cannot keep up.
    Overflow,
    /// A Disconnect* API call.
    Api,
}

/// What [`Inlet::deliver`] and `Conn::push` did.
#[derive(Debug, Clone)]
pub enum Delivery {
    Queued,
    /// The outbox was full; the connection is being disconnected.
    Overflow,
    /// The session is already ending.
    Gone,
    /// Switched to its DataChannel: the caller sends it there, batched
    /// with the other recipients on the same engine shard.
    Direct {
        peer: Arc<Peer>,
        compress: bool,
    },
}

/// Where a connection's pushes go, shared by its outbox task and its
/// table entry. A std mutex: held for a few instructions, never across an
/// `.await`.
#[derive(Debug, Default)]
pub enum Route {
    /// Through the outbox queue (before `switched`).
    #[default]
    Outbox,
    /// Straight to the `push` DataChannel, zlib-framed if `compress`.
    DataChannel { peer: Arc<Peer>, compress: bool },
}

/// The way into one connection's outbox, shared by its session and its
/// table entry so that both queue the same way: without waiting, bounded
/// in items (the channel) and in bytes (whatever the number of items, a
/// slow peer holds at most `byte_limit`; one item larger than that still
/// goes alone), and a full outbox ends the connection (once) instead of
/// stalling the caller or growing without bound. It also holds the
/// connection's [`Route`].
#[derive(Debug)]
pub struct Inlet {
    connection_id: Arc<str>,
    tx: mpsc::Sender<Out>,
    bytes: Arc<AtomicUsize>,
    byte_limit: usize,
    kill: mpsc::UnboundedSender<Kill>,
    overflowed: AtomicBool,
    route: Arc<Mutex<Route>>,
}

impl Inlet {
    pub fn new(
        connection_id: Arc<str>,
        tx: mpsc::Sender<Out>,
        byte_limit: usize,
        kill: mpsc::UnboundedSender<Kill>,
    ) -> Inlet {
        Inlet {
            connection_id,
            tx,
            bytes: Arc::default(),
            byte_limit,
            kill,
            overflowed: AtomicBool::new(false),
            route: Arc::default(),
        }
    }

    fn try_send(&self, item: Out) -> Result<(), mpsc::error::TrySendError<Out>> {
        let n = item.len();
        let before = self.bytes.fetch_add(n, Ordering::AcqRel);
        if before > 0 && before + n > self.byte_limit {
            self.bytes.fetch_sub(n, Ordering::AcqRel);
            return Err(mpsc::error::TrySendError::Full(item));
        }
        self.tx.try_send(item).inspect_err(|_| {
            self.bytes.fetch_sub(n, Ordering::AcqRel);
        })
    }

    /// Queues `item`; a full outbox asks the session to end.
    pub fn deliver(&self, item: Out) -> Delivery {
        match self.try_send(item) {
            Ok(()) => Delivery::Queued,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !self.overflowed.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        connection_id = %self.connection_id,
                        "outbox full, disconnecting (OUTBOX-OVERFLOW)"
                    );
                    let _ = self.kill.send(Kill::Overflow);
                }
                Delivery::Overflow
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Delivery::Gone,
        }
    }

    /// Asks the session to end for `why`.
    pub fn kill(&self, why: Kill) {
        let _ = self.kill.send(why);
    }

    /// Bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The connection's route, locked.
    pub fn route(&self) -> std::sync::MutexGuard<'_, Route> {
        self.route.lock().unwrap()
    }
}

/// The session's handle on its outbox task.
pub struct Outbox {
    pub inlet: Arc<Inlet>,
    close: oneshot::Sender<Closing>,
    task: JoinHandle<()>,
}

impl Outbox {
    /// Starts the task. `peer` carries the DataChannels used after the
    /// switch; `compress` says whether they are zlib-framed; `kill` is
    /// where a full outbox asks the session to end.
    pub fn spawn(
        ws: WsSink,
        peer: Arc<Peer>,
        compress: bool,
        capacity: usize,
        byte_limit: usize,
        connection_id: Arc<str>,
        kill: mpsc::UnboundedSender<Kill>,
    ) -> Outbox {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let inlet = Arc::new(Inlet::new(connection_id, tx, byte_limit, kill));
        let (close, close_rx) = oneshot::channel();
        let task = tokio::spawn(
            Writer {
                queued: inlet.bytes.clone(),
                ws: Some(ws),
                peer,
                compress,
                switched: false,
                route: inlet.route.clone(),
            }
            .run(rx, close_rx),
        );
        Outbox { inlet, close, task }
    }

    /// Sends what `close` says (its WebSocket Close frame and `close`
    /// message; the channels are the session's) ahead of anything still
    /// queued, then waits (bounded) for the task to finish sending it.
    pub async fn close(self, close: Closing) {
        let _ = self.close.send(close);
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(3), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

/// Largest number of queued items written before one flush.
const BATCH: usize = 64;

/// The outbox task: owns the connection's sending side.
struct Writer {
    /// The queue's byte count, given back as items leave it.
    queued: Arc<AtomicUsize>,
    ws: Option<WsSink>,
    peer: Arc<Peer>,
    compress: bool,
    switched: bool,
    route: Arc<Mutex<Route>>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Out>, mut close_rx: oneshot::Receiver<Closing>) {
        loop {
            // A close goes ahead of anything queued. Checked without a
            // waker while items are waiting; waited on with one otherwise.
            match close_rx.try_recv() {
                Ok(close) => return self.close(close).await,
                Err(oneshot::error::TryRecvError::Closed) => {
                    return self.close(Closing::default()).await
                }
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            let first = match rx.try_recv() {
                Ok(item) => item,
                Err(mpsc::error::TryRecvError::Disconnected) => return,
                Err(mpsc::error::TryRecvError::Empty) => tokio::select! {
                    biased;
                    close = &mut close_rx => return self.close(close.unwrap_or_default()).await,
                    item = rx.recv() => match item {
                        Some(item) => item,
                        None => return,
                    },
                },
            };
            // Write a batch and flush once: one syscall for many pushes.
            let work = async {
                self.send(first, &mut rx).await;
                for _ in 1..BATCH {
                    match rx.try_recv() {
                        Ok(item) => self.send(item, &mut rx).await,
                        Err(_) => break,
                    }
                }
                self.flush().await;
            };
            // The writes first: while they go through at once, the close
            // is not polled (it is checked above); one stuck on a slow
            // peer's socket is cut short by it.
            tokio::select! {
                biased;
                () = work => {}
                close = &mut close_rx => return self.close(close.unwrap_or_default()).await,
            }
        }
    }

    async fn ws_feed(&mut self, text: Utf8Bytes) {
        if let Some(ws) = &mut self.ws {
            if ws.feed(Message::Text(text)).await.is_err() {
                // The session sees the loss on its reading half.
                self.ws = None;
            }
        }
    }

    async fn flush(&mut self) {
        if let Some(ws) = &mut self.ws {
            if ws.flush().await.is_err() {
                self.ws = None;
            }
        }
    }

    fn dc_send(&self, label: &str, frame: &Encoded) {
        self.peer
            .send(label, frame.bytes(self.compress), !self.compress);
    }

    /// After `switched`: sends what is still queued on the DataChannels and
    /// routes later pushes straight to the engine, under the route's lock
    /// (see the module comment). Returns, in order, the texts queued for
    /// the WebSocket whatever the switch: signaling messages, and pushes
    /// too large for this peer's DataChannel.
    fn take_route(&mut self, rx: &mut mpsc::Receiver<Out>) -> Vec<Utf8Bytes> {
        let mut later = Vec::new();
        let mut route = self.route.lock().unwrap();
        while let Ok(item) = rx.try_recv() {
            self.taken(&item);
            match item {
                Out::Push(frame) => self.dc_send("push", &frame),
                Out::Notify(frame) => self.dc_send("notify", &frame),
                Out::Ws(text) => later.push(text.into()),
                Out::PushWs(frame) => later.push(frame.text.clone()),
                // One switch per connection: a second has nothing to do.
                Out::Switch { .. } => {}
            }
        }
        *route = Route::DataChannel {
            peer: self.peer.clone(),
            compress: self.compress,
        };
        later
    }

    fn taken(&self, out: &Out) {
        self.queued.fetch_sub(out.len(), Ordering::AcqRel);
    }

    async fn send(&mut self, out: Out, rx: &mut mpsc::Receiver<Out>) {
        self.taken(&out);
        match out {
            Out::Ws(text) => self.ws_feed(text.into()).await,
            Out::Push(frame) if self.switched => self.dc_send("push", &frame),
            Out::Notify(frame) if self.switched => self.dc_send("notify", &frame),
            Out::Push(frame) | Out::PushWs(frame) | Out::Notify(frame) => {
                self.ws_feed(frame.text.clone()).await
            }
            Out::Switch {
                ignore_disconnect_websocket,
            } => {
                self.ws_feed(message::switched(ignore_disconnect_websocket).into())
                    .await;
                self.flush().await;
                self.switched = true;
                if ignore_disconnect_websocket {
                    // Nothing more goes on the WebSocket in this mode (§3.9).
                    self.ws = None;
                }
                for text in self.take_route(rx) {
                    self.ws_feed(text).await;
                }
            }
        }
    }

    async fn close(mut self, close: Closing) {
        if let Some((code, reason)) = close.signaling {
            let text = message::close(code, &reason);
            let frame = Encoded::new(text);
            self.dc_send("signaling", &frame);
        }
        if let (Some((code, reason)), Some(ws)) = (close.websocket, &mut self.ws) {
            let frame = CloseFrame {
                code: CloseCode::from(code),
                reason: truncate_reason(&reason).into(),
            };
            let _ = ws.send(Message::Close(Some(frame))).await;
        }
    }
}

/// A Close frame's reason is at most 123 bytes (RFC 6455 §5.5).
pub fn truncate_reason(reason: &str) -> &str {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use hato_datachannel::{Engine, EngineConfig};

    /// A push for the WebSocket queued behind `Switch` (a hybrid peer's
    /// push too large for its DataChannel, racing the switch) still leaves
    /// on the WebSocket, after `switched`.
    #[tokio::test(flavor = "current_thread")]
    async fn a_websocket_push_queued_behind_the_switch_is_sent() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/", listener.local_addr().unwrap());
        let client = tokio::spawn(async move { tokio_tungstenite::connect_async(url).await });
        let (tcp, _) = listener.accept().await.unwrap();
        let stream = crate::tls::Stream::accept(None, tcp).await.unwrap();
        let (sink, _stream) = tokio_tungstenite::accept_async(stream)
            .await
            .unwrap()
            .split();
        let (mut client, _) = client.await.unwrap().unwrap();
        let engine = Engine::start(EngineConfig::server("127.0.0.1:0".parse().unwrap())).unwrap();
        let (peer, _offer, _events) = engine.offer(&["push"]).await.unwrap();
        let (kill, _kill_rx) = mpsc::unbounded_channel();
        let outbox = Outbox::spawn(sink, Arc::new(peer), false, 16, 1 << 20, "c".into(), kill);
        // Both queued before the task first runs (one thread, no await).
        let big = r#"{"type":"push","data":{"big":true}}"#;
        outbox
            .inlet
            .try_send(Out::Switch {
                ignore_disconnect_websocket: false,
            })
            .unwrap();
        outbox
            .inlet
            .try_send(Out::PushWs(Arc::new(Encoded::new(big.into()))))
            .unwrap();
        let mut next = async || {
            let m = tokio::time::timeout(Duration::from_secs(2), client.next()).await;
            m.ok()
                .flatten()
                .map(|m| m.unwrap().into_text().unwrap().to_string())
        };
        let switched = next().await.expect("switched");
        assert!(switched.contains(r#""type":"switched""#), "{switched}");
        assert_eq!(next().await.as_deref(), Some(big), "the push was lost");
        assert!(matches!(*outbox.inlet.route(), Route::DataChannel { .. }));
    }
}

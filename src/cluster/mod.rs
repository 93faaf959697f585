//! hato nodes as one cluster over NATS (`--cluster-nats-url`; docs/cluster.md).
//!
//! Every node is the authority on its own connections. What the others
//! need of them travels on four kinds of subject:
//!
//! - `hato.ch.<hex of channel_id>`: the pushes and disconnects for one
//!   channel, published by the node whose API accepted them. A node
//!   subscribes while it holds connections in the channel ([`ChannelGuard`])
//!   and so receives only what it can deliver. One publisher and one
//!   subject per channel: every node sees one API node's pushes in the
//!   order it accepted them.
//! - `hato.presence`: each node's joins and leaves (what `notify` and the
//!   channel counts need), its heartbeats and its goodbye, numbered per
//!   node (a random epoch per start, a sequence per event). A receiver that
//!   sees a gap — it was cut off, or joined late — asks for a snapshot.
//! - `hato.snapshot.<hex of node>`: one node's connections now, with the
//!   sequence number they stand at.
//! - `hato.list`: the listing targets' scatter-gather; every node answers
//!   with its own connections.
//!
//! A node not heard from for `--cluster-node-timeout-ms` is dropped from
//! every count, and its connections leave with `connection.destroyed`.
//! Without a NATS connection a push that needs other nodes gets 503
//! `CLUSTER-UNAVAILABLE` and is delivered nowhere; the client reconnects by
//! itself.
//!
//! The rules of presence (epochs, gaps, snapshots, expiry, the limits
//! another node is held to) are a sans-I/O machine in [`presence`]; this
//! module is its shell, and reaches the broker only through [`Broker`]
//! (NATS is the one implementation, in [`broker`]).

mod broker;
mod presence;
pub mod stream;

pub use broker::{nats, Broker, StreamBounds};
pub use presence::{Limits, Load};

use crate::hub::{self, Origin};
use crate::table::{Conn, Member};
use crate::Shared;
use bytes::Bytes;
use futures_util::StreamExt;
use hato_signaling::api::Audience;
use presence::{Announcement, Effect, Nodes, Snapshot};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

const PRESENCE: &str = "hato.presence";
pub const LIST: &str = "hato.list";
/// Messages waiting for the NATS client, in order; beyond, pushes get 503.
const QUEUE: usize = 65_536;
/// The most one reply message carries (NATS refuses over 1 MiB by default).
const CHUNK_BYTES: usize = 512 * 1024;
/// The bytes of one node's answer to a snapshot or listing request, at
/// most: 50 000 members (the default --max-connections) of ~10 KB each.
const MAX_ANSWER_BYTES: usize = 512 << 20;

/// The most bytes of kept pushes one recovering joiner reads from the
/// stream: what a stranger's connect can make a node hold for the length
/// of a handshake. Beyond, the joiner is told `gap: "expired"` and given
/// the newest.
const PREFETCH_BYTES: usize = 16 << 20;

/// Counts and logs (at most once a second) what another node announced
/// beyond this node's limits.
fn refuse(cluster: &Cluster, node: &str, why: &'static str) {
    static REFUSED: crate::limits::Throttle = crate::limits::Throttle::new(Duration::from_secs(1));
    cluster.stats.refused.fetch_add(1, Ordering::Relaxed);
    if let Some(folded) = REFUSED.hit() {
        let node: String = node.chars().take(64).collect();
        tracing::warn!(
            node,
            why,
            refused_since_last_line = folded,
            "cluster: announcement ignored"
        );
    }
}

/// Hex of the bytes: any channel id or node name is a valid subject token.
fn token(s: &str) -> String {
    use std::fmt::Write;
    s.bytes()
        .fold(String::with_capacity(s.len() * 2), |mut t, b| {
            let _ = write!(t, "{b:02x}");
            t
        })
}

fn channel_subject(channel_id: &str) -> String {
    format!("hato.ch.{}", token(channel_id))
}

fn snapshot_subject(node: &str) -> String {
    format!("hato.snapshot.{}", token(node))
}

/// One push or disconnect as it crosses to the other nodes.
#[derive(Debug, Serialize, Deserialize)]
pub struct Item<'a> {
    /// "push" or "disconnect".
    pub op: &'a str,
    /// Whom in the channel it addresses.
    pub to: Audience,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub data: Option<&'a RawValue>,
}

/// What is published on a channel's subject: its items, in order.
#[derive(Debug, Serialize, Deserialize)]
pub struct Wire<'a> {
    pub channel_id: String,
    /// Through the stream: the channel's epoch and the first item's
    /// offset (the others follow it).
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<&'a str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(borrow)]
    pub items: Vec<Item<'a>>,
}

impl<'a> Wire<'a> {
    /// Through the stream: its pushes with their offsets, in order.
    pub fn pushes(&self) -> impl Iterator<Item = (u64, &Item<'a>, &'a RawValue)> + '_ {
        let first = self.offset.unwrap_or_default();
        self.items
            .iter()
            .enumerate()
            .filter(|(_, item)| item.op == "push")
            .filter_map(move |(i, item)| Some((first + i as u64, item, item.data?)))
    }
}

/// One part of a node's answer to a snapshot or listing request.
#[derive(Debug, Deserialize)]
struct Chunk {
    node: String,
    epoch: u64,
    seq: u64,
    part: usize,
    parts: usize,
    items: Vec<Box<RawValue>>,
}

/// A node's complete answer.
pub struct Answer {
    pub epoch: u64,
    pub seq: u64,
    pub items: Vec<Box<RawValue>>,
}

/// Counters an operator reads (GetStatsReport `cluster`).
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Messages handed to NATS.
    pub published: AtomicU64,
    /// Channel messages received from other nodes.
    pub received: AtomicU64,
    /// API calls answered 503 CLUSTER-UNAVAILABLE.
    pub unavailable: AtomicU64,
    /// Snapshots asked for after a gap in another node's announcements.
    pub resyncs: AtomicU64,
    /// Nodes dropped for silence.
    pub nodes_lost: AtomicU64,
    /// Messages that could not be queued or published.
    pub publish_failures: AtomicU64,
    /// What another node announced beyond this node's own limits (a
    /// member, a node name, a view or an answer too large): ignored.
    pub refused: AtomicU64,
    /// With the stream: pushes NATS lost on the way here, read from the
    /// stream and delivered in their place.
    pub refilled: AtomicU64,
}

/// This node's own connections as the others know them.
#[derive(Default)]
struct Mine {
    seq: u64,
    members: HashMap<Arc<str>, Arc<Member>>,
}

/// A channel subscription and the sessions that hold it.
struct Sub {
    refs: usize,
    ready: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

pub struct Cluster {
    pub node: Arc<str>,
    epoch: u64,
    broker: Arc<dyn Broker>,
    out: mpsc::Sender<(String, Bytes)>,
    out_rx: Mutex<Option<mpsc::Receiver<(String, Bytes)>>>,
    /// Held while a push is delivered here and queued for the others, so
    /// that both see the pushes of this node in one order.
    order: Mutex<()>,
    mine: Mutex<Mine>,
    channels: Mutex<HashMap<Arc<str>, Sub>>,
    /// The other nodes heard from within the node timeout.
    live: Mutex<HashMap<String, Load>>,
    /// The node this is a member for: where remote pushes are delivered
    /// and remote connections counted.
    shared: Weak<Shared>,
    limits: Limits,
    node_timeout: Duration,
    pub request_timeout: Duration,
    pub stats: ClusterStats,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// With `--history-size`: the stream that orders and keeps every
    /// channel's pushes ([`stream`]), and whether it is there now.
    pub streams: Option<Arc<stream::Streams>>,
    stream_ready: std::sync::atomic::AtomicBool,
}

/// Why a call that needs the cluster cannot be served now.
#[derive(Debug, Clone, Copy)]
pub struct Unavailable(pub &'static str);

/// Places reserved in the NATS queue while this node's pushes are held in
/// one order: deliver locally, then [`Outgoing::send`].
pub struct Outgoing<'a> {
    _order: std::sync::MutexGuard<'a, ()>,
    permits: Vec<mpsc::Permit<'a, (String, Bytes)>>,
}

impl Outgoing<'_> {
    /// Publishes `items` for `channel_id` to the nodes that hold
    /// connections in it.
    pub fn send(&mut self, channel_id: &str, items: Vec<Item<'_>>) {
        let Some(permit) = self.permits.pop() else {
            debug_assert!(false, "more sends than places reserved");
            return;
        };
        let wire = Wire {
            channel_id: channel_id.to_owned(),
            epoch: None,
            offset: None,
            items,
        };
        let payload = serde_json::to_vec(&wire).expect("a wire message serialises");
        permit.send((channel_subject(channel_id), payload.into()));
    }
}

/// A session's hold on its channel's subscription: the first one in a
/// channel subscribes, the last one out unsubscribes.
pub struct ChannelGuard {
    cluster: Arc<Cluster>,
    channel_id: Arc<str>,
}

impl Drop for ChannelGuard {
    fn drop(&mut self) {
        let mut channels = self.cluster.channels.lock().unwrap();
        if let Some(sub) = channels.get_mut(&self.channel_id) {
            sub.refs -= 1;
            if sub.refs == 0 {
                // Dropping the subscriber inside the task unsubscribes.
                sub.task.abort();
                channels.remove(&self.channel_id);
            }
        }
    }
}

impl Cluster {
    /// A cluster member named `node` over `broker`, for the node whose
    /// state is `shared`; [`Cluster::start`] sets it going.
    pub fn new(
        broker: Arc<dyn Broker>,
        node: String,
        node_timeout: Duration,
        request_timeout: Duration,
        limits: Limits,
        shared: Weak<Shared>,
        history: Option<StreamBounds>,
    ) -> Cluster {
        let (out, out_rx) = mpsc::channel(QUEUE);
        Cluster {
            streams: history.map(|b| Arc::new(stream::Streams::new(broker.clone(), b))),
            stream_ready: Default::default(),
            node: node.into(),
            // Random per start: tells a restarted node from its old self.
            epoch: {
                use std::hash::{BuildHasher, Hasher};
                std::collections::hash_map::RandomState::new()
                    .build_hasher()
                    .finish()
            },
            broker,
            out,
            out_rx: Mutex::new(Some(out_rx)),
            order: Mutex::new(()),
            mine: Mutex::default(),
            channels: Mutex::default(),
            live: Mutex::default(),
            shared,
            limits,
            node_timeout,
            request_timeout,
            stats: ClusterStats::default(),
            tasks: Mutex::default(),
        }
    }

    /// Starts the publisher, the presence and the responders.
    pub fn start(self: &Arc<Self>) {
        let rx = self.out_rx.lock().unwrap().take().expect("started once");
        let mut tasks = self.tasks.lock().unwrap();
        tasks.push(tokio::spawn(publisher(self.clone(), rx)));
        tasks.push(tokio::spawn(presence(self.clone())));
        tasks.push(tokio::spawn(responder(
            self.clone(),
            snapshot_subject(&self.node),
            Request::Snapshot,
        )));
        tasks.push(tokio::spawn(responder(
            self.clone(),
            LIST.into(),
            Request::List,
        )));
        if self.streams.is_some() {
            tasks.push(tokio::spawn(keep_stream(self.clone())));
        }
    }

    /// In a cluster whose stream orders the pushes: stores `items` (one
    /// channel's, in order) and returns their positions; every node, this
    /// one included, delivers them as the stream republishes them.
    pub async fn publish_ordered(
        &self,
        channel_id: &str,
        items: &[Item<'_>],
    ) -> Result<Vec<crate::history::Position>, Unavailable> {
        let streams = self
            .streams
            .as_ref()
            .expect("publish_ordered only with a stream");
        if !self.available() {
            return Err(self.unavailable());
        }
        if !self.stream_ready.load(Ordering::Relaxed) {
            self.stats.unavailable.fetch_add(1, Ordering::Relaxed);
            return Err(Unavailable(
                "the cluster's JetStream stream is not available",
            ));
        }
        let out = streams.publish(channel_id, items).await;
        match &out {
            Ok(_) => {
                self.stats
                    .published
                    .fetch_add(items.len() as u64, Ordering::Relaxed);
            }
            Err(_) => {
                self.stats.unavailable.fetch_add(1, Ordering::Relaxed);
                // Made again if it is gone (a NATS server restarted).
                self.stream_ready.store(false, Ordering::Relaxed);
            }
        }
        out
    }

    /// For a joiner that recovers in a cluster whose stream keeps the
    /// history: holds its channel's log and puts in it what the stream
    /// kept after the position asked for, so that the joiner is given it,
    /// and what arrives until it enters, when it enters.
    pub async fn prefetch(
        &self,
        shared: &Shared,
        channel_id: &str,
        ask: &crate::history::Recover,
    ) -> Option<crate::history::Hold> {
        let streams = self.streams.as_ref()?;
        let hold = shared.history.hold(channel_id);
        let after = match ask {
            crate::history::Recover::After { epoch, offset } => {
                if **epoch != *hold.0.lock().unwrap().epoch {
                    return Some(hold);
                }
                *offset
            }
            crate::history::Recover::Last(_) => 0,
        };
        let size = shared.config.history_size;
        let since = match streams
            .since(
                channel_id,
                after,
                size,
                PREFETCH_BYTES.min(shared.config.history_max_bytes),
            )
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(channel_id, why = e.0, "cluster: could not read the history");
                return Some(hold);
            }
        };
        let Some(epoch) = since.epoch.clone() else {
            return Some(hold);
        };
        let older = since.pushes(after);
        hold.0
            .lock()
            .unwrap()
            .backfill(Instant::now(), &epoch, older);
        Some(hold)
    }

    /// Whether NATS is reachable now.
    pub fn available(&self) -> bool {
        self.broker.available()
    }

    /// The other nodes alive now, by name.
    pub fn live_nodes(&self) -> HashSet<String> {
        self.live.lock().unwrap().keys().cloned().collect()
    }

    /// Where to send a client instead of this node: the live node that
    /// names its signaling URL, is not draining and has the fewest
    /// connections — fewer than `fewer_than` when given.
    pub fn redirect_target(&self, fewer_than: Option<usize>) -> Option<String> {
        self.live
            .lock()
            .unwrap()
            .values()
            .filter(|l| !l.draining && fewer_than.is_none_or(|n| l.connections < n))
            .filter_map(|l| Some((l.connections, l.url.clone()?)))
            .min()
            .map(|(_, url)| url)
    }

    fn unavailable(&self) -> Unavailable {
        self.stats.unavailable.fetch_add(1, Ordering::Relaxed);
        Unavailable("the cluster's NATS server is unreachable from this node")
    }

    /// Takes this node's push order and `n` places in the NATS queue, or
    /// says why not (NATS down, queue full).
    pub fn begin(&self, n: usize) -> Result<Outgoing<'_>, Unavailable> {
        let order = self.order.lock().unwrap();
        if !self.available() {
            return Err(self.unavailable());
        }
        let permits = match self.out.try_reserve_many(n) {
            Ok(p) => p.collect::<Vec<_>>(),
            Err(_) => {
                self.stats.unavailable.fetch_add(1, Ordering::Relaxed);
                return Err(Unavailable("the queue to the cluster is full"));
            }
        };
        Ok(Outgoing {
            _order: order,
            permits,
        })
    }

    /// Holds `channel_id`'s subscription for a session; waits (at most the
    /// request timeout) until NATS has it, so that a push accepted by
    /// another node after this peer joined reaches it.
    pub async fn enter(self: &Arc<Self>, channel_id: &str) -> ChannelGuard {
        let channel_id: Arc<str> = channel_id.into();
        let mut ready = {
            let mut channels = self.channels.lock().unwrap();
            let sub = channels.entry(channel_id.clone()).or_insert_with(|| {
                let (tx, rx) = watch::channel(false);
                Sub {
                    refs: 0,
                    ready: rx,
                    task: tokio::spawn(channel_task(self.clone(), channel_id.clone(), tx)),
                }
            });
            sub.refs += 1;
            sub.ready.clone()
        };
        // The guard exists before the wait, so that a session dropped
        // while waiting still gives its hold back.
        let guard = ChannelGuard {
            cluster: self.clone(),
            channel_id,
        };
        let _ = tokio::time::timeout(self.request_timeout, ready.wait_for(|r| *r)).await;
        guard
    }

    /// Tells the others `conn` joined (after it entered the table).
    pub fn joined(&self, conn: &Conn) {
        let member = Arc::new(Member::of(&self.node, conn));
        let mut mine = self.mine.lock().unwrap();
        mine.seq += 1;
        mine.members
            .insert(member.connection_id.clone(), member.clone());
        let msg = Announcement::Join {
            node: self.node.to_string(),
            epoch: self.epoch,
            seq: mine.seq,
            member: Box::new((*member).clone()),
        };
        self.queue(PRESENCE, &msg);
    }

    /// Tells the others `conn` left (after it left the table).
    pub fn left(&self, conn: &Conn) {
        let mut mine = self.mine.lock().unwrap();
        if mine.members.remove(&conn.connection_id).is_none() {
            return;
        }
        mine.seq += 1;
        let msg = Announcement::Leave {
            node: self.node.to_string(),
            epoch: self.epoch,
            seq: mine.seq,
            channel_id: conn.channel_id.clone(),
            connection_id: conn.connection_id.clone(),
        };
        self.queue(PRESENCE, &msg);
    }

    /// Queues a presence message behind everything this node sent before;
    /// a message that does not fit is lost, and the gap it leaves in the
    /// sequence makes the others ask for a snapshot.
    fn queue(&self, subject: &str, msg: &Announcement) {
        let payload = serde_json::to_vec(msg).expect("presence serialises");
        if self
            .out
            .try_send((subject.to_owned(), payload.into()))
            .is_err()
        {
            self.stats.publish_failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn heartbeat(&self) {
        let mine = self.mine.lock().unwrap();
        let load = match self.shared.upgrade() {
            Some(shared) => Load {
                url: shared.config.public_signaling_url.clone(),
                connections: shared.table.len(),
                draining: shared.draining(),
            },
            None => Load::default(),
        };
        let msg = Announcement::Heartbeat {
            node: self.node.to_string(),
            epoch: self.epoch,
            seq: mine.seq,
            load,
        };
        self.queue(PRESENCE, &msg);
    }

    /// On shutdown, after the sessions have ended: tells the others this
    /// node is gone, and waits (briefly) for NATS to have it all.
    pub async fn goodbye(&self) {
        self.queue(
            PRESENCE,
            &Announcement::Bye {
                node: self.node.to_string(),
                epoch: self.epoch,
            },
        );
        let until = Instant::now() + Duration::from_secs(1);
        while self.out.capacity() < QUEUE && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.broker.flush()).await;
        self.stop();
    }

    /// Stops the publisher, the presence and the responders.
    pub fn stop(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    /// Asks `subject` and collects the answers of the nodes in `expect`
    /// (and of any other node that answers) until all of `expect` have
    /// answered or the request timeout passes. Returns the answers by node
    /// and the expected nodes that did not answer.
    pub async fn gather(
        &self,
        subject: String,
        request: Bytes,
        expect: HashSet<String>,
    ) -> Result<(HashMap<String, Answer>, Vec<String>), Unavailable> {
        if !self.available() {
            return Err(self.unavailable());
        }
        let inbox = self.broker.new_inbox();
        let mut sub = self
            .broker
            .subscribe(inbox.clone())
            .await
            .map_err(|_| self.unavailable())?;
        self.broker
            .request(subject, inbox, request)
            .await
            .map_err(|_| self.unavailable())?;
        let mut parts: HashMap<String, (usize, Answer)> = HashMap::new();
        let mut bytes: HashMap<String, usize> = HashMap::new();
        let mut over: HashSet<String> = HashSet::new();
        let complete = |parts: &HashMap<String, (usize, Answer)>, node: &str| {
            parts.get(node).is_some_and(|(left, _)| *left == 0)
        };
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        while !expect.iter().all(|n| complete(&parts, n)) {
            let Ok(Some(msg)) = tokio::time::timeout_at(deadline, sub.next()).await else {
                break;
            };
            let Ok(chunk) = serde_json::from_slice::<Chunk>(&msg.payload) else {
                continue;
            };
            // Only nodes asked for, and each within a byte bound: a
            // node's answer beyond it is dropped whole.
            if !expect.contains(&chunk.node) || over.contains(&chunk.node) {
                continue;
            }
            let got = bytes.entry(chunk.node.clone()).or_insert(0);
            *got += msg.payload.len();
            if *got > MAX_ANSWER_BYTES {
                refuse(self, &chunk.node, "an answer over 512 MiB");
                parts.remove(&chunk.node);
                over.insert(chunk.node);
                continue;
            }
            let entry = parts.entry(chunk.node).or_insert_with(|| {
                (
                    chunk.parts,
                    Answer {
                        epoch: chunk.epoch,
                        seq: chunk.seq,
                        items: Vec::new(),
                    },
                )
            });
            if entry.1.epoch != chunk.epoch || chunk.part >= chunk.parts || entry.0 == 0 {
                continue;
            }
            entry.0 -= 1;
            entry.1.items.extend(chunk.items);
        }
        let missing = expect
            .into_iter()
            .filter(|n| !complete(&parts, n))
            .collect();
        let answers = parts
            .into_iter()
            .filter(|(_, (left, _))| *left == 0)
            .map(|(node, (_, a))| (node, a))
            .collect();
        Ok((answers, missing))
    }
}

/// Hands queued messages to NATS, one at a time, in order.
async fn publisher(cluster: Arc<Cluster>, mut rx: mpsc::Receiver<(String, Bytes)>) {
    static FAILURES: crate::limits::Throttle = crate::limits::Throttle::new(Duration::from_secs(1));
    while let Some((subject, payload)) = rx.recv().await {
        match cluster.broker.publish(subject, payload).await {
            Ok(()) => cluster.stats.published.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                if let Some(folded) = FAILURES.hit() {
                    tracing::warn!(error = %e, failures_folded = folded, "cluster: publish failed");
                }
                cluster
                    .stats
                    .publish_failures
                    .fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// Receives one channel's pushes and disconnects from the other nodes.
/// With the stream, delivers its pushes in its order: one that NATS lost
/// on the way is read from the stream before the next is delivered.
async fn channel_task(cluster: Arc<Cluster>, channel_id: Arc<str>, ready: watch::Sender<bool>) {
    let mut sub = match cluster.broker.subscribe(channel_subject(&channel_id)).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%channel_id, error = %e, "cluster: could not subscribe");
            let _ = ready.send(true);
            return;
        }
    };
    // The server has the subscription once it answers a ping sent after
    // it (when connected; else the client subscribes again on reconnect).
    if cluster.available() {
        let _ = tokio::time::timeout(cluster.request_timeout, cluster.broker.flush()).await;
    }
    // With the stream: where the channel stands before anything is
    // delivered here. The task holds the log, and so its position.
    let mut cursor = Cursor::default();
    let log = match (&cluster.streams, cluster.shared.upgrade()) {
        (Some(streams), Some(shared)) => {
            let log = shared.history.log(&channel_id);
            match streams.position(&channel_id).await {
                Ok(Some((epoch, offset, seq))) => {
                    log.lock().unwrap().start_at(&epoch, offset);
                    cursor = Cursor { seq, known: true };
                }
                Ok(None) => cursor.known = true,
                Err(e) => {
                    tracing::warn!(%channel_id, why = e.0, "cluster: could not read the channel's position")
                }
            }
            Some(log)
        }
        _ => None,
    };
    let _ = ready.send(true);
    let weak = cluster.shared.clone();
    drop(cluster);
    // When NATS may have dropped messages (a lost connection, a slow
    // subscription), the stream is asked once whether the channel's tail
    // reached this node: a lost last message has no successor to reveal
    // it. A gap before a later message is seen without asking.
    let mut tail = tokio::time::interval(Duration::from_secs(1));
    tail.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut losses_seen = broker::LOSSES.load(Ordering::Relaxed);
    loop {
        let msg = tokio::select! {
            msg = sub.next() => match msg {
                Some(msg) => msg,
                None => break,
            },
            _ = tail.tick(), if log.is_some() => {
                let losses = broker::LOSSES.load(Ordering::Relaxed);
                if losses == losses_seen {
                    continue;
                }
                let Some(shared) = weak.upgrade() else { break };
                let Some(cluster) = &shared.cluster else { break };
                if let (Some(streams), Some(log)) = (&cluster.streams, &log) {
                    match streams.position(&channel_id).await {
                        Ok(Some((epoch, _, seq))) => {
                            losses_seen = losses;
                            let ours = log.lock().unwrap().epoch.clone();
                            if epoch == ours && cursor.known && seq > cursor.seq {
                                fill(&shared, streams, &channel_id, &mut cursor, seq + 1).await;
                            }
                        }
                        Ok(None) => losses_seen = losses,
                        // Asked again at the next tick.
                        Err(_) => {}
                    }
                }
                continue;
            }
        };
        let Some(shared) = weak.upgrade() else { break };
        let Some(cluster) = &shared.cluster else {
            break;
        };
        cluster.stats.received.fetch_add(1, Ordering::Relaxed);
        match (msg.stream, &cluster.streams, &log) {
            (Some(stored), Some(streams), Some(log)) => {
                let Ok(wire) = serde_json::from_slice::<Wire<'_>>(&msg.payload) else {
                    tracing::debug!("cluster: unreadable stream message");
                    continue;
                };
                let same_epoch = wire.epoch.is_some_and(|e| *e == *log.lock().unwrap().epoch);
                if same_epoch && cursor.known && stored.seq <= cursor.seq {
                    continue;
                }
                if same_epoch && cursor.known && stored.previous > cursor.seq {
                    fill(&shared, streams, &channel_id, &mut cursor, stored.seq).await;
                }
                deliver_stored(&shared, &wire);
                cursor = Cursor {
                    seq: stored.seq,
                    known: true,
                };
            }
            _ => apply_from_cluster(&shared, &msg.payload),
        }
    }
}

/// The stream sequence of the last message a channel task delivered.
#[derive(Default)]
struct Cursor {
    seq: u64,
    known: bool,
}

/// Reads from the stream and delivers a channel's messages after the
/// cursor and before `until`: what NATS lost on the way here.
async fn fill(
    shared: &Shared,
    streams: &stream::Streams,
    channel_id: &str,
    cursor: &mut Cursor,
    until: u64,
) {
    let subject = stream::stream_subject(channel_id);
    let mut filled = 0;
    while cursor.seq + 1 < until {
        match streams.next(&subject, cursor.seq + 1).await {
            Ok(Some((seq, payload))) if seq < until => {
                if let Ok(wire) = serde_json::from_slice::<Wire<'_>>(&payload) {
                    deliver_stored(shared, &wire);
                }
                cursor.seq = seq;
                filled += 1;
                if let Some(c) = &shared.cluster {
                    c.stats.refilled.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(
                    channel_id,
                    why = e.0,
                    "cluster: could not read missed pushes"
                );
                break;
            }
        }
    }
    tracing::info!(
        channel_id,
        filled,
        "cluster: pushes NATS lost on the way read from the stream"
    );
}

/// Delivers one stored message's pushes here, at their offsets.
fn deliver_stored(shared: &Shared, wire: &Wire<'_>) {
    let Some(epoch) = wire.epoch else { return };
    for (offset, item, data) in wire.pushes() {
        let push = hub::Push {
            channel_id: &wire.channel_id,
            audience: item.to.as_ref(),
            data: data.get(),
        };
        hub::deliver_at(shared, push, epoch, offset);
    }
}

/// Makes the stream at start, and again whenever it went missing.
async fn keep_stream(cluster: Arc<Cluster>) {
    let Some(streams) = &cluster.streams else {
        return;
    };
    let mut logged = false;
    loop {
        if !cluster.stream_ready.load(Ordering::Relaxed) && cluster.available() {
            match streams.ensure().await {
                Ok(()) => {
                    cluster.stream_ready.store(true, Ordering::Relaxed);
                    tracing::info!(
                        stream = stream::STREAM,
                        "cluster: JetStream stream ready; one order and one history per channel"
                    );
                    logged = false;
                }
                Err(e) if !logged => {
                    tracing::error!(error = %e, "cluster: no JetStream stream (is the NATS server run with -js?); pushes get 503 until there is one");
                    logged = true;
                }
                Err(_) => {}
            }
        }
        streams.sweep();
        let ready = cluster.stream_ready.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(if ready { 2000 } else { 200 })).await;
    }
}

#[derive(Clone, Copy)]
enum Request {
    Snapshot,
    List,
}

/// Answers snapshot or listing requests with this node's connections, in
/// parts of at most [`CHUNK_BYTES`].
async fn responder(cluster: Arc<Cluster>, subject: String, kind: Request) {
    let Ok(mut sub) = cluster.broker.subscribe(subject).await else {
        return;
    };
    while let Some(msg) = sub.next().await {
        let Some(reply) = msg.reply else { continue };
        let (seq, items): (u64, Vec<String>) = match kind {
            Request::Snapshot => {
                let mine = cluster.mine.lock().unwrap();
                let items = mine
                    .members
                    .values()
                    .map(|m| serde_json::to_string(&**m).expect("a member serialises"))
                    .collect();
                (mine.seq, items)
            }
            Request::List => {
                let Some(shared) = cluster.shared.upgrade() else {
                    continue;
                };
                let channel = serde_json::from_slice::<serde_json::Value>(&msg.payload)
                    .ok()
                    .and_then(|v| v["channel_id"].as_str().map(str::to_owned));
                let items = crate::hub::local_listing(&shared, channel.as_deref())
                    .iter()
                    .map(|v| v.to_string())
                    .collect();
                (0, items)
            }
        };
        for part in chunks(&cluster.node, cluster.epoch, seq, &items) {
            let _ = cluster.broker.publish(reply.clone(), part).await;
        }
    }
}

/// `items` (JSON texts) in messages of about [`CHUNK_BYTES`]; at least one.
fn chunks(node: &str, epoch: u64, seq: u64, items: &[String]) -> Vec<Bytes> {
    let mut groups: Vec<Vec<&str>> = vec![Vec::new()];
    let mut size = 0;
    for item in items {
        if size + item.len() > CHUNK_BYTES && !groups.last().unwrap().is_empty() {
            groups.push(Vec::new());
            size = 0;
        }
        size += item.len() + 1;
        groups.last_mut().unwrap().push(item);
    }
    let parts = groups.len();
    let node = serde_json::to_string(node).expect("a string serialises");
    groups
        .iter()
        .enumerate()
        .map(|(part, g)| {
            Bytes::from(format!(
                r#"{{"node":{node},"epoch":{epoch},"seq":{seq},"part":{part},"parts":{parts},"items":[{}]}}"#,
                g.join(",")
            ))
        })
        .collect()
}

/// Follows the other nodes' presence ([`Nodes`]) and carries out what it
/// decides; sends this node's heartbeats.
async fn presence(cluster: Arc<Cluster>) {
    let Ok(mut sub) = cluster.broker.subscribe(PRESENCE.into()).await else {
        tracing::error!("cluster: could not subscribe to presence");
        return;
    };
    let (snap_tx, mut snap_rx) = mpsc::unbounded_channel::<(String, u64, Option<Snapshot>)>();
    let mut nodes = Nodes::new(
        cluster.node.clone(),
        cluster.epoch,
        cluster.node_timeout,
        cluster.limits,
    );
    let mut tick = tokio::time::interval(cluster.node_timeout / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut effects = Vec::new();
    loop {
        tokio::select! {
            msg = sub.next() => {
                let Some(msg) = msg else { break };
                let Ok(event) = serde_json::from_slice::<Announcement>(&msg.payload) else {
                    tracing::debug!("cluster: unreadable presence message");
                    continue;
                };
                nodes.on_announcement(Instant::now(), event, &mut effects);
            }
            Some((node, epoch, answer)) = snap_rx.recv() => {
                nodes.on_snapshot(&node, epoch, answer, &mut effects);
            }
            _ = tick.tick() => {
                cluster.heartbeat();
                nodes.on_tick(Instant::now(), &mut effects);
            }
        }
        for effect in effects.drain(..) {
            carry_out(&cluster, effect, &snap_tx);
        }
    }
}

fn carry_out(
    cluster: &Arc<Cluster>,
    effect: Effect,
    snap_tx: &mpsc::UnboundedSender<(String, u64, Option<Snapshot>)>,
) {
    match effect {
        Effect::Up(node) => {
            cluster.live.lock().unwrap().insert(node, Load::default());
        }
        Effect::Load { node, load } => {
            if let Some(l) = cluster.live.lock().unwrap().get_mut(&node) {
                *l = load;
            }
        }
        Effect::Down(node) => {
            cluster.live.lock().unwrap().remove(&node);
        }
        Effect::Joined(member) => {
            if let Some(shared) = cluster.shared.upgrade() {
                if let Some(Some(announce)) = shared.table.insert_remote(member) {
                    announce.send();
                }
            }
        }
        Effect::Left(member) => {
            if let Some(shared) = cluster.shared.upgrade() {
                if let Some(announce) = shared.table.remove_remote(&member) {
                    announce.send();
                }
            }
        }
        Effect::Fetch { node, epoch } => fetch_snapshot(cluster, node, epoch, snap_tx.clone()),
        Effect::Resync(node) => {
            cluster.stats.resyncs.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                node,
                "cluster: missed some of a node's announcements; asking for a snapshot"
            );
        }
        Effect::Lost { node, connections } => {
            cluster.stats.nodes_lost.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                node,
                connections,
                "cluster: node not heard from for {} ms; its connections leave the counts",
                cluster.node_timeout.as_millis()
            );
        }
        Effect::Refused { node, why } => refuse(cluster, &node, why),
        Effect::NameClash => tracing::error!(
            node = %cluster.node,
            "cluster: another node uses this node's name; give each node its own --node-name"
        ),
    }
}

fn fetch_snapshot(
    cluster: &Arc<Cluster>,
    node: String,
    epoch: u64,
    tx: mpsc::UnboundedSender<(String, u64, Option<Snapshot>)>,
) {
    let cluster = cluster.clone();
    tokio::spawn(async move {
        let subject = snapshot_subject(&node);
        let expect = HashSet::from([node.clone()]);
        let answer = match cluster.gather(subject, Bytes::new(), expect).await {
            Ok((mut answers, _)) => {
                answers
                    .remove(&node)
                    .filter(|a| a.epoch == epoch)
                    .map(|a| Snapshot {
                        seq: a.seq,
                        members: a.items,
                    })
            }
            Err(_) => None,
        };
        if answer.is_none() {
            // Not too eager against a node that cannot answer.
            tokio::time::sleep(cluster.request_timeout).await;
        }
        let _ = tx.send((node, epoch, answer));
    });
}

/// A push or disconnect from another node, for this node's connections.
fn apply_from_cluster(shared: &Shared, payload: &[u8]) {
    let wire = match serde_json::from_slice::<Wire<'_>>(payload) {
        Ok(w) => w,
        Err(e) => {
            tracing::debug!(error = %e, "cluster: unreadable channel message");
            return;
        }
    };
    for item in &wire.items {
        let target = item.to.as_ref();
        match (item.op, item.data) {
            ("push", Some(data)) => {
                let push = hub::Push {
                    channel_id: &wire.channel_id,
                    audience: target,
                    data: data.get(),
                };
                let _ = hub::deliver(shared, push, Origin::Cluster);
            }
            ("disconnect", _) => hub::disconnect(shared, &wire.channel_id, target),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_channel_id_is_one_subject_token() {
        for id in ["a", "with.dot", "sp ace", "*", ">", "日本", "a\u{0}b"] {
            let s = channel_subject(id);
            let t = s.strip_prefix("hato.ch.").unwrap();
            assert!(
                !t.is_empty() && t.bytes().all(|b| b.is_ascii_hexdigit()),
                "{s}"
            );
        }
        assert_ne!(channel_subject("ab"), channel_subject("a.b"));
    }

    #[test]
    fn chunks_split_and_parse_back() {
        let items: Vec<String> = (0..3000)
            .map(|i| format!(r#"{{"i":{i},"pad":"{}"}}"#, "x".repeat(400)))
            .collect();
        let parts = chunks("node \"a\"", 7, 9, &items);
        assert!(parts.len() > 1);
        let mut n = 0;
        for (i, p) in parts.iter().enumerate() {
            assert!(p.len() <= CHUNK_BYTES + 1024);
            let c: Chunk = serde_json::from_slice(p).unwrap();
            assert_eq!(
                (c.node.as_str(), c.epoch, c.seq, c.part, c.parts),
                ("node \"a\"", 7, 9, i, parts.len())
            );
            n += c.items.len();
        }
        assert_eq!(n, 3000);
        let empty = chunks("n", 1, 0, &[]);
        assert_eq!(empty.len(), 1);
        assert_eq!(
            serde_json::from_slice::<Chunk>(&empty[0])
                .unwrap()
                .items
                .len(),
            0
        );
    }
}

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

use crate::hub::{self, Origin};
use crate::outbox::Frame;
use crate::table::{Conn, Member, Target};
use crate::Shared;
use async_nats::connection::State;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

const PRESENCE: &str = "hato.presence";
pub const LIST: &str = "hato.list";
/// Messages waiting for the NATS client, in order; beyond, pushes get 503.
const QUEUE: usize = 65_536;
/// Events of one node kept while its snapshot is awaited, at most.
const MAX_BUFFERED: usize = 100_000;
/// The most one reply message carries (NATS refuses over 1 MiB by default).
const CHUNK_BYTES: usize = 512 * 1024;
/// Other nodes followed at most; a presence message from one more is
/// ignored.
const MAX_NODES: usize = 1024;
/// The bytes of one node's answer to a snapshot or listing request, at
/// most: 50 000 members (the default --max-connections) of ~10 KB each.
const MAX_ANSWER_BYTES: usize = 512 << 20;
/// A member's `created_time` (RFC 3339), at most.
const MAX_TIME_BYTES: usize = 64;

/// Whether another node's member fits the limits this node holds its own
/// connections to: ids and the node name of at most 255 bytes, notify
/// metadata within --notify-metadata-limit, the auth webhook's metadata
/// within --connect-metadata-limit each.
fn member_fits(m: &Member, cfg: &crate::Config) -> Result<(), &'static str> {
    let id = hato_signaling::connect::MAX_ID_BYTES;
    if [
        &m.connection_id,
        &m.client_id,
        &m.bundle_id,
        &m.channel_id,
        &m.session_id,
    ]
    .iter()
    .any(|s| s.len() > id)
        || m.node.len() > id
        || m.created_time.len() > MAX_TIME_BYTES
    {
        return Err("an id longer than 255 bytes");
    }
    let len = |v: &Option<serde_json::Value>| {
        v.as_ref().map_or(0, |v| {
            serde_json::to_string(v).map_or(usize::MAX, |t| t.len())
        })
    };
    let meta = &m.notify_metadata;
    if len(&meta.metadata) > cfg.notify_metadata_limit
        || len(&meta.authn_metadata) > cfg.connect_metadata_limit
        || len(&meta.authz_metadata) > cfg.connect_metadata_limit
    {
        return Err("metadata over this node's limits");
    }
    Ok(())
}

/// Whether `m`, announced by `node`, may join this node's view of it: one
/// of that node's own connections, within this node's limits
/// ([`member_fits`]).
fn member_of(node: &str, m: &Member, cfg: &crate::Config) -> Result<(), &'static str> {
    if m.node != node {
        return Err("a member of another node");
    }
    member_fits(m, cfg)
}

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

/// What one node tells the others about its connections.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Presence {
    Heartbeat {
        node: String,
        epoch: u64,
        seq: u64,
    },
    Join {
        node: String,
        epoch: u64,
        seq: u64,
        member: Member,
    },
    Leave {
        node: String,
        epoch: u64,
        seq: u64,
        channel_id: Arc<str>,
        connection_id: Arc<str>,
    },
    Bye {
        node: String,
        epoch: u64,
    },
}

impl Presence {
    fn sender(&self) -> (&str, u64) {
        match self {
            Presence::Heartbeat { node, epoch, .. }
            | Presence::Join { node, epoch, .. }
            | Presence::Leave { node, epoch, .. }
            | Presence::Bye { node, epoch } => (node, *epoch),
        }
    }
}

/// One push or disconnect as it crosses to the other nodes.
#[derive(Debug, Serialize, Deserialize)]
pub struct Item<'a> {
    /// "push" or "disconnect".
    pub op: &'a str,
    /// "channel", "client", "connection" or "role".
    pub scope: &'a str,
    /// The client_id, connection_id or role the scope names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub data: Option<&'a RawValue>,
}

/// What is published on a channel's subject: its items, in order.
#[derive(Debug, Serialize, Deserialize)]
pub struct Wire<'a> {
    pub channel_id: String,
    #[serde(borrow)]
    pub items: Vec<Item<'a>>,
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
    client: async_nats::Client,
    out: mpsc::Sender<(String, Bytes)>,
    out_rx: Mutex<Option<mpsc::Receiver<(String, Bytes)>>>,
    /// Held while a push is delivered here and queued for the others, so
    /// that both see the pushes of this node in one order.
    order: Mutex<()>,
    mine: Mutex<Mine>,
    channels: Mutex<HashMap<Arc<str>, Sub>>,
    /// The other nodes heard from within the node timeout.
    live: Mutex<HashSet<String>>,
    shared: OnceLock<Weak<Shared>>,
    node_timeout: Duration,
    pub request_timeout: Duration,
    pub stats: ClusterStats,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// Why a call that needs the cluster cannot be served now.
#[derive(Debug)]
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
    /// Makes the NATS client. It connects, and reconnects, in the
    /// background: a node starts even when NATS is down.
    pub async fn connect(
        urls: &str,
        node: String,
        node_timeout: Duration,
        request_timeout: Duration,
    ) -> Result<Arc<Cluster>, String> {
        let addrs = urls
            .split(',')
            .map(|u| {
                u.trim().parse::<async_nats::ServerAddr>().map_err(|e| {
                    let u = crate::config_file::redact_urls(u.trim());
                    format!("--cluster-nats-url {u:?}: {e}")
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let name = node.clone();
        // async-nats parses credentials in a URL but does not send them:
        // take them from the first URL that has some.
        let mut options = async_nats::ConnectOptions::new();
        if let Some(addr) = addrs.iter().find(|a| a.username().is_some()) {
            let user = addr.username().unwrap_or_default().to_owned();
            options = match addr.password() {
                Some(pass) => options.user_and_password(user, pass.to_owned()),
                None => options.token(user),
            };
        }
        let client = options
            .name(format!("hato {node}"))
            .no_echo()
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .ping_interval(Duration::from_secs(5))
            .reconnect_delay_callback(|n| Duration::from_millis((50u64 << n.min(5)).min(1000)))
            .event_callback(move |event| {
                let name = name.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            tracing::info!(node = %name, "cluster: connected to NATS")
                        }
                        async_nats::Event::Disconnected => tracing::warn!(
                            node = %name,
                            "cluster: NATS connection lost; pushes that need other nodes get 503 until it is back"
                        ),
                        other => tracing::warn!(node = %name, "cluster: NATS {other}"),
                    }
                }
            })
            .connect(addrs)
            .await
            .map_err(|e| format!("--cluster-nats-url: {e}"))?;
        let (out, out_rx) = mpsc::channel(QUEUE);
        Ok(Arc::new(Cluster {
            node: node.into(),
            // Random per start: tells a restarted node from its old self.
            epoch: {
                use std::hash::{BuildHasher, Hasher};
                std::collections::hash_map::RandomState::new()
                    .build_hasher()
                    .finish()
            },
            client,
            out,
            out_rx: Mutex::new(Some(out_rx)),
            order: Mutex::new(()),
            mine: Mutex::default(),
            channels: Mutex::default(),
            live: Mutex::default(),
            shared: OnceLock::new(),
            node_timeout,
            request_timeout,
            stats: ClusterStats::default(),
            tasks: Mutex::default(),
        }))
    }

    /// Starts the publisher, the presence and the responders.
    pub fn start(self: &Arc<Self>, shared: Weak<Shared>) {
        let _ = self.shared.set(shared);
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
    }

    /// Whether NATS is reachable now.
    pub fn available(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// The other nodes alive now, by name.
    pub fn live_nodes(&self) -> HashSet<String> {
        self.live.lock().unwrap().clone()
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
        let msg = Presence::Join {
            node: self.node.to_string(),
            epoch: self.epoch,
            seq: mine.seq,
            member: (*member).clone(),
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
        let msg = Presence::Leave {
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
    fn queue(&self, subject: &str, msg: &Presence) {
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
        let msg = Presence::Heartbeat {
            node: self.node.to_string(),
            epoch: self.epoch,
            seq: mine.seq,
        };
        self.queue(PRESENCE, &msg);
    }

    /// On shutdown, after the sessions have ended: tells the others this
    /// node is gone, and waits (briefly) for NATS to have it all.
    pub async fn goodbye(&self) {
        self.queue(
            PRESENCE,
            &Presence::Bye {
                node: self.node.to_string(),
                epoch: self.epoch,
            },
        );
        let until = Instant::now() + Duration::from_secs(1);
        while self.out.capacity() < QUEUE && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.client.flush()).await;
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
        let inbox = self.client.new_inbox();
        let mut sub = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|_| self.unavailable())?;
        self.client
            .publish_with_reply(subject, inbox, request)
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
        match cluster.client.publish(subject, payload).await {
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
async fn channel_task(cluster: Arc<Cluster>, channel_id: Arc<str>, ready: watch::Sender<bool>) {
    let mut sub = match cluster.client.subscribe(channel_subject(&channel_id)).await {
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
        let _ = tokio::time::timeout(cluster.request_timeout, cluster.client.flush()).await;
    }
    let _ = ready.send(true);
    let weak = cluster.shared.get().cloned().unwrap_or_default();
    drop(cluster);
    while let Some(msg) = sub.next().await {
        let Some(shared) = weak.upgrade() else { break };
        if let Some(cluster) = &shared.cluster {
            cluster.stats.received.fetch_add(1, Ordering::Relaxed);
        }
        apply_from_cluster(&shared, &msg.payload);
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
    let Ok(mut sub) = cluster.client.subscribe(subject).await else {
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
                let Some(shared) = cluster.shared.get().and_then(Weak::upgrade) else {
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
            let _ = cluster.client.publish(reply.clone(), part).await;
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

/// What this node knows of another.
struct View {
    epoch: u64,
    last_seen: Instant,
    /// The last of its events applied.
    seq: u64,
    members: HashMap<Arc<str>, Arc<Member>>,
    /// Waiting for a snapshot: the events that came meanwhile.
    syncing: Option<Vec<Presence>>,
    /// A snapshot request is out.
    fetching: bool,
}

/// Follows the other nodes' presence; sends this node's heartbeats.
async fn presence(cluster: Arc<Cluster>) {
    let Ok(mut sub) = cluster.client.subscribe(PRESENCE).await else {
        tracing::error!("cluster: could not subscribe to presence");
        return;
    };
    let (snap_tx, mut snap_rx) = mpsc::unbounded_channel::<(String, u64, Option<Answer>)>();
    let mut views: HashMap<String, View> = HashMap::new();
    let mut tick = tokio::time::interval(cluster.node_timeout / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut name_clash: Option<Instant> = None;
    loop {
        tokio::select! {
            msg = sub.next() => {
                let Some(msg) = msg else { break };
                let Ok(event) = serde_json::from_slice::<Presence>(&msg.payload) else {
                    tracing::debug!("cluster: unreadable presence message");
                    continue;
                };
                let (node, epoch) = event.sender();
                if node.len() > hato_signaling::connect::MAX_ID_BYTES
                    || (views.len() >= MAX_NODES && !views.contains_key(node))
                {
                    refuse(&cluster, node, "a node name over 255 bytes, or one node too many");
                    continue;
                }
                if node == &*cluster.node {
                    if epoch != cluster.epoch
                        && name_clash.is_none_or(|t| t.elapsed() > Duration::from_secs(10))
                    {
                        name_clash = Some(Instant::now());
                        tracing::error!(node, "cluster: another node uses this node's name; give each node its own --node-name");
                    }
                    continue;
                }
                on_presence(&cluster, &mut views, event, &snap_tx);
            }
            Some((node, epoch, answer)) = snap_rx.recv() => {
                on_snapshot(&cluster, &mut views, &node, epoch, answer, &snap_tx);
            }
            _ = tick.tick() => {
                cluster.heartbeat();
                expire(&cluster, &mut views, &snap_tx);
            }
        }
    }
}

fn on_presence(
    cluster: &Arc<Cluster>,
    views: &mut HashMap<String, View>,
    event: Presence,
    snap_tx: &mpsc::UnboundedSender<(String, u64, Option<Answer>)>,
) {
    let (node, epoch) = event.sender();
    let node = node.to_owned();
    if let Presence::Bye { .. } = event {
        if views.get(&node).is_some_and(|v| v.epoch == epoch) {
            tracing::info!(node, "cluster: node left");
            drop_node(cluster, views, &node);
        }
        return;
    }
    if views.get(&node).is_some_and(|v| v.epoch != epoch) {
        tracing::info!(node, "cluster: node restarted");
        drop_node(cluster, views, &node);
    }
    let view = views.entry(node.clone()).or_insert_with(|| {
        tracing::info!(node, "cluster: node joined");
        View {
            epoch,
            last_seen: Instant::now(),
            seq: 0,
            members: HashMap::new(),
            syncing: Some(Vec::new()),
            fetching: false,
        }
    });
    view.last_seen = Instant::now();
    cluster.live.lock().unwrap().insert(node.clone());
    if view.syncing.is_none() {
        let behind = match &event {
            Presence::Heartbeat { seq, .. } => *seq > view.seq,
            Presence::Join { seq, .. } | Presence::Leave { seq, .. } => *seq > view.seq + 1,
            Presence::Bye { .. } => false,
        };
        if behind {
            cluster.stats.resyncs.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                node,
                "cluster: missed some of a node's announcements; asking for a snapshot"
            );
            view.syncing = Some(Vec::new());
        }
    }
    match &mut view.syncing {
        Some(buffer) => {
            if !matches!(event, Presence::Heartbeat { .. }) {
                if buffer.len() >= MAX_BUFFERED {
                    // The snapshot will be older than what was dropped
                    // here, and the next gap asks for another.
                    buffer.clear();
                }
                buffer.push(event);
            }
            if !view.fetching {
                view.fetching = true;
                fetch_snapshot(cluster, node, epoch, snap_tx.clone());
            }
        }
        None => apply(cluster, view, event),
    }
}

fn fetch_snapshot(
    cluster: &Arc<Cluster>,
    node: String,
    epoch: u64,
    tx: mpsc::UnboundedSender<(String, u64, Option<Answer>)>,
) {
    let cluster = cluster.clone();
    tokio::spawn(async move {
        let subject = snapshot_subject(&node);
        let expect = HashSet::from([node.clone()]);
        let answer = match cluster.gather(subject, Bytes::new(), expect).await {
            Ok((mut answers, _)) => answers.remove(&node).filter(|a| a.epoch == epoch),
            Err(_) => None,
        };
        if answer.is_none() {
            // Not too eager against a node that cannot answer.
            tokio::time::sleep(cluster.request_timeout).await;
        }
        let _ = tx.send((node, epoch, answer));
    });
}

fn on_snapshot(
    cluster: &Arc<Cluster>,
    views: &mut HashMap<String, View>,
    node: &str,
    epoch: u64,
    answer: Option<Answer>,
    snap_tx: &mpsc::UnboundedSender<(String, u64, Option<Answer>)>,
) {
    let Some(view) = views.get_mut(node).filter(|v| v.epoch == epoch) else {
        return;
    };
    view.fetching = false;
    let Some(answer) = answer else {
        tracing::warn!(node, "cluster: no snapshot from node; asking again");
        view.fetching = true;
        fetch_snapshot(cluster, node.to_owned(), epoch, snap_tx.clone());
        return;
    };
    let shared = cluster.shared.get().and_then(Weak::upgrade);
    let Some(cfg) = shared.as_ref().map(|s| &s.config) else {
        return;
    };
    let members: HashMap<Arc<str>, Arc<Member>> = answer
        .items
        .iter()
        .filter_map(|raw| serde_json::from_str::<Member>(raw.get()).ok())
        .filter(|m| match member_of(node, m, cfg) {
            Ok(()) => true,
            Err(why) => {
                refuse(cluster, node, why);
                false
            }
        })
        .map(|m| (m.connection_id.clone(), Arc::new(m)))
        .collect();
    if cfg.max_connections > 0 && members.len() > cfg.max_connections {
        refuse(cluster, node, "a snapshot over --max-connections members");
        return;
    }
    // What changed while this node was not listening.
    let gone: Vec<Arc<Member>> = view
        .members
        .values()
        .filter(|m| !members.contains_key(&m.connection_id))
        .cloned()
        .collect();
    for m in gone {
        view.members.remove(&m.connection_id);
        if let Some(shared) = &shared {
            member_left(shared, &m);
        }
    }
    for (id, m) in members {
        if let std::collections::hash_map::Entry::Vacant(e) = view.members.entry(id) {
            e.insert(m.clone());
            if let Some(shared) = &shared {
                member_joined(shared, m);
            }
        }
    }
    view.seq = answer.seq;
    let buffered = view.syncing.take().unwrap_or_default();
    for event in buffered {
        let seq = match &event {
            Presence::Join { seq, .. } | Presence::Leave { seq, .. } => *seq,
            _ => continue,
        };
        if seq <= view.seq {
            continue;
        }
        if seq > view.seq + 1 {
            // Still a hole: start over.
            view.syncing = Some(Vec::new());
            view.fetching = true;
            fetch_snapshot(cluster, node.to_owned(), epoch, snap_tx.clone());
            return;
        }
        apply(cluster, view, event);
    }
}

/// Applies the next event of a node in sync.
fn apply(cluster: &Cluster, view: &mut View, event: Presence) {
    let shared = cluster.shared.get().and_then(Weak::upgrade);
    match event {
        Presence::Join {
            seq, member, node, ..
        } if seq == view.seq + 1 => {
            view.seq = seq;
            let Some(shared) = &shared else { return };
            let cfg = &shared.config;
            let full = cfg.max_connections > 0 && view.members.len() >= cfg.max_connections;
            let fits = match member_of(&node, &member, cfg) {
                Ok(()) if full => Err("more members than --max-connections"),
                fits => fits,
            };
            if let Err(why) = fits {
                // Its place in the sequence is taken all the same: the
                // next event follows on.
                refuse(cluster, &node, why);
                return;
            }
            let shared = Some(shared);
            let member = Arc::new(member);
            view.members
                .insert(member.connection_id.clone(), member.clone());
            if let Some(shared) = &shared {
                member_joined(shared, member);
            }
        }
        Presence::Leave {
            seq, connection_id, ..
        } if seq == view.seq + 1 => {
            view.seq = seq;
            if let Some(m) = view.members.remove(&connection_id) {
                if let Some(shared) = &shared {
                    member_left(shared, &m);
                }
            }
        }
        _ => {}
    }
}

/// Drops the nodes not heard from within the node timeout.
fn expire(
    cluster: &Arc<Cluster>,
    views: &mut HashMap<String, View>,
    _snap_tx: &mpsc::UnboundedSender<(String, u64, Option<Answer>)>,
) {
    let silent: Vec<String> = views
        .iter()
        .filter(|(_, v)| v.last_seen.elapsed() > cluster.node_timeout)
        .map(|(n, _)| n.clone())
        .collect();
    for node in silent {
        let n = views.get(&node).map_or(0, |v| v.members.len());
        tracing::warn!(
            node,
            connections = n,
            "cluster: node not heard from for {} ms; its connections leave the counts",
            cluster.node_timeout.as_millis()
        );
        cluster.stats.nodes_lost.fetch_add(1, Ordering::Relaxed);
        drop_node(cluster, views, &node);
    }
}

fn drop_node(cluster: &Cluster, views: &mut HashMap<String, View>, node: &str) {
    cluster.live.lock().unwrap().remove(node);
    let Some(view) = views.remove(node) else {
        return;
    };
    let Some(shared) = cluster.shared.get().and_then(Weak::upgrade) else {
        return;
    };
    for m in view.members.values() {
        member_left(&shared, m);
    }
}

/// A connection of another node joined: counts, and `connection.created`
/// to this node's connections in its channel.
fn member_joined(shared: &Shared, member: Arc<Member>) {
    if let Some(Some(announce)) = shared.table.insert_remote(member) {
        announce.send();
    }
}

fn member_left(shared: &Shared, member: &Member) {
    if let Some(announce) = shared.table.remove_remote(member) {
        announce.send();
    }
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
        let key = item.key.as_deref().unwrap_or_default();
        let target = match item.scope {
            "channel" => Target::Channel,
            "client" => Target::Client(key),
            "connection" => Target::Connection(key),
            "role" => match hato_signaling::Role::parse(key) {
                Some(role) => Target::Role(role),
                None => continue,
            },
            _ => continue,
        };
        match (item.op, item.data) {
            ("push", Some(data)) => {
                let frame = Arc::new(Frame::new(hato_signaling::message::push_json(data.get())));
                let _ = hub::deliver(shared, &wire.channel_id, target, &frame, Origin::Cluster);
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

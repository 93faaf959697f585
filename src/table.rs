//! The one connection table every lookup goes through: by channel, by
//! `client_id` (many connections may share one), by `connection_id` and by
//! role.
//!
//! State sits behind a std `Mutex`, not tokio's: every critical section is
//! a few hash-map operations and never awaits, so a blocking lock is both
//! cheaper and impossible to hold across an `.await` by accident.

use crate::outbox::{Delivery, Encoded, Inlet, Kill, Out, Route};
use hato_signaling::api::Audience;
use hato_signaling::message::{ChannelCounts, NotifyConnection, NotifyMetadata};
use hato_signaling::Role;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Who a connection is, wherever it is held: what `notify`, the listings,
/// the counts and the other nodes know of it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub connection_id: Arc<str>,
    pub client_id: Arc<str>,
    pub bundle_id: Arc<str>,
    pub channel_id: Arc<str>,
    pub session_id: Arc<str>,
    pub role: Role,
    /// What `notify` shows of it besides its ids.
    #[serde(flatten)]
    pub notify_metadata: NotifyMetadata,
    /// When it joined the table (RFC 3339), for the listing targets.
    pub created_time: String,
}

impl Identity {
    /// What `notify` says of it.
    pub fn who(&self) -> NotifyConnection<'_> {
        NotifyConnection {
            role: self.role,
            session_id: &self.session_id,
            channel_id: &self.channel_id,
            client_id: &self.client_id,
            bundle_id: &self.bundle_id,
            connection_id: &self.connection_id,
            meta: &self.notify_metadata,
        }
    }

    /// Whether `audience` includes it (its channel aside).
    pub fn matches(&self, audience: Audience<&str>) -> bool {
        match audience {
            Audience::Channel => true,
            Audience::Client(id) => &*self.client_id == id,
            Audience::Connection(id) => &*self.connection_id == id,
            Audience::Role(role) => self.role == role,
        }
    }
}

/// One connection of this node in the table: its [`Identity`] (which it
/// dereferences to), how its pushes may travel, and the way into its
/// outbox.
#[derive(Debug)]
pub struct Conn {
    pub identity: Identity,
    /// Largest push this peer can take, when pushes may go over its
    /// DataChannel; `None` for WebSocket-only peers.
    pub message_limit: Option<usize>,
    /// Its WebSocket stays open for the whole session (hybrid mode, or no
    /// DataChannel signaling): what its DataChannel cannot take goes there.
    pub websocket_fallback: bool,
    /// It is told of others' joins and leaves (`signaling_notify`, true
    /// unless the auth webhook said false).
    pub notify: bool,
    inlet: Arc<Inlet>,
}

impl Conn {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        connection_id: Arc<str>,
        client_id: Arc<str>,
        bundle_id: Arc<str>,
        channel_id: Arc<str>,
        session_id: Arc<str>,
        role: Role,
        notify_metadata: NotifyMetadata,
        message_limit: Option<usize>,
        websocket_fallback: bool,
        inlet: Arc<Inlet>,
    ) -> Conn {
        Conn {
            identity: Identity {
                connection_id,
                client_id,
                bundle_id,
                channel_id,
                session_id,
                role,
                notify_metadata,
                created_time: hato_signaling::time::now_rfc3339(),
            },
            message_limit,
            websocket_fallback,
            notify: true,
            inlet,
        }
    }

    /// The same connection, told nothing of others' joins and leaves.
    pub fn without_notify(mut self) -> Conn {
        self.notify = false;
        self
    }

    /// Bytes waiting in its outbox now.
    pub fn queued_bytes(&self) -> usize {
        self.inlet.queued_bytes()
    }

    /// Whether its pushes go over its `push` DataChannel now (after
    /// `switched`), else its WebSocket.
    pub fn on_datachannel(&self) -> bool {
        matches!(*self.inlet.route(), Route::DataChannel { .. })
    }

    /// Queues `out` on this connection's outbox; see [`Inlet::deliver`].
    pub fn deliver(&self, out: Out) -> Delivery {
        self.inlet.deliver(out)
    }

    /// Asks the session to end with `DISCONNECTED-API`.
    pub fn disconnect(&self) {
        self.inlet.kill(Kill::Api);
    }

    /// Queues a push on the outbox, or, once switched, says which
    /// DataChannel peer to send it to (see [`Route`]).
    pub fn push(&self, frame: &Arc<Encoded>) -> Delivery {
        let route = self.inlet.route();
        match &*route {
            Route::Outbox => self.inlet.deliver(Out::Push(frame.clone())),
            Route::DataChannel { peer, compress } => Delivery::Direct {
                peer: peer.clone(),
                compress: *compress,
            },
        }
    }
}

/// Sends one `notify` to each of `conns`; the message is built only when
/// someone is there to receive it.
pub fn notify_all(conns: &[Arc<Conn>], message: impl FnOnce() -> String) {
    if conns.is_empty() {
        return;
    }
    let frame = Arc::new(Encoded::new(message()));
    for c in conns {
        c.deliver(Out::Notify(frame.clone()));
    }
}

/// A connection held by another node of the cluster, as that node
/// announced it: what `notify`, the counts and a 413 decision need.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Member {
    pub node: String,
    #[serde(flatten)]
    pub identity: Identity,
    /// Its pushes can only go over a DataChannel (no WebSocket fallback).
    pub datachannel_only: bool,
}

impl Member {
    /// How `conn` is announced to the other nodes.
    pub fn of(node: &str, conn: &Conn) -> Member {
        Member {
            node: node.to_owned(),
            identity: conn.identity.clone(),
            datachannel_only: conn.message_limit.is_some() && !conn.websocket_fallback,
        }
    }
}

impl std::ops::Deref for Conn {
    type Target = Identity;
    fn deref(&self) -> &Identity {
        &self.identity
    }
}

impl std::ops::Deref for Member {
    type Target = Identity;
    fn deref(&self) -> &Identity {
        &self.identity
    }
}

impl std::ops::DerefMut for Member {
    fn deref_mut(&mut self) -> &mut Identity {
        &mut self.identity
    }
}

#[derive(Default)]
struct Channel {
    by_connection: HashMap<Arc<str>, Arc<Conn>>,
    by_client: HashMap<Arc<str>, Vec<Arc<Conn>>>,
    by_role: [Vec<Arc<Conn>>; 3],
    /// The channel's connections on other nodes (cluster mode).
    remote: HashMap<Arc<str>, Arc<Member>>,
    remote_roles: [usize; 3],
    /// Its `notify` budget and the announcements waiting for it.
    pace: Pace,
}

/// Whose join or leave a `notify` announces.
#[derive(Debug, Clone)]
pub enum Who {
    Local(Arc<Conn>),
    Remote(Arc<Member>),
}

impl Who {
    fn connection_id(&self) -> &Arc<str> {
        match self {
            Who::Local(c) => &c.connection_id,
            Who::Remote(m) => &m.connection_id,
        }
    }

    pub fn who(&self) -> NotifyConnection<'_> {
        match self {
            Who::Local(c) => c.who(),
            Who::Remote(m) => m.who(),
        }
    }
}

/// `connection.created` or `connection.destroyed` about one connection,
/// ready to go to `to`.
#[derive(Debug)]
pub struct Announce {
    pub event_type: &'static str,
    pub who: Who,
    /// When it happened (RFC 3339).
    pub at: String,
    /// The channel's counts when it is sent.
    pub counts: ChannelCounts,
    pub to: Vec<Arc<Conn>>,
}

impl Announce {
    /// Queues it on every recipient's outbox; the message is built once.
    pub fn send(self) {
        notify_all(&self.to, || {
            hato_signaling::message::notify_connection(
                self.event_type,
                &self.who.who(),
                self.counts,
                &self.at,
                None,
            )
        });
    }
}

/// What became of an announcement.
#[derive(Debug)]
enum Outcome {
    /// It goes now (`None`: to no one).
    Now(Option<Announce>),
    /// It waits for the channel's budget.
    Held,
    /// A leave whose join still waited: neither is announced.
    Unannounced,
}

pub const CREATED: &str = "connection.created";
pub const DESTROYED: &str = "connection.destroyed";

/// A channel's `notify` budget: a token bucket of messages (one
/// announcement to N members costs N), refilled at the table's rate and
/// holding one second of it. While the bucket is empty announcements
/// wait in order; a connection that leaves while its `connection.created`
/// still waits was never announced, and its leave is not either.
#[derive(Debug, Default)]
struct Pace {
    tokens: f64,
    refilled: Option<Instant>,
    /// What waits, by connection: its generation, event and time.
    held: HashMap<Arc<str>, (u64, &'static str, Who, String)>,
    /// The order they came in; an entry whose generation no longer
    /// matches `held` was cancelled.
    order: VecDeque<(Arc<str>, u64)>,
    generation: u64,
}

impl Pace {
    fn refill(&mut self, rate: f64, now: Instant) {
        let since = self.refilled.map_or(1.0, |t| (now - t).as_secs_f64());
        self.tokens = (self.tokens + since * rate).min(rate);
        self.refilled = Some(now);
    }

    fn is_held_created(&self, connection_id: &str) -> bool {
        // Nothing waits in almost every channel: no hashing per member.
        !self.held.is_empty() && matches!(self.held.get(connection_id), Some((_, CREATED, _, _)))
    }
}

/// See [`Table::census`].
#[derive(Debug, Default, Clone, Copy)]
pub struct Census {
    /// `[role][transport]`: roles in [`ROLES`] order, websocket then datachannel.
    pub by_role_and_transport: [[usize; 2]; 3],
    pub outbox_bytes: usize,
}

impl Census {
    pub fn total(&self) -> usize {
        self.by_role_and_transport.iter().flatten().sum()
    }
}

/// The roles, in the order of [`Census`] and the table's role lists.
pub const ROLES: [Role; 3] = [Role::Sendrecv, Role::Sendonly, Role::Recvonly];

/// The transports, in the order of [`Census`].
pub const TRANSPORTS: [&str; 2] = ["websocket", "datachannel"];

fn role_index(role: Role) -> usize {
    match role {
        Role::Sendrecv => 0,
        Role::Sendonly => 1,
        Role::Recvonly => 2,
    }
}

impl Channel {
    /// Head-counts over the whole cluster: this node's and the others'.
    fn counts(&self) -> ChannelCounts {
        ChannelCounts {
            all: self.by_connection.len() + self.remote.len(),
            sendrecv: self.by_role[0].len() + self.remote_roles[0],
            sendonly: self.by_role[1].len() + self.remote_roles[1],
            recvonly: self.by_role[2].len() + self.remote_roles[2],
        }
    }

    fn is_empty(&self) -> bool {
        self.by_connection.is_empty() && self.remote.is_empty()
    }

    /// Who hears of `about`'s join or leave: this node's connections that
    /// take notify, `about` aside.
    fn audience(&self, about: &str) -> Vec<Arc<Conn>> {
        self.by_connection
            .values()
            .filter(|c| c.notify && &*c.connection_id != about)
            .cloned()
            .collect()
    }

    /// `event_type` about `who`, now if the budget allows and nothing
    /// waits before it, else held (see [`Pace`]).
    fn announce(
        &mut self,
        rate: f64,
        now: Instant,
        event_type: &'static str,
        who: Who,
        at: String,
    ) -> Outcome {
        let id = who.connection_id().clone();
        if rate > 0.0 {
            self.pace.refill(rate, now);
            if event_type == DESTROYED && self.pace.is_held_created(&id) {
                self.pace.held.remove(&id);
                return Outcome::Unannounced;
            }
            if !self.pace.held.is_empty() || self.pace.tokens <= 0.0 {
                let pace = &mut self.pace;
                pace.generation += 1;
                pace.held
                    .insert(id.clone(), (pace.generation, event_type, who, at));
                pace.order.push_back((id, pace.generation));
                if pace.order.len() > 2 * pace.held.len() + 64 {
                    let held = &pace.held;
                    pace.order
                        .retain(|(id, g)| held.get(id).is_some_and(|h| h.0 == *g));
                }
                return Outcome::Held;
            }
        }
        let to = self.audience(&id);
        self.pace.tokens -= to.len() as f64;
        let counts = self.counts();
        Outcome::Now((!to.is_empty()).then_some(Announce {
            event_type,
            who,
            at,
            counts,
            to,
        }))
    }

    /// Sends what the budget now allows of what waits; returns when to
    /// look again, or `None` once nothing waits.
    fn release(&mut self, rate: f64, now: Instant, out: &mut Vec<Announce>) -> Option<Instant> {
        self.pace.refill(rate, now);
        while let Some((id, generation)) = self.pace.order.front().cloned() {
            if self.pace.held.get(&id).is_none_or(|h| h.0 != generation) {
                self.pace.order.pop_front();
                continue;
            }
            if self.pace.tokens <= 0.0 {
                let wait = (-self.pace.tokens + 1.0) / rate;
                return Some(now + Duration::from_secs_f64(wait.min(60.0)));
            }
            self.pace.order.pop_front();
            let (_, event_type, who, at) = self.pace.held.remove(&id).expect("checked");
            let to = self.audience(&id);
            self.pace.tokens -= to.len() as f64;
            if !to.is_empty() {
                out.push(Announce {
                    event_type,
                    who,
                    at,
                    counts: self.counts(),
                    to,
                });
            }
        }
        None
    }
}

/// What [`Table::insert`] found in the channel.
pub struct Joined {
    /// This node's other connections in the channel that have been
    /// announced (whose `connection.created` does not still wait).
    pub others: Vec<Arc<Conn>>,
    /// The same of the channel's connections on other nodes.
    pub remote: Vec<Arc<Member>>,
    /// The counts, the newcomer included.
    pub counts: ChannelCounts,
    /// Its `connection.created` to the others, unless it waits.
    pub announce: Option<Announce>,
}

/// Counters an operator reads.
#[derive(Debug, Default)]
pub struct Stats {
    pub pushes: AtomicU64,
    pub deliveries: AtomicU64,
    /// Pushes not queued because the connection's outbox was full (the
    /// connection ends with OUTBOX-OVERFLOW).
    pub outbox_overflows: AtomicU64,
    /// Deliveries skipped because the push exceeded the recipient's
    /// `a=max-message-size`.
    pub undeliverable: AtomicU64,
    /// Sessions ended because one of their DataChannels closed mid-session
    /// or a send on one failed.
    pub channel_failures: AtomicU64,
    /// Pushes by target: channel, client, connection, role.
    pub pushes_by_target: [AtomicU64; 4],
    /// Deliveries handed to the WebRTC engine (switched peers).
    pub deliveries_datachannel: AtomicU64,
    /// Join and leave announcements that waited for their channel's budget.
    pub notify_held: AtomicU64,
    /// Joins that were never announced: the peer left while its
    /// `connection.created` waited (its leave is not announced either).
    pub notify_unannounced: AtomicU64,
}

#[derive(Default)]
pub struct Table {
    channels: Mutex<HashMap<Arc<str>, Channel>>,
    /// Channels with announcements waiting for their budget.
    paced: Mutex<HashSet<Arc<str>>>,
    /// Woken when a channel starts holding announcements.
    pub paced_wake: tokio::sync::Notify,
    /// `notify` messages a channel may carry per second; 0: no limit.
    notify_rate: f64,
    pub stats: Stats,
}

fn remove_from(list: &mut Vec<Arc<Conn>>, connection_id: &str) {
    if let Some(i) = list.iter().position(|c| &*c.connection_id == connection_id) {
        list.swap_remove(i);
    }
}

impl Table {
    /// A table whose channels each carry at most `notify_rate` `notify`
    /// messages a second about joins and leaves (0: no limit).
    pub fn new(notify_rate: u32) -> Table {
        Table {
            notify_rate: f64::from(notify_rate),
            ..Table::default()
        }
    }

    /// Announces in `channel_id`, now or later (see [`Pace`]).
    fn announce(
        &self,
        ch: &mut Channel,
        channel_id: &Arc<str>,
        event_type: &'static str,
        who: Who,
    ) -> Option<Announce> {
        let at = hato_signaling::time::now_rfc3339();
        match ch.announce(self.notify_rate, Instant::now(), event_type, who, at) {
            Outcome::Now(announce) => return announce,
            Outcome::Held => {
                self.stats.notify_held.fetch_add(1, Ordering::Relaxed);
                if self.paced.lock().unwrap().insert(channel_id.clone()) {
                    self.paced_wake.notify_one();
                }
            }
            Outcome::Unannounced => {
                self.stats
                    .notify_unannounced
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        None
    }

    /// Adds `conn`; returns who is already in its channel, the channel's
    /// counts including it, and its `connection.created` to the others.
    pub fn insert(&self, conn: Arc<Conn>) -> Joined {
        let mut channels = self.channels.lock().unwrap();
        let ch = channels.entry(conn.channel_id.clone()).or_default();
        let others = ch
            .by_connection
            .values()
            .filter(|c| !ch.pace.is_held_created(&c.connection_id))
            .cloned()
            .collect();
        let remote = ch
            .remote
            .values()
            .filter(|m| !ch.pace.is_held_created(&m.connection_id))
            .cloned()
            .collect();
        ch.by_connection
            .insert(conn.connection_id.clone(), conn.clone());
        ch.by_client
            .entry(conn.client_id.clone())
            .or_default()
            .push(conn.clone());
        ch.by_role[role_index(conn.role)].push(conn.clone());
        let counts = ch.counts();
        let announce = self.announce(ch, &conn.channel_id, CREATED, Who::Local(conn.clone()));
        Joined {
            others,
            remote,
            counts,
            announce,
        }
    }

    /// Adds a connection of another node; returns its `connection.created`
    /// to this node's connections (if it goes now), or `None` if it was
    /// already known.
    pub fn insert_remote(&self, member: Arc<Member>) -> Option<Option<Announce>> {
        let mut channels = self.channels.lock().unwrap();
        let ch = channels.entry(member.channel_id.clone()).or_default();
        if ch.remote.contains_key(&member.connection_id) {
            return None;
        }
        ch.remote_roles[role_index(member.role)] += 1;
        ch.remote
            .insert(member.connection_id.clone(), member.clone());
        let channel_id = member.channel_id.clone();
        Some(self.announce(ch, &channel_id, CREATED, Who::Remote(member)))
    }

    /// Removes a connection of another node; returns its
    /// `connection.destroyed` to this node's connections, if it goes now.
    pub fn remove_remote(&self, member: &Member) -> Option<Announce> {
        let mut channels = self.channels.lock().unwrap();
        let ch = channels.get_mut(&member.channel_id)?;
        let gone = ch.remote.remove(&member.connection_id)?;
        ch.remote_roles[role_index(gone.role)] -= 1;
        let announce = self.announce(ch, &member.channel_id, DESTROYED, Who::Remote(gone));
        if ch.is_empty() {
            channels.remove(&member.channel_id);
        }
        announce
    }

    /// What the channels' budgets now allow of what waits; and when to
    /// look again (`None`: nothing waits).
    pub fn release_paced(&self, now: Instant) -> (Vec<Announce>, Option<Instant>) {
        let mut out = Vec::new();
        let mut next: Option<Instant> = None;
        let mut channels = self.channels.lock().unwrap();
        let mut paced = self.paced.lock().unwrap();
        paced.retain(|id| {
            let Some(ch) = channels.get_mut(id) else {
                return false;
            };
            match ch.release(self.notify_rate, now, &mut out) {
                Some(t) => {
                    next = Some(next.map_or(t, |n| n.min(t)));
                    true
                }
                None => false,
            }
        });
        (out, next)
    }

    /// Announcements waiting for their channel's budget, over all channels.
    pub fn paced_len(&self) -> usize {
        let channels = self.channels.lock().unwrap();
        let paced = self.paced.lock().unwrap();
        paced
            .iter()
            .filter_map(|id| channels.get(id))
            .map(|c| c.pace.held.len())
            .sum()
    }

    /// How many connections on other nodes `target` addresses in
    /// `channel_id`, and whether one of them can only take pushes over a
    /// DataChannel.
    pub fn remote_matches(&self, channel_id: &str, target: Audience<&str>) -> (usize, bool) {
        let channels = self.channels.lock().unwrap();
        let Some(ch) = channels.get(channel_id) else {
            return (0, false);
        };
        if let Audience::Connection(id) = target {
            return ch
                .remote
                .get(id)
                .map_or((0, false), |m| (1, m.datachannel_only));
        }
        ch.remote
            .values()
            .filter(|m| m.matches(target))
            .fold((0, false), |(n, dc), m| (n + 1, dc || m.datachannel_only))
    }

    /// Removes `conn`, if present; returns the channel's counts after and
    /// its `connection.destroyed` to the others, if that goes now.
    pub fn remove(&self, conn: &Conn) -> Option<(ChannelCounts, Option<Announce>)> {
        let mut channels = self.channels.lock().unwrap();
        let ch = channels.get_mut(&conn.channel_id)?;
        let gone = ch.by_connection.remove(&conn.connection_id)?;
        if let Some(list) = ch.by_client.get_mut(&conn.client_id) {
            remove_from(list, &conn.connection_id);
            if list.is_empty() {
                ch.by_client.remove(&conn.client_id);
            }
        }
        remove_from(&mut ch.by_role[role_index(conn.role)], &conn.connection_id);
        let counts = ch.counts();
        let announce = self.announce(ch, &conn.channel_id, DESTROYED, Who::Local(gone));
        if ch.is_empty() {
            channels.remove(&conn.channel_id);
        }
        Some((counts, announce))
    }

    /// The connections `target` addresses in `channel_id`.
    pub fn lookup(&self, channel_id: &str, target: Audience<&str>) -> Vec<Arc<Conn>> {
        let channels = self.channels.lock().unwrap();
        let Some(ch) = channels.get(channel_id) else {
            return Vec::new();
        };
        match target {
            Audience::Channel => ch.by_connection.values().cloned().collect(),
            Audience::Client(id) => ch.by_client.get(id).cloned().unwrap_or_default(),
            Audience::Connection(id) => ch.by_connection.get(id).cloned().into_iter().collect(),
            Audience::Role(role) => ch.by_role[role_index(role)].clone(),
        }
    }

    /// Connections now by role (sendrecv, sendonly, recvonly) and
    /// transport (websocket, datachannel), and the bytes their outboxes
    /// hold: one pass over the table, for the stats target and /metrics.
    pub fn census(&self) -> Census {
        let mut census = Census::default();
        for c in self.all() {
            census.by_role_and_transport[role_index(c.role)][usize::from(c.on_datachannel())] += 1;
            census.outbox_bytes += c.queued_bytes();
        }
        census
    }

    /// Every connection, channel by channel.
    pub fn all(&self) -> Vec<Arc<Conn>> {
        let channels = self.channels.lock().unwrap();
        channels
            .values()
            .flat_map(|c| c.by_connection.values().cloned())
            .collect()
    }

    /// The channel's head-counts now.
    pub fn counts(&self, channel_id: &str) -> ChannelCounts {
        let channels = self.channels.lock().unwrap();
        channels
            .get(channel_id)
            .map(|c| c.counts())
            .unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        let channels = self.channels.lock().unwrap();
        channels.values().map(|c| c.by_connection.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    fn conn(id: &str, channel: &str, client: &str, role: Role) -> (Arc<Conn>, mpsc::Receiver<Out>) {
        let (tx, rx) = mpsc::channel(2);
        let (kill, _) = mpsc::unbounded_channel();
        let c = Conn::new(
            id.into(),
            client.into(),
            id.into(),
            channel.into(),
            "s".into(),
            role,
            NotifyMetadata::default(),
            None,
            true,
            Arc::new(Inlet::new(id.into(), tx, 1 << 20, kill)),
        );
        (Arc::new(c), rx)
    }

    fn ids(v: Vec<Arc<Conn>>) -> Vec<String> {
        let mut v: Vec<String> = v.iter().map(|c| c.connection_id.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn indexes_stay_consistent() {
        let t = Table::default();
        let (a, _ra) = conn("a", "ch", "shared", Role::Recvonly);
        let (b, _rb) = conn("b", "ch", "shared", Role::Sendrecv);
        let (c, _rc) = conn("c", "other", "shared", Role::Recvonly);
        t.insert(a.clone());
        let joined = t.insert(b.clone());
        assert_eq!(ids(joined.others), ["a"]);
        assert_eq!(joined.counts.all, 2);
        t.insert(c);
        assert_eq!(ids(t.lookup("ch", Audience::Channel)), ["a", "b"]);
        assert_eq!(ids(t.lookup("ch", Audience::Client("shared"))), ["a", "b"]);
        assert_eq!(ids(t.lookup("ch", Audience::Connection("b"))), ["b"]);
        assert_eq!(ids(t.lookup("ch", Audience::Role(Role::Recvonly))), ["a"]);
        assert!(t.lookup("ch", Audience::Role(Role::Sendonly)).is_empty());
        assert!(t.lookup("none", Audience::Channel).is_empty());
        let (counts, announce) = t.remove(&a).unwrap();
        assert_eq!(ids(announce.unwrap().to), ["b"]);
        assert_eq!(counts.recvonly, 0);
        assert!(t.remove(&a).is_none(), "removing twice is a no-op");
        assert_eq!(ids(t.lookup("ch", Audience::Client("shared"))), ["b"]);
        t.remove(&b);
        assert_eq!(t.len(), 1);
    }

    /// The budget, clock-free: what goes at once, what waits and in which
    /// order, and a join and leave that cancel while waiting.
    #[test]
    fn announcements_wait_for_the_budget_in_order() {
        let mut ch = Channel::default();
        let mut all = HashMap::new();
        let mut keep = Vec::new();
        for id in ["l1", "l2", "l3", "x", "y", "z"] {
            let (c, rx) = conn(id, "ch", id, Role::Recvonly);
            keep.push(rx);
            if id.starts_with('l') {
                ch.by_connection.insert(c.connection_id.clone(), c.clone());
            }
            all.insert(id, c);
        }
        let who = |id: &str| Who::Local(all[id].clone());
        let t0 = Instant::now();
        let at = || String::from("t");
        // Rate 4 a second, a full bucket of 4: x to the three listeners goes.
        let sent = ch.announce(4.0, t0, CREATED, who("x"), at());
        assert!(matches!(sent, Outcome::Now(Some(a)) if a.to.len() == 3));
        // One token left: y goes too, and the bucket is in debt (-2).
        let sent = ch.announce(4.0, t0, CREATED, who("y"), at());
        assert!(matches!(sent, Outcome::Now(Some(_))));
        // z waits; y's leave waits behind it; then z leaves: cancelled.
        let held = |o: Outcome| matches!(o, Outcome::Held);
        assert!(held(ch.announce(4.0, t0, CREATED, who("z"), at())));
        assert!(held(ch.announce(4.0, t0, DESTROYED, who("y"), at())));
        let gone = ch.announce(4.0, t0, DESTROYED, who("z"), at());
        assert!(
            matches!(gone, Outcome::Unannounced),
            "z came and went unannounced"
        );
        let mut out = Vec::new();
        let next = ch.release(4.0, t0 + Duration::from_millis(100), &mut out);
        assert!(out.is_empty() && next.is_some(), "still in debt");
        let next = ch.release(4.0, t0 + Duration::from_millis(800), &mut out);
        assert_eq!(next, None);
        let sent: Vec<_> = out
            .iter()
            .map(|a| (a.event_type, a.who.connection_id().to_string()))
            .collect();
        assert_eq!(sent, [(DESTROYED, "y".to_string())]);
    }

    #[test]
    fn overflow_kills_once() {
        let (tx, _rx) = mpsc::channel(1);
        let (kill_tx, mut kill_rx) = mpsc::unbounded_channel();
        let c = Conn::new(
            "a".into(),
            "a".into(),
            "a".into(),
            "ch".into(),
            "s".into(),
            Role::Recvonly,
            NotifyMetadata::default(),
            None,
            true,
            Arc::new(Inlet::new("a".into(), tx, 1 << 20, kill_tx)),
        );
        let f = Arc::new(Encoded::new("{}".into()));
        assert!(matches!(c.push(&f), Delivery::Queued));
        assert!(matches!(c.push(&f), Delivery::Overflow));
        assert!(matches!(c.push(&f), Delivery::Overflow));
        assert_eq!(kill_rx.try_recv(), Ok(Kill::Overflow));
        assert!(kill_rx.try_recv().is_err());
    }
}

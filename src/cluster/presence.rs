//! What this node knows of the others' connections: a sans-I/O machine.
//!
//! Inputs are the presence messages other nodes publish, the snapshots
//! this node asked for, and the passing of time, each with the instant it
//! happened; outputs are [`Effect`]s for the shell to carry out (change
//! the table, ask for a snapshot, count). Nothing here reads a clock,
//! touches a socket or spawns a task, so the rules — epochs, sequence
//! gaps, snapshots, expiry, the limits another node is held to — are
//! tested with plain calls.

use crate::table::Member;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Events of one node kept while its snapshot is awaited, at most.
const MAX_BUFFERED: usize = 100_000;
/// Other nodes followed at most; a presence message from one more is
/// ignored.
pub const MAX_NODES: usize = 1024;
/// A member's `created_time` (RFC 3339), at most.
const MAX_TIME_BYTES: usize = 64;
/// How often a clash of node names is logged, at most.
const CLASH_LOG_EVERY: Duration = Duration::from_secs(10);

/// What one node tells the others about its connections, on
/// `hato.presence`: numbered per node by a random epoch per start and a
/// sequence per join or leave.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Announcement {
    Heartbeat {
        node: String,
        epoch: u64,
        seq: u64,
        /// What a client redirected there needs to know.
        #[serde(default)]
        load: Load,
    },
    Join {
        node: String,
        epoch: u64,
        seq: u64,
        member: Box<Member>,
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

impl Announcement {
    fn sender(&self) -> (&str, u64) {
        match self {
            Announcement::Heartbeat { node, epoch, .. }
            | Announcement::Join { node, epoch, .. }
            | Announcement::Leave { node, epoch, .. }
            | Announcement::Bye { node, epoch } => (node, *epoch),
        }
    }

    /// The sequence number of a join or leave.
    fn event_seq(&self) -> Option<u64> {
        match self {
            Announcement::Join { seq, .. } | Announcement::Leave { seq, .. } => Some(*seq),
            _ => None,
        }
    }
}

/// How busy a node is, and where clients reach it: what a draining or
/// full node redirects by.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    /// Its `--public-signaling-url`.
    pub url: Option<String>,
    pub connections: usize,
    pub draining: bool,
}

/// The longest `--public-signaling-url` taken from another node.
pub const MAX_URL_BYTES: usize = 2048;

/// One node's connections at one point of its sequence, as its snapshot
/// answer carries them.
pub struct Snapshot {
    pub seq: u64,
    pub members: Vec<Box<RawValue>>,
}

/// The limits this node holds its own connections to, and so the others'.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub notify_metadata: usize,
    pub connect_metadata: usize,
}

impl Limits {
    pub fn of(cfg: &crate::Config) -> Limits {
        Limits {
            max_connections: cfg.max_connections,
            notify_metadata: cfg.notify_metadata_limit,
            connect_metadata: cfg.connect_metadata_limit,
        }
    }

    /// Whether a member fits: ids and the node name of at most 255 bytes,
    /// notify metadata within --notify-metadata-limit, the auth webhook's
    /// metadata within --connect-metadata-limit each.
    pub fn fits(&self, m: &Member) -> Result<(), &'static str> {
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
        if len(&meta.metadata) > self.notify_metadata
            || len(&meta.authn_metadata) > self.connect_metadata
            || len(&meta.authz_metadata) > self.connect_metadata
        {
            return Err("metadata over this node's limits");
        }
        Ok(())
    }

    /// Whether `m`, announced by `node`, may join this node's view of it:
    /// one of that node's own connections, within the limits.
    fn member_of(&self, node: &str, m: &Member) -> Result<(), &'static str> {
        if m.node != node {
            return Err("a member of another node");
        }
        self.fits(m)
    }
}

/// What the shell does after an input.
#[derive(Debug)]
pub enum Effect {
    /// A node is heard from for the first time (since it was dropped).
    Up(String),
    /// A node left, restarted, or went silent: it is no longer live.
    Down(String),
    /// A connection of another node joined: into the table.
    Joined(Arc<Member>),
    /// A connection of another node left: out of the table.
    Left(Arc<Member>),
    /// Ask `node` for its snapshot, and hand the answer (or its absence)
    /// to [`Nodes::on_snapshot`].
    Fetch { node: String, epoch: u64 },
    /// A gap in a node's sequence was seen (a snapshot follows).
    Resync(String),
    /// A node's heartbeat: its load and where clients reach it.
    Load { node: String, load: Load },
    /// A node went silent for the node timeout.
    Lost { node: String, connections: usize },
    /// Something a node announced was beyond this node's limits: ignored.
    Refused { node: String, why: &'static str },
    /// Another node announces itself under this node's name.
    NameClash,
}

/// What this node knows of another.
struct View {
    epoch: u64,
    last_seen: Instant,
    /// The last of its events applied.
    seq: u64,
    members: HashMap<Arc<str>, Arc<Member>>,
    /// Waiting for a snapshot: the events that came meanwhile.
    syncing: Option<Vec<Announcement>>,
    /// A snapshot request is out.
    fetching: bool,
}

/// The other nodes, as their announcements describe them.
pub struct Nodes {
    me: Arc<str>,
    my_epoch: u64,
    timeout: Duration,
    limits: Limits,
    views: HashMap<String, View>,
    clash_logged: Option<Instant>,
}

impl Nodes {
    pub fn new(me: Arc<str>, my_epoch: u64, timeout: Duration, limits: Limits) -> Nodes {
        Nodes {
            me,
            my_epoch,
            timeout,
            limits,
            views: HashMap::new(),
            clash_logged: None,
        }
    }

    /// The nodes followed now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.views.len()
    }

    /// A presence message, received at `now`.
    pub fn on_announcement(&mut self, now: Instant, event: Announcement, out: &mut Vec<Effect>) {
        let (node, epoch) = event.sender();
        if node.len() > hato_signaling::connect::MAX_ID_BYTES
            || (self.views.len() >= MAX_NODES && !self.views.contains_key(node))
        {
            out.push(Effect::Refused {
                node: node.chars().take(64).collect(),
                why: "a node name over 255 bytes, or one node too many",
            });
            return;
        }
        if node == &*self.me {
            if epoch != self.my_epoch
                && self
                    .clash_logged
                    .is_none_or(|t| now.saturating_duration_since(t) > CLASH_LOG_EVERY)
            {
                self.clash_logged = Some(now);
                out.push(Effect::NameClash);
            }
            return;
        }
        let node = node.to_owned();
        if let Announcement::Bye { .. } = event {
            if self.views.get(&node).is_some_and(|v| v.epoch == epoch) {
                tracing::info!(node, "cluster: node left");
                self.drop_node(&node, out);
            }
            return;
        }
        if self.views.get(&node).is_some_and(|v| v.epoch != epoch) {
            tracing::info!(node, "cluster: node restarted");
            self.drop_node(&node, out);
        }
        let view = self.views.entry(node.clone()).or_insert_with(|| {
            tracing::info!(node, "cluster: node joined");
            out.push(Effect::Up(node.clone()));
            View {
                epoch,
                last_seen: now,
                seq: 0,
                members: HashMap::new(),
                syncing: Some(Vec::new()),
                fetching: false,
            }
        });
        view.last_seen = now;
        if let Announcement::Heartbeat { load, .. } = &event {
            let mut load = load.clone();
            if load.url.as_ref().is_some_and(|u| u.len() > MAX_URL_BYTES) {
                load.url = None;
            }
            out.push(Effect::Load {
                node: node.clone(),
                load,
            });
        }
        if view.syncing.is_none() {
            let behind = match &event {
                Announcement::Heartbeat { seq, .. } => *seq > view.seq,
                _ => event.event_seq().is_some_and(|seq| seq > view.seq + 1),
            };
            if behind {
                out.push(Effect::Resync(node.clone()));
                view.syncing = Some(Vec::new());
            }
        }
        match &mut view.syncing {
            Some(buffer) => {
                if event.event_seq().is_some() {
                    if buffer.len() >= MAX_BUFFERED {
                        // The snapshot will be older than what was dropped
                        // here, and the next gap asks for another.
                        buffer.clear();
                    }
                    buffer.push(event);
                }
                if !view.fetching {
                    view.fetching = true;
                    out.push(Effect::Fetch { node, epoch });
                }
            }
            None => apply(&self.limits, view, event, out),
        }
    }

    /// The answer to a [`Effect::Fetch`]: `None` when the node did not
    /// answer in time (the shell waits a little before it says so).
    pub fn on_snapshot(
        &mut self,
        node: &str,
        epoch: u64,
        answer: Option<Snapshot>,
        out: &mut Vec<Effect>,
    ) {
        let Some(view) = self.views.get_mut(node).filter(|v| v.epoch == epoch) else {
            return;
        };
        view.fetching = false;
        let Some(answer) = answer else {
            tracing::warn!(node, "cluster: no snapshot from node; asking again");
            view.fetching = true;
            out.push(Effect::Fetch {
                node: node.to_owned(),
                epoch,
            });
            return;
        };
        let limits = &self.limits;
        let members: HashMap<Arc<str>, Arc<Member>> = answer
            .members
            .iter()
            .filter_map(|raw| serde_json::from_str::<Member>(raw.get()).ok())
            .filter(|m| match limits.member_of(node, m) {
                Ok(()) => true,
                Err(why) => {
                    out.push(Effect::Refused {
                        node: node.to_owned(),
                        why,
                    });
                    false
                }
            })
            .map(|m| (m.connection_id.clone(), Arc::new(m)))
            .collect();
        if limits.max_connections > 0 && members.len() > limits.max_connections {
            out.push(Effect::Refused {
                node: node.to_owned(),
                why: "a snapshot over --max-connections members",
            });
            return;
        }
        // What changed while this node was not listening.
        view.members.retain(|id, m| {
            let stays = members.contains_key(id);
            if !stays {
                out.push(Effect::Left(m.clone()));
            }
            stays
        });
        for (id, m) in members {
            if let std::collections::hash_map::Entry::Vacant(e) = view.members.entry(id) {
                e.insert(m.clone());
                out.push(Effect::Joined(m));
            }
        }
        view.seq = answer.seq;
        for event in view.syncing.take().unwrap_or_default() {
            let Some(seq) = event.event_seq() else {
                continue;
            };
            if seq <= view.seq {
                continue;
            }
            if seq > view.seq + 1 {
                // Still a hole: start over.
                view.syncing = Some(Vec::new());
                view.fetching = true;
                out.push(Effect::Fetch {
                    node: node.to_owned(),
                    epoch,
                });
                return;
            }
            apply(limits, view, event, out);
        }
    }

    /// Time passed: drops the nodes not heard from within the timeout.
    pub fn on_tick(&mut self, now: Instant, out: &mut Vec<Effect>) {
        let silent: Vec<String> = self
            .views
            .iter()
            .filter(|(_, v)| now.saturating_duration_since(v.last_seen) > self.timeout)
            .map(|(n, _)| n.clone())
            .collect();
        for node in silent {
            let connections = self.views.get(&node).map_or(0, |v| v.members.len());
            out.push(Effect::Lost {
                node: node.clone(),
                connections,
            });
            self.drop_node(&node, out);
        }
    }

    fn drop_node(&mut self, node: &str, out: &mut Vec<Effect>) {
        let Some(view) = self.views.remove(node) else {
            return;
        };
        out.push(Effect::Down(node.to_owned()));
        out.extend(view.members.into_values().map(Effect::Left));
    }
}

/// Applies the next event of a node in sync.
fn apply(limits: &Limits, view: &mut View, event: Announcement, out: &mut Vec<Effect>) {
    match event {
        Announcement::Join {
            seq, member, node, ..
        } if seq == view.seq + 1 => {
            view.seq = seq;
            let full = limits.max_connections > 0 && view.members.len() >= limits.max_connections;
            let fits = match limits.member_of(&node, &member) {
                Ok(()) if full => Err("more members than --max-connections"),
                fits => fits,
            };
            if let Err(why) = fits {
                // Its place in the sequence is taken all the same: the
                // next event follows on.
                out.push(Effect::Refused { node, why });
                return;
            }
            let member = Arc::new(*member);
            view.members
                .insert(member.connection_id.clone(), member.clone());
            out.push(Effect::Joined(member));
        }
        Announcement::Leave {
            seq, connection_id, ..
        } if seq == view.seq + 1 => {
            view.seq = seq;
            if let Some(m) = view.members.remove(&connection_id) {
                out.push(Effect::Left(m));
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(3);
    const LIMITS: Limits = Limits {
        max_connections: 3,
        notify_metadata: 64,
        connect_metadata: 64,
    };

    fn nodes() -> Nodes {
        Nodes::new("me".into(), 1, TIMEOUT, LIMITS)
    }

    fn member(node: &str, id: &str) -> Member {
        serde_json::from_value(serde_json::json!({
            "node": node, "connection_id": id, "client_id": id, "bundle_id": id,
            "channel_id": "ch", "session_id": "s", "role": "recvonly",
            "created_time": "2026-12-05T00:00:00Z", "datachannel_only": false,
        }))
        .unwrap()
    }

    fn join(node: &str, epoch: u64, seq: u64, id: &str) -> Announcement {
        Announcement::Join {
            node: node.into(),
            epoch,
            seq,
            member: Box::new(member(node, id)),
        }
    }

    fn leave(node: &str, epoch: u64, seq: u64, id: &str) -> Announcement {
        Announcement::Leave {
            node: node.into(),
            epoch,
            seq,
            channel_id: "ch".into(),
            connection_id: id.into(),
        }
    }

    fn beat(node: &str, epoch: u64, seq: u64) -> Announcement {
        Announcement::Heartbeat {
            node: node.into(),
            epoch,
            seq,
            load: Load::default(),
        }
    }

    fn snapshot(node: &str, seq: u64, ids: &[&str]) -> Snapshot {
        Snapshot {
            seq,
            members: ids
                .iter()
                .map(|id| RawValue::from_string(serde_json::to_string(&member(node, id)).unwrap()))
                .collect::<Result<_, _>>()
                .unwrap(),
        }
    }

    /// The effects as short words, for comparison (loads aside: see
    /// `heartbeats_carry_a_nodes_load`).
    fn words(out: &mut Vec<Effect>) -> Vec<String> {
        out.drain(..)
            .filter(|e| !matches!(e, Effect::Load { .. }))
            .map(|e| match e {
                Effect::Up(n) => format!("up {n}"),
                Effect::Down(n) => format!("down {n}"),
                Effect::Joined(m) => format!("joined {}", m.connection_id),
                Effect::Left(m) => format!("left {}", m.connection_id),
                Effect::Fetch { node, epoch } => format!("fetch {node}/{epoch}"),
                Effect::Resync(n) => format!("resync {n}"),
                Effect::Lost { node, connections } => format!("lost {node} {connections}"),
                Effect::Refused { node, .. } => format!("refused {node}"),
                Effect::NameClash => "clash".into(),
                Effect::Load { .. } => unreachable!("filtered out"),
            })
            .collect()
    }

    /// A node `b` at epoch 7 followed from its snapshot at sequence `seq`
    /// with members `ids`.
    fn synced(n: &mut Nodes, t: Instant, seq: u64, ids: &[&str]) {
        let mut out = Vec::new();
        n.on_announcement(t, beat("b", 7, seq), &mut out);
        n.on_snapshot("b", 7, Some(snapshot("b", seq, ids)), &mut out);
        out.clear();
    }

    #[test]
    fn a_new_node_is_followed_from_its_snapshot_then_its_events() {
        let t = Instant::now();
        let mut n = nodes();
        let mut out = Vec::new();
        n.on_announcement(t, join("b", 7, 3, "c3"), &mut out);
        assert_eq!(words(&mut out), ["up b", "fetch b/7"]);
        // Events while the snapshot is out wait for it.
        n.on_announcement(t, join("b", 7, 4, "c4"), &mut out);
        assert!(words(&mut out).is_empty());
        // The snapshot stands at 3 and has c1 and c3: the buffered join of
        // c3 is older and skipped, that of c4 follows on.
        n.on_snapshot("b", 7, Some(snapshot("b", 3, &["c1", "c3"])), &mut out);
        let mut w = words(&mut out);
        w[..2].sort();
        assert_eq!(w, ["joined c1", "joined c3", "joined c4"]);
        n.on_announcement(t, leave("b", 7, 5, "c1"), &mut out);
        assert_eq!(words(&mut out), ["left c1"]);
    }

    #[test]
    fn a_gap_in_the_sequence_asks_for_a_snapshot() {
        let t = Instant::now();
        let mut n = nodes();
        synced(&mut n, t, 2, &["c1"]);
        let mut out = Vec::new();
        // Event 3 was lost: 4 is a gap.
        n.on_announcement(t, join("b", 7, 4, "c4"), &mut out);
        assert_eq!(words(&mut out), ["resync b", "fetch b/7"]);
        // A second gap while fetching asks nothing more.
        n.on_announcement(t, join("b", 7, 6, "c6"), &mut out);
        assert!(words(&mut out).is_empty());
        // The snapshot stands at 4 (c1 left as event 3): c1 leaves, c4
        // joins; buffered 6 is still a hole after 4, so another snapshot.
        n.on_snapshot("b", 7, Some(snapshot("b", 4, &["c4"])), &mut out);
        let w = words(&mut out);
        assert_eq!(w, ["left c1", "joined c4", "fetch b/7"]);
        n.on_snapshot("b", 7, Some(snapshot("b", 6, &["c4", "c6"])), &mut out);
        assert_eq!(words(&mut out), ["joined c6"]);
    }

    #[test]
    fn a_heartbeat_ahead_of_the_last_event_is_a_gap() {
        let t = Instant::now();
        let mut n = nodes();
        synced(&mut n, t, 2, &[]);
        let mut out = Vec::new();
        n.on_announcement(t, beat("b", 7, 2), &mut out);
        assert!(words(&mut out).is_empty());
        n.on_announcement(t, beat("b", 7, 3), &mut out);
        assert_eq!(words(&mut out), ["resync b", "fetch b/7"]);
    }

    #[test]
    fn a_missing_snapshot_is_asked_for_again_and_a_stale_one_ignored() {
        let t = Instant::now();
        let mut n = nodes();
        let mut out = Vec::new();
        n.on_announcement(t, beat("b", 7, 0), &mut out);
        words(&mut out);
        n.on_snapshot("b", 7, None, &mut out);
        assert_eq!(words(&mut out), ["fetch b/7"]);
        // An answer for an old epoch is not this node's state.
        n.on_snapshot("b", 6, Some(snapshot("b", 0, &["x"])), &mut out);
        assert!(words(&mut out).is_empty());
    }

    #[test]
    fn a_new_epoch_drops_the_old_members_first() {
        let t = Instant::now();
        let mut n = nodes();
        synced(&mut n, t, 1, &["c1"]);
        let mut out = Vec::new();
        n.on_announcement(t, beat("b", 8, 0), &mut out);
        assert_eq!(words(&mut out), ["down b", "left c1", "up b", "fetch b/8"]);
    }

    #[test]
    fn bye_drops_a_node_only_for_its_own_epoch() {
        let t = Instant::now();
        let mut n = nodes();
        synced(&mut n, t, 1, &["c1"]);
        let mut out = Vec::new();
        n.on_announcement(
            t,
            Announcement::Bye {
                node: "b".into(),
                epoch: 6,
            },
            &mut out,
        );
        assert!(words(&mut out).is_empty());
        n.on_announcement(
            t,
            Announcement::Bye {
                node: "b".into(),
                epoch: 7,
            },
            &mut out,
        );
        assert_eq!(words(&mut out), ["down b", "left c1"]);
        assert_eq!(n.len(), 0);
    }

    #[test]
    fn a_silent_node_expires_after_the_timeout() {
        let t = Instant::now();
        let mut n = nodes();
        synced(&mut n, t, 2, &["c1", "c2"]);
        let mut out = Vec::new();
        n.on_tick(t + TIMEOUT, &mut out);
        assert!(words(&mut out).is_empty());
        // Heard from again: the clock of its expiry restarts.
        n.on_announcement(t + TIMEOUT, beat("b", 7, 2), &mut out);
        n.on_tick(t + TIMEOUT * 2, &mut out);
        assert!(words(&mut out).is_empty());
        n.on_tick(t + TIMEOUT * 2 + Duration::from_millis(1), &mut out);
        let mut w = words(&mut out);
        w[2..].sort();
        assert_eq!(w, ["lost b 2", "down b", "left c1", "left c2"]);
    }

    #[test]
    fn another_nodes_members_are_held_to_this_nodes_limits() {
        let t = Instant::now();
        let mut n = nodes();
        synced(&mut n, t, 0, &[]);
        let mut out = Vec::new();
        // A member said to be of another node.
        n.on_announcement(
            t,
            Announcement::Join {
                node: "b".into(),
                epoch: 7,
                seq: 1,
                member: Box::new(member("c", "x")),
            },
            &mut out,
        );
        assert_eq!(words(&mut out), ["refused b"]);
        // Its place in the sequence is taken: 2 follows without a gap.
        let mut big = member("b", "big");
        big.notify_metadata.metadata = Some(serde_json::json!("m".repeat(100)));
        n.on_announcement(
            t,
            Announcement::Join {
                node: "b".into(),
                epoch: 7,
                seq: 2,
                member: Box::new(big),
            },
            &mut out,
        );
        assert_eq!(words(&mut out), ["refused b"]);
        for (seq, id) in [(3, "c1"), (4, "c2"), (5, "c3"), (6, "c4")] {
            n.on_announcement(t, join("b", 7, seq, id), &mut out);
        }
        assert_eq!(
            words(&mut out),
            ["joined c1", "joined c2", "joined c3", "refused b"]
        );
        // A snapshot over --max-connections is refused whole.
        n.on_announcement(t, join("b", 7, 9, "c9"), &mut out);
        words(&mut out);
        n.on_snapshot(
            "b",
            7,
            Some(snapshot("b", 9, &["a", "b", "c", "d"])),
            &mut out,
        );
        assert_eq!(words(&mut out), ["refused b"]);
    }

    #[test]
    fn heartbeats_carry_a_nodes_load() {
        let t = Instant::now();
        let mut n = nodes();
        let mut out = Vec::new();
        let load = Load {
            url: Some("wss://b/signaling".into()),
            connections: 7,
            draining: true,
        };
        let beat = |load: Load| Announcement::Heartbeat {
            node: "b".into(),
            epoch: 7,
            seq: 0,
            load,
        };
        n.on_announcement(t, beat(load.clone()), &mut out);
        assert!(out
            .iter()
            .any(|e| matches!(e, Effect::Load { node, load: l } if node == "b" && *l == load)));
        // A URL beyond the bound is not taken.
        out.clear();
        let long = Load {
            url: Some("x".repeat(MAX_URL_BYTES + 1)),
            ..load
        };
        n.on_announcement(t, beat(long), &mut out);
        assert!(out
            .iter()
            .any(|e| matches!(e, Effect::Load { load: l, .. } if l.url.is_none())));
    }

    #[test]
    fn own_name_and_too_many_nodes_are_ignored() {
        let t = Instant::now();
        let mut n = nodes();
        let mut out = Vec::new();
        n.on_announcement(t, beat("me", 1, 5), &mut out);
        assert!(words(&mut out).is_empty());
        n.on_announcement(t, beat("me", 2, 5), &mut out);
        n.on_announcement(t + Duration::from_secs(1), beat("me", 2, 5), &mut out);
        assert_eq!(words(&mut out), ["clash"]);
        for i in 0..MAX_NODES {
            n.on_announcement(t, beat(&format!("n{i}"), 1, 0), &mut out);
        }
        out.clear();
        n.on_announcement(t, beat("one-more", 1, 0), &mut out);
        assert_eq!(words(&mut out), ["refused one-more"]);
        n.on_announcement(t, beat(&"x".repeat(256), 1, 0), &mut out);
        assert_eq!(words(&mut out).len(), 1);
        assert_eq!(n.len(), MAX_NODES);
    }
}

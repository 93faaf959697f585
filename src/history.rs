//! Each channel's one order of pushes and, with `--history-size`, its
//! recent pushes (docs/api.md, "Offsets, history and recovery").
//!
//! A channel's [`Log`] gives every push accepted for the channel the next
//! offset of its epoch (a random name per log, so that offsets from before
//! a restart are never taken for today's). The hub holds the log's lock
//! while it delivers a push, so every connection of the channel receives
//! the channel's pushes in offset order; a joiner that recovers holds it
//! while it is replayed what it missed and enters the table, so nothing
//! falls between the replay and the live pushes.
//!
//! Memory: each kept push counts its message's bytes plus a fixed
//! overhead; past `--history-max-bytes` over all channels, a channel's
//! oldest pushes go first. Nothing here reads a clock: the instants come
//! from the caller.

use crate::outbox::Encoded;
use crate::table::Identity;
pub use hato_signaling::admit::Recover;
use hato_signaling::api::Audience;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bytes counted for one kept push besides its message.
pub const ENTRY_OVERHEAD: usize = 128;

/// What `--history-*` set.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Pushes kept per channel; 0: none.
    pub size: usize,
    /// How long a push is kept; `None`: until pushed out.
    pub ttl: Option<Duration>,
    /// Bytes kept over all channels, at most.
    pub max_bytes: usize,
    /// In a cluster, where the stream keeps the history: a log keeps
    /// pushes only while a joiner that recovers waits to enter (what it
    /// was given from the stream, and what came after).
    pub only_while_held: bool,
}

impl Settings {
    pub fn of(cfg: &crate::Config) -> Settings {
        Settings {
            size: cfg.history_size,
            ttl: (cfg.history_ttl > 0).then(|| Duration::from_secs(cfg.history_ttl)),
            max_bytes: cfg.history_max_bytes,
            only_while_held: cfg.cluster_nats_url.is_some(),
        }
    }
}

/// Counters of every channel's history together.
#[derive(Debug, Default)]
pub struct Counts {
    /// Bytes kept now (a gauge).
    pub bytes: AtomicU64,
    /// Pushes kept now (a gauge).
    pub pushes: AtomicU64,
    /// Pushes dropped early to stay within --history-max-bytes.
    pub evicted: AtomicU64,
    /// Joiners given everything they asked for.
    pub recovered: AtomicU64,
    /// Joiners told that some of what they asked for is gone.
    pub recovery_gaps: AtomicU64,
}

/// Every channel's log.
pub struct History {
    settings: Settings,
    logs: Mutex<HashMap<Arc<str>, Arc<Mutex<Log>>>>,
    pub counts: Arc<Counts>,
}

/// Where a push stands in its channel's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub epoch: Arc<str>,
    pub offset: u64,
}

/// One push kept.
pub struct Entry {
    pub offset: u64,
    at: Instant,
    pub audience: Audience,
    pub message: Arc<Encoded>,
}

impl Entry {
    fn bytes(&self) -> usize {
        self.message.len() + ENTRY_OVERHEAD
    }
}

/// One channel's order and kept pushes.
pub struct Log {
    pub epoch: Arc<str>,
    /// The last offset given; the first push gets 1.
    last: u64,
    entries: VecDeque<Entry>,
    settings: Settings,
    counts: Arc<Counts>,
    /// Joiners that recover waiting to enter ([`Hold`]).
    holds: usize,
}

/// A joiner's hold on its channel's log while it is being given what it
/// missed from the stream: the log keeps what arrives meanwhile.
pub struct Hold(pub Arc<Mutex<Log>>);

impl Drop for Hold {
    fn drop(&mut self) {
        let mut log = self.0.lock().unwrap();
        log.holds -= 1;
        if log.holds == 0 && log.settings.only_while_held {
            while !log.entries.is_empty() {
                log.pop();
            }
        }
    }
}

/// Why a recovery could not give everything that was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gap {
    /// The epoch is not the channel's now (hato restarted, or the channel
    /// was forgotten while empty): the offsets started again.
    Epoch,
    /// Pushes after the offset asked for are no longer kept (or history
    /// is off).
    Expired,
    /// The offset asked for was never given.
    Unknown,
}

impl Gap {
    pub fn as_str(self) -> &'static str {
        match self {
            Gap::Epoch => "epoch",
            Gap::Expired => "expired",
            Gap::Unknown => "unknown-offset",
        }
    }
}

/// What a joiner is given, in order, before the live pushes.
pub struct Recovery {
    /// `None` when everything asked for is replayed.
    pub gap: Option<Gap>,
    /// The channel's position when the joiner entered.
    pub now: Position,
    pub messages: Vec<Arc<Encoded>>,
}

impl History {
    pub fn new(settings: Settings) -> History {
        History {
            settings,
            logs: Mutex::default(),
            counts: Arc::default(),
        }
    }

    /// Counts a recovery: complete or with a gap.
    pub fn counted(&self, complete: bool) {
        let c = if complete {
            &self.counts.recovered
        } else {
            &self.counts.recovery_gaps
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Channels with a log now.
    pub fn channels(&self) -> usize {
        self.logs.lock().unwrap().len()
    }

    /// `channel_id`'s log, made on first use.
    pub fn log(&self, channel_id: &str) -> Arc<Mutex<Log>> {
        let mut logs = self.logs.lock().unwrap();
        if let Some(log) = logs.get(channel_id) {
            return log.clone();
        }
        let log = Arc::new(Mutex::new(Log {
            epoch: new_epoch(),
            last: 0,
            entries: VecDeque::new(),
            settings: self.settings,
            counts: self.counts.clone(),
            holds: 0,
        }));
        logs.insert(channel_id.into(), log.clone());
        log
    }

    /// Holds `channel_id`'s log for a joiner that recovers.
    pub fn hold(&self, channel_id: &str) -> Hold {
        let log = self.log(channel_id);
        log.lock().unwrap().holds += 1;
        Hold(log)
    }

    /// `channel_id`'s log if it has one.
    pub fn existing(&self, channel_id: &str) -> Option<Arc<Mutex<Log>>> {
        self.logs.lock().unwrap().get(channel_id).cloned()
    }

    /// Forgets `channel_id`'s `log` at once when it keeps nothing and no
    /// one else holds it: a push to a channel with no connection here
    /// leaves nothing behind, however many channels are pushed to.
    pub fn forget_if_idle(&self, channel_id: &str, log: &Arc<Mutex<Log>>) {
        let mut logs = self.logs.lock().unwrap();
        let Some(held) = logs.get(channel_id) else {
            return;
        };
        // Ours and the map's: nobody else is delivering or joining.
        let idle = Arc::ptr_eq(held, log)
            && Arc::strong_count(log) == 2
            && log.try_lock().is_ok_and(|l| l.entries.is_empty());
        if idle {
            logs.remove(channel_id);
        }
    }

    /// Drops the expired pushes, and forgets the logs that keep nothing,
    /// that no one holds and whose channel has no connection here
    /// (`in_use`). A channel pushed to again gets a new epoch.
    pub fn sweep(&self, now: Instant, in_use: impl Fn(&str) -> bool) {
        let mut logs = self.logs.lock().unwrap();
        logs.retain(|channel, log| {
            let Ok(mut l) = log.try_lock() else {
                return true;
            };
            l.expire(now);
            let forget = l.entries.is_empty() && Arc::strong_count(log) == 1 && !in_use(channel);
            !forget
        });
    }
}

/// A short random name.
pub fn new_epoch() -> Arc<str> {
    hato_signaling::id::new_id()[..12].into()
}

impl Log {
    /// The offset the next push gets.
    pub fn next_offset(&self) -> u64 {
        self.last + 1
    }

    /// The channel's position now: its last push.
    pub fn position(&self) -> Position {
        Position {
            epoch: self.epoch.clone(),
            offset: self.last,
        }
    }

    /// Takes the position the cluster's stream gave a push: the next
    /// push committed gets `offset` in `epoch`. A new epoch drops what
    /// was kept of the old one.
    pub fn adopt(&mut self, epoch: &str, offset: u64) {
        if *self.epoch != *epoch {
            while !self.entries.is_empty() {
                self.pop();
            }
            self.epoch = epoch.into();
        }
        self.last = offset.saturating_sub(1);
    }

    /// Where the channel stands, as the cluster's stream says before any
    /// of its pushes is delivered here.
    pub fn start_at(&mut self, epoch: &str, offset: u64) {
        self.adopt(epoch, offset + 1);
    }

    /// Puts pushes the stream kept before the oldest kept here (same
    /// epoch, in order) in front of them, for a joiner that recovers.
    pub fn backfill(
        &mut self,
        now: Instant,
        epoch: &str,
        older: Vec<(u64, Audience, Arc<Encoded>)>,
    ) {
        if *self.epoch != *epoch || self.holds == 0 || self.settings.size == 0 {
            return;
        }
        let first = self.entries.front().map_or(self.last + 1, |e| e.offset);
        let mut before: Vec<Entry> = older
            .into_iter()
            .filter(|(offset, ..)| *offset < first)
            .map(|(offset, audience, message)| Entry {
                offset,
                at: now,
                audience,
                message,
            })
            .collect();
        // Only what joins on to what is kept here, with no hole: a run
        // that stops short (a bound cut it) is not taken, and the joiner
        // is told of the gap instead of missing pushes silently.
        let mut joined = before.len();
        while joined > 0 && before[joined - 1].offset + (before.len() - joined) as u64 + 1 == first
        {
            joined -= 1;
        }
        before.drain(..joined);
        while before.len() + self.entries.len() > self.settings.size && !before.is_empty() {
            before.remove(0);
        }
        for e in before.into_iter().rev() {
            self.counts
                .bytes
                .fetch_add(e.bytes() as u64, Ordering::Relaxed);
            self.counts.pushes.fetch_add(1, Ordering::Relaxed);
            self.entries.push_front(e);
        }
    }

    /// Gives the next offset to `message` (built for it), and keeps it
    /// when history is on.
    pub fn commit(&mut self, now: Instant, audience: Audience<&str>, message: Arc<Encoded>) {
        self.last += 1;
        if self.settings.size == 0 || (self.settings.only_while_held && self.holds == 0) {
            return;
        }
        self.expire(now);
        let entry = Entry {
            offset: self.last,
            at: now,
            audience: audience.to_owned(),
            message,
        };
        self.counts
            .bytes
            .fetch_add(entry.bytes() as u64, Ordering::Relaxed);
        self.counts.pushes.fetch_add(1, Ordering::Relaxed);
        self.entries.push_back(entry);
        while self.entries.len() > self.settings.size {
            self.pop();
        }
        while self.counts.bytes.load(Ordering::Relaxed) > self.settings.max_bytes as u64
            && !self.entries.is_empty()
        {
            self.pop();
            self.counts.evicted.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn pop(&mut self) {
        if let Some(e) = self.entries.pop_front() {
            self.counts
                .bytes
                .fetch_sub(e.bytes() as u64, Ordering::Relaxed);
            self.counts.pushes.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Drops the pushes older than the TTL.
    pub fn expire(&mut self, now: Instant) {
        let Some(ttl) = self.settings.ttl else { return };
        while self
            .entries
            .front()
            .is_some_and(|e| now.saturating_duration_since(e.at) > ttl)
        {
            self.pop();
        }
    }

    /// What `who` is given on joining with `ask`: the kept pushes after
    /// the position asked for that address it, in order, and whether
    /// anything is missing.
    pub fn recover(&mut self, now: Instant, ask: &Recover, who: &Identity) -> Recovery {
        self.expire(now);
        let (after, gap) = match ask {
            Recover::Last(n) => {
                let skip = self.entries.len().saturating_sub(*n);
                let after = self.entries.get(skip).map_or(self.last, |e| e.offset - 1);
                (after, None)
            }
            Recover::After { epoch, offset } if **epoch != *self.epoch => {
                (*offset, Some(Gap::Epoch))
            }
            Recover::After { offset, .. } if *offset > self.last => (*offset, Some(Gap::Unknown)),
            Recover::After { offset, .. } => {
                let first = self.entries.front().map_or(self.last + 1, |e| e.offset);
                let gap = (first > offset + 1).then_some(Gap::Expired);
                (*offset, gap)
            }
        };
        let messages = match gap {
            // Other offsets: nothing of this log follows what it saw.
            Some(Gap::Epoch) | Some(Gap::Unknown) => Vec::new(),
            _ => self
                .entries
                .iter()
                .filter(|e| e.offset > after && who.matches(e.audience.as_ref()))
                .map(|e| e.message.clone())
                .collect(),
        };
        Recovery {
            gap,
            now: self.position(),
            messages,
        }
    }

    /// The kept pushes after `offset`, at most `limit`, in order.
    pub fn since(&mut self, now: Instant, offset: u64, limit: usize) -> Vec<&Entry> {
        self.expire(now);
        self.entries
            .iter()
            .filter(|e| e.offset > offset)
            .take(limit)
            .collect()
    }

    /// The oldest offset kept, if any.
    pub fn first_kept(&self) -> Option<u64> {
        self.entries.front().map(|e| e.offset)
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        while !self.entries.is_empty() {
            self.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hato_signaling::message::NotifyMetadata;
    use hato_signaling::Role;

    fn history(size: usize, ttl: Option<u64>, max_bytes: usize) -> History {
        History::new(Settings {
            size,
            ttl: ttl.map(Duration::from_secs),
            max_bytes,
            only_while_held: false,
        })
    }

    fn who(client: &str) -> Identity {
        Identity {
            connection_id: "new".into(),
            client_id: client.into(),
            bundle_id: "b".into(),
            channel_id: "ch".into(),
            session_id: "s".into(),
            role: Role::Recvonly,
            notify_metadata: NotifyMetadata::default(),
            created_time: String::new(),
        }
    }

    fn push(log: &mut Log, t: Instant, to: Audience<&str>) {
        let text = format!(r#"{{"offset":{}}}"#, log.next_offset());
        log.commit(t, to, Arc::new(Encoded::new(text)));
    }

    fn texts(r: &Recovery) -> Vec<String> {
        r.messages.iter().map(|m| m.text().to_owned()).collect()
    }

    #[test]
    fn offsets_follow_on_and_recovery_replays_what_was_missed() {
        let t = Instant::now();
        let h = history(10, None, 1 << 20);
        let log = h.log("ch");
        let mut log = log.lock().unwrap();
        for _ in 0..5 {
            push(&mut log, t, Audience::Channel);
        }
        assert_eq!(log.position().offset, 5);
        let epoch = log.epoch.to_string();
        let r = log.recover(
            t,
            &Recover::After {
                epoch: epoch.clone(),
                offset: 3,
            },
            &who("c"),
        );
        assert_eq!(r.gap, None);
        assert_eq!(texts(&r), [r#"{"offset":4}"#, r#"{"offset":5}"#]);
        let r = log.recover(
            t,
            &Recover::After {
                epoch: epoch.clone(),
                offset: 5,
            },
            &who("c"),
        );
        assert_eq!((r.gap, r.messages.len()), (None, 0));
        let r = log.recover(
            t,
            &Recover::After {
                epoch: "other".into(),
                offset: 3,
            },
            &who("c"),
        );
        assert_eq!((r.gap, r.messages.len()), (Some(Gap::Epoch), 0));
        let r = log.recover(t, &Recover::After { epoch, offset: 9 }, &who("c"));
        assert_eq!((r.gap, r.messages.len()), (Some(Gap::Unknown), 0));
        let r = log.recover(t, &Recover::Last(2), &who("c"));
        assert_eq!(texts(&r), [r#"{"offset":4}"#, r#"{"offset":5}"#]);
    }

    #[test]
    fn replay_is_what_addressed_the_joiner() {
        let t = Instant::now();
        let h = history(10, None, 1 << 20);
        let log = h.log("ch");
        let mut log = log.lock().unwrap();
        push(&mut log, t, Audience::Client("c"));
        push(&mut log, t, Audience::Client("d"));
        push(&mut log, t, Audience::Role(Role::Sendonly));
        push(&mut log, t, Audience::Role(Role::Recvonly));
        push(&mut log, t, Audience::Connection("old"));
        let epoch = log.epoch.to_string();
        let r = log.recover(t, &Recover::After { epoch, offset: 0 }, &who("c"));
        assert_eq!(texts(&r), [r#"{"offset":1}"#, r#"{"offset":4}"#]);
    }

    #[test]
    fn size_ttl_and_bytes_bound_what_is_kept_and_a_gap_is_told() {
        let t = Instant::now();
        let h = history(3, Some(10), 1 << 20);
        let log = h.log("ch");
        let mut log = log.lock().unwrap();
        for _ in 0..5 {
            push(&mut log, t, Audience::Channel);
        }
        assert_eq!(log.first_kept(), Some(3));
        assert_eq!(h.counts.pushes.load(Ordering::Relaxed), 3);
        let epoch = log.epoch.to_string();
        let r = log.recover(
            t,
            &Recover::After {
                epoch: epoch.clone(),
                offset: 1,
            },
            &who("c"),
        );
        assert_eq!(r.gap, Some(Gap::Expired));
        assert_eq!(r.messages.len(), 3, "what is kept is still given");
        let r = log.recover(
            t,
            &Recover::After {
                epoch: epoch.clone(),
                offset: 2,
            },
            &who("c"),
        );
        assert_eq!((r.gap, r.messages.len()), (None, 3));
        // Past the TTL nothing is kept.
        let later = t + Duration::from_secs(11);
        let r = log.recover(later, &Recover::After { epoch, offset: 4 }, &who("c"));
        assert_eq!((r.gap, r.messages.len()), (Some(Gap::Expired), 0));
        assert_eq!(h.counts.bytes.load(Ordering::Relaxed), 0);
        drop(log);

        // The byte bound over all channels: a channel's oldest go first.
        let h = history(100, None, 3 * (ENTRY_OVERHEAD + 13));
        let a = h.log("a");
        let mut a = a.lock().unwrap();
        for _ in 0..10 {
            push(&mut a, t, Audience::Channel);
        }
        assert_eq!(a.first_kept(), Some(8));
        assert!(h.counts.bytes.load(Ordering::Relaxed) <= 3 * (ENTRY_OVERHEAD + 13) as u64);
        assert_eq!(h.counts.evicted.load(Ordering::Relaxed), 7);
    }

    #[test]
    fn without_history_offsets_still_count_and_nothing_is_kept() {
        let t = Instant::now();
        let h = history(0, None, 1 << 20);
        let log = h.log("ch");
        let mut log = log.lock().unwrap();
        push(&mut log, t, Audience::Channel);
        push(&mut log, t, Audience::Channel);
        assert_eq!(log.position().offset, 2);
        let epoch = log.epoch.to_string();
        let r = log.recover(t, &Recover::After { epoch, offset: 1 }, &who("c"));
        assert_eq!((r.gap, r.messages.len()), (Some(Gap::Expired), 0));
        assert_eq!(h.counts.bytes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_log_that_keeps_nothing_is_forgotten_after_its_push() {
        let t = Instant::now();
        let h = history(0, None, 1 << 20);
        for i in 0..1000 {
            let channel = format!("c{i}");
            let log = h.log(&channel);
            push(&mut log.lock().unwrap(), t, Audience::Channel);
            h.forget_if_idle(&channel, &log);
        }
        assert_eq!(h.channels(), 0);
        // Held by someone else (a joiner), or keeping a push: it stays.
        let log = h.log("held");
        let other = log.clone();
        h.forget_if_idle("held", &log);
        assert!(h.existing("held").is_some());
        drop(other);
        let h = history(10, None, 1 << 20);
        let log = h.log("kept");
        push(&mut log.lock().unwrap(), t, Audience::Channel);
        h.forget_if_idle("kept", &log);
        assert!(h.existing("kept").is_some());
    }

    #[test]
    fn sweep_forgets_only_idle_empty_logs() {
        let t = Instant::now();
        let h = history(10, Some(1), 1 << 20);
        let epoch = {
            let log = h.log("ch");
            let mut log = log.lock().unwrap();
            push(&mut log, t, Audience::Channel);
            log.epoch.clone()
        };
        h.log("idle");
        h.sweep(t, |_| false);
        assert!(h.existing("idle").is_none(), "empty and idle: forgotten");
        assert_eq!(h.log("ch").lock().unwrap().epoch, epoch, "it keeps a push");
        h.log("busy");
        let held = h.log("held");
        h.sweep(t + Duration::from_secs(2), |c| c == "busy");
        assert!(h.existing("ch").is_none(), "expired and idle: forgotten");
        assert!(h.existing("busy").is_some() && h.existing("held").is_some());
        drop(held);
        assert_ne!(h.log("ch").lock().unwrap().epoch, epoch, "a new epoch");
    }

    #[test]
    fn backfill_takes_only_what_joins_on_without_a_hole() {
        let h = History::new(Settings {
            size: 100,
            ttl: None,
            max_bytes: 1 << 20,
            only_while_held: true,
        });
        let hold = h.hold("ch");
        let t = Instant::now();
        let mut log = hold.0.lock().unwrap();
        log.start_at("E", 10);
        let kept = |offsets: &[u64]| {
            offsets
                .iter()
                .map(|&o| {
                    let m = Arc::new(Encoded::new(format!(r#"{{"offset":{o}}}"#)));
                    (o, Audience::Channel, m)
                })
                .collect::<Vec<_>>()
        };
        // A hole at 5: only 6..=10 join on to the channel's position.
        log.backfill(t, "E", kept(&[3, 4, 6, 7, 8, 9, 10, 11]));
        assert_eq!(log.first_kept(), Some(6));
        let r = log.recover(
            t,
            &Recover::After {
                epoch: "E".into(),
                offset: 2,
            },
            &who("c"),
        );
        assert_eq!(r.gap, Some(Gap::Expired));
        assert_eq!(r.messages.len(), 5);
        // Another epoch, or a run that stops short: nothing is taken.
        log.backfill(t, "F", kept(&[1, 2, 3, 4, 5]));
        log.backfill(t, "E", kept(&[1, 2, 3]));
        assert_eq!(log.first_kept(), Some(6));
        drop(log);
        drop(hold);
        assert_eq!(
            h.log("ch").lock().unwrap().first_kept(),
            None,
            "kept only while held"
        );
    }
}

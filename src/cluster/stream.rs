//! One order and one history per channel for the whole cluster, kept by
//! a NATS JetStream stream (with `--history-size` in a cluster;
//! docs/cluster.md, "Offsets and history").
//!
//! Every push goes into the stream on `hato.h.<hex of channel_id>`, with
//! the channel's epoch and its next offset in the message. The publisher
//! states which message it expects to be the subject's last
//! (`Nats-Expected-Last-Subject-Sequence`): when another node published
//! first, the stream refuses, and the publisher reads the subject's last
//! message and tries again with the offset after it. So the offsets of a
//! channel are contiguous and the stream holds them in offset order,
//! whichever nodes accepted the pushes.
//!
//! The stream republishes each message it stores on the channel's
//! `hato.ch.` subject, with its sequence and the sequence of the
//! subject's message before it. A node delivers them in that order; when
//! one is missing (NATS dropped it on the way) it reads it from the
//! stream first.

use super::broker::{Broker, StreamBounds, StreamError};
use super::{token, Item, Unavailable, Wire};
use crate::history::Position;
use crate::outbox::Encoded;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The stream's name.
pub const STREAM: &str = "hato_history";
/// Its subjects.
const SUBJECTS: &str = "hato.h.>";
/// Where it republishes what it stores (`hato.h.X` → `hato.ch.X`).
const REPUBLISH: &str = "hato.ch.>";
/// Tries of one push against other nodes publishing to its channel.
const TRIES: usize = 32;

pub fn stream_subject(channel_id: &str) -> String {
    format!("hato.h.{}", token(channel_id))
}

/// The stream as this node publishes to and reads from it.
pub struct Streams {
    broker: Arc<dyn Broker>,
    pub bounds: StreamBounds,
    /// What this node last knew of each channel's last message, to state
    /// it on the next publish. One publish per channel at a time here.
    heads: Mutex<HashMap<Arc<str>, Arc<Slot>>>,
    /// Stores tried again because another node had stored to the channel
    /// first.
    pub conflicts: std::sync::atomic::AtomicU64,
}

/// A channel as this node publishes to it.
#[derive(Default)]
struct Slot {
    /// Its last message as this node knows it; held while storing.
    head: tokio::sync::Mutex<Option<Head>>,
    /// Calls waiting for the next message, in arrival order.
    waiting: Mutex<std::collections::VecDeque<Waiting>>,
}

/// One call's pushes (as JSON items) and where its answer goes.
struct Waiting {
    items: Vec<String>,
    tx: tokio::sync::oneshot::Sender<Result<Vec<Position>, Unavailable>>,
}

/// The most pushes one stored message carries.
pub const BATCH_ITEMS: usize = 256;
/// About the most bytes of pushes one stored message carries (NATS
/// refuses messages over 1 MiB by default); a larger push goes alone.
pub const BATCH_BYTES: usize = 256 * 1024;

/// The calls the next message carries: the first, and those after it
/// within the bounds. A call's pushes are never split.
fn take_batch(waiting: &mut std::collections::VecDeque<Waiting>) -> Vec<Waiting> {
    let mut batch: Vec<Waiting> = Vec::new();
    let (mut items, mut bytes) = (0, 0);
    while let Some(w) = waiting.front() {
        let size: usize = w.items.iter().map(String::len).sum();
        if !batch.is_empty() && (items + w.items.len() > BATCH_ITEMS || bytes + size > BATCH_BYTES)
        {
            break;
        }
        items += w.items.len();
        bytes += size;
        batch.push(waiting.pop_front().expect("front exists"));
    }
    batch
}

/// A channel's last message in the stream.
#[derive(Debug, Clone)]
struct Head {
    seq: u64,
    epoch: Arc<str>,
    offset: u64,
}

/// What the stream keeps of a channel after an offset.
pub struct Since {
    /// `None`: the stream keeps nothing of the channel.
    pub epoch: Option<Arc<str>>,
    /// The channel's last offset.
    pub last: u64,
    /// The oldest offset kept.
    pub first: Option<u64>,
    /// Its messages after the offset asked for, in order (`Wire`s).
    pub messages: Vec<(u64, Bytes)>,
}

impl Since {
    /// Its pushes after `after`, each as the message a peer is sent, with
    /// whom it addresses, in order.
    pub fn pushes(&self, after: u64) -> Vec<(u64, hato_signaling::api::Audience, Arc<Encoded>)> {
        let Some(epoch) = &self.epoch else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (_, payload) in &self.messages {
            let Ok(wire) = serde_json::from_slice::<Wire<'_>>(payload) else {
                continue;
            };
            for (offset, item, data) in wire.pushes().filter(|(o, ..)| *o > after) {
                let text = hato_signaling::message::push_json(data.get(), epoch, offset);
                out.push((offset, item.to.clone(), Arc::new(Encoded::new(text))));
            }
        }
        out
    }
}

/// The epoch and the first and last offsets a stored message carries.
fn position_of(payload: &[u8]) -> Option<(Arc<str>, u64, u64)> {
    let w = serde_json::from_slice::<Wire<'_>>(payload).ok()?;
    let first = w.offset?;
    Some((
        w.epoch?.into(),
        first,
        first + (w.items.len() as u64).max(1) - 1,
    ))
}

impl Streams {
    pub fn new(broker: Arc<dyn Broker>, bounds: StreamBounds) -> Streams {
        Streams {
            broker,
            bounds,
            heads: Mutex::default(),
            conflicts: Default::default(),
        }
    }

    /// Makes the stream, or brings its bounds to this node's.
    pub async fn ensure(&self) -> Result<(), String> {
        self.broker
            .ensure_stream(STREAM, SUBJECTS, REPUBLISH, self.bounds.clone())
            .await
            .map_err(|e| e.0)
    }

    /// The subject's last message, as its position.
    async fn read_head(&self, channel_id: &str) -> Result<Option<Head>, Unavailable> {
        let last = self
            .broker
            .stream_last(STREAM, stream_subject(channel_id))
            .await
            .map_err(|_| Unavailable("JetStream did not answer"))?;
        Ok(last.and_then(|(seq, payload)| {
            let (epoch, _, offset) = position_of(&payload)?;
            Some(Head { seq, epoch, offset })
        }))
    }

    /// Where `channel_id` stands in the stream: its epoch, last offset and
    /// the last message's sequence (`None`: nothing kept).
    pub async fn position(
        &self,
        channel_id: &str,
    ) -> Result<Option<(Arc<str>, u64, u64)>, Unavailable> {
        Ok(self
            .read_head(channel_id)
            .await?
            .map(|h| (h.epoch, h.offset, h.seq)))
    }

    /// Stores one push (or several, of one channel, in order) and returns
    /// the position of each. Nothing is delivered here: every node,
    /// this one included, delivers what the stream republishes.
    ///
    /// A channel's pushes are stored one message at a time by this node:
    /// the calls that arrive while one is being stored wait, and the next
    /// message carries all of them (at most [`BATCH_ITEMS`] pushes and
    /// about [`BATCH_BYTES`]), in the order they arrived.
    pub async fn publish(
        self: &Arc<Self>,
        channel_id: &str,
        items: &[Item<'_>],
    ) -> Result<Vec<Position>, Unavailable> {
        let slot = {
            let mut heads = self.heads.lock().unwrap();
            heads.entry(channel_id.into()).or_default().clone()
        };
        // A call's pushes go in order, in as many messages as the bounds
        // need; other calls' may come between those messages.
        let mut rxs = Vec::new();
        {
            let mut waiting = slot.waiting.lock().unwrap();
            let (mut part, mut bytes) = (Vec::new(), 0);
            for item in items {
                let text = serde_json::to_string(item).expect("an item serialises");
                if !part.is_empty()
                    && (part.len() == BATCH_ITEMS || bytes + text.len() > BATCH_BYTES)
                {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    waiting.push_back(Waiting {
                        items: std::mem::take(&mut part),
                        tx,
                    });
                    rxs.push(rx);
                    bytes = 0;
                }
                bytes += text.len();
                part.push(text);
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            waiting.push_back(Waiting { items: part, tx });
            rxs.push(rx);
        }
        let mut out: Result<Vec<Position>, Unavailable> = Ok(Vec::with_capacity(items.len()));
        let mut next = 0;
        let channel: Arc<str> = channel_id.into();
        loop {
            while next < rxs.len() {
                use tokio::sync::oneshot::error::TryRecvError;
                let done = match rxs[next].try_recv() {
                    Ok(done) => done,
                    Err(TryRecvError::Closed) => Err(Unavailable("the push was dropped")),
                    Err(TryRecvError::Empty) => break,
                };
                // Every part is carried out, even after one failed: none
                // is left to be stored later unanswered.
                match (&mut out, done) {
                    (Ok(out), Ok(positions)) => out.extend(positions),
                    (Ok(_), Err(e)) => out = Err(e),
                    (Err(_), _) => {}
                }
                next += 1;
            }
            if next == rxs.len() {
                return out;
            }
            // A task of its own: a caller that goes away (its HTTP client
            // hung up) does not leave the others' pushes half stored.
            let drain = tokio::spawn(self.clone().store_next(slot.clone(), channel.clone()));
            let _ = drain.await;
        }
    }

    /// Stores the waiting calls' next message and answers them.
    async fn store_next(self: Arc<Self>, slot: Arc<Slot>, channel_id: Arc<str>) {
        let mut head = slot.head.lock().await;
        let batch = take_batch(&mut slot.waiting.lock().unwrap());
        if batch.is_empty() {
            return;
        }
        let texts: Vec<&str> = batch
            .iter()
            .flat_map(|w| w.items.iter().map(String::as_str))
            .collect();
        let stored = self.store(&mut head, &channel_id, &texts).await;
        let mut at = 0;
        for w in batch {
            let answer = stored.clone().map(|first| {
                (at..at + w.items.len())
                    .map(|k| Position {
                        epoch: first.epoch.clone(),
                        offset: first.offset + k as u64,
                    })
                    .collect()
            });
            at += w.items.len();
            let _ = w.tx.send(answer);
        }
        // The lock goes only now: a call whose pushes were in this message
        // finds its answer once it has the lock.
        drop(head);
    }

    /// Stores `items` as one message after the channel's last; returns
    /// the first one's position.
    async fn store(
        &self,
        head: &mut Option<Head>,
        channel_id: &str,
        items: &[&str],
    ) -> Result<Position, Unavailable> {
        for _ in 0..TRIES {
            let known = match head.take() {
                Some(h) => h,
                None => self.read_head(channel_id).await?.unwrap_or(Head {
                    seq: 0,
                    epoch: crate::history::new_epoch(),
                    offset: 0,
                }),
            };
            let offset = known.offset + 1;
            let payload = Bytes::from(format!(
                r#"{{"channel_id":{},"epoch":{},"offset":{offset},"items":[{}]}}"#,
                serde_json::to_string(channel_id).expect("a string serialises"),
                serde_json::to_string(&*known.epoch).expect("a string serialises"),
                items.join(",")
            ));
            match self
                .broker
                .stream_publish(stream_subject(channel_id), known.seq, payload)
                .await
            {
                Ok(seq) => {
                    *head = Some(Head {
                        seq,
                        epoch: known.epoch.clone(),
                        offset: offset + items.len() as u64 - 1,
                    });
                    return Ok(Position {
                        epoch: known.epoch,
                        offset,
                    });
                }
                // Another node published first: read where it left the
                // channel, and try again after it.
                Err(StreamError::Conflict) => {
                    self.conflicts
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
                Err(StreamError::Unavailable(e)) => {
                    tracing::warn!(error = %e, "cluster: JetStream publish failed");
                    return Err(Unavailable("JetStream did not store the push"));
                }
            }
        }
        Err(Unavailable(
            "too many nodes pushed to this channel at once; nothing was stored",
        ))
    }

    /// The stream's messages of `channel_id` after `offset` (in its
    /// epoch), oldest first: at most `limit` pushes and about `max_bytes`.
    pub async fn since(
        &self,
        channel_id: &str,
        offset: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Since, Unavailable> {
        let subject = stream_subject(channel_id);
        let Some(head) = self.read_head(channel_id).await? else {
            return Ok(Since {
                epoch: None,
                last: 0,
                first: None,
                messages: Vec::new(),
            });
        };
        let fail = |_| Unavailable("JetStream did not answer");
        let mut since = Since {
            epoch: Some(head.epoch.clone()),
            last: head.offset,
            first: None,
            messages: Vec::new(),
        };
        let mut bytes = 0;
        let mut from = 1;
        while from <= head.seq && since.messages.len() < limit {
            let Some((seq, payload)) = self
                .broker
                .stream_next(STREAM, subject.clone(), from)
                .await
                .map_err(fail)?
            else {
                break;
            };
            if seq < from {
                break;
            }
            from = seq + 1;
            let Some((epoch, at, last)) = position_of(&payload) else {
                continue;
            };
            if epoch != head.epoch {
                continue;
            }
            since.first.get_or_insert(at);
            if last <= offset {
                continue;
            }
            if bytes > 0 && bytes + payload.len() > max_bytes {
                break;
            }
            bytes += payload.len();
            since.messages.push((at, payload));
        }
        Ok(since)
    }

    /// The first message kept on `subject` at sequence `from` or later.
    pub async fn next(
        &self,
        subject: &str,
        from: u64,
    ) -> Result<Option<(u64, Bytes)>, Unavailable> {
        self.broker
            .stream_next(STREAM, subject.to_owned(), from)
            .await
            .map_err(|_| Unavailable("JetStream did not answer"))
    }

    /// Forgets what this node knew of channels it is not publishing to.
    pub fn sweep(&self) {
        self.heads
            .lock()
            .unwrap()
            .retain(|_, h| Arc::strong_count(h) > 1 || h.head.try_lock().is_err());
    }
}

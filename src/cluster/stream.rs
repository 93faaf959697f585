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
    heads: Mutex<HashMap<Arc<str>, HeadSlot>>,
}

/// A channel's [`Head`] as this node knows it, held while publishing.
type HeadSlot = Arc<tokio::sync::Mutex<Option<Head>>>;

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

/// The epoch and first offset a stored message carries.
pub fn position_of(payload: &[u8]) -> Option<(Arc<str>, u64)> {
    let w = serde_json::from_slice::<Wire<'_>>(payload).ok()?;
    Some((w.epoch?.into(), w.offset?))
}

impl Streams {
    pub fn new(broker: Arc<dyn Broker>, bounds: StreamBounds) -> Streams {
        Streams {
            broker,
            bounds,
            heads: Mutex::default(),
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
            let (epoch, offset) = position_of(&payload)?;
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
    pub async fn publish(
        &self,
        channel_id: &str,
        items: &[Item<'_>],
        stats: &super::ClusterStats,
    ) -> Result<Vec<Position>, Unavailable> {
        let head = {
            let mut heads = self.heads.lock().unwrap();
            heads.entry(channel_id.into()).or_default().clone()
        };
        let mut head = head.lock().await;
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            out.push(self.publish_one(&mut head, channel_id, item, stats).await?);
        }
        Ok(out)
    }

    async fn publish_one(
        &self,
        head: &mut Option<Head>,
        channel_id: &str,
        item: &Item<'_>,
        stats: &super::ClusterStats,
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
            let wire = Wire {
                channel_id: channel_id.to_owned(),
                epoch: Some(&known.epoch),
                offset: Some(offset),
                items: vec![Item {
                    op: item.op,
                    to: item.to.clone(),
                    data: item.data,
                }],
            };
            let payload =
                Bytes::from(serde_json::to_vec(&wire).expect("a wire message serialises"));
            match self
                .broker
                .stream_publish(stream_subject(channel_id), known.seq, payload)
                .await
            {
                Ok(seq) => {
                    *head = Some(Head {
                        seq,
                        epoch: known.epoch.clone(),
                        offset,
                    });
                    return Ok(Position {
                        epoch: known.epoch,
                        offset,
                    });
                }
                // Another node published first: read where it left the
                // channel, and try again after it.
                Err(StreamError::Conflict) => {
                    stats
                        .stream_conflicts
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
            let Some((epoch, at)) = position_of(&payload) else {
                continue;
            };
            if epoch != head.epoch {
                continue;
            }
            since.first.get_or_insert(at);
            if at <= offset {
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
            .retain(|_, h| Arc::strong_count(h) > 1 || h.try_lock().is_err());
    }
}

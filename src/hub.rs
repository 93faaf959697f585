//! The delivery hub: how a push (or a disconnect) reaches this node's
//! connections, whoever asked — the HTTP API or another node of the
//! cluster. It owns the lookup, the size policy (413 up front, or the
//! WebSocket for a hybrid peer whose DataChannel takes less), the choice of
//! transport per recipient, the batching of DataChannel sends per engine
//! shard, and the counting. The API parses and answers; the cluster hands
//! remote pushes here; a connection's outbox only sends what was decided
//! here (see [`crate::outbox`] for how a push crosses the switch).

use crate::history::Position;
use crate::limits::Throttle;
use crate::outbox::{Delivery, Encoded, Out};
use crate::table::Conn;
use crate::Shared;
use hato_datachannel::Peer;
use hato_signaling::api::{Audience, Call};
use hato_signaling::message;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// A push to deliver here: its channel, whom in it, and `data` as the
/// API received it (its text).
#[derive(Clone, Copy)]
pub struct Push<'a> {
    pub channel_id: &'a str,
    pub audience: Audience<&'a str>,
    pub data: &'a str,
}

impl<'a> Push<'a> {
    pub fn of(call: &'a Call<'_>) -> Push<'a> {
        Push {
            channel_id: &call.channel_id,
            audience: call.audience.as_ref(),
            data: call.data.expect("a push call has data").get(),
        }
    }
}

/// What a delivered push reached, and its place in its channel's order.
#[derive(Debug)]
pub struct Pushed {
    /// Connections it was queued to (here, and in a cluster, as this node
    /// knows them, on the others).
    pub recipients: u64,
    pub position: Position,
}

/// A push larger than hato itself sends over a DataChannel (RFC 8831
/// §6.6), for a recipient that has nothing else: refused whole.
#[derive(Debug)]
pub struct TooLarge {
    pub bytes: usize,
    pub limit: usize,
}

/// Where a push being delivered here comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// This node's API: an oversize push for a DataChannel-only
    /// recipient is refused.
    Api,
    /// Another node, which accepted it: such recipients are skipped.
    Cluster,
}

/// Whether a recipient has nothing but a DataChannel for a push: then a
/// push larger than hato sends over one is refused whole (413).
fn any_datachannel_only(conns: &[Arc<Conn>]) -> bool {
    conns
        .iter()
        .any(|c| c.message_limit.is_some() && !c.websocket_fallback)
}

fn refuse_oversize(shared: &Shared, bytes: usize) -> Result<(), TooLarge> {
    let limit = shared.config.data_channel_message_limit;
    if bytes <= limit {
        return Ok(());
    }
    Err(TooLarge { bytes, limit })
}

/// In a cluster: refuses a push too large for a DataChannel-only
/// recipient on another node, as for one here; delivers it here. Counts
/// the recipients here and, as this node knows them, on the others.
pub fn deliver_here_and_there(shared: &Shared, push: Push<'_>) -> Result<Pushed, TooLarge> {
    let (remote, remote_dc_only) = shared.table.remote_matches(push.channel_id, push.audience);
    let mut pushed = deliver_checked(shared, push, Origin::Api, remote_dc_only, None)?;
    pushed.recipients += remote as u64;
    Ok(pushed)
}

/// Gives one push its channel's next offset and queues it on every
/// matching connection of this node, all under the channel's lock: every
/// connection of the channel receives its pushes in one order.
pub fn deliver(shared: &Shared, push: Push<'_>, origin: Origin) -> Result<Pushed, TooLarge> {
    deliver_checked(shared, push, origin, false, None)
}

/// Delivers a push the cluster's stream gave `offset` in `epoch`, under
/// the channel's lock, as [`deliver`] does.
pub fn deliver_at(shared: &Shared, push: Push<'_>, epoch: &str, offset: u64) {
    let _ = deliver_checked(shared, push, Origin::Cluster, false, Some((epoch, offset)));
}

/// In a cluster whose stream orders the pushes: refuses, as
/// [`deliver_here_and_there`] does, a push too large for a
/// DataChannel-only recipient here or there, before it is stored; counts
/// the recipients it will reach (here, and there as this node knows
/// them). Delivery follows when the stream republishes it.
pub fn check(shared: &Shared, push: Push<'_>) -> Result<u64, TooLarge> {
    let (remote, remote_dc_only) = shared.table.remote_matches(push.channel_id, push.audience);
    let conns = shared.table.lookup(push.channel_id, push.audience);
    if remote_dc_only || any_datachannel_only(&conns) {
        // Its size with a position as long as any it can be given.
        let around = message::push_json("", "000000000000", u64::MAX).len();
        refuse_oversize(shared, around + push.data.len())?;
    }
    shared.table.stats.pushes.fetch_add(1, Ordering::Relaxed);
    Ok((conns.len() + remote) as u64)
}

fn deliver_checked(
    shared: &Shared,
    push: Push<'_>,
    origin: Origin,
    must_fit: bool,
    at: Option<(&str, u64)>,
) -> Result<Pushed, TooLarge> {
    let Push {
        channel_id,
        audience,
        data,
    } = push;
    let log_arc = shared.history.log(channel_id);
    let mut log = log_arc.lock().unwrap();
    if let Some((epoch, offset)) = at {
        log.adopt(epoch, offset);
    }
    let frame = Arc::new(Encoded::new(message::push_json(
        data,
        &log.epoch,
        log.next_offset(),
    )));
    let conns = shared.table.lookup(channel_id, audience);
    // Refuse up front a push larger than hato itself sends over a
    // DataChannel, when a recipient would need one.
    let own_limit = shared.config.data_channel_message_limit;
    if origin == Origin::Api && (must_fit || any_datachannel_only(&conns)) {
        refuse_oversize(shared, frame.len())?;
    }
    log.commit(std::time::Instant::now(), audience, frame.clone());
    let frame = &frame;
    let stats = &shared.table.stats;
    if origin == Origin::Api {
        stats.pushes.fetch_add(1, Ordering::Relaxed);
    }
    let mut queued = 0;
    // Switched peers, by framing: handed to the engine in one call each,
    // which reaches every shard once however many peers it holds.
    let mut direct: [Vec<Arc<Peer>>; 2] = Default::default();
    let mut undeliverable = 0;
    for conn in &conns {
        let Some(delivery) = push_one(conn, frame, own_limit) else {
            undeliverable += 1;
            continue;
        };
        match delivery {
            Delivery::Queued => queued += 1,
            Delivery::Direct { peer, compress } => direct[usize::from(compress)].push(peer),
            Delivery::Overflow => {
                stats.outbox_overflows.fetch_add(1, Ordering::Relaxed);
            }
            Delivery::Gone => {}
        }
    }
    for (compress, peers) in direct.iter().enumerate() {
        if peers.is_empty() {
            continue;
        }
        let compress = compress == 1;
        queued += peers.len() as u64;
        stats
            .deliveries_datachannel
            .fetch_add(peers.len() as u64, Ordering::Relaxed);
        shared.engine.send_many(
            peers.iter().map(|p| &**p),
            "push",
            frame.bytes(compress),
            !compress,
        );
    }
    stats.deliveries.fetch_add(queued, Ordering::Relaxed);
    if undeliverable > 0 {
        stats
            .undeliverable
            .fetch_add(undeliverable, Ordering::Relaxed);
        static SKIPPED: Throttle = Throttle::new(Duration::from_secs(1));
        if let Some(folded) = SKIPPED.hit() {
            tracing::warn!(
                channel_id,
                bytes = frame.len(),
                skipped = undeliverable,
                pushes_folded = folded,
                "push larger than some DataChannel-only recipients' a=max-message-size: skipped for them"
            );
        }
    }
    let position = log.position();
    drop(log);
    if queued == 0 && shared.table.counts(channel_id).all == 0 {
        shared.history.forget_if_idle(channel_id, &log_arc);
    }
    Ok(Pushed {
        recipients: queued,
        position,
    })
}

/// One recipient never vetoes a push: a peer whose DataChannel takes less
/// than this push gets it on its WebSocket, or, without one, is skipped
/// (`None`) while the others still get it.
fn push_one(conn: &Conn, frame: &Arc<Encoded>, own_limit: usize) -> Option<Delivery> {
    if conn
        .message_limit
        .is_some_and(|l| frame.len() > l.min(own_limit))
    {
        return conn
            .websocket_fallback
            .then(|| conn.deliver(Out::PushWs(frame.clone())));
    }
    Some(conn.push(frame))
}

/// Queues `frames` on `conn` alone, in order, with the size policy of a
/// push: what a joiner that recovers is given before the live pushes.
pub fn replay<'a>(
    shared: &Shared,
    conn: &Conn,
    frames: impl IntoIterator<Item = &'a Arc<Encoded>>,
) {
    let own_limit = shared.config.data_channel_message_limit;
    let stats = &shared.table.stats;
    for frame in frames {
        match push_one(conn, frame, own_limit) {
            Some(Delivery::Queued) => {}
            Some(Delivery::Direct { peer, compress }) => {
                stats.deliveries_datachannel.fetch_add(1, Ordering::Relaxed);
                shared.engine.send_many(
                    std::iter::once(&*peer),
                    "push",
                    frame.bytes(compress),
                    !compress,
                );
            }
            Some(Delivery::Overflow) => {
                stats.outbox_overflows.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Some(Delivery::Gone) => return,
            None => {
                stats.undeliverable.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        }
        stats.deliveries.fetch_add(1, Ordering::Relaxed);
    }
}

/// Ends every matching session of this node with `DISCONNECTED-API`.
pub fn disconnect(shared: &Shared, channel_id: &str, target: Audience<&str>) {
    for conn in shared.table.lookup(channel_id, target) {
        conn.disconnect();
    }
}

/// This node's connections (in one channel, or all) as listed.
pub fn local_listing(shared: &Shared, channel: Option<&str>) -> Vec<Value> {
    let conns = match channel {
        Some(ch) => shared.table.lookup(ch, Audience::Channel),
        None => shared.table.all(),
    };
    let node = shared.config.node_name();
    conns.iter().map(|c| connection_json(c, &node)).collect()
}

/// One connection as the listing targets show it (docs/protocol.md §6.3), with
/// hato's transport for its pushes now and the node that holds it.
fn connection_json(c: &Conn, node: &str) -> Value {
    json!({
        "node_name": node,
        "channel_id": &*c.channel_id,
        "client_id": &*c.client_id,
        "bundle_id": &*c.bundle_id,
        "connection_id": &*c.connection_id,
        "session_id": &*c.session_id,
        "role": c.role.as_str(),
        "created_time": c.created_time,
        "audio": false,
        "video": false,
        "simulcast": false,
        "spotlight": false,
        "multistream": false,
        "data_channel_signaling": c.message_limit.is_some(),
        "ignore_disconnect_websocket": !c.websocket_fallback,
        "transport": if c.on_datachannel() { "datachannel" } else { "websocket" },
    })
}

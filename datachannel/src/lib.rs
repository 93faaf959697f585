//! A WebRTC DataChannel engine for a push server: webrtc-rs's sans-I/O
//! core (`rtc`) driven by hato itself.
//!
//! Peers are spread over shards. A shard is one thread that owns one UDP
//! socket, its peers' `RTCPeerConnection`s and one timer; it reads
//! datagrams in batches, routes each to its peer (the STUN `USERNAME` of a
//! new source address, checked with that peer's password, then the address),
//! drives the peers that have work, and writes their datagrams in batches.
//! The owner of a [`Peer`] talks to its shard through commands and hears
//! back through [`PeerEvent`]s; nothing here blocks on a peer.
//!
//! [`Engine::offer`] is the server side (one `m=application` section, the
//! shard's advertised address inside the SDP, DataChannels created in-band
//! before the offer). [`Engine::answer`] is the client side, for tests and
//! the load harness; a client engine gives each peer an address of its own
//! ([`Sockets::LoopbackAliases`]), as a browser has, so that many of them
//! can talk to one server socket. Nothing here knows about channels, roles
//! or pushes.

pub mod candidate;
mod consent;
mod demux;
mod prefilter;
mod shard;
mod udp;

use bytes::Bytes;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Events buffered per peer of the answering (client) side.
pub const CLIENT_EVENT_BUFFER: usize = 16_384;

pub use consent::signed_binding_request;
pub use shard::{
    fix_mmap_threshold, give_back_memory, EARLY_BYTES, EVENT_BUFFER, PEER_CHECKS, SHARD_CHECKS,
    SHARD_HELD_BYTES,
};

/// How peers reach the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sockets {
    /// One UDP socket per shard, shared by its peers (a server).
    Shared,
    /// One UDP socket per shard on an ephemeral port of the unspecified
    /// address, and a loopback address (127.x.y.z) per peer on it: a client
    /// of a server on this host, which tells peers apart by their address.
    LoopbackAliases,
}

/// How an engine binds and what it advertises.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Where the shards bind: shard `k` binds port `bind.port() + k`
    /// (port 0: an ephemeral port each). A concrete address binds that
    /// interface; `0.0.0.0` binds every one. [`Sockets::LoopbackAliases`]
    /// binds `0.0.0.0` on ephemeral ports whatever this says.
    pub bind: SocketAddr,
    /// Addresses written into candidates instead of the bound one (Sora's
    /// public IP setting, for NAT 1:1 or containers). Empty: the bound
    /// address, or every interface's when bound to the unspecified address.
    pub advertise: Vec<IpAddr>,
    /// Threads, each with its own socket, timer and peers.
    pub shards: usize,
    pub sockets: Sockets,
    /// Our `a=max-message-size`: the largest message a peer may send us.
    pub max_message_size: u32,
    /// Bytes a channel may hold unacknowledged before [`PeerEvent::Backlog`].
    pub backlog_limit: usize,
    /// How often the ICE agent checks a connected pair (zero: never). An
    /// offering peer skips its check while the other side checks on its
    /// own (Chromium and libwebrtc do, every 2.5 s): see docs.
    pub keepalive: Duration,
    /// A connected peer from which no authenticated STUN (its checks, or
    /// its answers to ours) has arrived for this long is failed
    /// ([`PeerEvent::Failed`]): ICE consent expiry, 30 s in RFC 7675 §5.1.
    /// Other datagrams do not count: anyone can forge their source. At
    /// least [`ICE_DISCONNECTED`] plus a second. While it still
    /// connects, a peer gets [`CHECKING_LIMIT`] whatever this is.
    pub silence_limit: Duration,
    /// Refuse remote candidates in private ranges (an internet-facing
    /// deployment's peers never need them checked).
    pub refuse_private_candidates: bool,
}

impl EngineConfig {
    /// A server engine on `bind`, one shard per core.
    pub fn server(bind: SocketAddr) -> EngineConfig {
        EngineConfig {
            bind,
            advertise: Vec::new(),
            shards: default_shards(),
            sockets: Sockets::Shared,
            max_message_size: 262_144,
            backlog_limit: 8 << 20,
            keepalive: Duration::from_secs(2),
            silence_limit: Duration::from_secs(30),
            refuse_private_candidates: false,
        }
    }

    /// A client engine for a server on this host: a loopback address per
    /// peer.
    pub fn client() -> EngineConfig {
        EngineConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            sockets: Sockets::LoopbackAliases,
            ..EngineConfig::server(SocketAddr::from(([127, 0, 0, 1], 0)))
        }
    }
}

/// One shard per available core.
pub fn default_shards() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// What happened on a peer.
#[derive(Debug)]
pub enum PeerEvent {
    /// ICE and DTLS are up.
    Connected,
    /// The PeerConnection failed or closed; nothing more will arrive.
    Failed(String),
    /// A DataChannel is open (both ends).
    Open(Arc<str>),
    /// A message read on a channel. Boxed: every peer's event queue
    /// allocates room for 32 events at once, and inline this variant made
    /// each 56 bytes (1.8 KB a peer); servers read few messages.
    Message(Box<Incoming>),
    /// A DataChannel closed.
    Closed(Arc<str>),
    /// The SCTP association ended (the other side closed its
    /// PeerConnection, or it was aborted): nothing more travels on any
    /// channel.
    AssociationClosed,
    /// A send on this channel failed (the channel is gone, or the core
    /// refused the message). Said once per peer; every failure is counted
    /// in [`Stats::failed_sends`].
    SendFailed { label: Arc<str>, error: Box<str> },
    /// A channel's unacknowledged bytes fell below its low-water mark.
    Writable(Arc<str>),
    /// A channel holds more than [`EngineConfig::backlog_limit`] bytes the
    /// other side has not acknowledged: it is not keeping up.
    Backlog(Arc<str>),
}

/// A message read on a channel ([`PeerEvent::Message`]).
#[derive(Debug)]
pub struct Incoming {
    pub label: Arc<str>,
    pub data: Bytes,
    /// Sent as a string (PPID 51), not as binary.
    pub text: bool,
}

#[derive(Debug)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// Counters an operator (or a test) reads.
#[derive(Debug, Default)]
pub struct Stats {
    /// Peers whose engine state exists: created and not yet dropped.
    pub live_peers: AtomicUsize,
    /// Datagrams that matched no peer (unknown address, no valid STUN).
    pub dropped_unknown: AtomicU64,
    /// STUN from a new address whose MESSAGE-INTEGRITY did not check out.
    pub dropped_integrity: AtomicU64,
    /// Datagrams held for a peer that was not ready for them yet: any
    /// datagram before the offerer has the answer.
    pub held_early: AtomicU64,
    /// DTLS records held because they came before this side's ICE agent
    /// had selected a pair (the core drops those; the other side would
    /// resend only after a second).
    pub held_before_ice: AtomicU64,
    /// Early datagrams dropped because a hold was full (count or bytes).
    pub dropped_early: AtomicU64,
    /// Bytes held now, early and before ICE, over every shard (a gauge).
    pub held_bytes: AtomicU64,
    /// Remote candidates not used: an address hato never checks
    /// ([`candidate::Policy`]).
    pub refused_candidates: AtomicU64,
    /// Datagrams not sent to an address that never answered, over the
    /// peer's or the shard's pace ([`shard::PEER_CHECKS`]).
    pub paced_checks: AtomicU64,
    /// Binding requests from an address bound to a live peer that named
    /// another peer (a forged source address), dropped.
    pub refused_moves: AtomicU64,
    /// DataChannels the remote side opened, closed at once.
    pub refused_channels: AtomicU64,
    /// Incoming DataChannel messages dropped because the owner was not reading.
    pub dropped_messages: AtomicU64,
    /// Sends that failed (channel not open, message too large, ...).
    pub failed_sends: AtomicU64,
    /// Datagrams the kernel refused.
    pub dropped_outbound: AtomicU64,
    /// Consent checks of connected peers answered by their shard without
    /// the core (see the shard's `answer_check`).
    pub answered_checks: AtomicU64,
    /// Peers heard again after a silence whose backed-off SCTP DATA was
    /// resent at once ([`shard::HEARD_AGAIN_AFTER`]).
    pub resent_on_return: AtomicU64,
}

/// A running engine. Cloning is cheap; the shards stop when the last clone
/// and the last [`Peer`] are gone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    shards: Vec<Arc<shard::Handle>>,
    next: AtomicUsize,
    stats: Arc<Stats>,
    local_addrs: Vec<SocketAddr>,
}

impl Engine {
    /// Binds the shards' sockets and starts their threads.
    pub fn start(config: EngineConfig) -> Result<Engine, Error> {
        let stats = Arc::new(Stats::default());
        let shared = shard::Common::new(&config, stats.clone())?;
        let mut shards = Vec::new();
        let mut local_addrs = Vec::new();
        for k in 0..config.shards.max(1) {
            let (handle, addr) = shard::spawn(k, &config, shared.clone())?;
            local_addrs.push(addr);
            shards.push(Arc::new(handle));
        }
        Ok(Engine {
            inner: Arc::new(EngineInner {
                shards,
                next: AtomicUsize::new(0),
                stats,
                local_addrs,
            }),
        })
    }

    /// The shards' bound UDP addresses.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.inner.local_addrs
    }

    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    fn pick(&self) -> Arc<shard::Handle> {
        let k = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.shards.len();
        self.inner.shards[k].clone()
    }

    /// The offering (server) side. Creates `labels` as ordered, reliable,
    /// in-band channels and returns the offer SDP with the shard's
    /// candidates in it. With no labels the offer still has an
    /// `m=application` section (an unannounced negotiated channel holds it
    /// open): without one no transport exists and SDKs never reach
    /// "connected".
    pub async fn offer(
        &self,
        labels: &[&str],
    ) -> Result<(Peer, String, mpsc::Receiver<PeerEvent>), Error> {
        let labels = labels.iter().map(|l| Arc::<str>::from(*l)).collect();
        self.create(shard::Side::Offer { labels }).await
    }

    /// The answering (client) side: applies `offer_sdp`, answers with the
    /// candidates inside. Channels the offerer opens arrive as events.
    pub async fn answer(
        &self,
        offer_sdp: &str,
    ) -> Result<(Peer, String, mpsc::Receiver<PeerEvent>), Error> {
        self.create(shard::Side::Answer {
            offer: offer_sdp.to_owned(),
        })
        .await
    }

    async fn create(
        &self,
        side: shard::Side,
    ) -> Result<(Peer, String, mpsc::Receiver<PeerEvent>), Error> {
        let shard = self.pick();
        // The answering side is a client of hato's own (tests, hato-load):
        // the server's pushes it has not read yet are its measurement, not
        // a flood; room for a burst of a PushBatch (1 000) and more.
        let buffer = match side {
            shard::Side::Offer { .. } => EVENT_BUFFER,
            shard::Side::Answer { .. } => CLIENT_EVENT_BUFFER,
        };
        let (events, events_rx) = mpsc::channel(buffer);
        let (reply, reply_rx) = oneshot::channel();
        shard.command(shard::Command::Create {
            side,
            events,
            reply,
        });
        let (id, sdp) = reply_rx
            .await
            .map_err(|_| Error("the engine has stopped".into()))??;
        Ok((Peer { shard, id }, sdp, events_rx))
    }

    /// Sends one message on `label` to each of `peers`: one command per
    /// shard, whatever the number of peers.
    pub fn send_many<'a>(
        &self,
        peers: impl IntoIterator<Item = &'a Peer>,
        label: &str,
        data: Bytes,
        text: bool,
    ) {
        let mut by_shard: Vec<(Arc<shard::Handle>, Vec<shard::PeerId>)> = Vec::new();
        for p in peers {
            match by_shard.iter_mut().find(|(s, _)| Arc::ptr_eq(s, &p.shard)) {
                Some((_, ids)) => ids.push(p.id),
                None => by_shard.push((p.shard.clone(), vec![p.id])),
            }
        }
        let label: Arc<str> = label.into();
        for (shard, ids) in by_shard {
            shard.command(shard::Command::Send {
                ids,
                label: label.clone(),
                data: data.clone(),
                text,
            });
        }
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("shards", &self.inner.shards.len())
            .field("local_addrs", &self.inner.local_addrs)
            .finish()
    }
}

/// One end of a WebRTC connection carrying only DataChannels. Dropping it
/// frees the peer's engine state (after telling the other side).
pub struct Peer {
    shard: Arc<shard::Handle>,
    id: shard::PeerId,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Peer({})", self.id)
    }
}

impl Peer {
    /// Applies the remote answer (offering side).
    pub async fn apply_answer(&self, sdp: &str) -> Result<(), Error> {
        let (reply, rx) = oneshot::channel();
        self.shard.command(shard::Command::Answer {
            id: self.id,
            sdp: sdp.to_owned(),
            reply,
        });
        rx.await
            .map_err(|_| Error("the engine has stopped".into()))?
    }

    /// Adds a trickled remote candidate. `sdp_mid` and `sdp_mline_index`
    /// are not needed (one m-line); an empty candidate (end of candidates)
    /// is ignored. A bad candidate is logged by the shard.
    pub fn add_candidate(&self, candidate: &str) {
        if candidate.trim().is_empty() {
            return;
        }
        self.shard.command(shard::Command::Candidate {
            id: self.id,
            candidate: candidate.to_owned(),
        });
    }

    /// Sends one message on `label`, as text or binary. Never waits: the
    /// shard queues it in SCTP, and reports [`PeerEvent::Backlog`] when
    /// the other side stops acknowledging.
    pub fn send(&self, label: &str, data: Bytes, text: bool) {
        self.shard.command(shard::Command::Send {
            ids: vec![self.id],
            label: label.into(),
            data,
            text,
        });
    }

    /// Closes every DataChannel (an SCTP stream reset each) once what was
    /// sent on them is acknowledged, or after `drain_limit`, so the peer
    /// sees each `onclose` after the last message.
    pub fn close_channels(&self, drain_limit: std::time::Duration) {
        self.shard.command(shard::Command::CloseChannels {
            id: self.id,
            drain_limit,
        });
    }

    /// From now on, drops every datagram that arrives for this peer, as if
    /// its host had frozen: nothing is read or acknowledged. For tests of
    /// peers that stop keeping up.
    pub fn stall(&self) {
        self.shard.command(shard::Command::Stall { id: self.id });
    }

    /// Opens a DataChannel from this side; later sends on `label` use it.
    /// hato's server side never does (and refuses channels its peers
    /// open); the client side does it to test that.
    pub fn open_channel(&self, label: &str) {
        self.shard.command(shard::Command::OpenChannel {
            id: self.id,
            label: label.into(),
        });
    }

    /// For `d`, drops every datagram this peer would send or receive, as if
    /// its host's network were down for a while; then carries on. For tests
    /// of peers that come back.
    pub fn freeze(&self, d: Duration) {
        self.shard.command(shard::Command::Freeze {
            id: self.id,
            until: std::time::Instant::now() + d,
            forge: false,
        });
    }

    /// As [`freeze`](Self::freeze), and in place of each STUN message the
    /// peer would have sent (its consent checks, every 2 s), sends a
    /// datagram that is not STUN from its address to the same place — as a
    /// third party forging the vanished peer's address could. For tests
    /// that the other side does not count such datagrams as consent.
    pub fn freeze_forging(&self, d: Duration) {
        self.shard.command(shard::Command::Freeze {
            id: self.id,
            until: std::time::Instant::now() + d,
            forge: true,
        });
    }

    /// Forgets this peer without a word to the other side, as if its host
    /// had vanished: the other side must find out by itself (ICE consent).
    pub fn vanish(&self) {
        self.shard.command(shard::Command::Vanish { id: self.id });
    }

    /// Closes one channel (an SCTP stream reset), as a client may.
    pub fn close_channel(&self, label: &str) {
        self.shard.command(shard::Command::CloseChannel {
            id: self.id,
            label: label.into(),
        });
    }

    /// Ends the connection: the other side is told (SCTP ABORT, DTLS
    /// close_notify); events stop after a final `Failed`.
    pub fn close(&self) {
        self.shard.command(shard::Command::Close { id: self.id });
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.shard.command(shard::Command::Remove { id: self.id });
    }
}

//! One shard: a thread with a current-thread runtime that owns a UDP
//! socket, its peers' `RTCPeerConnection`s and one timer. A client
//! shard's peers each send and receive as an address of their own on that
//! socket (see [`Aliases`]).
//!
//! Each turn of the loop takes what is ready — commands, a batch of
//! datagrams, due timers — feeds it to the peers concerned, then drives
//! each of those peers until it has nothing more to say: events and reads
//! are drained *before* the last `poll_write`, since handling an event can
//! queue writes (the order the crate's own example gets wrong, and the
//! cause of the stalls of the async wrapper). The datagrams of all
//! peers leave together at the end of the turn.

use crate::candidate::{Pace, Policy};
use crate::consent;
use crate::demux::{Demux, Proof, Route};
use crate::prefilter;
use crate::udp::{Datagram, SharedSocket, Transmit};
use crate::{EngineConfig, Error, Incoming, PeerEvent, Sockets, Stats};
use bytes::{Bytes, BytesMut};
use rand::distributions::Alphanumeric;
use rand::Rng;
use rtc::data_channel::{RTCDataChannelId, RTCDataChannelInit};
use rtc::peer_connection::certificate::{CertificateParams, RTCCertificate};
use rtc::peer_connection::configuration::setting_engine::{
    SctpMaxMessageSize, SettingEngineBuilder,
};
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::event::{RTCDataChannelEvent, RTCPeerConnectionEvent};
use rtc::peer_connection::message::RTCMessage;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::{RTCIceConnectionState, RTCPeerConnectionState};
use rtc::peer_connection::transport::{RTCIceCandidateInit, RTCSctpTransportState};
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

pub type PeerId = u64;

/// Events buffered per peer. Control events are few; incoming messages
/// beyond this (a peer flooding while its owner is slow) are dropped and
/// counted rather than held without bound.
pub const EVENT_BUFFER: usize = 256;
/// Room kept for control events when deciding to drop a message.
const EVENT_RESERVE: usize = 16;

/// Datagrams held for a peer that is not ready for them yet (an ICE check or
/// a DTLS ClientHello that overtook the answer on the signaling path)...
const EARLY_LIMIT: usize = 64;
/// ...and their bytes: a handshake's early datagrams are a few STUN
/// checks (~100 bytes) and a DTLS ClientHello (~200), while a datagram may
/// be 64 KiB.
pub const EARLY_BYTES: usize = 16 * 1024;
/// The bytes every peer of a shard may hold together (1 000 handshakes in
/// flight would hold ~0.5 MiB if honest).
pub const SHARD_HELD_BYTES: usize = 4 << 20;

/// ICE checks one peer may make hato send to addresses that have not
/// answered one: a burst, then a rate. An honest browser needs none of
/// them: its own check reaches hato first, from its first address, which
/// is checked at ICE's pace (`Proof::Own`) and answers.
pub const PEER_CHECKS: (u32, u32) = (10, 5);
/// The same, for all the peers of a shard together.
pub const SHARD_CHECKS: (u32, u32) = (200, 100);

/// No datagram from a connected peer for this long: ICE calls it
/// "disconnected" (a state only; it keeps checking).
pub const ICE_DISCONNECTED: Duration = Duration::from_secs(4);

/// A connected peer heard again after at least this long without a
/// datagram: the path works once more, and SCTP DATA that waits on a
/// backed-off retransmission timer is resent at once (rtc-sctp's
/// `retransmit_now_if_backed_off`, hato's patch). The timer doubles at each
/// expiry (1, 2, 4, 8, 16 s ...), so a peer back from a 20 s blip would
/// otherwise wait up to 12 s more for what was sent while it was away. At
/// most one resend per silence this long: a peer cannot make hato resend
/// faster by sending more, and many peers timing out together (a server
/// too busy to read its socket) keep their backoff.
pub const HEARD_AGAIN_AFTER: Duration = ICE_DISCONNECTED;

/// A peer whose ICE checks have found no working pair this long after they
/// began is failed, however long [`EngineConfig::silence_limit`] is: an
/// unanswered peer makes hato check the addresses it named (paced, see
/// [`PEER_CHECKS`]), and this bounds for how long.
pub const CHECKING_LIMIT: Duration = Duration::from_secs(12);

/// How often shard 0 of a server engine returns free memory to the kernel.
const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Peers created within one [`TRIM_EVERY`] that make it a connect storm,
/// after which memory is handed back every [`TRIM_EVERY`] for
/// [`TRIM_AFTER_STORM`].
const STORM: u64 = 64;

/// How long after a connect storm the periodic return of memory goes on:
/// its notifies drain from the SCTP queues within seconds.
const TRIM_AFTER_STORM: Duration = Duration::from_secs(20);

/// Peers removed between two returns of free memory to the kernel.
const TRIM_AFTER: usize = 256;

/// Returns the allocator's free pages to the kernel. A few hundred KB of
/// state per peer come and go with every connect; glibc keeps freed
/// memory in its arenas, so without this a server's RSS stays at its
/// high-water mark after the peers have left.
pub fn give_back_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory the allocator holds free.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Fixes glibc's mmap threshold at 1 MiB (unless `MALLOC_MMAP_THRESHOLD_`
/// is set). glibc raises the threshold each time a large mmapped block is
/// freed, so after a connect storm later large blocks come from the
/// threads' heaps, where they fragment and RSS grows with every cycle of
/// peers (docs/configuration.md, "Memory after bursts"). A threshold of
/// 128 KiB did as well for memory but mmapped blocks the push path
/// allocates and frees all the time, at a clear cost in CPU per delivery.
/// For the server process.
pub fn fix_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt only changes a tunable of the allocator.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        }
    }
}

/// Receive and send buffer asked for each shared socket.
const SOCKET_BUFFER: usize = 8 << 20;

/// Receive buffer of a client shard's socket. Its peers' datagrams all
/// queue in it, and a connect storm in one channel (every connect a notify
/// to everyone: ~N²/2 datagrams for N peers) outruns the client by more
/// than `net.core.rmem_max` allows (4 MiB here: ~1 800 lost datagrams a
/// run of 1000 peers, each a 1 s retransmit, and once a connect that never
/// finished). Asked with `SO_RCVBUFFORCE`, which ignores that cap where the
/// process may (CAP_NET_ADMIN), else as `SO_RCVBUF`.
const CLIENT_RECV_BUFFER: usize = 64 << 20;

/// The name of the unannounced negotiated channel that holds the
/// `m=application` section open when no channel is offered.
const QUIET_LABEL: &str = "hato-sctp";

/// Which side of the offer/answer exchange a new peer takes.
pub enum Side {
    Offer { labels: Vec<Arc<str>> },
    Answer { offer: String },
}

pub enum Command {
    Create {
        side: Side,
        events: mpsc::Sender<PeerEvent>,
        reply: oneshot::Sender<Result<(PeerId, String), Error>>,
    },
    Answer {
        id: PeerId,
        sdp: String,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Candidate {
        id: PeerId,
        candidate: String,
    },
    Send {
        ids: Vec<PeerId>,
        label: Arc<str>,
        data: Bytes,
        text: bool,
    },
    CloseChannels {
        id: PeerId,
        drain_limit: Duration,
    },
    Close {
        id: PeerId,
    },
    Remove {
        id: PeerId,
    },
    /// Forget a peer without telling the other side (a test's client
    /// whose host vanished).
    Vanish {
        id: PeerId,
    },
    Stall {
        id: PeerId,
    },
    Freeze {
        id: PeerId,
        until: Instant,
        /// Sends, in place of each datagram it drops, one that is not STUN.
        forge: bool,
    },
    OpenChannel {
        id: PeerId,
        label: Arc<str>,
    },
    CloseChannel {
        id: PeerId,
        label: Arc<str>,
    },
}

/// The sending half of a shard's command queue.
pub struct Handle {
    commands: mpsc::UnboundedSender<Command>,
}

impl Handle {
    pub fn command(&self, c: Command) {
        // Fails only once the shard has stopped; then there is nothing to do.
        let _ = self.commands.send(c);
    }
}

/// What every shard of an engine shares.
#[derive(Clone)]
pub struct Common {
    stats: Arc<Stats>,
    /// Peers created by every shard so far (shard 0 decides when to trim).
    created: Arc<AtomicU64>,
    /// One DTLS certificate for every peer: generating one per peer costs
    /// CPU at every connect, and nothing is gained by it.
    certificate: RTCCertificate,
    crypto: Arc<dyn rtc::crypto::RTCCryptoProvider>,
    advertise: Vec<IpAddr>,
    /// Which remote candidates are used.
    policy: Policy,
    max_message_size: u32,
    backlog_limit: usize,
    keepalive: Duration,
    silence_limit: Duration,
}

impl Common {
    pub fn new(config: &EngineConfig, stats: Arc<Stats>) -> Result<Common, Error> {
        let crypto = rtc::crypto::default_provider().map_err(|e| Error(e.to_string()))?;
        let params =
            CertificateParams::new(vec![random_string(16)]).map_err(|e| Error(e.to_string()))?;
        let certificate = RTCCertificate::generate(
            crypto.crypto(),
            rtc::crypto::SignatureScheme::EcdsaP256Sha256,
            params,
        )
        .map_err(|e| Error(e.to_string()))?;
        let advertise = if !config.advertise.is_empty() {
            config.advertise.clone()
        } else if config.bind.ip().is_unspecified() {
            let found = crate::udp::interface_addrs(config.bind.is_ipv6());
            if found.is_empty() {
                return Err(Error(format!(
                    "{} binds every interface, but none has an address to advertise; give one",
                    config.bind.ip()
                )));
            }
            found
        } else {
            vec![config.bind.ip()]
        };
        Ok(Common {
            stats,
            created: Arc::new(AtomicU64::new(0)),
            certificate,
            crypto,
            // Where hato listens: what it advertises, and the address it is
            // bound to when that is one address (0.0.0.0 listens on
            // loopback too, but a deployment bound there does not serve
            // peers on it).
            policy: Policy::new(
                &[&advertise[..], &[config.bind.ip()]].concat(),
                config.refuse_private_candidates,
            ),
            advertise,
            max_message_size: config.max_message_size,
            keepalive: config.keepalive,
            silence_limit: config
                .silence_limit
                .max(ICE_DISCONNECTED + Duration::from_secs(1)),
            backlog_limit: config.backlog_limit,
        })
    }
}

/// Binds shard `k`'s socket and starts its thread.
pub fn spawn(
    k: usize,
    config: &EngineConfig,
    common: Common,
) -> Result<(Handle, SocketAddr), Error> {
    let client = config.sockets == Sockets::LoopbackAliases;
    // A client: every 127.x.y.z and an ephemeral port, each peer's address.
    let mut bind = if client {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        config.bind
    };
    if bind.port() != 0 {
        let port = bind.port() as usize + k;
        let port = u16::try_from(port)
            .map_err(|_| Error(format!("shard {k}: port {port} is out of range")))?;
        bind.set_port(port);
    }
    let socket = std::net::UdpSocket::bind(bind)
        .map_err(|e| Error(format!("cannot bind UDP {bind}: {e}")))?;
    // Every peer of the shard shares these buffers: a connect storm
    // (DTLS flights of hundreds of peers at once) overflows the
    // default ~200 KiB and costs each lost flight a 1 s retransmit.
    // The kernel caps the size at net.core.rmem_max / wmem_max.
    let sock = socket2::SockRef::from(&socket);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    if !(client && force_recv_buffer(&socket, CLIENT_RECV_BUFFER)) {
        let _ = sock.set_recv_buffer_size(if client {
            CLIENT_RECV_BUFFER
        } else {
            SOCKET_BUFFER
        });
    }
    if !client {
        // Without it the shard still drops the same datagrams itself.
        if let Err(e) = prefilter::attach(&socket) {
            tracing::warn!("shard {k}: no kernel filter for junk STUN: {e}");
        }
    }
    let addr = socket.local_addr().map_err(|e| Error(e.to_string()))?;
    let aliases = client.then(|| Aliases::new(k));
    let (commands, rx) = mpsc::unbounded_channel();
    // Everything that can fail (descriptors for the runtime, the socket's
    // registration) is set up here, so that a shard that
    // cannot run is an error of `Engine::start` — not a thread that dies
    // after it returned and leaves its peers waiting forever (seen when
    // the process was out of file descriptors at startup).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error(format!("shard {k}: no runtime: {e}")))?;
    let socket = {
        let _runtime = rt.enter();
        SharedSocket::new(socket)
            .map_err(|e| Error(format!("shard {k}: UDP socket unusable: {e}")))?
    };
    let port = addr.port();
    std::thread::Builder::new()
        .name(format!("hato-rtc-{k}"))
        .spawn(move || {
            rt.block_on(async move {
                Shard {
                    k,
                    common,
                    socket,
                    port,
                    aliases,
                    peers: HashMap::new(),
                    demux: Demux::default(),
                    next_id: 1,
                    dirty: Vec::new(),
                    timers: BinaryHeap::new(),
                    out: Vec::new(),
                    removed_since_trim: 0,
                    held_bytes: 0,
                    pace: Pace::new(SHARD_CHECKS.0, SHARD_CHECKS.1, Instant::now()),
                    next_trim: Instant::now() + TRIM_EVERY,
                    created_at_trim: 0,
                    last_storm: None,
                }
                .run(rx)
                .await;
            });
        })
        .map_err(|e| Error(format!("cannot start shard thread: {e}")))?;
    Ok((Handle { commands }, addr))
}

/// `SO_RCVBUFFORCE`: whether the kernel took it (it needs CAP_NET_ADMIN).
fn force_recv_buffer(socket: &std::net::UdpSocket, size: usize) -> bool {
    use std::os::fd::AsRawFd;
    let size = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    // SAFETY: an int option on an open socket; the value outlives the call.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &size as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    r == 0
}

fn random_string(n: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

struct Channel {
    label: Arc<str>,
    id: RTCDataChannelId,
    open: bool,
    backlogged: bool,
    /// Messages not yet handed to SCTP, held as shared `Bytes` (a push
    /// to many peers is one buffer for all of them) while SCTP holds
    /// [`SCTP_HIGH`] bytes unacknowledged. SCTP copies each message and
    /// its queues never shrink, so a burst (a connect storm's notifies)
    /// would otherwise stay resident in every peer.
    pending: VecDeque<(Bytes, bool)>,
    pending_bytes: usize,
}

impl Channel {
    fn new(label: Arc<str>, id: RTCDataChannelId) -> Channel {
        Channel {
            label,
            id,
            open: false,
            backlogged: false,
            pending: VecDeque::new(),
            pending_bytes: 0,
        }
    }
}

/// Unacknowledged bytes a channel's SCTP stream may hold; more waits in
/// the channel's `pending` queue.
const SCTP_HIGH: usize = 128 * 1024;

struct PeerSlot {
    pc: RTCPeerConnection,
    ufrag: String,
    events: mpsc::Sender<PeerEvent>,
    channels: Vec<Channel>,
    /// Whether this side created the channels (then any other is refused).
    offerer: bool,
    /// Datagrams that arrived before the answer was applied.
    early: Option<Vec<Datagram>>,
    /// The bytes of `early` and `before_ice`.
    held_bytes: usize,
    /// Checks to addresses that never answered.
    pace: Pace,
    /// DTLS datagrams that arrived before this side's ICE agent selected a
    /// pair, which the core would drop: fed once it has (see `feed`).
    before_ice: Vec<Datagram>,
    /// This side's ICE agent has selected a pair.
    ice_up: bool,
    /// While ICE checks run: when they give up ([`CHECKING_LIMIT`]).
    checking_until: Option<Instant>,
    /// The address the peer's datagrams come to and leave from.
    local_addr: SocketAddr,
    deadline: Option<Instant>,
    dirty: bool,
    connected: bool,
    failed: bool,
    association_up: bool,
    association_closed: bool,
    /// Close every channel once drained, or at this time.
    closing: Option<Instant>,
    /// Drops whatever arrives for it (a test's frozen client).
    stalled: bool,
    /// Until then, drops whatever arrives for it or it sends (a test's
    /// client whose network is down for a while).
    frozen_until: Option<Instant>,
    /// While frozen, sends a forged-looking datagram in place of each STUN
    /// message (a test's [`Command::Freeze`]).
    forging: bool,
    /// A failed send was reported (once: the session ends on it).
    send_failed: bool,
    /// When the last datagram for it arrived (or it was created).
    heard: Instant,
}

impl PeerSlot {
    /// Whether its network is down as of `now` (a test's [`Command::Freeze`]).
    fn frozen(&self, now: Instant) -> bool {
        self.frozen_until.is_some_and(|t| now < t)
    }

    /// When it next wants a turn: the core's deadline, or the shard's own
    /// for it (closing its channels, giving up its checks).
    fn due(&mut self) -> Option<Instant> {
        [self.pc.poll_timeout(), self.closing, self.checking_until]
            .into_iter()
            .flatten()
            .min()
    }

    /// Counts a send that failed and tells the session, once.
    fn send_failed(&mut self, stats: &Stats, label: Arc<str>, error: String) {
        stats.failed_sends.fetch_add(1, Ordering::Relaxed);
        if !self.send_failed {
            self.send_failed = true;
            self.emit(PeerEvent::SendFailed {
                label,
                error: error.into(),
            });
        }
    }

    fn emit(&self, ev: PeerEvent) {
        let _ = self.events.try_send(ev);
    }

    fn label_of(&mut self, id: RTCDataChannelId) -> Option<Arc<str>> {
        if let Some(c) = self.channels.iter().find(|c| c.id == id) {
            return Some(c.label.clone());
        }
        if self.offerer {
            // Only the channels this side created carry messages: one the
            // peer opened (refused, or about to be) never stands in for
            // `signaling`, `notify`, `push` or `stats`.
            return None;
        }
        let label: Arc<str> = self.pc.data_channel(id)?.label().into();
        self.channels.push(Channel::new(label.clone(), id));
        Some(label)
    }
}

/// A client shard's peers' addresses. A server tells peers apart by their
/// address, as a browser's is its own; a client shard gives each of its
/// peers one of loopback's 127.0.0.0/8 on the shard's one socket (bound to
/// the unspecified address), and tells them apart by the address each
/// datagram came to (`IP_PKTINFO`). One socket then carries every peer's
/// datagrams in batches, where a socket per peer cost a system call per
/// datagram each way and an epoll set to find them.
struct Aliases {
    by_ip: HashMap<Ipv4Addr, PeerId>,
    /// Shard `k` hands out 127.(k + 1).x.y.
    k: u8,
    next: u32,
}

impl Aliases {
    /// Addresses per shard: 127.n.x.y with y in 1..=254.
    const SPACE: u32 = 256 * 254;

    fn new(k: usize) -> Aliases {
        Aliases {
            by_ip: HashMap::new(),
            k: (k % 254) as u8,
            next: 0,
        }
    }

    /// An address no live peer of this shard holds, the least recently
    /// handed out first (a late datagram for a gone peer finds nobody).
    fn free(&mut self) -> Option<Ipv4Addr> {
        for _ in 0..Self::SPACE {
            let n = self.next;
            self.next = (self.next + 1) % Self::SPACE;
            let ip = Ipv4Addr::new(127, self.k + 1, (n / 254) as u8, (n % 254 + 1) as u8);
            if !self.by_ip.contains_key(&ip) {
                return Some(ip);
            }
        }
        None
    }

    fn peer(&self, ip: IpAddr) -> Option<PeerId> {
        match ip {
            IpAddr::V4(ip) => self.by_ip.get(&ip).copied(),
            IpAddr::V6(_) => None,
        }
    }
}

struct Shard {
    k: usize,
    common: Common,
    socket: SharedSocket,
    port: u16,
    /// A client shard's peers' addresses (`None`: a server shard).
    aliases: Option<Aliases>,
    /// Boxed: a slot holds a whole PeerConnection, and a table of slots
    /// inline keeps up to twice its peers' worth of them empty (its
    /// buckets double at 7/8 full).
    peers: HashMap<PeerId, Box<PeerSlot>>,
    demux: Demux,
    next_id: PeerId,
    dirty: Vec<PeerId>,
    timers: BinaryHeap<Reverse<(Instant, PeerId)>>,
    out: Vec<Transmit>,
    removed_since_trim: usize,
    /// Bytes held by every peer's `early` and `before_ice`.
    held_bytes: usize,
    /// Checks to addresses that never answered, all peers together.
    pace: Pace,
    next_trim: Instant,
    /// `Common::created` at the last periodic trim.
    created_at_trim: u64,
    /// The last periodic trim that found a connect storm behind it.
    last_storm: Option<Instant>,
}

impl Shard {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        let mut commands = Vec::with_capacity(256);
        let mut datagrams = Vec::with_capacity(64);
        let mut naming = Vec::with_capacity(64);
        loop {
            let next_timer = self.timers.peek().map(|Reverse((t, _))| *t);
            let sleep = async {
                match next_timer {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                n = rx.recv_many(&mut commands, 256) => {
                    if n == 0 {
                        break;
                    }
                }
                r = self.socket.readable() => {
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "shard {}: UDP socket failed", self.k);
                    }
                }
                () = sleep => {}
            }
            let now = Instant::now();
            if now >= self.next_trim {
                self.next_trim = now + TRIM_EVERY;
                // Shard 0 hands freed memory back now and then after a
                // connect storm: its notifies sit in SCTP queues by the
                // hundred thousand for a few seconds, and glibc would
                // otherwise keep that peak. Not otherwise: with a large heap
                // a trim holds the allocator long enough to be a stall every
                // thread of the process feels.
                if self.k == 0 && self.aliases.is_none() {
                    let created = self.common.created.load(Ordering::Relaxed);
                    if created - self.created_at_trim >= STORM {
                        self.last_storm = Some(now);
                    }
                    self.created_at_trim = created;
                    if self.last_storm.is_some_and(|t| now - t <= TRIM_AFTER_STORM) {
                        give_back_memory();
                    }
                }
            }
            for c in commands.drain(..) {
                self.on_command(c, now);
            }
            // Every ready datagram, a batch at a time (bounded per turn).
            // Junk (no peer's, see `Demux::may_route`) is counted and
            // left in the receive buffer.
            naming.clear();
            for _ in 0..8 {
                let (demux, client) = (&self.demux, self.aliases.is_some());
                let mut junk = 0;
                let naming = &mut naming;
                let read = self.socket.recv_batch(&mut datagrams, |from, data| {
                    let keep = client || demux.may_route(from, data, naming);
                    junk += u64::from(!keep);
                    keep
                });
                let stats = &self.common.stats;
                stats.dropped_unknown.fetch_add(junk, Ordering::Relaxed);
                match read {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "shard {}: recv", self.k);
                        break;
                    }
                }
            }
            for d in datagrams.drain(..) {
                self.on_datagram(d, now);
            }
            self.on_timers(now);
            self.drive_dirty(now);
            self.flush().await;
        }
        // The engine is gone: tell every remaining peer.
        let ids: Vec<PeerId> = self.peers.keys().copied().collect();
        for id in ids {
            self.remove(id, true);
        }
        self.flush().await;
    }

    fn mark(&mut self, id: PeerId) {
        if let Some(p) = self.peers.get_mut(&id) {
            if !p.dirty {
                p.dirty = true;
                self.dirty.push(id);
            }
        }
    }

    fn on_command(&mut self, c: Command, now: Instant) {
        match c {
            Command::Create {
                side,
                events,
                reply,
            } => {
                let _ = reply.send(self.create(side, events, now));
            }
            Command::Answer { id, sdp, reply } => {
                let _ = reply.send(self.apply_answer(id, sdp, now));
            }
            Command::Candidate { id, candidate } => {
                if let Some(p) = self.peers.get_mut(&id) {
                    if let Err(why) = self.common.policy.judge(&candidate) {
                        let stats = &self.common.stats;
                        stats.refused_candidates.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(peer = id, why, "candidate refused");
                        return;
                    }
                    let init = RTCIceCandidateInit {
                        candidate,
                        ..Default::default()
                    };
                    if let Err(e) = p.pc.add_remote_candidate(init) {
                        tracing::debug!(peer = id, error = %e, "candidate not added");
                    }
                    self.mark(id);
                }
            }
            Command::Send {
                ids,
                label,
                data,
                text,
            } => {
                for id in ids {
                    self.send(id, &label, &data, text, now);
                }
            }
            Command::CloseChannels { id, drain_limit } => {
                if let Some(p) = self.peers.get_mut(&id) {
                    p.closing = Some(now + drain_limit);
                    self.mark(id);
                }
            }
            Command::Close { id } => {
                if let Some(p) = self.peers.get_mut(&id) {
                    // A peer that never connected has no path to be told on.
                    if p.connected || p.association_up {
                        let _ = p.pc.close();
                        self.mark(id);
                    }
                }
            }
            Command::Remove { id } => self.remove(id, true),
            Command::Vanish { id } => self.remove(id, false),
            Command::Stall { id } => {
                if let Some(p) = self.peers.get_mut(&id) {
                    p.stalled = true;
                }
            }
            Command::Freeze { id, until, forge } => {
                if let Some(p) = self.peers.get_mut(&id) {
                    p.frozen_until = Some(until);
                    p.forging = forge;
                }
            }
            Command::OpenChannel { id, label } => {
                if let Some(p) = self.peers.get_mut(&id) {
                    match p.pc.create_data_channel(&label, None) {
                        // First, so that sends on `label` take this one.
                        Ok(dc) => {
                            let cid = dc.id();
                            p.channels.insert(0, Channel::new(label, cid));
                        }
                        Err(e) => tracing::debug!(peer = id, error = %e, "cannot open a channel"),
                    }
                    self.drive(id, now);
                }
            }
            Command::CloseChannel { id, label } => {
                if let Some(p) = self.peers.get_mut(&id) {
                    let cid = p.channels.iter().find(|c| c.label == label).map(|c| c.id);
                    if let Some(mut dc) = cid.and_then(|cid| p.pc.data_channel(cid)) {
                        let _ = dc.close();
                    }
                    self.drive(id, now);
                }
            }
        }
    }

    fn create(
        &mut self,
        side: Side,
        events: mpsc::Sender<PeerEvent>,
        now: Instant,
    ) -> Result<(PeerId, String), Error> {
        let e = |e: rtc::shared::error::Error| Error(e.to_string());
        let mut ufrag = prefilter::ufrag();
        while self.demux.has_ufrag(&ufrag) {
            ufrag = prefilter::ufrag();
        }
        let pwd = random_string(32);
        let port = self.port;
        let alias = match &mut self.aliases {
            Some(a) => Some(
                a.free()
                    .ok_or_else(|| Error("no loopback address left".into()))?,
            ),
            None => None,
        };
        let own_ip = alias.map(IpAddr::V4);
        let se = SettingEngineBuilder::new()
            .with_crypto_provider(self.common.crypto.clone())
            .with_ice_credentials(ufrag.clone(), pwd.clone())
            // A short check interval: with the default one, and the first
            // check lost to ordering, a connect waited two intervals.
            .with_ice_connection_attempts(Some(Duration::from_millis(20)), Some(50))
            // Failed after `silence_limit` without a datagram (the agent
            // counts its failed timeout from the disconnected one's end).
            // While checking the agent would allow the same; the shard cuts
            // that to CHECKING_LIMIT (`drive`).
            .with_ice_timeouts(
                Some(ICE_DISCONNECTED),
                Some(self.common.silence_limit - ICE_DISCONNECTED),
                Some(self.common.keepalive),
            )
            // Browsers hide host addresses behind mDNS names, so their pair
            // is peer-reflexive, which the agent otherwise accepts only
            // after 1 s. A push server has nothing better to wait for.
            .with_host_acceptance_min_wait(Some(Duration::ZERO))
            .with_prflx_acceptance_min_wait(Some(Duration::ZERO))
            .with_srflx_acceptance_min_wait(Some(Duration::ZERO))
            .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
            .with_sctp_max_message_size(SctpMaxMessageSize::Bounded(self.common.max_message_size))
            .build();
        let configuration = RTCConfigurationBuilder::new()
            .with_certificates(vec![self.common.certificate.clone()])
            .build();
        let mut pc = RTCPeerConnectionBuilder::new()
            .with_configuration(configuration)
            .with_setting_engine(se)
            .build(now)
            .map_err(e)?;
        // Nothing here reads the core's statistics (hato counts its own);
        // they would cost ~4.5 KB a peer and a lookup per message.
        pc.disable_statistics();
        // A client peer's one address, or what the server advertises.
        let own = own_ip.map(|ip| [ip]);
        let ips: &[IpAddr] = match &own {
            Some(ip) => ip,
            None => &self.common.advertise,
        };
        let candidates: Vec<String> = ips
            .iter()
            .enumerate()
            .map(|(i, ip)| {
                // Host priority (RFC 8445 §5.1.2.1), one foundation per address.
                let priority = (126u32 << 24) | ((65535 - i as u32) << 8) | 255;
                format!("candidate:{} 1 udp {priority} {ip} {port} typ host", i + 1)
            })
            .collect();
        let add_candidates = |pc: &mut RTCPeerConnection| -> Result<(), Error> {
            for c in &candidates {
                pc.add_local_candidate(RTCIceCandidateInit {
                    candidate: c.clone(),
                    ..Default::default()
                })
                .map_err(e)?;
            }
            // No more: gathering is complete.
            pc.add_local_candidate(RTCIceCandidateInit::default())
                .map_err(e)
        };
        let mut channels = Vec::new();
        let offerer = matches!(side, Side::Offer { .. });
        match side {
            Side::Offer { labels } => {
                if labels.is_empty() {
                    let init = RTCDataChannelInit {
                        negotiated: Some(0),
                        ..Default::default()
                    };
                    pc.create_data_channel(QUIET_LABEL, Some(init)).map_err(e)?;
                }
                for label in labels {
                    let id = pc
                        .create_data_channel(&label, Some(RTCDataChannelInit::default()))
                        .map_err(e)?
                        .id();
                    channels.push(Channel::new(label, id));
                }
                let offer = pc.create_offer(None).map_err(e)?;
                pc.set_local_description(now, offer).map_err(e)?;
                add_candidates(&mut pc)?;
            }
            Side::Answer { offer } => {
                let offer = RTCSessionDescription::offer(offer).map_err(e)?;
                pc.set_remote_description(now, offer).map_err(e)?;
                add_candidates(&mut pc)?;
                let answer = pc.create_answer(None).map_err(e)?;
                pc.set_local_description(now, answer).map_err(e)?;
            }
        }
        let sdp = pc
            .local_description()
            .map(|d| d.sdp)
            .ok_or_else(|| Error("no local description".into()))?;
        let id = self.next_id;
        self.next_id += 1;
        let local_addr = SocketAddr::new(own_ip.unwrap_or(self.common.advertise[0]), port);
        if let (Some(a), Some(ip)) = (&mut self.aliases, alias) {
            a.by_ip.insert(ip, id);
        }
        self.demux.add_peer(id, ufrag.clone(), pwd);
        self.peers.insert(
            id,
            Box::new(PeerSlot {
                pc,
                ufrag,
                events,
                channels,
                offerer,
                early: offerer.then(Vec::new),
                held_bytes: 0,
                pace: Pace::new(PEER_CHECKS.0, PEER_CHECKS.1, now),
                before_ice: Vec::new(),
                ice_up: false,
                // The answering side checks from now on; the offering side
                // once it has the answer.
                checking_until: (!offerer).then(|| now + CHECKING_LIMIT),
                local_addr,
                deadline: None,
                dirty: false,
                connected: false,
                failed: false,
                association_up: false,
                association_closed: false,
                closing: None,
                stalled: false,
                frozen_until: None,
                forging: false,
                heard: now,
                send_failed: false,
            }),
        );
        self.common.stats.live_peers.fetch_add(1, Ordering::Relaxed);
        self.common.created.fetch_add(1, Ordering::Relaxed);
        self.mark(id);
        Ok((id, sdp))
    }

    fn apply_answer(&mut self, id: PeerId, sdp: String, now: Instant) -> Result<(), Error> {
        let p = self
            .peers
            .get_mut(&id)
            .ok_or_else(|| Error("no such peer".into()))?;
        let mut refused = 0;
        let sdp = self.common.policy.filter_sdp(&sdp, &mut refused);
        if refused > 0 {
            let stats = &self.common.stats;
            stats
                .refused_candidates
                .fetch_add(refused as u64, Ordering::Relaxed);
            tracing::debug!(peer = id, refused, "answer candidates refused");
        }
        let answer = RTCSessionDescription::answer(sdp).map_err(|e| Error(e.to_string()))?;
        p.pc.set_remote_description(now, answer)
            .map_err(|e| Error(e.to_string()))?;
        p.checking_until = Some(now + CHECKING_LIMIT);
        let early = p.early.take().unwrap_or_default();
        release(p, &mut self.held_bytes, &self.common.stats);
        for d in early {
            self.feed(id, d, now);
        }
        self.mark(id);
        Ok(())
    }

    fn send(&mut self, id: PeerId, label: &str, data: &Bytes, text: bool, now: Instant) {
        let stats = self.common.stats.clone();
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        let Some(ci) = p.channels.iter().position(|c| &*c.label == label) else {
            p.send_failed(&stats, label.into(), "no such channel (closed?)".into());
            return;
        };
        let ch = &mut p.channels[ci];
        ch.pending.push_back((data.clone(), text));
        ch.pending_bytes += data.len();
        feed_sctp(p, ci, now, &stats, id);
        // What waits for the peer: held here, or in SCTP unacknowledged.
        let ch = &p.channels[ci];
        let waiting = ch.pending_bytes
            + p.pc
                .data_channel(ch.id)
                .map_or(0, |dc| dc.outstanding_bytes());
        let ch = &mut p.channels[ci];
        if !ch.backlogged && waiting > self.common.backlog_limit {
            ch.backlogged = true;
            let label = ch.label.clone();
            p.emit(PeerEvent::Backlog(label));
        }
        self.mark(id);
    }

    fn remove(&mut self, id: PeerId, tell: bool) {
        let Some(mut p) = self.peers.remove(&id) else {
            return;
        };
        // Tell the other side, then forget everything of this peer. A peer
        // that never connected has no path to tell it on (the core logs
        // an error for every such write).
        if tell && (p.connected || p.association_up) {
            let _ = p.pc.close();
            take_writes(&mut p, &mut self.out, self.aliases.is_some(), |_, _| true);
        }
        if let (Some(a), IpAddr::V4(ip)) = (&mut self.aliases, p.local_addr.ip()) {
            a.by_ip.remove(&ip);
        }
        self.demux.remove_peer(id, &p.ufrag);
        release(&mut p, &mut self.held_bytes, &self.common.stats);
        self.common.stats.live_peers.fetch_sub(1, Ordering::Relaxed);
        drop(p);
        self.removed_since_trim += 1;
        if self.peers.is_empty() {
            // The maps keep the capacity of their busiest moment: give it
            // back.
            self.peers = HashMap::new();
            self.timers = BinaryHeap::new();
            self.demux = Demux::default();
            if let Some(a) = &mut self.aliases {
                a.by_ip = HashMap::new();
            }
            self.dirty = Vec::new();
            // Not emptied: it may hold this peer's goodbye, sent at the
            // end of the turn.
            self.out.shrink_to_fit();
        }
        if self.peers.is_empty() || self.removed_since_trim >= TRIM_AFTER {
            self.removed_since_trim = 0;
            give_back_memory();
        }
    }

    fn on_datagram(&mut self, d: Datagram, now: Instant) {
        if let Some(a) = &self.aliases {
            // A client shard: the peer is the address it came to.
            match d.to_ip.and_then(|ip| a.peer(ip)) {
                Some(id) => self.deliver(id, d, now),
                None => {
                    let c = &self.common.stats.dropped_unknown;
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
            return;
        }
        match self
            .demux
            .route(d.from, &d.data, self.common.crypto.crypto())
        {
            Route::Peer(id) => self.deliver(id, d, now),
            Route::Spoofed => {
                let c = &self.common.stats.refused_moves;
                c.fetch_add(1, Ordering::Relaxed);
            }
            Route::OverAddresses => {
                let c = &self.common.stats.refused_candidates;
                c.fetch_add(1, Ordering::Relaxed);
            }
            Route::Drop { integrity } => {
                let c = if integrity {
                    &self.common.stats.dropped_integrity
                } else {
                    &self.common.stats.dropped_unknown
                };
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A datagram for peer `id`: held while the peer waits for its answer.
    fn deliver(&mut self, id: PeerId, d: Datagram, now: Instant) {
        let Some(p) = self.peers.get_mut(&id) else {
            self.common
                .stats
                .dropped_unknown
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        if p.stalled || p.frozen(now) {
            return;
        }
        if p.early.is_some() {
            hold(p, &mut self.held_bytes, d, false, &self.common.stats);
            return;
        }
        self.feed(id, d, now);
    }

    /// Hands a datagram to the peer's core. A DTLS record that comes before
    /// this side's ICE agent has selected a pair is held instead: the core
    /// would drop it, and the other side would resend it only after a
    /// second. That order is common — the controlled side (a browser, or
    /// hato's client) may start DTLS on a pair the controlling side (hato,
    /// the offerer) has not yet heard succeed, and rtc's ICE stage even
    /// writes the first DTLS flight before its own binding response.
    fn feed(&mut self, id: PeerId, d: Datagram, now: Instant) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        if !p.ice_up && is_dtls(&d.data) {
            hold(p, &mut self.held_bytes, d, true, &self.common.stats);
            return;
        }
        let silent = now.saturating_duration_since(std::mem::replace(&mut p.heard, now));
        let resent = p.association_up
            && silent >= HEARD_AGAIN_AFTER
            && p.pc.retransmit_now_if_backed_off(now);
        if resent {
            let counter = &self.common.stats.resent_on_return;
            counter.fetch_add(1, Ordering::Relaxed);
        }
        if p.ice_up && self.aliases.is_none() {
            let crypto = self.common.crypto.crypto();
            if answer_check(p, id, &self.demux, crypto, &mut self.out, &d, now) {
                let answered = &self.common.stats.answered_checks;
                answered.fetch_add(1, Ordering::Relaxed);
                if resent {
                    // Its deadline is now: `drive` re-arms its timer.
                    self.mark(id);
                }
                return;
            }
        }
        read_into(p, d, &self.common.advertise, now);
        self.mark(id);
    }

    fn on_timers(&mut self, now: Instant) {
        while let Some(Reverse((t, id))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(p) = self.peers.get_mut(&id) else {
                continue;
            };
            // A stale entry: the peer's deadline moved since.
            if p.deadline != Some(t) {
                continue;
            }
            // The core's deadline can move later between turns: a check the
            // shard answered tells the ICE agent, which then has nothing to
            // do until the peer's silence could matter. Then no turn, only
            // the timer again (an idle peer's only turns were these ticks).
            if let Some(d) = p.due().filter(|d| *d > now) {
                p.deadline = Some(d);
                self.timers.push(Reverse((d, id)));
                continue;
            }
            p.deadline = None;
            let _ = p.pc.handle_timeout(now);
            self.mark(id);
        }
    }

    fn drive_dirty(&mut self, now: Instant) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for id in dirty.drain(..) {
            self.drive(id, now);
        }
        self.dirty = dirty;
    }

    /// Drains the peer's events and reads, then its writes, until it has
    /// nothing more to say; then re-arms its timer.
    fn drive(&mut self, id: PeerId, now: Instant) {
        let stats = self.common.stats.clone();
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        p.dirty = false;
        if let Some(until) = p.checking_until {
            if p.ice_up {
                p.checking_until = None;
            } else if now >= until {
                // The agent would go on for the whole silence limit.
                p.checking_until = None;
                if !p.failed {
                    p.failed = true;
                    let limit = CHECKING_LIMIT.as_secs();
                    p.emit(PeerEvent::Failed(format!(
                        "no ICE candidate pair worked within {limit} s"
                    )));
                }
                let _ = p.pc.close();
            }
        }
        let mut first = true;
        loop {
            let mut progressed = false;
            while let Some(ev) = p.pc.poll_event() {
                progressed = true;
                on_event(p, ev, &stats);
            }
            if p.ice_up && !p.before_ice.is_empty() {
                progressed = true;
                release(p, &mut self.held_bytes, &self.common.stats);
                for d in std::mem::take(&mut p.before_ice) {
                    read_into(p, d, &self.common.advertise, now);
                }
            }
            // After a pass that ended with every write taken, only an event
            // raised while writing can have left work: without one, the
            // sweeps for reads and writes would find nothing (each is a pass
            // over every handler of the core).
            if !first && !progressed {
                break;
            }
            first = false;
            while let Some(m) = p.pc.poll_read() {
                progressed = true;
                if let RTCMessage::DataChannelMessage(cid, msg) = m.message {
                    let Some(label) = p.label_of(cid) else {
                        stats.dropped_messages.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    if p.events.capacity() > EVENT_RESERVE {
                        p.emit(PeerEvent::Message(Box::new(Incoming {
                            label,
                            data: msg.data.freeze(),
                            text: msg.is_string,
                        })));
                    } else {
                        stats.dropped_messages.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            for ci in 0..p.channels.len() {
                if !p.channels[ci].pending.is_empty() && feed_sctp(p, ci, now, &stats, id) {
                    progressed = true;
                }
            }
            if let Some(until) = p.closing {
                let drained = p.channels.iter().all(|c| {
                    c.pending.is_empty()
                        && p.pc
                            .data_channel(c.id)
                            .is_none_or(|dc| dc.outstanding_bytes() == 0)
                });
                if drained || now >= until {
                    p.closing = None;
                    let ids: Vec<_> = p.channels.iter().map(|c| c.id).collect();
                    for cid in ids {
                        if let Some(mut dc) = p.pc.data_channel(cid) {
                            let _ = dc.close();
                        }
                    }
                    progressed = true;
                }
            }
            let demux = &mut self.demux;
            let from_alias = self.aliases.is_some();
            let shard_pace = &mut self.pace;
            let paced = &stats.paced_checks;
            // To an address that has not answered a check of the peer's, at
            // the peer's pace; one its signed requests did not even come
            // from (a candidate's, so far only the peer's word), at the
            // shard's too. Its requests prove nothing: a peer knows its own
            // password and can forge their source, and each such address
            // would get a check every 20 ms for as long as ICE tries. Only
            // the first address they came from goes unpaced (`Proof::Own`):
            // paced, a slow honest peer's pair ran out of ICE's attempts.
            let keep = |to, p: &mut PeerSlot| {
                let proof = demux.sent(id, to);
                if matches!(proof, Proof::Answered | Proof::Own) {
                    return true;
                }
                if p.pc.ice_answered_from(to) {
                    demux.answered(to);
                    return true;
                }
                let bound = proof == Proof::Bound;
                if p.pace.ready(now) && (bound || shard_pace.ready(now)) {
                    p.pace.take(now);
                    if !bound {
                        shard_pace.take(now);
                    }
                    return true;
                }
                paced.fetch_add(1, Ordering::Relaxed);
                false
            };
            if p.frozen(now) {
                while let Some(w) = p.pc.poll_write() {
                    if p.forging && w.message.first().is_some_and(|b| *b < 4) {
                        // In place of a STUN message it would have sent,
                        // what a third party forging its address can send:
                        // bytes in STUN's range (first byte 0-3) that are no
                        // STUN (no magic cookie), and not a Binding request,
                        // which the server's kernel filter would drop.
                        let from = match p.local_addr.ip() {
                            IpAddr::V4(ip) if from_alias => Some(ip),
                            _ => None,
                        };
                        let mut junk = BytesMut::zeroed(w.message.len());
                        junk[1] = 0x17;
                        let to = w.transport.peer_addr;
                        self.out.push(Transmit {
                            to,
                            from,
                            data: junk,
                        });
                    }
                }
            } else if take_writes(p, &mut self.out, from_alias, keep) {
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
        // The association's end is a state, not an event, in the core.
        let sctp = p.pc.sctp().map(|s| s.state());
        if sctp == Some(RTCSctpTransportState::Connected) {
            p.association_up = true;
        } else if p.association_up && !p.association_closed {
            p.association_closed = true;
            p.emit(PeerEvent::AssociationClosed);
        }
        // The core's queues, all drained now, give their memory back: a
        // queue of 224-byte messages keeps at least four slots once used,
        // ~27 KB a peer over the pipeline. Held between turns, those blocks
        // were spread among the peers' long-lived state, and the heap kept
        // the connect storm's peak (85 KB of RSS per peer at 1 000 peers,
        // 63 KB freeing them here); glibc's per-thread cache makes the
        // allocation at the next message cheap (CPU per delivery level in
        // alternated runs, docs/benchmarks.md).
        p.pc.shrink_idle_queues();
        let deadline = p.due();
        if deadline != p.deadline {
            p.deadline = deadline;
            if let Some(t) = deadline {
                self.timers.push(Reverse((t, id)));
            }
        }
    }

    async fn flush(&mut self) {
        if self.out.is_empty() {
            return;
        }
        let dropped = self.socket.send_all(&self.out).await;
        if dropped > 0 {
            self.common
                .stats
                .dropped_outbound
                .fetch_add(dropped as u64, Ordering::Relaxed);
        }
        self.out.clear();
    }
}

/// Answers a connected peer's consent check on its selected pair here,
/// without the core (see [`consent`]). Returns whether it did.
fn answer_check(
    p: &mut PeerSlot,
    id: PeerId,
    demux: &Demux,
    crypto: &dyn rtc::crypto::RTCCrypto,
    out: &mut Vec<Transmit>,
    d: &Datagram,
    now: Instant,
) -> bool {
    let Some(check) = consent::parse(&d.data) else {
        return false;
    };
    let Some(pwd) = demux.password_named(id, check.username) else {
        return false;
    };
    if !check.verify(pwd.as_bytes(), crypto) {
        return false;
    }
    // The answer first: the agent is told only of a check that is answered.
    let mut data = BytesMut::with_capacity(consent::ANSWER_MAX);
    if consent::answer(&check, d.from, pwd.as_bytes(), crypto, &mut data).is_none()
        || !p.pc.answered_check_on_selected(now, d.from, check.username)
    {
        return false;
    }
    out.push(Transmit {
        to: d.from,
        from: None,
        data,
    });
    true
}

/// Keeps `d` for later in the peer's `early` queue (or `before_ice`), up
/// to [`EARLY_LIMIT`] datagrams and [`EARLY_BYTES`] per peer and
/// [`SHARD_HELD_BYTES`] for the shard (`shard_held`). A datagram over a
/// bound is dropped and counted (its sender retransmits).
fn hold(p: &mut PeerSlot, shard_held: &mut usize, d: Datagram, before_ice: bool, stats: &Stats) {
    let n = d.data.len();
    let queue = if before_ice {
        &mut p.before_ice
    } else {
        p.early.get_or_insert_with(Vec::new)
    };
    if queue.len() >= EARLY_LIMIT
        || p.held_bytes + n > EARLY_BYTES
        || *shard_held + n > SHARD_HELD_BYTES
    {
        stats.dropped_early.fetch_add(1, Ordering::Relaxed);
        return;
    }
    queue.push(d);
    p.held_bytes += n;
    *shard_held += n;
    let held = if before_ice {
        &stats.held_before_ice
    } else {
        &stats.held_early
    };
    held.fetch_add(1, Ordering::Relaxed);
    stats.held_bytes.fetch_add(n as u64, Ordering::Relaxed);
}

/// The peer's held datagrams are gone (fed, or the peer removed): their
/// bytes no longer count.
fn release(p: &mut PeerSlot, shard_held: &mut usize, stats: &Stats) {
    *shard_held -= p.held_bytes;
    let n = std::mem::take(&mut p.held_bytes) as u64;
    stats.held_bytes.fetch_sub(n, Ordering::Relaxed);
}

/// Whether a datagram is a DTLS record (RFC 7983: first byte 20..=63).
fn is_dtls(data: &[u8]) -> bool {
    matches!(data.first(), Some(20..=63))
}

/// Hands one datagram to the peer's core, with the local address it came to.
fn read_into(p: &mut PeerSlot, d: Datagram, advertise: &[IpAddr], now: Instant) {
    let local_addr = match d.to_ip {
        Some(ip) if advertise.contains(&ip) => SocketAddr::new(ip, p.local_addr.port()),
        _ => p.local_addr,
    };
    let _ = p.pc.handle_read(TaggedBytesMut {
        now,
        transport: TransportContext {
            local_addr,
            peer_addr: d.from,
            ecn: None,
            transport_protocol: TransportProtocol::UDP,
        },
        message: d.data,
    });
}

/// Takes every datagram the peer has to send into `out` (the shard's
/// socket, at the end of the turn): from the peer's own address when
/// `from_alias` (a client shard), else as `keep` allows each destination.
/// Returns whether there were any.
fn take_writes(
    p: &mut PeerSlot,
    out: &mut Vec<Transmit>,
    from_alias: bool,
    mut keep: impl FnMut(SocketAddr, &mut PeerSlot) -> bool,
) -> bool {
    let mut any = false;
    while let Some(w) = p.pc.poll_write() {
        any = true;
        let to = w.transport.peer_addr;
        let from = match p.local_addr.ip() {
            IpAddr::V4(ip) if from_alias => Some(ip),
            _ => {
                if !keep(to, p) {
                    continue;
                }
                None
            }
        };
        out.push(Transmit {
            to,
            from,
            data: w.message,
        });
    }
    any
}

/// Hands channel `ci`'s pending messages to SCTP while it holds less than
/// [`SCTP_HIGH`] unacknowledged bytes. Returns whether it sent any.
fn feed_sctp(p: &mut PeerSlot, ci: usize, now: Instant, stats: &Stats, id: PeerId) -> bool {
    let ch = &mut p.channels[ci];
    let Some(mut dc) = p.pc.data_channel(ch.id) else {
        return false;
    };
    let mut sent = false;
    let mut failure = None;
    while dc.outstanding_bytes() < SCTP_HIGH {
        let Some((data, text)) = ch.pending.pop_front() else {
            break;
        };
        ch.pending_bytes -= data.len();
        let result = if text {
            // JSON text, UTF-8 by construction; the core only needs it
            // flagged as a string.
            match std::str::from_utf8(&data) {
                Ok(s) => dc.send_text(now, s),
                Err(_) => dc.send(now, BytesMut::from(&data[..])),
            }
        } else {
            dc.send(now, BytesMut::from(&data[..]))
        };
        if let Err(e) = result {
            failure = Some((ch.label.clone(), e.to_string()));
            break;
        }
        sent = true;
    }
    if ch.pending.is_empty() && ch.pending.capacity() > 64 {
        // A burst is over: give its queue back.
        ch.pending = VecDeque::new();
    }
    if let Some((label, error)) = failure {
        tracing::debug!(peer = id, %label, %error, "DataChannel send failed");
        p.send_failed(stats, label, error);
    }
    sent
}

fn on_event(p: &mut PeerSlot, ev: RTCPeerConnectionEvent, stats: &Stats) {
    match ev {
        RTCPeerConnectionEvent::OnIceConnectionStateChangeEvent(
            RTCIceConnectionState::Connected | RTCIceConnectionState::Completed,
        ) => p.ice_up = true,
        RTCPeerConnectionEvent::OnConnectionStateChangeEvent(state) => match state {
            RTCPeerConnectionState::Connected if !p.connected => {
                p.connected = true;
                p.emit(PeerEvent::Connected);
            }
            RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed if !p.failed => {
                p.failed = true;
                p.emit(PeerEvent::Failed(format!("connection {state}")));
            }
            _ => {}
        },
        RTCPeerConnectionEvent::OnDataChannel(dc) => match dc {
            RTCDataChannelEvent::OnOpen(cid) => {
                let known = p.channels.iter().any(|c| c.id == cid);
                if p.offerer && !known {
                    let Some(mut dc) = p.pc.data_channel(cid) else {
                        return;
                    };
                    if dc.label() != QUIET_LABEL {
                        // Only this side creates channels (Sora's rule): a
                        // channel the other side opens is closed at once,
                        // and its messages are never read (`label_of`).
                        stats.refused_channels.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(label = dc.label(), "a channel the peer opened is refused");
                        let _ = dc.close();
                    }
                    return;
                }
                let Some(label) = p.label_of(cid) else { return };
                if let Some(c) = p.channels.iter_mut().find(|c| c.id == cid) {
                    c.open = true;
                }
                if let Some(mut dc) = p.pc.data_channel(cid) {
                    dc.set_buffered_amount_low_threshold(64 * 1024);
                }
                p.emit(PeerEvent::Open(label));
            }
            RTCDataChannelEvent::OnClose(cid) => {
                if let Some(i) = p.channels.iter().position(|c| c.id == cid) {
                    let c = p.channels.remove(i);
                    if c.open {
                        p.emit(PeerEvent::Closed(c.label));
                    }
                }
            }
            RTCDataChannelEvent::OnBufferedAmountLow(cid) => {
                if let Some(c) = p.channels.iter_mut().find(|c| c.id == cid) {
                    c.backlogged = false;
                    let label = c.label.clone();
                    p.emit(PeerEvent::Writable(label));
                }
            }
            _ => {}
        },
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_are_unique_per_shard_and_skip_the_live_ones() {
        let mut a = Aliases::new(1);
        let first = a.free().unwrap();
        assert_eq!(first, Ipv4Addr::new(127, 2, 0, 1));
        a.by_ip.insert(first, 7);
        assert_eq!(a.peer(IpAddr::V4(first)), Some(7));
        assert_eq!(a.peer(IpAddr::V4(Ipv4Addr::new(127, 2, 0, 2))), None);
        // Never .0 or .255 in the last byte; wraps around the whole space
        // and skips the address still held.
        let mut seen = std::collections::HashSet::new();
        for _ in 1..Aliases::SPACE {
            let ip = a.free().unwrap();
            assert!(!matches!(ip.octets()[3], 0 | 255), "{ip}");
            assert_eq!(ip.octets()[..2], [127, 2]);
            assert!(seen.insert(ip), "{ip} twice");
        }
        assert!(!seen.contains(&first));
        assert_ne!(a.free(), Some(first));
        // Full: none left.
        for ip in seen {
            a.by_ip.insert(ip, 1);
        }
        assert_eq!(a.free(), None);
    }
}

//! What keeps one peer or client from hurting the others: admission of
//! signaling connections (a total, a per-address and a handshake cap),
//! accept loops that survive running out of file descriptors, and log
//! lines an attacker cannot multiply.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a signaling connection was refused before its upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Full,
    PerAddress,
    Handshakes,
    HandshakesPerAddress,
    /// Its address connected faster than --max-connects-per-ip-per-second
    /// for longer than a connection may wait.
    ConnectRate,
}

impl Refusal {
    /// The reason the refusal carries, as Sora-style `error_type` text.
    pub fn reason(self, admission: &Admission) -> String {
        match self {
            Refusal::Full => format!(
                "SERVER-FULL: {} connections (--max-connections)",
                admission.max_total
            ),
            Refusal::PerAddress => format!(
                "TOO-MANY-CONNECTIONS: {} from this address (--max-connections-per-ip)",
                admission.max_per_ip
            ),
            Refusal::Handshakes => format!(
                "TOO-MANY-HANDSHAKES: {} in flight (--max-handshakes)",
                admission.max_handshakes
            ),
            Refusal::HandshakesPerAddress => format!(
                "TOO-MANY-HANDSHAKES: {} in flight from this address (--max-handshakes-per-ip)",
                admission.max_handshakes_per_ip
            ),
            Refusal::ConnectRate => format!(
                "TOO-MANY-CONNECTS: more than {} a second from this address (--max-connects-per-ip-per-second)",
                admission.connect_rate
            ),
        }
    }
}

/// Counts signaling connections, from TCP accept to the session's end.
/// A limit of 0 is no limit.
#[derive(Debug)]
pub struct Admission {
    max_total: usize,
    max_per_ip: usize,
    max_handshakes: usize,
    max_handshakes_per_ip: usize,
    total: AtomicUsize,
    /// Per address (an IPv6 /64 as one): connections, and handshakes
    /// among them.
    per_ip: Mutex<HashMap<IpAddr, (usize, usize)>>,
    handshakes: Arc<Semaphore>,
    /// Connects an address may start per second, and a bucket of
    /// `CONNECT_BURST` seconds of them per address.
    connect_rate: f64,
    /// Per address: tokens and when counted; and the size at which to
    /// prune next.
    buckets: Mutex<(HashMap<IpAddr, Bucket>, usize)>,
    /// Connections refused, by any limit.
    pub refused: AtomicU64,
    /// Connects that waited for their address's turn.
    pub paced: AtomicU64,
    /// Connections from a trusted proxy closed for a missing or bad PROXY
    /// header (--proxy-protocol).
    pub bad_proxy_headers: AtomicU64,
}

impl Admission {
    pub fn new(
        max_total: usize,
        max_per_ip: usize,
        max_handshakes: usize,
        max_handshakes_per_ip: usize,
        connect_rate: u32,
    ) -> Arc<Admission> {
        Arc::new(Admission {
            connect_rate: f64::from(connect_rate),
            buckets: Mutex::new((HashMap::new(), 4096)),
            max_total,
            max_per_ip,
            max_handshakes,
            max_handshakes_per_ip,
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            handshakes: Arc::new(Semaphore::new(if max_handshakes == 0 {
                Semaphore::MAX_PERMITS
            } else {
                max_handshakes
            })),
            refused: AtomicU64::new(0),
            paced: AtomicU64::new(0),
            bad_proxy_headers: AtomicU64::new(0),
        })
    }

    /// Signaling connections now, handshaking or not.
    pub fn connections(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Takes a place for a connection from `ip`, or says which limit is
    /// reached. The place is given back when the [`Ticket`] drops.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refusal> {
        let ip = address_key(ip);
        let refuse = |why| {
            self.refused.fetch_add(1, Ordering::Relaxed);
            Err(why)
        };
        let before = self.total.fetch_add(1, Ordering::AcqRel);
        if self.max_total > 0 && before >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return refuse(Refusal::Full);
        }
        {
            let mut per_ip = self.per_ip.lock().unwrap();
            let (n, handshakes) = per_ip.entry(ip).or_insert((0, 0));
            let over = if self.max_per_ip > 0 && *n >= self.max_per_ip {
                Some(Refusal::PerAddress)
            } else if self.max_handshakes_per_ip > 0 && *handshakes >= self.max_handshakes_per_ip {
                Some(Refusal::HandshakesPerAddress)
            } else {
                None
            };
            if let Some(why) = over {
                if *n == 0 {
                    per_ip.remove(&ip);
                }
                drop(per_ip);
                self.total.fetch_sub(1, Ordering::AcqRel);
                return refuse(why);
            }
            *n += 1;
            *handshakes += 1;
        }
        // From here on, dropping the ticket gives the place back.
        let mut ticket = Ticket {
            admission: self.clone(),
            ip,
            handshake: None,
            handshaking: true,
            wait: Duration::ZERO,
        };
        match self.handshakes.clone().try_acquire_owned() {
            Ok(permit) => ticket.handshake = Some(permit),
            Err(_) => return refuse(Refusal::Handshakes),
        }
        match self.pace(ip, Instant::now()) {
            Some(wait) => {
                ticket.wait = wait;
                if !wait.is_zero() {
                    self.paced.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => return refuse(Refusal::ConnectRate),
        }
        Ok(ticket)
    }

    /// Takes one of `ip`'s connects: how long it waits for its turn, or
    /// `None` if that is longer than [`CONNECT_MAX_WAIT`].
    fn pace(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let rate = self.connect_rate;
        if rate == 0.0 {
            return Some(Duration::ZERO);
        }
        let full = rate * CONNECT_BURST;
        let mut guard = self.buckets.lock().unwrap();
        let (buckets, prune_at) = &mut *guard;
        if buckets.len() >= *prune_at {
            // Only buckets still refilling matter: a full one is the same
            // as none. What is left are the addresses of the last
            // CONNECT_BURST seconds; the next pass waits until the map has
            // doubled, so that pruning stays O(1) a connect on average.
            buckets.retain(|_, (tokens, at)| *tokens + (now - *at).as_secs_f64() * rate < full);
            *prune_at = (2 * buckets.len()).max(4096);
        }
        let (tokens, at) = buckets.entry(ip).or_insert((full, now));
        let refilled = (*tokens + (now - *at).as_secs_f64() * rate).min(full) - 1.0;
        let wait = Duration::from_secs_f64((-refilled).max(0.0) / rate);
        if wait > CONNECT_MAX_WAIT {
            return None;
        }
        (*tokens, *at) = (refilled, now);
        Some(wait)
    }
}

/// An address's connect tokens and when they were counted.
type Bucket = (f64, Instant);

/// Seconds of --max-connects-per-ip-per-second an address may use at once.
const CONNECT_BURST: f64 = 5.0;

/// Longest a connect waits for its address's turn; beyond, it is refused.
/// With --max-handshakes-per-ip (each waiting connect holds one) an
/// address rarely gets near it.
const CONNECT_MAX_WAIT: Duration = Duration::from_secs(5);
/// One admitted connection's place; dropping it frees the place.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    ip: IpAddr,
    handshake: Option<OwnedSemaphorePermit>,
    /// Counted among its address's handshakes.
    handshaking: bool,
    /// How long its `connect` waits for its address's turn
    /// (--max-connects-per-ip-per-second).
    pub wait: Duration,
}

impl Ticket {
    /// The handshake is over (the peer is connected): its place among the
    /// handshakes in flight goes to the next one.
    pub fn handshake_done(&mut self) {
        self.handshake = None;
        if std::mem::take(&mut self.handshaking) {
            let mut per_ip = self.admission.per_ip.lock().unwrap();
            if let Some((_, handshakes)) = per_ip.get_mut(&self.ip) {
                *handshakes -= 1;
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.total.fetch_sub(1, Ordering::AcqRel);
        let mut per_ip = self.admission.per_ip.lock().unwrap();
        if let Some((n, handshakes)) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if self.handshaking {
                *handshakes -= 1;
            }
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// The address a client is counted under: an IPv4 address (also when
/// written as IPv4-mapped IPv6), or the /64 of an IPv6 one — a single
/// host is routinely given a whole /64.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
        v4 => v4,
    }
}

/// At most one log line per `every` for a kind of event, however often it
/// happens; the line says how many were folded into it.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    last: Mutex<Option<Instant>>,
    folded: AtomicU64,
}

impl Throttle {
    pub const fn new(every: Duration) -> Throttle {
        Throttle {
            every,
            last: Mutex::new(None),
            folded: AtomicU64::new(0),
        }
    }

    /// `Some(n)`: log now, and say that `n` more happened since the last
    /// line. `None`: folded into the next line.
    pub fn hit(&self) -> Option<u64> {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap();
        match *last {
            Some(t) if now.duration_since(t) < self.every => {
                self.folded.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => {
                *last = Some(now);
                Some(self.folded.swap(0, Ordering::Relaxed))
            }
        }
    }
}

/// Accepts the next connection. Errors never end the loop: running out
/// of file descriptors is said once per second (with how many accepts
/// failed since) while the connections already open keep being served.
pub async fn accept(
    listener: &TcpListener,
    what: &str,
    throttle: &Throttle,
) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                let fds = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                if let Some(folded) = throttle.hit() {
                    if fds {
                        tracing::error!(
                            listener = what,
                            error = %e,
                            failed_since_last_line = folded,
                            "out of file descriptors: new connections wait (raise LimitNOFILE / ulimit -n)"
                        );
                    } else {
                        tracing::warn!(listener = what, error = %e, failed_since_last_line = folded, "accept failed");
                    }
                }
                // The pending connection stays in the backlog; try again
                // once some descriptor may have been freed.
                tokio::time::sleep(Duration::from_millis(if fds { 100 } else { 10 })).await;
            }
        }
    }
}

/// Raises the soft limit on open files to the hard one, as Go's runtime
/// does: every signaling peer holds a TCP socket, and the soft default of
/// 1024 is reached long before anything else. Returns the limit now.
pub fn raise_fd_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return Some(raised.rlim_cur);
            }
        }
    }
    Some(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clock-free: five seconds' worth at once, then one per 1/rate,
    /// and a refusal once the wait would pass five seconds.
    #[test]
    fn connects_from_one_address_are_paced() {
        let a = Admission::new(0, 0, 0, 0, 2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..10 {
            assert_eq!(a.pace(ip, t0), Some(Duration::ZERO));
        }
        assert_eq!(a.pace(ip, t0), Some(Duration::from_millis(500)));
        assert_eq!(a.pace(ip, t0), Some(Duration::from_secs(1)));
        for _ in 0..8 {
            assert!(a.pace(ip, t0).is_some());
        }
        assert_eq!(a.pace(ip, t0), None, "would wait 5.5 s");
        assert_eq!(
            a.pace(ip, t0 + Duration::from_secs(1)),
            Some(Duration::from_millis(4500))
        );
        assert_eq!(
            a.pace("10.0.0.2".parse().unwrap(), t0),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn admission_counts_and_gives_back() {
        let a = Admission::new(3, 2, 0, 0, 0);
        let ip1: IpAddr = "10.0.0.1".parse().unwrap();
        let ip2: IpAddr = "10.0.0.2".parse().unwrap();
        let t1 = a.admit(ip1).unwrap();
        let _t2 = a.admit(ip1).unwrap();
        assert_eq!(a.admit(ip1).unwrap_err(), Refusal::PerAddress);
        let _t3 = a.admit(ip2).unwrap();
        assert_eq!(a.admit(ip2).unwrap_err(), Refusal::Full);
        drop(t1);
        assert_eq!(a.connections(), 2);
        let _t4 = a.admit(ip1).unwrap();
        assert_eq!(a.refused.load(Ordering::Relaxed), 2);
        drop((_t2, _t3, _t4));
        assert!(a.per_ip.lock().unwrap().is_empty());
    }

    #[test]
    fn handshakes_are_capped_until_done() {
        let a = Admission::new(0, 0, 1, 0, 0);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let mut t = a.admit(ip).unwrap();
        assert_eq!(a.admit(ip).unwrap_err(), Refusal::Handshakes);
        t.handshake_done();
        let _u = a.admit(ip).unwrap();
    }

    #[test]
    fn one_address_holds_a_bounded_share_of_the_handshakes() {
        let a = Admission::new(0, 0, 10, 2, 0);
        let one: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let mut t1 = a.admit(one).unwrap();
        let _t2 = a.admit(same_64).unwrap();
        assert_eq!(a.admit(one).unwrap_err(), Refusal::HandshakesPerAddress);
        let _t3 = a.admit(other).unwrap();
        // Connected, it no longer counts as a handshake.
        t1.handshake_done();
        t1.handshake_done();
        let _t4 = a.admit(one).unwrap();
        assert_eq!(a.admit(one).unwrap_err(), Refusal::HandshakesPerAddress);
        drop(t1);
        assert_eq!(a.admit(one).unwrap_err(), Refusal::HandshakesPerAddress);
        assert_eq!(
            address_key("::ffff:10.0.0.1".parse().unwrap()),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn throttle_folds_repeats() {
        let t = Throttle::new(Duration::from_secs(3600));
        assert_eq!(t.hit(), Some(0));
        assert_eq!(t.hit(), None);
        assert_eq!(t.hit(), None);
        let t = Throttle::new(Duration::ZERO);
        assert_eq!(t.hit(), Some(0));
        assert_eq!(t.hit(), Some(0));
    }
}

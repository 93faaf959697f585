//! What a peer's remote candidates may make hato do.
//!
//! A candidate is an address the peer asks hato to send ICE checks to,
//! and nothing proves it belongs to the peer: a peer that names a third
//! party's address turns hato into a reflector. So a candidate is used
//! only if its address is one hato could ever reach a peer at
//! ([`Policy::judge`]), and the checks hato sends to an address that has
//! never answered are paced ([`Pace`]), per peer and per shard. Once an
//! address has answered (a Binding request with the peer's password came
//! from it, or a response to a check did), ICE's own pace applies.

use std::net::IpAddr;
use std::time::Instant;

/// Which candidate addresses a shard's peers may name.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Loopback candidates are used only when hato itself is reachable
    /// on loopback (a test, or a proxy on the same host).
    loopback: bool,
    /// Likewise link-local (169.254/16, fe80::/10).
    link_local: bool,
    /// Private ranges (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7)
    /// refused: for deployments that face only the internet.
    refuse_private: bool,
}

impl Policy {
    /// The policy of a shard that listens on `own` (the unspecified
    /// address in it counts as none).
    pub fn new(own: &[IpAddr], refuse_private: bool) -> Policy {
        Policy {
            loopback: own.iter().any(|ip| ip.is_loopback()),
            link_local: own.iter().any(|ip| is_link_local(*ip)),
            refuse_private,
        }
    }

    /// Whether hato may check the address a candidate line names
    /// (`candidate:…`, with or without `a=`); `Err` says why not.
    pub fn judge(&self, candidate: &str) -> Result<(), &'static str> {
        let (udp, ip, port) = parse(candidate).ok_or("not a candidate hato can read")?;
        if !udp {
            return Err("not UDP");
        }
        if port == 0 {
            return Err("port 0");
        }
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        if ip.is_unspecified() {
            return Err("unspecified address");
        }
        if ip.is_multicast() || ip == IpAddr::from([255, 255, 255, 255]) {
            return Err("multicast or broadcast address");
        }
        if ip.is_loopback() && !self.loopback {
            return Err("loopback address");
        }
        if is_link_local(ip) && !self.link_local {
            return Err("link-local address");
        }
        if self.refuse_private && is_private(ip) {
            return Err("private address (--refuse-private-candidates)");
        }
        Ok(())
    }

    /// The SDP without the `a=candidate` lines [`Policy::judge`] refuses;
    /// `refused` counts them.
    pub fn filter_sdp(&self, sdp: &str, refused: &mut usize) -> String {
        let mut out = String::with_capacity(sdp.len());
        for line in sdp.split_inclusive('\n') {
            if line.starts_with("a=candidate:") && self.judge(line.trim_end()).is_err() {
                *refused += 1;
                continue;
            }
            out.push_str(line);
        }
        out
    }
}

/// Transport is UDP, address, port: the fields 3, 5 and 6 of RFC 8839's
/// `candidate-attribute`. `None` when the line is not one, or names a host
/// (an mDNS `.local` name: hato resolves none).
fn parse(candidate: &str) -> Option<(bool, IpAddr, u16)> {
    let line = candidate.strip_prefix("a=").unwrap_or(candidate);
    let mut fields = line.strip_prefix("candidate:")?.split_ascii_whitespace();
    let transport = fields.nth(2)?;
    let ip = fields.nth(1)?.parse().ok()?;
    let port = fields.next()?.parse().ok()?;
    Some((transport.eq_ignore_ascii_case("udp"), ip, port))
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.segments()[0] & 0xffc0 == 0xfe80,
    }
}

fn is_private(ip: IpAddr) -> bool {
    match ip {
        // 100.64.0.0/10 is carrier-grade NAT: as private as 10/8.
        IpAddr::V4(a) => a.is_private() || (a.octets()[0] == 100 && a.octets()[1] & 0xc0 == 64),
        IpAddr::V6(a) => a.segments()[0] & 0xfe00 == 0xfc00,
    }
}

/// A token bucket: `burst` sends at once, then `per_second`.
#[derive(Debug, Clone)]
pub struct Pace {
    tokens: f32,
    last: Instant,
    burst: f32,
    per_second: f32,
}

impl Pace {
    pub fn new(burst: u32, per_second: u32, now: Instant) -> Pace {
        Pace {
            tokens: burst as f32,
            last: now,
            burst: burst as f32,
            per_second: per_second as f32,
        }
    }

    /// Takes a token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f32();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether a [`Pace::take`] now would succeed, without taking.
    pub fn ready(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f32();
        self.tokens + elapsed * self.per_second >= 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn addresses_hato_never_checks_are_refused() {
        let public = Policy::new(&["203.0.113.7".parse().unwrap()], false);
        let ok = |p: &Policy, c: &str| p.judge(c).is_ok();
        assert!(ok(
            &public,
            "candidate:1 1 udp 2122260223 198.51.100.4 50000 typ host"
        ));
        assert!(ok(
            &public,
            "a=candidate:1 1 UDP 2122260223 192.168.1.4 50000 typ host generation 0"
        ));
        assert!(ok(
            &public,
            "candidate:2 1 udp 1686052607 2001:db8::4 50000 typ srflx raddr 0.0.0.0 rport 0"
        ));
        for bad in [
            "candidate:1 1 udp 1 0.0.0.0 50000 typ host",
            "candidate:1 1 udp 1 :: 50000 typ host",
            "candidate:1 1 udp 1 224.0.0.251 5353 typ host",
            "candidate:1 1 udp 1 255.255.255.255 50000 typ host",
            "candidate:1 1 udp 1 ff02::1 50000 typ host",
            "candidate:1 1 udp 1 127.0.0.1 50000 typ host",
            "candidate:1 1 udp 1 ::ffff:127.0.0.1 50000 typ host",
            "candidate:1 1 udp 1 ::1 50000 typ host",
            "candidate:1 1 udp 1 169.254.1.1 50000 typ host",
            "candidate:1 1 udp 1 fe80::1 50000 typ host",
            "candidate:1 1 udp 1 198.51.100.4 0 typ host",
            "candidate:1 1 tcp 1 198.51.100.4 9 typ host tcptype active",
            "candidate:1 1 udp 1 4f1c.local 50000 typ host",
            "candidate:garbage",
        ] {
            assert!(!ok(&public, bad), "{bad}");
        }
        // Served on loopback (tests, a local proxy): loopback is checked.
        let local = Policy::new(&["127.0.0.1".parse().unwrap()], false);
        assert!(ok(&local, "candidate:1 1 udp 1 127.0.0.1 50000 typ host"));
        assert!(!ok(
            &local,
            "candidate:1 1 udp 1 169.254.1.1 50000 typ host"
        ));
        // Internet-facing only.
        let strict = Policy::new(&["203.0.113.7".parse().unwrap()], true);
        for private in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.0.2",
            "100.64.0.1",
            "fd00::1",
        ] {
            let c = format!("candidate:1 1 udp 1 {private} 50000 typ host");
            assert!(!ok(&strict, &c), "{c}");
        }
        assert!(ok(&strict, "candidate:1 1 udp 1 198.51.100.4 1 typ host"));
    }

    #[test]
    fn refused_lines_leave_the_sdp() {
        let p = Policy::new(&["203.0.113.7".parse().unwrap()], false);
        let sdp = "v=0\r\na=candidate:1 1 udp 1 198.51.100.4 5 typ host\r\na=candidate:2 1 udp 1 0.0.0.0 5 typ host\r\na=end-of-candidates\r\n";
        let mut refused = 0;
        let out = p.filter_sdp(sdp, &mut refused);
        assert_eq!(refused, 1);
        assert_eq!(
            out,
            "v=0\r\na=candidate:1 1 udp 1 198.51.100.4 5 typ host\r\na=end-of-candidates\r\n"
        );
    }

    #[test]
    fn pace_gives_a_burst_then_a_rate() {
        let t0 = Instant::now();
        let mut p = Pace::new(3, 10, t0);
        assert!((0..3).all(|_| p.take(t0)));
        assert!(!p.take(t0));
        assert!(!p.ready(t0 + Duration::from_millis(50)));
        assert!(p.take(t0 + Duration::from_millis(100)));
        // Ten seconds idle refill the burst, not more.
        let later = t0 + Duration::from_secs(10);
        assert_eq!((0..10).filter(|_| p.take(later)).count(), 3);
    }
}

//! The PROXY protocol (versions 1 and 2, as HAProxy, nginx's
//! `proxy_protocol` and most cloud load balancers send it): a header a
//! proxy writes at the start of each connection, naming the client it
//! proxies. hato reads it only from `--trusted-proxy` addresses and only
//! with `--proxy-protocol`; anyone else's bytes are HTTP.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The longest version 1 header, CRLF included (the specification's).
const V1_MAX: usize = 107;
/// Version 2's fixed part: the signature, version/command, family and length.
const V2_FIXED: usize = 16;
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest version 2 header read: two IPv6 addresses and ports (36
/// bytes) and room for a proxy's TLVs. Longer is refused.
pub const V2_MAX: usize = V2_FIXED + 512;

/// What a header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The client's address (the source the proxy saw).
    Client(IpAddr),
    /// The proxy speaks for itself (v1 `UNKNOWN`, v2 `LOCAL`, or a family
    /// other than TCP over IPv4/IPv6): its own address counts.
    Local,
}

/// Parses a header at the start of `buf`: `Ok(Some((length, header)))`,
/// `Ok(None)` while more bytes are needed, `Err` for anything that is not
/// a valid header.
pub fn parse(buf: &[u8]) -> Result<Option<(usize, Header)>, &'static str> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] == b'P' {
        return parse_v1(buf);
    }
    if buf[0] == b'\r' {
        return parse_v2(buf);
    }
    Err("the connection does not start with a PROXY protocol header")
}

fn parse_v1(buf: &[u8]) -> Result<Option<(usize, Header)>, &'static str> {
    let seen = &buf[..buf.len().min(V1_MAX)];
    if !b"PROXY ".starts_with(&seen[..seen.len().min(6)]) {
        return Err("the connection does not start with a PROXY protocol header");
    }
    let Some(end) = seen.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err("a PROXY v1 header longer than 107 bytes")
        } else {
            Ok(None)
        };
    };
    let line =
        std::str::from_utf8(&seen[..end]).map_err(|_| "a PROXY v1 header that is not text")?;
    let fields: Vec<&str> = line.split(' ').collect();
    let header = match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Header::Local,
        ["PROXY", family @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let src: IpAddr = src
                .parse()
                .map_err(|_| "a PROXY v1 source that is not an address")?;
            let dst: IpAddr = dst
                .parse()
                .map_err(|_| "a PROXY v1 destination that is not an address")?;
            if src.is_ipv4() != (*family == "TCP4") || dst.is_ipv4() != src.is_ipv4() {
                return Err("a PROXY v1 address of the wrong family");
            }
            for port in [sport, dport] {
                port.parse::<u16>()
                    .map_err(|_| "a PROXY v1 port that is not a port")?;
            }
            Header::Client(src)
        }
        _ => return Err("a malformed PROXY v1 header"),
    };
    Ok(Some((end + 2, header)))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(usize, Header)>, &'static str> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] != V2_SIGNATURE[..n] {
        return Err("the connection does not start with a PROXY protocol header");
    }
    if buf.len() < V2_FIXED {
        return Ok(None);
    }
    if buf[12] >> 4 != 2 {
        return Err("a PROXY header of a version other than 1 and 2");
    }
    let len = V2_FIXED + u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if len > V2_MAX {
        return Err("a PROXY v2 header longer than 528 bytes");
    }
    if buf.len() < len {
        return Ok(None);
    }
    let body = &buf[V2_FIXED..len];
    let header = match (buf[12] & 0x0f, buf[13]) {
        (0x0, _) => Header::Local,
        (0x1, 0x11 | 0x12) if body.len() >= 12 => {
            Header::Client(Ipv4Addr::new(body[0], body[1], body[2], body[3]).into())
        }
        (0x1, 0x21 | 0x22) if body.len() >= 36 => {
            let octets: [u8; 16] = body[..16].try_into().expect("16 bytes");
            Header::Client(Ipv6Addr::from(octets).into())
        }
        (0x1, 0x11 | 0x12 | 0x21 | 0x22) => {
            return Err("a PROXY v2 header too short for its addresses")
        }
        (0x1, _) => Header::Local,
        _ => return Err("a PROXY v2 header with an unknown command"),
    };
    Ok(Some((len, header)))
}

/// Reads the header off the start of `tcp`, within `limit`, leaving every
/// byte after it unread. `Err` says why the connection is to be closed.
pub async fn read(tcp: &mut TcpStream, limit: Duration) -> Result<Header, &'static str> {
    let mut buf = [0u8; V2_MAX];
    let found = tokio::time::timeout(limit, async {
        let mut seen = 0;
        loop {
            // Peek: what follows the header is not ours to take.
            let n = tcp
                .peek(&mut buf)
                .await
                .map_err(|_| "the connection failed")?;
            if n == 0 {
                return Err("the connection closed before its PROXY header");
            }
            if let Some(found) = parse(&buf[..n])? {
                return Ok(found);
            }
            if n == seen {
                // Nothing new since the last look: wait for more.
                tcp.readable().await.map_err(|_| "the connection failed")?;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            seen = n;
        }
    })
    .await
    .map_err(|_| "no complete PROXY header in time")??;
    let (len, header) = found;
    tcp.read_exact(&mut buf[..len])
        .await
        .map_err(|_| "the connection failed")?;
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_1() {
        let h = b"PROXY TCP4 203.0.113.9 192.0.2.1 5555 5000\r\nGET /";
        assert_eq!(
            parse(h),
            Ok(Some((44, Header::Client("203.0.113.9".parse().unwrap()))))
        );
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 5555 5000\r\n";
        assert_eq!(
            parse(h),
            Ok(Some((
                h.len(),
                Header::Client("2001:db8::1".parse().unwrap())
            )))
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Ok(Some((15, Header::Local))));
        assert_eq!(parse(b"PROXY TCP4 203.0"), Ok(None));
        assert_eq!(parse(b"PRO"), Ok(None));
        assert!(parse(b"GET / HTTP/1.1\r\n").is_err());
        assert!(parse(b"PROXY TCP4 203.0.113.9 192.0.2.1 5555\r\n").is_err());
        assert!(parse(b"PROXY TCP6 203.0.113.9 192.0.2.1 5555 5000\r\n").is_err());
        assert!(parse(b"PROXY TCP4 203.0.113.9 192.0.2.1 99999 5000\r\n").is_err());
        assert!(parse(&[b'P'; 200]).is_err());
        let long = [b"PROXY ".as_slice(), &[b'1'; 150]].concat();
        assert!(parse(&long).is_err(), "no CRLF within 107 bytes");
    }

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    #[test]
    fn version_2() {
        let body = [203, 0, 113, 9, 192, 0, 2, 1, 0x15, 0xb3, 0x13, 0x88];
        let h = v2(1, 0x11, &body);
        assert_eq!(
            parse(&h),
            Ok(Some((28, Header::Client("203.0.113.9".parse().unwrap()))))
        );
        for cut in 0..h.len() {
            assert_eq!(parse(&h[..cut]), Ok(None), "{cut} bytes");
        }
        let mut body6 = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets().to_vec();
        body6.extend_from_slice(&[0; 20]);
        assert_eq!(
            parse(&v2(1, 0x21, &body6)),
            Ok(Some((52, Header::Client("2001:db8::1".parse().unwrap()))))
        );
        assert_eq!(parse(&v2(0, 0, &[])), Ok(Some((16, Header::Local))));
        // A Unix socket's addresses: the proxy's own address counts.
        assert_eq!(
            parse(&v2(1, 0x31, &[0; 216])),
            Ok(Some((232, Header::Local)))
        );
        assert!(parse(&v2(1, 0x11, &body[..8])).is_err());
        assert!(parse(&v2(7, 0x11, &body)).is_err());
        assert!(parse(&v2(1, 0x11, &[0; 600])).is_err(), "over 528 bytes");
        let mut v3 = v2(1, 0x11, &body);
        v3[12] = 0x31;
        assert!(parse(&v3).is_err());
    }
}

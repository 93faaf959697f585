//! One shard's UDP socket: datagrams in with `recvmmsg` (quinn-udp, which
//! also reports each datagram's destination address and splits GRO
//! batches), datagrams out with `sendmmsg`, so a fan-out to a shard's
//! peers costs a few system calls rather than one per peer.

use bytes::BytesMut;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Datagrams read per `recvmmsg`, and buffer size of each. A WebRTC
/// datagram stays under the path MTU (rtc's SCTP packets are ≤ 1200 B);
/// GRO may coalesce several of one sender into one buffer.
const RECV_BATCH: usize = 32;
const RECV_BUF: usize = 64 * 1024;

/// Datagrams handed to one `sendmmsg`.
const SEND_BATCH: usize = 64;

/// One received datagram.
pub struct Datagram {
    pub from: SocketAddr,
    /// The local address it was sent to, when the kernel says (IP_PKTINFO).
    pub to_ip: Option<IpAddr>,
    pub data: BytesMut,
}

/// One datagram to send.
pub struct Transmit {
    pub to: SocketAddr,
    /// The local address to send it from (`IP_PKTINFO`), for a socket bound
    /// to the unspecified address; `None`: the kernel's choice.
    pub from: Option<Ipv4Addr>,
    pub data: BytesMut,
}

pub struct SharedSocket {
    socket: UdpSocket,
    state: quinn_udp::UdpSocketState,
    bufs: Vec<Vec<u8>>,
}

impl SharedSocket {
    pub fn new(std: std::net::UdpSocket) -> io::Result<SharedSocket> {
        std.set_nonblocking(true)?;
        let state = quinn_udp::UdpSocketState::new((&std).into())?;
        // quinn-udp asks for a receive timestamp and the TOS byte of every
        // datagram; hato reads neither, and each is a control message the
        // kernel builds per datagram.
        for (level, name) in [
            (libc::SOL_SOCKET, libc::SO_TIMESTAMPNS),
            (libc::IPPROTO_IP, libc::IP_RECVTOS),
        ] {
            let off: libc::c_int = 0;
            // SAFETY: a valid descriptor and an int option of the right size.
            unsafe {
                libc::setsockopt(
                    std.as_raw_fd(),
                    level,
                    name,
                    (&off as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        let socket = UdpSocket::from_std(std)?;
        Ok(SharedSocket {
            socket,
            state,
            bufs: (0..RECV_BATCH).map(|_| vec![0u8; RECV_BUF]).collect(),
        })
    }

    pub async fn readable(&self) -> io::Result<()> {
        self.socket.readable().await
    }

    /// Reads whatever is queued, up to one batch, without waiting; GRO
    /// segments come out as separate datagrams. Only those `keep` accepts
    /// (judging the bytes in the receive buffer) are copied out to `out`.
    /// Returns how many were read, kept or not: 0 when nothing was ready.
    pub fn recv_batch(
        &mut self,
        out: &mut Vec<Datagram>,
        mut keep: impl FnMut(&SocketAddr, &[u8]) -> bool,
    ) -> io::Result<usize> {
        let mut meta = [quinn_udp::RecvMeta::default(); RECV_BATCH];
        let Self {
            socket,
            state,
            bufs,
        } = self;
        let mut bufs = bufs.iter_mut();
        let mut slices: [IoSliceMut<'_>; RECV_BATCH] = std::array::from_fn(|_| {
            IoSliceMut::new(&mut bufs.next().expect("RECV_BATCH buffers")[..])
        });
        let n = match socket.try_io(Interest::READABLE, || {
            state.recv((&*socket).into(), &mut slices, &mut meta)
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut read = 0;
        for (m, buf) in meta.iter().zip(slices.iter()).take(n) {
            let stride = m.stride.max(1);
            for segment in buf[..m.len].chunks(stride) {
                read += 1;
                if keep(&m.addr, segment) {
                    out.push(Datagram {
                        from: m.addr,
                        to_ip: m.dst_ip,
                        data: BytesMut::from(segment),
                    });
                }
            }
        }
        Ok(read)
    }

    /// Sends every datagram, batched; waits while the socket buffer is full.
    /// A datagram the kernel refuses (unreachable, too large) is dropped, as
    /// UDP would: the protocols above retransmit.
    pub async fn send_all(&self, out: &[Transmit]) -> usize {
        let mut sent = 0;
        let mut dropped = 0;
        while sent < out.len() {
            let chunk = &out[sent..out.len().min(sent + SEND_BATCH)];
            match self
                .socket
                .try_io(Interest::WRITABLE, || sendmmsg(&self.socket, chunk))
            {
                Ok(n) => sent += n.max(1).min(chunk.len()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.socket.writable().await.is_err() {
                        return dropped + out.len() - sent;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, to = %chunk[0].to, "UDP send failed; datagram dropped");
                    sent += 1;
                    dropped += 1;
                }
            }
        }
        dropped
    }
}

/// An `IP_PKTINFO` control message: its header, then the data at
/// `CMSG_DATA` (the header's size, already aligned on Linux).
#[repr(C)]
struct PktInfo {
    hdr: libc::cmsghdr,
    info: libc::in_pktinfo,
}

impl PktInfo {
    fn from(ip: Ipv4Addr) -> PktInfo {
        // SAFETY: all-zero is a valid cmsghdr and in_pktinfo.
        let mut c: PktInfo = unsafe { std::mem::zeroed() };
        c.hdr.cmsg_level = libc::IPPROTO_IP;
        c.hdr.cmsg_type = libc::IP_PKTINFO;
        // SAFETY: arithmetic only.
        c.hdr.cmsg_len =
            unsafe { libc::CMSG_LEN(std::mem::size_of::<libc::in_pktinfo>() as u32) } as _;
        c.info.ipi_spec_dst = libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        };
        c
    }
}

/// One `sendmmsg` over `out`; returns how many datagrams the kernel took.
fn sendmmsg(socket: &UdpSocket, out: &[Transmit]) -> io::Result<usize> {
    let addrs: Vec<socket2::SockAddr> = out.iter().map(|t| t.to.into()).collect();
    let mut iovs: Vec<libc::iovec> = out
        .iter()
        .map(|t| libc::iovec {
            iov_base: t.data.as_ptr() as *mut libc::c_void,
            iov_len: t.data.len(),
        })
        .collect();
    let mut control: Vec<Option<PktInfo>> = out.iter().map(|t| t.from.map(PktInfo::from)).collect();
    let mut hdrs: Vec<libc::mmsghdr> = addrs
        .iter()
        .zip(iovs.iter_mut())
        .zip(control.iter_mut())
        .map(|((a, iov), c)| {
            // SAFETY: an all-zero msghdr is a valid empty header; every
            // pointer set below outlives the call.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = a.as_ptr() as *mut libc::c_void;
            h.msg_hdr.msg_namelen = a.len();
            h.msg_hdr.msg_iov = iov as *mut libc::iovec;
            h.msg_hdr.msg_iovlen = 1;
            if let Some(c) = c {
                h.msg_hdr.msg_control = c as *mut PktInfo as *mut libc::c_void;
                h.msg_hdr.msg_controllen = std::mem::size_of::<PktInfo>() as _;
            }
            h
        })
        .collect();
    // SAFETY: `hdrs` points at `addrs`, `iovs` and `control`, which live
    // until return.
    let n = unsafe {
        libc::sendmmsg(
            socket.as_raw_fd(),
            hdrs.as_mut_ptr(),
            hdrs.len() as libc::c_uint,
            0,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// The non-loopback, up IPv4 and IPv6 addresses of this host: what a
/// socket bound to the unspecified address advertises when no public
/// address is given.
pub fn interface_addrs(v6: bool) -> Vec<IpAddr> {
    let mut found = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, which is walked read-only and freed once.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return found;
        }
        let mut cur = list;
        while !cur.is_null() {
            let ifa = &*cur;
            cur = ifa.ifa_next;
            if ifa.ifa_addr.is_null() || ifa.ifa_flags & libc::IFF_UP as u32 == 0 {
                continue;
            }
            let family = (*ifa.ifa_addr).sa_family as i32;
            let ip = if family == libc::AF_INET && !v6 {
                let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes())
            } else if family == libc::AF_INET6 && v6 {
                let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                IpAddr::from(sin6.sin6_addr.s6_addr)
            } else {
                continue;
            };
            let link_local = matches!(ip, IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80);
            if !ip.is_loopback() && !link_local && !found.contains(&ip) {
                found.push(ip);
            }
        }
        libc::freeifaddrs(list);
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `PktInfo` is laid out as the kernel reads a control message: the
    /// data at `CMSG_DATA`, the whole `CMSG_SPACE` long.
    #[test]
    fn pktinfo_has_the_layout_of_a_control_message() {
        let data = std::mem::size_of::<libc::in_pktinfo>() as u32;
        // SAFETY: arithmetic only.
        let (space, header) = unsafe { (libc::CMSG_SPACE(data), libc::CMSG_LEN(0)) };
        assert_eq!(std::mem::size_of::<PktInfo>(), space as usize);
        assert_eq!(std::mem::offset_of!(PktInfo, info), header as usize);
        let c = PktInfo::from(Ipv4Addr::new(127, 3, 1, 2));
        assert_eq!(c.hdr.cmsg_len as u32, header + data);
        assert_eq!(
            c.info.ipi_spec_dst.s_addr,
            u32::from_be_bytes([127, 3, 1, 2]).to_be()
        );
    }
}

//! A kernel-side filter for a server shard's UDP socket: a STUN Binding
//! request whose `USERNAME` does not start with a ufrag this process could
//! have handed out is dropped by the kernel, before it is queued, copied
//! or seen by hato.
//!
//! A server ufrag is 8 random characters followed by an 8-character tag
//! (`a`–`p`, 4 bits each) computed from them with a keyed hash whose key
//! is drawn at start and never leaves the process. The classic BPF program
//! attached with `SO_ATTACH_FILTER` (no privilege needed) computes the
//! same hash over the request's `USERNAME` and compares tags, so a request
//! with a made-up username costs hato nothing but the kernel's IP and UDP
//! processing. The hash is not cryptographic: a peer that learns enough
//! real ufrags to recover the key only gets back to the shard's own check
//! (a hash lookup on the receive buffer), which still decides. Everything
//! that is not a Binding request (DTLS, SCTP, STUN responses) passes: the
//! kernel cannot know which addresses belong to live peers.

use rand::Rng;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::OnceLock;

/// Characters of a ufrag: the random part, then the tag.
const RANDOM: usize = 8;
const UFRAG: usize = 16;

/// The STUN attributes walked looking for `USERNAME`; every ICE agent
/// known puts it first or second. A request without it among the first
/// ones is dropped, as it would be by the shard.
const WALKED: usize = 4;

fn key() -> &'static [u32; 4] {
    static KEY: OnceLock<[u32; 4]> = OnceLock::new();
    // Odd multipliers, so each multiplication is a bijection.
    KEY.get_or_init(|| {
        let mut r = rand::thread_rng();
        [
            r.gen(),
            r.gen::<u32>() | 1,
            r.gen::<u32>() | 1,
            r.gen::<u32>() | 1,
        ]
    })
}

/// The keyed hash of a ufrag's random part, as the filter computes it.
fn hash(w0: u32, w1: u32) -> u32 {
    let k = key();
    let mut h = (w0 ^ k[0]).wrapping_mul(k[1]);
    h ^= h >> 15;
    h ^= w1;
    h = h.wrapping_mul(k[2]);
    h ^= h >> 13;
    h = h.wrapping_mul(k[3]);
    h ^= h >> 16;
    h
}

/// The two big-endian words of the tag for a hash: each byte `a` + a nibble.
fn tag_words(h: u32) -> [u32; 2] {
    [
        (h & 0x0f0f_0f0f) + 0x6161_6161,
        ((h >> 4) & 0x0f0f_0f0f) + 0x6161_6161,
    ]
}

/// A fresh server ufrag: 8 random alphanumerics and their tag.
pub fn ufrag() -> String {
    let mut r = rand::thread_rng();
    let random: Vec<u8> = (&mut r)
        .sample_iter(rand::distributions::Alphanumeric)
        .take(RANDOM)
        .collect();
    let w0 = u32::from_be_bytes(random[0..4].try_into().unwrap());
    let w1 = u32::from_be_bytes(random[4..8].try_into().unwrap());
    let [t0, t1] = tag_words(hash(w0, w1));
    let mut u = random;
    u.extend_from_slice(&t0.to_be_bytes());
    u.extend_from_slice(&t1.to_be_bytes());
    debug_assert_eq!(u.len(), UFRAG);
    String::from_utf8(u).expect("ASCII")
}

/// Whether a ufrag carries a valid tag (what the kernel filter checks).
#[cfg(test)]
fn tagged(ufrag: &[u8]) -> bool {
    if ufrag.len() < UFRAG {
        return false;
    }
    let w = |i: usize| u32::from_be_bytes(ufrag[i..i + 4].try_into().unwrap());
    tag_words(hash(w(0), w(4))) == [w(8), w(12)]
}

// Classic BPF, as in <linux/filter.h>.
const LD: u16 = 0x00;
const LDX: u16 = 0x01;
const ST: u16 = 0x02;
const ALU: u16 = 0x04;
const JMP: u16 = 0x05;
const RET: u16 = 0x06;
const MISC: u16 = 0x07;
const W: u16 = 0x00;
const H: u16 = 0x08;
const B: u16 = 0x10;
const IMM: u16 = 0x00;
const ABS: u16 = 0x20;
const IND: u16 = 0x40;
const MEM: u16 = 0x60;
const ADD: u16 = 0x00;
const MUL: u16 = 0x20;
const AND: u16 = 0x50;
const RSH: u16 = 0x70;
const XOR: u16 = 0xa0;
const JEQ: u16 = 0x10;
const JGT: u16 = 0x20;
const K: u16 = 0x00;
const X: u16 = 0x08;
const TAX: u16 = 0x00;

/// One instruction; jumps are resolved to labels by [`Program`].
#[derive(Clone, Copy)]
enum Next {
    /// Fall through.
    On,
    Accept,
    Drop,
    /// The `USERNAME` check.
    Found,
}

struct Program {
    code: Vec<(u16, Next, Next, u32)>,
    found: Option<usize>,
}

impl Program {
    fn op(&mut self, code: u16, k: u32) {
        self.code.push((code, Next::On, Next::On, k));
    }
    fn jump(&mut self, code: u16, k: u32, t: Next, f: Next) {
        self.code.push((code, t, f, k));
    }

    /// The filter, with the UDP header at offset 0 (where the kernel runs
    /// a UDP socket's filter) and the STUN message at 8.
    fn build() -> Vec<libc::sock_filter> {
        let k = key();
        let mut p = Program {
            code: Vec::new(),
            found: None,
        };
        // Not STUN-looking (DTLS, SCTP...): the shard decides.
        p.op(LD | B | ABS, 8);
        p.jump(JMP | JGT | K, 3, Next::Accept, Next::On);
        // Anything but a Binding request (responses, indications): too.
        p.op(LD | H | ABS, 8);
        p.jump(JMP | JEQ | K, 1, Next::On, Next::Accept);
        p.op(LD | W | ABS, 12);
        p.jump(JMP | JEQ | K, 0x2112_a442, Next::On, Next::Drop);
        // Walk the attributes (X: the offset of one) for USERNAME (6).
        p.op(LDX | W | IMM, 28);
        for _ in 0..WALKED {
            p.op(LD | H | IND, 0);
            p.jump(JMP | JEQ | K, 6, Next::Found, Next::On);
            p.op(LD | H | IND, 2);
            p.op(ALU | ADD | K, 3 + 4);
            p.op(ALU | AND | K, 0xffff_fffc);
            p.op(ALU | ADD | X, 0);
            p.op(MISC | TAX, 0);
        }
        p.op(RET | K, 0);
        p.found = Some(p.code.len());
        // X: the USERNAME attribute; its value starts at X + 4.
        p.op(LD | W | IND, 4 + 4);
        p.op(ST, 2);
        p.op(LD | W | IND, 4 + 8);
        p.op(ST, 3);
        p.op(LD | W | IND, 4 + 12);
        p.op(ST, 4);
        p.op(LD | B | IND, 4 + UFRAG as u32);
        p.jump(JMP | JEQ | K, u32::from(b':'), Next::On, Next::Drop);
        p.op(LD | W | IND, 4);
        // h = (w0 ^ k0) * k1; h ^= h >> 15
        p.op(ALU | XOR | K, k[0]);
        p.op(ALU | MUL | K, k[1]);
        p.xor_shift(15);
        // h ^= w1; h *= k2; h ^= h >> 13
        p.op(LDX | W | MEM, 2);
        p.op(ALU | XOR | X, 0);
        p.op(ALU | MUL | K, k[2]);
        p.xor_shift(13);
        // h *= k3; h ^= h >> 16
        p.op(ALU | MUL | K, k[3]);
        p.xor_shift(16);
        p.op(ST, 0);
        p.op(ALU | AND | K, 0x0f0f_0f0f);
        p.op(ALU | ADD | K, 0x6161_6161);
        p.op(LDX | W | MEM, 3);
        p.jump(JMP | JEQ | X, 0, Next::On, Next::Drop);
        p.op(LD | W | MEM, 0);
        p.op(ALU | RSH | K, 4);
        p.op(ALU | AND | K, 0x0f0f_0f0f);
        p.op(ALU | ADD | K, 0x6161_6161);
        p.op(LDX | W | MEM, 4);
        p.jump(JMP | JEQ | X, 0, Next::Accept, Next::Drop);
        p.resolve()
    }

    /// `A ^= A >> n`, through scratch slot 1.
    fn xor_shift(&mut self, n: u32) {
        self.op(ST, 1);
        self.op(ALU | RSH | K, n);
        self.op(LDX | W | MEM, 1);
        self.op(ALU | XOR | X, 0);
    }

    /// Appends the two verdicts and turns labels into relative jumps.
    fn resolve(self) -> Vec<libc::sock_filter> {
        let accept = self.code.len();
        let drop = accept + 1;
        let found = self.found.expect("built");
        let at = |i: usize, n: Next| -> u8 {
            let to = match n {
                Next::On => i + 1,
                Next::Accept => accept,
                Next::Drop => drop,
                Next::Found => found,
            };
            u8::try_from(to - i - 1).expect("a short jump")
        };
        let mut out: Vec<libc::sock_filter> = self
            .code
            .iter()
            .enumerate()
            .map(|(i, &(code, t, f, k))| libc::sock_filter {
                code,
                jt: at(i, t),
                jf: at(i, f),
                k,
            })
            .collect();
        for k in [u32::MAX, 0] {
            out.push(libc::sock_filter {
                code: RET | K,
                jt: 0,
                jf: 0,
                k,
            });
        }
        out
    }
}

/// Attaches the filter to a server shard's socket.
pub fn attach(socket: &impl AsRawFd) -> io::Result<()> {
    let code = Program::build();
    let prog = libc::sock_fprog {
        len: code.len() as u16,
        filter: code.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: a valid descriptor; `prog` points at `code`, alive for the
    // call (the kernel copies the program).
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ufrags_carry_their_tag() {
        for _ in 0..1000 {
            let u = ufrag();
            assert_eq!(u.len(), UFRAG);
            assert!(u.bytes().all(|b| b.is_ascii_alphanumeric()));
            assert!(tagged(u.as_bytes()));
            let mut forged = u.clone().into_bytes();
            forged[0] ^= 1;
            assert!(!tagged(&forged), "{u}");
        }
    }

    /// The program, run by the kernel on datagrams over loopback: made-up
    /// usernames never reach the socket; ours and everything else do.
    #[test]
    fn the_kernel_drops_made_up_usernames() {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        attach(&server).unwrap();
        server
            .set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = server.local_addr().unwrap();
        let request = |username: &str, before: usize| {
            let mut attrs = Vec::new();
            for _ in 0..before {
                attrs.extend_from_slice(&[0x80, 0x2a, 0, 5, 1, 2, 3, 4, 5, 0, 0, 0]);
            }
            let n = username.len() as u16;
            attrs.extend_from_slice(&[0, 6]);
            attrs.extend_from_slice(&n.to_be_bytes());
            attrs.extend_from_slice(username.as_bytes());
            attrs.resize(attrs.len().div_ceil(4) * 4, 0);
            let mut m = vec![0, 1];
            m.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
            m.extend_from_slice(&0x2112_a442u32.to_be_bytes());
            m.extend_from_slice(&[7; 12]);
            m.extend_from_slice(&attrs);
            m
        };
        let passes = |datagram: &[u8]| {
            client.send_to(datagram, to).unwrap();
            let mut buf = [0u8; 2048];
            match server.recv(&mut buf) {
                Ok(n) => {
                    assert_eq!(&buf[..n], datagram);
                    true
                }
                Err(_) => false,
            }
        };
        let ours = format!("{}:theirs", ufrag());
        assert!(passes(&request(&ours, 0)));
        assert!(passes(&request(&ours, 3)), "USERNAME fourth");
        assert!(!passes(&request(&ours, 4)), "USERNAME fifth");
        assert!(!passes(&request("made0up0abcdefgh:theirs", 0)));
        assert!(!passes(&request(&ours[..16], 0)), "no colon");
        let mut no_username = request(&ours, 0);
        no_username[21] = 7;
        assert!(!passes(&no_username));
        // A Binding response, DTLS and SCTP-looking datagrams: the shard's.
        let mut response = request("x", 0);
        response[0] = 1;
        assert!(passes(&response));
        assert!(passes(&[22, 254, 253, 0, 0]));
        assert!(passes(&[0x40; 64]));
    }
}

//! What an anonymous peer can make hato do, tried over real sockets: each
//! test is one attack, with the bound that holds it (docs/security.md).
//! Part of the `server` test binary (one binary: the WebRTC stack is
//! heavy to link).

use super::*;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::Ordering::Relaxed;

/// Waits up to `limit` until `done` holds; fails naming `what`.
async fn eventually(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let until = tokio::time::Instant::now() + limit;
    while !done() {
        assert!(tokio::time::Instant::now() < until, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connects by hand, answers with the client engine's answer stripped of
/// its candidates, and forgets the client peer: hato has an answer, and
/// nothing on the other side ever answers its checks — the shape of a
/// peer that aims hato's checks at someone else.
async fn silent_answerer(s: &Server, channel: &str) -> RawWs {
    let (mut ws, offer) = offer_for(
        &s.signaling_url(),
        json!({"type": "connect", "role": "recvonly", "channel_id": channel}),
    )
    .await;
    let (peer, answer, _events) = hato::client::default_engine()
        .answer(offer["sdp"].as_str().unwrap())
        .await
        .unwrap();
    peer.vanish();
    let answer: String = answer
        .lines()
        .filter(|l| !l.starts_with("a=candidate"))
        .map(|l| format!("{l}\r\n"))
        .collect();
    ws.send(text(json!({"type": "answer", "sdp": answer})))
        .await
        .unwrap();
    ws
}

/// A peer whose answer leads nowhere is checked for 12 s at most
/// (`CHECKING_LIMIT`), not for the 30 s a connected peer may stay silent,
/// and not until the establish timeout: then its session ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_to_a_silent_answerer_end_at_the_checking_limit() {
    let s = server_with(|c| c.establish_timeout_ms = 60_000).await;
    let mut ws = silent_answerer(&s, "checking-limit").await;
    // Still checking at 10 s; ended within the next 10 (`close_of`).
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(live_peers(&s), 1, "ended before 10 s");
    let (code, reason) = close_of(&mut ws).await;
    assert_eq!(code, 1000, "{reason}");
    assert!(
        reason.contains("no ICE candidate pair worked within 12 s"),
        "{reason}"
    );
}

/// The close frame a raw WebSocket receives next (skipping other frames).
async fn close_of<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> (u16, String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::time::timeout(T, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(f)))) => {
                    return (u16::from(f.code), f.reason.to_string())
                }
                Some(Ok(_)) => continue,
                other => panic!("no close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("closed in time")
}

/// A peer that names a third party's address in its candidates makes
/// hato check it at most at the per-peer pace, never names a refused
/// address successfully, and is ended once over the candidate cap; a
/// bystander in the channel keeps getting pushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candidates_are_filtered_paced_and_capped() {
    let s = server().await;
    let stats = s.shared.engine.stats();
    let mut bystander = connected(&opts(&s, "cand", "recvonly")).await;
    // The "third party": every 127.0.x.y on one port, counting.
    let third = tokio::net::UdpSocket::bind("0.0.0.0:0").await.unwrap();
    let port = third.local_addr().unwrap().port();
    let counted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = {
        let counted = counted.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while third.recv_from(&mut buf).await.is_ok() {
                counted.fetch_add(1, Relaxed);
            }
        })
    };
    let mut ws = silent_answerer(&s, "cand").await;
    let cand = |transport: &str, ip: &str| {
        text(json!({"type": "candidate", "candidate":
            format!("candidate:7 1 {transport} 2122260223 {ip} {port} typ host")}))
    };
    let refused_before = stats.refused_candidates.load(Relaxed);
    for (transport, ip) in [
        ("udp", "0.0.0.0"),
        ("udp", "224.0.0.1"),
        ("udp", "255.255.255.255"),
        ("udp", "169.254.1.1"),
        ("tcp", "127.0.0.9"),
        ("udp", "a1b2c3.local"),
    ] {
        ws.send(cand(transport, ip)).await.unwrap();
    }
    let started = std::time::Instant::now();
    for i in 0..50u32 {
        let ip = format!("127.0.{}.{}", 1 + i / 200, 2 + i % 200);
        ws.send(cand("udp", &ip)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let n = counted.load(Relaxed);
    let seconds = started.elapsed().as_secs() as usize + 1;
    let (burst, per_second) = hato_datachannel::PEER_CHECKS;
    let most = burst as usize + per_second as usize * seconds;
    assert!(
        (1..=most).contains(&n),
        "{n} datagrams to the third party in {seconds} s (pace: at most {most})"
    );
    assert!(stats.paced_checks.load(Relaxed) > 0);
    assert_eq!(stats.refused_candidates.load(Relaxed) - refused_before, 6);
    // 56 so far; the 65th ends the session.
    for i in 0..9u32 {
        ws.send(cand("udp", &format!("127.0.9.{}", 1 + i)))
            .await
            .unwrap();
    }
    assert_eq!(
        close_of(&mut ws).await,
        (
            4490,
            "TOO-MANY-CANDIDATES: more than 64 remote candidates".into()
        )
    );
    // Counted apart, in hato_disconnects_total{reason="TOO-MANY-CANDIDATES"}.
    let ended = s
        .shared
        .metrics
        .disconnects
        .get_or_create(&hato::metrics::Reason {
            reason: "TOO-MANY-CANDIDATES".into(),
        })
        .clone();
    eventually(T, "the capped session not counted", || ended.get() == 1).await;
    assert_eq!(
        still_served(&s, &mut bystander, "cand").await,
        Via::WebSocket
    );
    counter.abort();
}

/// --refuse-private-candidates refuses candidates in private ranges;
/// without it (the default: peers on a LAN need them) they are checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_candidates_are_refused_only_when_asked() {
    for refuse in [false, true] {
        let s = server_with(|c| c.refuse_private_candidates = refuse).await;
        let stats = s.shared.engine.stats();
        let mut ws = silent_answerer(&s, "private").await;
        let before = stats.refused_candidates.load(Relaxed);
        for ip in [
            "10.1.2.3",
            "192.168.1.1",
            "172.16.0.9",
            "100.64.0.1",
            "198.51.100.7",
        ] {
            ws.send(text(json!({"type": "candidate", "candidate":
                format!("candidate:7 1 udp 2122260223 {ip} 9 typ host")})))
                .await
                .unwrap();
        }
        let expected = if refuse { 4 } else { 0 };
        eventually(T, "private candidates not refused", || {
            stats.refused_candidates.load(Relaxed) - before >= expected
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            stats.refused_candidates.load(Relaxed) - before,
            expected,
            "--refuse-private-candidates {refuse}"
        );
    }
}

/// Candidates in an answer SDP count, and a refused one is taken out of
/// it; a peer whose answer carries more than the cap is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candidates_in_the_answer_are_filtered_and_counted() {
    // The client engine's answer carries two candidates (components 1, 2).
    let s = server_with(|c| c.max_remote_candidates = 4).await;
    let stats = s.shared.engine.stats();
    let before = stats.refused_candidates.load(Relaxed);
    let extra = |n: usize| -> String {
        (0..n)
            .map(|i| format!("a=candidate:{i} 1 udp 1 0.0.0.0 {} typ host\r\n", 9 + i))
            .collect()
    };
    // Two refused candidates beside the client's own two: connects.
    let o = with_answer_lines(&s, "ans", &extra(2));
    let mut c = connected(&o).await;
    assert_eq!(stats.refused_candidates.load(Relaxed) - before, 2);
    assert_eq!(still_served(&s, &mut c, "ans").await, Via::WebSocket);
    // Three: over the cap.
    let o = with_answer_lines(&s, "ans", &extra(3));
    let mut c = Client::connect(&o).await.unwrap();
    expect_ws_close(
        &mut c,
        4490,
        "TOO-MANY-CANDIDATES: more than 4 remote candidates",
    )
    .await;
}

/// Options whose answer carries `lines` after its own candidate.
fn with_answer_lines(s: &Server, channel: &str, lines: &str) -> ClientOptions {
    let mut o = opts(s, channel, "recvonly");
    o.engine = hato_datachannel::Engine::start(hato_datachannel::EngineConfig::client()).unwrap();
    o.extra_answer_lines = lines.to_owned();
    o
}

/// One IPv4/UDP datagram from `src` (any address: a forged source) to
/// `dst`, through a raw socket (needs CAP_NET_RAW, which the test command
/// has: it runs as root for its network namespaces).
fn forge_udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) {
    let len = 20 + 8 + payload.len();
    let mut p = Vec::with_capacity(len);
    p.extend_from_slice(&[
        0x45,
        0,
        (len >> 8) as u8,
        len as u8,
        0,
        0,
        0x40,
        0,
        64,
        17,
        0,
        0,
    ]);
    p.extend_from_slice(&src.ip().octets());
    p.extend_from_slice(&dst.ip().octets());
    p.extend_from_slice(&src.port().to_be_bytes());
    p.extend_from_slice(&dst.port().to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]); // no UDP checksum (IPv4 allows it)
    p.extend_from_slice(payload);
    // SAFETY: a raw socket, one sendto of an owned buffer, closed after.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
        assert!(
            fd >= 0,
            "a raw socket needs CAP_NET_RAW (run the tests as root, as tests/run does): {}",
            std::io::Error::last_os_error()
        );
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(*dst.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let sent = libc::sendto(
            fd,
            p.as_ptr().cast(),
            p.len(),
            0,
            (&to as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        assert_eq!(sent, p.len() as isize, "forged datagram not sent: {err}");
    }
}

/// A STUN Binding request with `username` (hato's ufrag from an offer,
/// `:`, the peer's) signed with `pwd`: valid for that peer, whoever sends
/// it.
fn binding_request(username: &str, pwd: &str, padding: usize) -> Vec<u8> {
    use rtc::stun::attributes::{AttrType, ATTR_USERNAME};
    use rtc::stun::integrity::MessageIntegrity;
    use rtc::stun::message::{Message as Stun, Setter, TransactionId, BINDING_REQUEST};
    use rtc::stun::textattrs::TextAttribute;
    struct Pad(usize);
    impl Setter for Pad {
        fn add_to(&self, m: &mut Stun) -> Result<(), rtc::shared::error::Error> {
            if self.0 > 0 {
                m.add(AttrType(0x8050), &vec![0u8; self.0]);
            }
            Ok(())
        }
    }
    let crypto = rtc::crypto::default_provider().unwrap();
    let mut m = Stun::new();
    m.build(&[
        Box::new(BINDING_REQUEST),
        Box::new(TransactionId::new()),
        Box::new(TextAttribute::new(ATTR_USERNAME, username.to_owned())),
        Box::new(Pad(padding)),
        Box::new(MessageIntegrity::new_short_term_integrity_with_provider(
            pwd.into(),
            crypto.crypto(),
        )),
    ])
    .unwrap();
    m.raw.clone()
}

fn sdp_attr<'a>(sdp: &'a str, name: &str) -> &'a str {
    sdp.lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} in {sdp}"))
        .trim()
}

/// Peer A forges a Binding request, valid for A, from the address of
/// connected peer V. The address stays V's: V's next message (a
/// `disconnect` on its DataChannel) still reaches V's session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_source_cannot_take_a_live_peers_address() {
    let s = server_with(|c| c.rtc_shards = 1).await;
    let mut v = switched_client(&s, "victim", true).await;
    let a = connected(&opts(&s, "attacker", "recvonly")).await;
    let a_sdp = a.offer["sdp"].as_str().unwrap();
    let request = binding_request(
        &format!("{}:x", sdp_attr(a_sdp, "a=ice-ufrag:")),
        sdp_attr(a_sdp, "a=ice-pwd:"),
        0,
    );
    // V's address: the one candidate of its answer.
    let line = v
        .answer
        .lines()
        .find(|l| l.starts_with("a=candidate"))
        .unwrap()
        .to_owned();
    let fields: Vec<&str> = line.split_whitespace().collect();
    let v_addr = SocketAddrV4::new(fields[4].parse().unwrap(), fields[5].parse().unwrap());
    let SocketAddr::V4(hato) = s.rtc_addrs()[0] else {
        panic!()
    };
    for _ in 0..3 {
        forge_udp(v_addr, hato, &request);
    }
    let stats = s.shared.engine.stats();
    eventually(T, "forged requests not seen", || {
        stats.refused_moves.load(Relaxed) >= 3
    })
    .await;
    assert_eq!(still_served(&s, &mut v, "victim").await, Via::DataChannel);
    v.send_dc(
        "signaling",
        r#"{"type":"disconnect","reason":"NO-ERROR"}"#,
        true,
    );
    eventually(
        Duration::from_secs(3),
        "V's disconnect went elsewhere: its address was taken",
        || s.table().len() == 1,
    )
    .await;
}

/// Binding requests with made-up usernames are dropped by the kernel
/// before hato reads them; a request naming a real ufrag, and datagrams
/// that are not Binding requests, still reach the shard, which judges them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_usernames_never_reach_the_shard() {
    let s = server_with(|c| c.rtc_shards = 1).await;
    let live = connected(&opts(&s, "junk", "recvonly")).await;
    let sdp = live.offer["sdp"].as_str().unwrap();
    let ufrag = sdp_attr(sdp, "a=ice-ufrag:").to_owned();
    let junk = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let hato = s.rtc_addrs()[0];
    // Usernames of a server ufrag's shape: 16 characters, then the peer's.
    for i in 0..1000u64 {
        let username = format!("{:016x}:x", i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        junk.send_to(&binding_request(&username, "pwd", 0), hato)
            .unwrap();
    }
    // The live peer's ufrag with a wrong password: the shard's to refuse.
    junk.send_to(&binding_request(&format!("{ufrag}:x"), "wrong", 0), hato)
        .unwrap();
    // DTLS-looking junk: only the shard knows no peer has this address.
    for _ in 0..10 {
        junk.send_to(
            &[23, 254, 253, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 1, 2, 3, 4],
            hato,
        )
        .unwrap();
    }
    let stats = s.shared.engine.stats();
    eventually(T, "DTLS-looking junk not counted", || {
        stats.dropped_unknown.load(Relaxed) >= 10
    })
    .await;
    // Sent before the DTLS junk on the same socket pair: had the 1 000
    // reached the shard, they would have been counted first.
    assert_eq!(stats.dropped_unknown.load(Relaxed), 10);
    eventually(T, "the real ufrag's request not judged", || {
        stats.dropped_integrity.load(Relaxed) >= 1
    })
    .await;
    drop(live);
}

/// Datagrams that come before the answer are held up to a byte bound:
/// 40 datagrams of 30 000 bytes from an address that proved itself hold
/// nothing, and small ones stop at 16 KiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_datagrams_are_held_within_a_byte_bound() {
    let s = server().await;
    let stats = s.shared.engine.stats();
    let (ws, offer) = offer_for(
        &s.signaling_url(),
        json!({"type": "connect", "role": "recvonly", "channel_id": "early"}),
    )
    .await;
    let sdp = offer["sdp"].as_str().unwrap();
    let port = sdp_attr(sdp, "a=candidate:")
        .split_whitespace()
        .nth(5)
        .unwrap()
        .parse::<u16>()
        .unwrap();
    let hato = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let held = || stats.held_early.load(Relaxed);
    let dropped = || stats.dropped_early.load(Relaxed);
    let (held0, dropped0) = (held(), dropped());
    // Proves the address (and is itself held: no answer yet).
    let request = binding_request(
        &format!("{}:x", sdp_attr(sdp, "a=ice-ufrag:")),
        sdp_attr(sdp, "a=ice-pwd:"),
        0,
    );
    udp.send_to(&request, hato).await.unwrap();
    let mut big = vec![0u8; 30_000];
    big[..3].copy_from_slice(&[23, 254, 253]);
    for _ in 0..40 {
        udp.send_to(&big, hato).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let small = &big[..1000];
    for _ in 0..40 {
        udp.send_to(small, hato).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    eventually(T, "not all 81 datagrams held or dropped", || {
        held() + dropped() - held0 - dropped0 >= 81
    })
    .await;
    let max_small = hato_datachannel::EARLY_BYTES / 1000;
    assert!(
        held() - held0 <= 1 + max_small as u64,
        "held {} datagrams",
        held() - held0
    );
    assert!(stats.held_bytes.load(Relaxed) <= hato_datachannel::EARLY_BYTES as u64);
    drop(ws);
    eventually(T, "held bytes not given back", || {
        stats.held_bytes.load(Relaxed) == 0
    })
    .await;
}

/// 1 000 TCP connections from one address that send nothing take that
/// address's share of the handshake places and no more: another address
/// connects at once, the same one gets a clear 503, and the idle sockets
/// are closed after the first-byte timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_from_one_address_lock_out_no_one() {
    let s = server().await;
    let mut idle = Vec::new();
    for _ in 0..1000 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        idle.push(sock.connect(s.signaling_addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, _, ws) = upgrade_from(&s, "127.0.0.2").await;
    assert_eq!(status, 101);
    let mut ws = ws.unwrap();
    ws.send(text(
        json!({"type": "connect", "role": "recvonly", "channel_id": "idle"}),
    ))
    .await
    .unwrap();
    assert!(next_ws_text(&mut ws, "\"offer\"").await.is_some());
    let (status, body, _) = upgrade_from(&s, "127.0.0.1").await;
    assert_eq!(status, 503);
    assert!(
        body.contains("TOO-MANY-HANDSHAKES") && body.contains("--max-handshakes-per-ip"),
        "{body}"
    );
    // Closed after the first-byte timeout (2 s), so the address is served
    // again.
    let (closed, _) = closed_within(&mut idle[999], T).await;
    assert!(closed);
    let (closed, _) = closed_within(&mut idle[0], T).await;
    assert!(closed);
    drop(idle);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, _, _) = upgrade_from(&s, "127.0.0.1").await;
    assert_eq!(status, 101);
}

/// A WebSocket upgraded by hand over plain TCP: the request written and
/// hato's 101 read, nothing after it (a frame is the test's to write).
async fn upgraded_by_hand(s: &Server) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(s.signaling_addr)
        .await
        .unwrap();
    let upgrade = format!(
        "GET /signaling HTTP/1.1\r\nhost: {}\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n",
        s.signaling_addr
    );
    tcp.write_all(upgrade.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    while !answer.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8];
        tcp.read_exact(&mut byte).await.unwrap();
        answer.push(byte[0]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 101"), "{answer:?}");
    tcp
}

/// A frame whose header announces more than may come before `connect` is
/// refused from its header: the connection is closed at once, not when
/// the bytes have come (or the connect timeout has passed), and nothing
/// is reserved for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_announcing_too_much_before_connect_is_refused_from_its_header() {
    use tokio::io::AsyncWriteExt;
    let s = server().await;
    let mut tcp = upgraded_by_hand(&s).await;
    // A masked text frame of 1 MiB: its header and the first few bytes.
    let mut frame = vec![0x81, 0xff];
    frame.extend_from_slice(&(1u64 << 20).to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(br#"{"type":"connect","metadata":["#);
    tcp.write_all(&frame).await.unwrap();
    // Well within the 10 s connect timeout.
    let (closed, got) = closed_within(&mut tcp, Duration::from_secs(3)).await;
    assert!(closed, "still open 3 s after announcing 1 MiB: {got:?}");
    assert!(got.contains("more bytes before connect"), "{got:?}");
}

/// After hato's Close, a client that keeps sending instead of closing is
/// read for at most 16 messages and dropped — not read until the close
/// timeout (2 s) runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_on_after_the_close_is_dropped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = server().await;
    let mut tcp = upgraded_by_hand(&s).await;
    let mut got = vec![0u8; 4096];
    let mut seen = Vec::new();
    // Masked (with the zero mask) text frames under 126 bytes.
    let frame = |text: &str| {
        let mut f = vec![0x81, 0x80 | text.len() as u8, 0, 0, 0, 0];
        f.extend_from_slice(text.as_bytes());
        f
    };
    tcp.write_all(&frame(
        r#"{"type":"connect","role":"nobody","channel_id":"c"}"#,
    ))
    .await
    .unwrap();
    // hato's Close (4490, a bad role).
    while !String::from_utf8_lossy(&seen).contains("role must be") {
        let n = tokio::time::timeout(T, tcp.read(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "closed before the Close: {:?}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&got[..n]);
    }
    // Candidates instead of a Close.
    let started = std::time::Instant::now();
    let mut flood = Vec::new();
    for i in 0..100 {
        flood.extend(frame(&format!(
            r#"{{"type":"candidate","candidate":"{i}"}}"#
        )));
    }
    let _ = tcp.write_all(&flood).await;
    let (closed, _) = closed_within(&mut tcp, Duration::from_millis(1500)).await;
    assert!(
        closed,
        "still read {:?} after hato's Close",
        started.elapsed()
    );
}

/// `metadata` over --connect-metadata-limit is refused with 4490 and a
/// reason; a connect too large for what may come before it is cut off
/// while it is still arriving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_metadata_is_capped() {
    let s = server().await;
    let connect = |metadata: Value| {
        text(
            json!({"type": "connect", "role": "recvonly", "channel_id": "meta", "metadata": metadata}),
        )
    };
    let (code, reason) = refused(&s, vec![connect(json!("x".repeat(70_000)))]).await;
    assert_eq!(
        (code, reason.as_str()),
        (
            4490,
            "metadata is 70002 bytes; at most 65536 (--connect-metadata-limit)"
        )
    );
    // Within the limit: connects.
    let mut o = opts(&s, "meta", "recvonly");
    o.extra
        .insert("metadata".into(), json!({"token": "t".repeat(60_000)}));
    connected(&o).await;
    // 300 KB: the connection is closed before the frame is whole.
    let (mut ws, _) = tokio_tungstenite::connect_async(s.signaling_url())
        .await
        .unwrap();
    let _ = ws.send(connect(json!("y".repeat(300_000)))).await;
    let got = tokio::time::timeout(T, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(f))) => return Some(f),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .expect("closed in time");
    if let Some(Some(f)) = got {
        assert_eq!(u16::from(f.code), 4490);
        assert!(f.reason.contains("before connect"), "{}", f.reason);
    }
}

/// VmHWM (peak resident) and VmRSS of a process, in bytes.
fn memory_of(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap()
            * 1024
    };
    (kb("VmHWM:"), kb("VmRSS:"))
}

/// 1 000 anonymous WebSockets from 1 000 addresses, each sending a
/// `connect` of 1 MiB (metadata `[0,0,0,…]`), raise the hato process's
/// peak RSS by at most 150 MB; hato still serves a peer afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_megabyte_connects_cost_bounded_memory() {
    use tokio::io::AsyncWriteExt;
    let (child, signaling, _api, _lines) = spawn_hato("", "").await;
    let pid = child.id().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, base) = memory_of(pid);
    let mut payload =
        String::from(r#"{"type":"connect","role":"recvonly","channel_id":"m","metadata":[0"#);
    while payload.len() < 1_000_060 {
        payload.push_str(",0");
    }
    payload.push_str("]}");
    // A masked text frame with the zero mask: the payload as is.
    let mut frame = vec![0x81, 0xff];
    frame.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(payload.as_bytes());
    let frame = std::sync::Arc::new(frame);
    let target: SocketAddr = signaling.parse().unwrap();
    let mut tasks = Vec::new();
    for i in 0..1000u32 {
        let frame = frame.clone();
        tasks.push(tokio::spawn(async move {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            let src = Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8);
            sock.bind(SocketAddr::from((src, 0))).unwrap();
            let Ok(mut tcp) = sock.connect(target).await else {
                return;
            };
            let upgrade = format!(
                "GET /signaling HTTP/1.1\r\nhost: {target}\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
            );
            let _ = tcp.write_all(upgrade.as_bytes()).await;
            let _ = tokio::time::timeout(T, tcp.write_all(&frame)).await;
            let _ = closed_within(&mut tcp, T).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (peak, _) = memory_of(pid);
    let grew = peak.saturating_sub(base);
    eprintln!(
        "1000 x 1 MiB connects: RSS {} MB before, peak {} MB (+{} MB)",
        base >> 20,
        peak >> 20,
        grew >> 20
    );
    assert!(grew <= 150 << 20, "peak RSS grew {} MB", grew >> 20);
    let o = ClientOptions::new(&format!("ws://{signaling}/signaling"), "m", "recvonly");
    connected(&o).await;
    drop(child);
}

/// DTLS records of the next epoch that come while hato's handshake waits
/// are queued within 32 records and 16 KiB (patched rtc-dtls; unpatched,
/// each was kept until the handshake ended, up to the establish
/// timeout). The attacker is a peer of its own: it answers with
/// `a=setup:passive`, answers hato's ICE checks, and once hato's
/// ClientHello shows that ICE is up, sends 20 000 records of 1 000 bytes
/// of epoch 1 instead of a ServerHello. hato's RSS stays where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_epoch_dtls_records_are_queued_within_a_bound() {
    use rtc::stun::fingerprint::FINGERPRINT;
    use rtc::stun::integrity::MessageIntegrity;
    use rtc::stun::message::{Message as Stun, BINDING_REQUEST, BINDING_SUCCESS};
    use rtc::stun::xoraddr::XorMappedAddress;
    const PWD: &str = "attackerpasswordattackerpw";
    let (child, signaling, _, _lines) = spawn_hato("", "").await;
    let pid = child.id().unwrap();
    let (mut ws, offer) = offer_for(
        &format!("ws://{signaling}/signaling"),
        json!({"type": "connect", "role": "recvonly", "channel_id": "epoch"}),
    )
    .await;
    let sdp = offer["sdp"].as_str().unwrap();
    let fields: Vec<&str> = sdp_attr(sdp, "a=candidate:").split_whitespace().collect();
    let hato = SocketAddr::new(fields[4].parse().unwrap(), fields[5].parse().unwrap());
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = udp.local_addr().unwrap();
    let candidate = format!(
        "a=candidate:1 1 udp 2130706431 127.0.0.1 {} typ host",
        me.port()
    );
    let answer =
        hato::client::hand_made_answer(PWD, "passive", &["a=max-message-size:262144", &candidate]);
    ws.send(text(json!({"type": "answer", "sdp": answer})))
        .await
        .unwrap();
    // Check hato (which binds this address to the peer), and answer its
    // checks until its ClientHello comes: ICE is up.
    let request = binding_request(
        &format!("{}:attk", sdp_attr(sdp, "a=ice-ufrag:")),
        sdp_attr(sdp, "a=ice-pwd:"),
        0,
    );
    udp.send_to(&request, hato).await.unwrap();
    let crypto = rtc::crypto::default_provider().unwrap();
    let mut buf = vec![0u8; 2048];
    tokio::time::timeout(T, async {
        loop {
            let (n, from) = udp.recv_from(&mut buf).await.unwrap();
            if buf[0] == 22 {
                return;
            }
            let mut request = Stun::new();
            if request.unmarshal_binary(&buf[..n]).is_err() || request.typ != BINDING_REQUEST {
                continue;
            }
            let mut response = Stun::new();
            response
                .build(&[
                    Box::new(BINDING_SUCCESS),
                    Box::new(request.transaction_id),
                    Box::new(XorMappedAddress {
                        ip: from.ip(),
                        port: from.port(),
                    }),
                    Box::new(MessageIntegrity::new_short_term_integrity_with_provider(
                        PWD.into(),
                        crypto.crypto(),
                    )),
                    Box::new(FINGERPRINT),
                ])
                .unwrap();
            udp.send_to(&response.raw, from).await.unwrap();
        }
    })
    .await
    .expect("hato's ClientHello: ICE up");
    let (_, before) = memory_of(pid);
    let mut record = vec![23, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 0];
    record.extend_from_slice(&1000u16.to_be_bytes());
    record.extend_from_slice(&[0x5a; 1000]);
    for seq in 0..20_000u32 {
        record[7..11].copy_from_slice(&seq.to_be_bytes());
        udp.send_to(&record, hato).await.unwrap();
        if seq % 200 == 199 {
            // Within the socket's receive buffer.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, after) = memory_of(pid);
    eprintln!(
        "20 000 next-epoch records: RSS {} KB -> {} KB",
        before >> 10,
        after >> 10
    );
    assert!(
        after.saturating_sub(before) < 4 << 20,
        "RSS grew {} KB",
        (after - before) >> 10
    );
    let o = ClientOptions::new(&format!("ws://{signaling}/signaling"), "epoch", "recvonly");
    connected(&o).await;
    drop(ws);
    drop(child);
}

/// An API connection that sends nothing is closed at the header timeout
/// (the clock runs from accept), not after the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_api_connection_is_closed_at_the_header_timeout() {
    let s = server_with(|c| {
        c.api_header_timeout_ms = 300;
        c.api_idle_timeout_ms = 60_000;
    })
    .await;
    let mut silent = tokio::net::TcpStream::connect(s.api_addr).await.unwrap();
    let (closed, got) = closed_within(&mut silent, T).await;
    assert!(closed && got.is_empty(), "{got:?}");
}

/// One address holds at most --api-max-connections-per-ip of the API's
/// places: 2 000 silent sockets from it leave the API to everyone else,
/// and the same address gets a clear 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_api_place() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = server().await;
    let api = s.api_addr;
    let from = |source: &'static str| async move {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
        sock.connect(api).await.unwrap()
    };
    let mut silent = Vec::new();
    for _ in 0..2000 {
        silent.push(from("127.0.0.3").await);
    }
    let push = b"POST / HTTP/1.1\r\nhost: hato\r\nx-sora-target: Sora_20160711.PushChannel\r\ncontent-length: 30\r\nconnection: close\r\n\r\n{\"channel_id\":\"api\",\"data\":{}}";
    let answer = |mut tcp: tokio::net::TcpStream| async move {
        tcp.write_all(push).await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(T, tcp.read_to_end(&mut got)).await;
        String::from_utf8_lossy(&got).into_owned()
    };
    let other = answer(from("127.0.0.4").await).await;
    assert!(other.starts_with("HTTP/1.1 200"), "{other}");
    let same = answer(from("127.0.0.3").await).await;
    assert!(
        same.starts_with("HTTP/1.1 503") && same.contains("--api-max-connections-per-ip"),
        "{same}"
    );
    // Counted: hato_drops_total{reason="refused_api_connection"}.
    assert!(s.shared.api_admission.refused.load(Relaxed) >= 1);
}

/// The metrics listener serves a bounded number of connections, each for
/// a bounded time: the one over the cap is closed at once, and the idle
/// ones are closed in time for a scrape to get through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_listener_is_capped_and_timed() {
    let s = server_with(|c| c.metrics_addr = Some("127.0.0.1:0".parse().unwrap())).await;
    let addr = s.metrics_addr.unwrap();
    let mut idle = Vec::new();
    for _ in 0..hato::metrics::METRICS_MAX_CONNECTIONS {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut over = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (closed, _) = closed_within(&mut over, Duration::from_secs(2)).await;
    assert!(closed, "the connection over the cap was kept");
    let limit = hato::metrics::METRICS_CONNECTION_TIME + Duration::from_secs(3);
    let (closed, _) = closed_within(&mut idle[0], limit).await;
    assert!(closed, "an idle metrics connection was kept");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, body) = get(&addr.to_string(), "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("hato_"));
}

/// A 50 KB `role` is not echoed into the log whole: every line the
/// process writes stays under the line limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_field_does_not_make_a_huge_log_line() {
    let (child, signaling, _api, mut lines) = spawn_hato("", "").await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{signaling}/signaling"))
        .await
        .unwrap();
    ws.send(text(
        json!({"type": "connect", "role": "r".repeat(50_000), "channel_id": "log"}),
    ))
    .await
    .unwrap();
    let (code, reason) = close_of(&mut ws).await;
    assert_eq!(code, 4490);
    assert!(reason.starts_with("role must be"), "{reason}");
    let mut refused_line = false;
    while let Ok(Some(line)) = tokio::time::timeout(Duration::from_secs(1), lines.recv()).await {
        assert!(
            line.len() <= hato::logging::MAX_LINE,
            "a {} byte log line",
            line.len()
        );
        refused_line |= line.contains("connect refused");
    }
    assert!(refused_line);
    drop(child);
}

/// --print-config shows no secret of a URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn print_config_masks_the_secrets_in_urls() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_hato"))
        .args([
            "--print-config",
            "--cluster-nats-url",
            "nats://alice:s3cret@127.0.0.1:4222,nats://tok3n@127.0.0.2:4222",
            "--auth-webhook-url",
            "http://bob:pa55@127.0.0.1:9/auth?key=k3y",
            "--api-token",
            "t0ken",
        ])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains(
            r#"cluster_nats_url = "nats://<set>@127.0.0.1:4222,nats://<set>@127.0.0.2:4222""#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"auth_webhook_url = "http://<set>@127.0.0.1:9/auth?<set>""#),
        "{text}"
    );
    for secret in ["s3cret", "tok3n", "pa55", "k3y", "t0ken"] {
        assert!(!text.contains(secret), "{secret} printed:\n{text}");
    }
}

/// The upgrade's status when `source` (a loopback address) sends
/// `X-Forwarded-For: forwarded`; the WebSocket, held open, when 101.
async fn upgrade_forwarded(
    s: &Server,
    source: &str,
    forwarded: &str,
) -> (
    u16,
    Option<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>>,
) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let tcp = sock.connect(s.signaling_addr).await.unwrap();
    let mut req = s.signaling_url().into_client_request().unwrap();
    req.headers_mut()
        .insert("x-forwarded-for", forwarded.parse().unwrap());
    match tokio_tungstenite::client_async(req, tcp).await {
        Ok((ws, resp)) => (resp.status().as_u16(), Some(ws)),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => (resp.status().as_u16(), None),
        Err(e) => panic!("{e}"),
    }
}

/// Behind a trusted proxy, the per-address handshake limit counts the
/// client X-Forwarded-For names (its rightmost untrusted hop), so that
/// one busy proxy is not one address; from anyone else the header counts
/// for nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxy_forwards_the_address_that_is_counted() {
    let s = server_with(|c| {
        c.trusted_proxy = vec!["127.0.0.1".parse().unwrap()];
        c.max_handshakes_per_ip = 2;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let (status, ws) = upgrade_forwarded(&s, "127.0.0.1", "198.51.100.1").await;
        assert_eq!(status, 101);
        held.push(ws);
    }
    // The same client again, also when it claims an address of its own
    // to the left.
    for forwarded in ["198.51.100.1", "203.0.113.9, 198.51.100.1, 127.0.0.1"] {
        let (status, _) = upgrade_forwarded(&s, "127.0.0.1", forwarded).await;
        assert_eq!(status, 503, "{forwarded}");
    }
    // Other clients through the same proxy.
    for forwarded in ["198.51.100.2", "2001:db8::1"] {
        let (status, ws) = upgrade_forwarded(&s, "127.0.0.1", forwarded).await;
        assert_eq!(status, 101, "{forwarded}");
        held.push(ws);
    }
    // Not a trusted proxy: its own address counts, whatever it forwards.
    for (i, want) in [101, 101, 503].into_iter().enumerate() {
        let (status, ws) =
            upgrade_forwarded(&s, "127.0.0.2", &format!("198.51.100.{}", 10 + i)).await;
        assert_eq!(status, want, "untrusted #{i}");
        held.push(ws);
    }
}

/// A WebSocket upgrade over a TCP connection from `source` that first
/// writes `prefix` (a PROXY header): the upgrade's status, or 0 when the
/// connection closed without an answer.
async fn upgrade_after(
    s: &Server,
    source: &str,
    prefix: &[u8],
) -> (
    u16,
    Option<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>>,
) {
    use tokio::io::AsyncWriteExt;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut tcp = sock.connect(s.signaling_addr).await.unwrap();
    tcp.write_all(prefix).await.unwrap();
    match tokio_tungstenite::client_async(s.signaling_url(), tcp).await {
        Ok((ws, resp)) => (resp.status().as_u16(), Some(ws)),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => (resp.status().as_u16(), None),
        Err(_) => (0, None),
    }
}

/// With --proxy-protocol, a trusted proxy's PROXY header (v1 or v2)
/// names the client the per-address limits count; a connection from it
/// without a valid header is closed; from anyone else a header is not
/// read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxys_proxy_header_names_the_client() {
    let s = server_with(|c| {
        c.trusted_proxy = vec!["127.0.0.1".parse().unwrap()];
        c.proxy_protocol = true;
    })
    .await;
    let v1 = |client: &str| format!("PROXY TCP4 {client} 127.0.0.1 40000 5000\r\n").into_bytes();
    let mut held = Vec::new();
    for _ in 0..16 {
        let (status, ws) = upgrade_after(&s, "127.0.0.1", &v1("203.0.113.9")).await;
        assert_eq!(status, 101);
        held.push(ws);
    }
    let (status, _) = upgrade_after(&s, "127.0.0.1", &v1("203.0.113.9")).await;
    assert_eq!(status, 503, "the 17th handshake of 203.0.113.9");
    // Version 2, naming the same client: refused too; another one is in.
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    v2.extend_from_slice(&[203, 0, 113, 9, 127, 0, 0, 1, 0x9c, 0x40, 0x13, 0x88]);
    let (status, _) = upgrade_after(&s, "127.0.0.1", &v2).await;
    assert_eq!(status, 503, "v2 naming 203.0.113.9");
    v2[19] = 10;
    let (status, _) = upgrade_after(&s, "127.0.0.1", &v2).await;
    assert_eq!(status, 101, "v2 naming 203.0.113.10");
    let (status, _) = upgrade_after(&s, "127.0.0.1", &v1("203.0.113.10")).await;
    assert_eq!(status, 101, "v1 naming 203.0.113.10");
    // The proxy without a header: closed, no answer.
    let (status, _) = upgrade_after(&s, "127.0.0.1", b"").await;
    assert_eq!(status, 0);
    let (status, _) = upgrade_after(&s, "127.0.0.1", b"PROXY TCP4 bogus\r\n").await;
    assert_eq!(status, 0);
    // Counted: hato_drops_total{reason="bad_proxy_header"}.
    let bad = &s.shared.admission.bad_proxy_headers;
    eventually(T, "bad PROXY headers not counted", || {
        bad.load(Relaxed) == 2
    })
    .await;
    // Someone else's header is not read: it is a bad HTTP request.
    let (status, _) = upgrade_after(&s, "127.0.0.2", &v1("203.0.113.11")).await;
    assert_ne!(status, 101);
    let (status, _) = upgrade_after(&s, "127.0.0.2", b"").await;
    assert_eq!(status, 101, "no header needed from a client");
}

/// A member as node `node` would announce it.
fn member(node: &str, connection_id: &str, metadata: Value) -> Value {
    json!({"node": node, "connection_id": connection_id, "client_id": connection_id,
           "bundle_id": connection_id, "channel_id": "k", "session_id": "s",
           "role": "recvonly", "metadata": metadata,
           "created_time": "2026-12-05T00:00:00Z", "datachannel_only": false})
}

/// A stranger on the cluster's NATS posing as node "z" is held to this
/// node's own limits: in its snapshot and in its announcements, a member
/// with an over-long id, metadata over --notify-metadata-limit or another
/// node's name is ignored (the sequence goes on), and so is a node name
/// over 255 bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_holds_other_nodes_to_the_local_limits() {
    let nats = Nats::start().await;
    let a = node(&nats, "a").await;
    let stranger = async_nats::connect(nats.url()).await.unwrap();
    let mut requests = stranger
        .subscribe("hato.snapshot.7a".to_owned())
        .await
        .unwrap();
    let answering = {
        let stranger = stranger.clone();
        let items = vec![
            member("z", "m1", Value::Null),
            member("z", &"x".repeat(300), Value::Null),
            member("z", "big", json!("y".repeat(10_000))),
            member("q", "other", Value::Null),
        ];
        tokio::spawn(async move {
            while let Some(req) = requests.next().await {
                let chunk = json!({"node": "z", "epoch": 1, "seq": 0, "part": 0,
                                   "parts": 1, "items": items});
                if let Some(reply) = req.reply {
                    let _ = stranger.publish(reply, chunk.to_string().into()).await;
                }
            }
        })
    };
    let heartbeats = {
        let stranger = stranger.clone();
        tokio::spawn(async move {
            loop {
                for node in ["z".to_owned(), "n".repeat(300)] {
                    let hb = json!({"t": "heartbeat", "node": node, "epoch": 1, "seq": 0});
                    let _ = stranger
                        .publish("hato.presence", hb.to_string().into())
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    knows_nodes(&a, &["z"]).await;
    channel_count(&a, "k", 1).await;
    for (seq, m) in [
        (1, member("z", "big2", json!("y".repeat(10_000)))),
        (2, member("z", "m2", Value::Null)),
    ] {
        let join = json!({"t": "join", "node": "z", "epoch": 1, "seq": seq, "member": m});
        stranger
            .publish("hato.presence", join.to_string().into())
            .await
            .unwrap();
    }
    stranger.flush().await.unwrap();
    channel_count(&a, "k", 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.table().counts("k").all, 2);
    let refused = a
        .shared
        .cluster
        .as_ref()
        .unwrap()
        .stats
        .refused
        .load(Relaxed);
    assert!(refused >= 5, "{refused} refused");
    knows_nodes(&a, &["z"]).await;
    heartbeats.abort();
    answering.abort();
}

/// The `connection.created`/`destroyed` connection ids `c` has been told
/// of (its own aside), in order, reading for `for_`.
async fn announced(c: &mut Client, for_: Duration) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    let until = tokio::time::Instant::now() + for_;
    while let Ok(Some(ev)) = tokio::time::timeout_at(until, c.next_event(for_)).await {
        if let ClientEvent::Notify { message, .. } = ev {
            let id = message["connection_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if id != c.connection_id {
                let event = message["event_type"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                seen.push((event, id));
            }
        }
    }
    seen
}

/// A channel carries at most --channel-notify-rate `notify` messages a
/// second about joins and leaves: beyond, announcements wait in order,
/// and a peer that joins and leaves while its `connection.created`
/// waits is announced to no one, neither its join nor its leave. A peer
/// whose auth webhook said `signaling_notify: false` hears of no one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_and_leaves_are_announced_within_the_channels_budget() {
    let (url, _) = auth_webhook().await;
    let s = server_with(|c| {
        c.channel_notify_rate = 1;
        c.auth_webhook_url = Some(url);
    })
    .await;
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(connected(&opts(&s, "paced", "recvonly")).await);
    }
    let mut quiet = connected(&with_answer(&s, "paced", "quiet")).await;
    // Three listeners announced: one second of budget (1 message) is
    // spent, and B's announcement to three costs three: from here on,
    // every join and leave waits about a second per listener.
    let b = connected(&opts(&s, "paced", "recvonly")).await;
    let c = connected(&opts(&s, "paced", "recvonly")).await;
    assert!(
        s.shared.table.paced_len() > 0,
        "C's connection.created waits (behind B's, or the budget)"
    );
    let c_id = c.connection_id.clone();
    c.send_ws(r#"{"type":"disconnect","reason":"NO-ERROR"}"#);
    table_len(&s, 5).await;
    // D stays until it is announced, then leaves.
    let d = connected(&opts(&s, "paced", "recvonly")).await;
    let all_sent = || s.shared.table.paced_len() == 0;
    eventually(Duration::from_secs(30), "D announced", all_sent).await;
    d.send_ws(r#"{"type":"disconnect","reason":"NO-ERROR"}"#);
    table_len(&s, 5).await;
    eventually(Duration::from_secs(30), "D's leave announced", all_sent).await;
    let (b_id, d_id) = (b.connection_id.clone(), d.connection_id.clone());
    for l in &mut listeners {
        let seen = announced(l, Duration::from_millis(300)).await;
        let about: Vec<_> = seen
            .iter()
            .filter(|(_, id)| [&b_id, &c_id, &d_id].contains(&id))
            .collect();
        let want = [
            ("connection.created", &b_id),
            ("connection.created", &d_id),
            ("connection.destroyed", &d_id),
        ];
        assert_eq!(
            about,
            want.iter()
                .map(|(e, id)| (e.to_string(), id.to_string()))
                .collect::<Vec<_>>()
                .iter()
                .collect::<Vec<_>>(),
            "C came and went unannounced; B and D in order"
        );
    }
    let heard = announced(&mut quiet, Duration::from_millis(300)).await;
    assert!(
        heard.is_empty(),
        "signaling_notify false hears nothing: {heard:?}"
    );
}

/// Reads until an `offer` comes (true) or `limit` passes (false).
async fn offer_within(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    limit: Duration,
) -> bool {
    tokio::time::timeout(limit, async {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Text(t) = m {
                if t.contains("\"offer\"") {
                    return true;
                }
            }
        }
        false
    })
    .await
    .unwrap_or(false)
}

/// --max-connects-per-ip-per-second: an address's first five seconds'
/// worth of connects go at once; the next wait their turn and then get
/// their offer; one that would wait over 5 s gets 503 TOO-MANY-CONNECTS;
/// another address is not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_addresss_connects_wait_their_turn() {
    let s = server_with(|c| c.max_connects_per_ip_per_second = 1).await;
    let paced = || s.shared.admission.paced.load(Relaxed);
    let connect = text(json!({"type": "connect", "role": "recvonly", "channel_id": "rate"}));
    let mut held = Vec::new();
    for _ in 0..5 {
        let (status, _, ws) = upgrade_from(&s, "127.9.0.1").await;
        assert_eq!(status, 101);
        let mut ws = ws.unwrap();
        ws.send(connect.clone()).await.unwrap();
        assert!(offer_within(&mut ws, T).await, "within the burst: at once");
        held.push(ws);
    }
    assert_eq!(paced(), 0);
    let (status, _, ws) = upgrade_from(&s, "127.9.0.1").await;
    assert_eq!(status, 101);
    let mut sixth = ws.unwrap();
    sixth.send(connect.clone()).await.unwrap();
    assert_eq!(paced(), 1, "the sixth waits its turn");
    // Four more wait 2 to 5 s; the eleventh would wait 6 s.
    for _ in 0..4 {
        let (status, _, ws) = upgrade_from(&s, "127.9.0.1").await;
        assert_eq!(status, 101);
        held.push(ws.unwrap());
    }
    let (status, body, _) = upgrade_from(&s, "127.9.0.1").await;
    assert_eq!(status, 503);
    assert!(body.contains("TOO-MANY-CONNECTS"), "{body}");
    let (status, _, ws) = upgrade_from(&s, "127.9.0.2").await;
    assert_eq!(status, 101);
    let mut other = ws.unwrap();
    other.send(connect.clone()).await.unwrap();
    assert!(offer_within(&mut other, T).await, "another address at once");
    assert!(
        offer_within(&mut sixth, T).await,
        "the sixth, after its wait"
    );
    assert_eq!(paced(), 5);
}

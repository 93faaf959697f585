//! CPU per delivery of webrtc-rs's sans-I/O core alone, with no sockets:
//! N offering peers (set up as hato's shards set them up) and N answering
//! peers in one thread, wired back to back in memory. Each round sends one
//! message on `push` to every peer, the way a PushChannel does; the time
//! spent on each side is measured separately.
//!
//! `cargo run --release -p hato-datachannel --example corebench -- [PEERS] [ROUNDS] [BYTES]`
//!
//! It measures the core, so that a change to it (datachannel/patched) can be
//! judged without the noise of a full load test; hato's own figures are the
//! ones in docs/benchmarks.md.

use bytes::BytesMut;
use rtc::data_channel::RTCDataChannelInit;
use rtc::peer_connection::certificate::{CertificateParams, RTCCertificate};
use rtc::peer_connection::configuration::setting_engine::{
    SctpMaxMessageSize, SettingEngineBuilder,
};
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::event::{RTCDataChannelEvent, RTCPeerConnectionEvent};
use rtc::peer_connection::message::RTCMessage;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::transport::RTCIceCandidateInit;
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const LABELS: [&str; 4] = ["signaling", "notify", "push", "stats"];

struct Side {
    pc: RTCPeerConnection,
    addr: SocketAddr,
    push: Option<rtc::data_channel::RTCDataChannelId>,
    open: usize,
    received: usize,
}

fn pc(
    crypto: &std::sync::Arc<dyn rtc::crypto::RTCCryptoProvider>,
    cert: &RTCCertificate,
    i: usize,
    now: Instant,
) -> RTCPeerConnection {
    let se = SettingEngineBuilder::new()
        .with_crypto_provider(crypto.clone())
        .with_ice_credentials(format!("ufrag{i:011}"), format!("pwd{i:029}"))
        .with_ice_connection_attempts(Some(Duration::from_millis(20)), Some(50))
        .with_host_acceptance_min_wait(Some(Duration::ZERO))
        .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
        .with_sctp_max_message_size(SctpMaxMessageSize::Bounded(262_144))
        .build();
    let configuration = RTCConfigurationBuilder::new()
        .with_certificates(vec![cert.clone()])
        .build();
    RTCPeerConnectionBuilder::new()
        .with_configuration(configuration)
        .with_setting_engine(se)
        .build(now)
        .expect("build")
}

fn candidate(pc: &mut RTCPeerConnection, addr: SocketAddr) {
    let c = format!(
        "candidate:1 1 udp 2130706431 {} {} typ host",
        addr.ip(),
        addr.port()
    );
    pc.add_local_candidate(RTCIceCandidateInit {
        candidate: c,
        ..Default::default()
    })
    .expect("candidate");
    pc.add_local_candidate(RTCIceCandidateInit::default())
        .expect("end of candidates");
}

/// Drains one side: events, reads, then writes into `out` (to the other side).
fn drain(s: &mut Side, out: &mut Vec<BytesMut>) {
    let mut first = true;
    loop {
        let mut progressed = false;
        while let Some(ev) = s.pc.poll_event() {
            progressed = true;
            if let RTCPeerConnectionEvent::OnDataChannel(RTCDataChannelEvent::OnOpen(cid)) = ev {
                s.open += 1;
                if let Some(dc) = s.pc.data_channel(cid) {
                    if dc.label() == "push" {
                        s.push = Some(cid);
                    }
                }
            }
        }
        // As hato's shards do: after a pass that took every write, only an
        // event raised while writing can have left work.
        if !first && !progressed {
            break;
        }
        first = false;
        while let Some(m) = s.pc.poll_read() {
            progressed = true;
            if let RTCMessage::DataChannelMessage(_, _) = m.message {
                s.received += 1;
            }
        }
        while let Some(w) = s.pc.poll_write() {
            progressed = true;
            out.push(w.message);
        }
        if !progressed {
            break;
        }
    }
}

fn feed(s: &mut Side, from: SocketAddr, data: Vec<BytesMut>, now: Instant) {
    for message in data {
        let _ = s.pc.handle_read(TaggedBytesMut {
            now,
            transport: TransportContext {
                local_addr: s.addr,
                peer_addr: from,
                ecn: None,
                transport_protocol: TransportProtocol::UDP,
            },
            message,
        });
    }
}

fn timers(s: &mut Side, now: Instant) {
    if s.pc.poll_timeout().is_some_and(|t| t <= now) {
        let _ = s.pc.handle_timeout(now);
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let peers: usize = args.next().map_or(200, |a| a.parse().expect("PEERS"));
    let rounds: usize = args.next().map_or(200, |a| a.parse().expect("ROUNDS"));
    let bytes: usize = args.next().map_or(150, |a| a.parse().expect("BYTES"));

    let crypto = rtc::crypto::default_provider().expect("crypto");
    let cert = RTCCertificate::generate(
        crypto.crypto(),
        rtc::crypto::SignatureScheme::EcdsaP256Sha256,
        CertificateParams::new(vec!["corebench".into()]).expect("params"),
    )
    .expect("certificate");

    let now = Instant::now();
    let mut pairs: Vec<(Side, Side)> = (0..peers)
        .map(|i| {
            let s_addr: SocketAddr = "10.0.0.1:25000".parse().unwrap();
            let c_addr = SocketAddr::new(
                format!("10.1.{}.{}", i / 250, 1 + i % 250).parse().unwrap(),
                40000,
            );
            let mut s = pc(&crypto, &cert, i, now);
            for l in LABELS {
                s.create_data_channel(l, Some(RTCDataChannelInit::default()))
                    .expect("channel");
            }
            let offer = s.create_offer(None).expect("offer");
            s.set_local_description(now, offer).expect("local offer");
            candidate(&mut s, s_addr);
            let offer = s.local_description().expect("offer sdp").sdp;
            let mut c = pc(&crypto, &cert, peers + i, now);
            c.set_remote_description(now, RTCSessionDescription::offer(offer).unwrap())
                .expect("remote offer");
            candidate(&mut c, c_addr);
            let answer = c.create_answer(None).expect("answer");
            c.set_local_description(now, answer).expect("local answer");
            let answer = c.local_description().expect("answer sdp").sdp;
            s.set_remote_description(now, RTCSessionDescription::answer(answer).unwrap())
                .expect("remote answer");
            let side = |pc, addr| Side {
                pc,
                addr,
                push: None,
                open: 0,
                received: 0,
            };
            (side(s, s_addr), side(c, c_addr))
        })
        .collect();

    // Connect everyone: pump both ways until every channel is open.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = Instant::now();
        let mut done = true;
        for (s, c) in &mut pairs {
            for _ in 0..4 {
                timers(s, now);
                timers(c, now);
                let mut to_c = Vec::new();
                drain(s, &mut to_c);
                feed(c, s.addr, to_c, now);
                let mut to_s = Vec::new();
                drain(c, &mut to_s);
                feed(s, c.addr, to_s, now);
            }
            done &= s.open >= 4 && c.push.is_some();
        }
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "peers did not connect in 60 s");
        std::thread::sleep(Duration::from_millis(2));
    }

    // Rounds: the server side sends to everyone and drains its writes; the
    // client side reads and answers (SACKs, delayed or not, as the core
    // decides); the server side takes the answers.
    let payload = "x".repeat(bytes);
    let (mut server, mut client) = (Duration::ZERO, Duration::ZERO);
    let mut datagrams = 0usize;
    let mut answers = 0usize;
    let mut flights: Vec<Vec<BytesMut>> = (0..peers).map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        let t = Instant::now();
        server_sends(&mut pairs, &mut flights, &payload, t);
        server += t.elapsed();
        let t = Instant::now();
        datagrams += flights.iter().map(Vec::len).sum::<usize>();
        let back = client_turn(&mut pairs, &mut flights, t);
        client += t.elapsed();
        let t = Instant::now();
        answers += back.iter().map(Vec::len).sum::<usize>();
        server_takes_answers(&mut pairs, back, t);
        server += t.elapsed();
    }
    let delivered: usize = pairs.iter().map(|(_, c)| c.received).sum();
    let n = (peers * rounds) as f64;
    println!(
        "{peers} peers x {rounds} rounds, {bytes}-byte messages: delivered {delivered}, \
         {:.2} datagrams and {:.2} answers per delivery",
        datagrams as f64 / n,
        answers as f64 / n
    );
    println!(
        "server side {:.2} us per delivery, client side {:.2} us",
        server.as_secs_f64() * 1e6 / n,
        client.as_secs_f64() * 1e6 / n
    );
}

// The three steps of a round, kept out of line so that an instruction
// count (`valgrind --tool=callgrind --toggle-collect='*server_sends*'
// --toggle-collect='*server_takes_answers*'`; a bare `*server_*` also
// matches the DTLS handshake's functions in the set-up) can take
// the server's side alone: timings on a shared machine vary by tens of
// percent from one minute to the next, instruction counts do not.

#[inline(never)]
fn server_sends(
    pairs: &mut [(Side, Side)],
    flights: &mut [Vec<BytesMut>],
    payload: &str,
    now: Instant,
) {
    for ((s, _), out) in pairs.iter_mut().zip(flights.iter_mut()) {
        let id = s.push.expect("push channel");
        let mut dc = s.pc.data_channel(id).expect("push");
        dc.send_text(now, payload).expect("send");
        drain(s, out);
        timers(s, now);
    }
}

#[inline(never)]
fn client_turn(
    pairs: &mut [(Side, Side)],
    flights: &mut [Vec<BytesMut>],
    now: Instant,
) -> Vec<Vec<BytesMut>> {
    let mut back = Vec::with_capacity(pairs.len());
    for ((s, c), out) in pairs.iter_mut().zip(flights.iter_mut()) {
        feed(c, s.addr, std::mem::take(out), now);
        timers(c, now);
        let mut b = Vec::new();
        drain(c, &mut b);
        back.push(b);
    }
    back
}

#[inline(never)]
fn server_takes_answers(pairs: &mut [(Side, Side)], back: Vec<Vec<BytesMut>>, now: Instant) {
    for ((s, c), b) in pairs.iter_mut().zip(back) {
        feed(s, c.addr, b, now);
        drain(s, &mut Vec::new());
    }
}

//! One order per channel, history and recovery (docs/api.md, "Offsets,
//! history and recovery"), over real sockets and real WebRTC peers. Part
//! of the `server` test binary.

use super::*;

/// The next push's `data` and `hato` objects.
async fn next_with_place(c: &mut Client) -> (Value, Value) {
    let (msg, _) = next_push(c).await.expect("a push arrives");
    (msg["data"].clone(), msg["hato"].clone())
}

/// Pushes `n` pushes to `channel` from `tasks` concurrent API clients,
/// `data: {"n": i}`, PushChannel and PushChannelByRole (recvonly) mixed.
async fn concurrent_pushes(s: &Server, channel: &str, n: usize, tasks: usize) {
    concurrent_pushes_to(&[s], channel, n, tasks).await
}

/// As [`concurrent_pushes`], the API clients spread over `nodes`.
async fn concurrent_pushes_to(nodes: &[&Server], channel: &str, n: usize, tasks: usize) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut handles = Vec::new();
    for t in 0..tasks {
        let s = nodes[t % nodes.len()];
        let (addr, next, channel) = (s.api_addr.to_string(), next.clone(), channel.to_owned());
        handles.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let (target, body) = if i % 3 == 0 {
                    (
                        "Sora_20201120.PushChannelByRole",
                        json!({"channel_id": channel, "role": "recvonly", "data": {"n": i}}),
                    )
                } else {
                    (
                        "Sora_20160711.PushChannel",
                        json!({"channel_id": channel, "data": {"n": i}}),
                    )
                };
                let (status, _, body) = http_to(
                    &addr,
                    "POST",
                    &[("x-sora-target", target)],
                    &body.to_string(),
                )
                .await;
                assert_eq!(status, 200, "{body}");
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
}

use std::sync::Arc;

/// Thousands of concurrent pushes from 32 API clients to 8 peers — four
/// over DataChannels on two engine shards, four over WebSockets: every
/// peer receives every push, all in one and the same order, the channel's
/// offsets 1, 2, 3, … with one epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_peer_of_a_channel_sees_its_pushes_in_one_order() {
    let s = server_with(|c| c.rtc_shards = 2).await;
    let mut peers = Vec::new();
    for i in 0..4 {
        peers.push(switched_client(&s, "one-order", i % 2 == 0).await);
        peers.push(connected(&opts(&s, "one-order", "recvonly")).await);
    }
    table_len(&s, 8).await;
    const N: usize = 3000;
    concurrent_pushes(&s, "one-order", N, 32).await;
    one_order(&mut peers, N).await;
}

/// The next `count` pushes `c` receives are `{"n": i}` at offset i + 1,
/// for i = 0, 1, …: each once, in the order they were pushed.
async fn pushes_n_at_offset_n_plus_1(c: &mut Client, count: u64, who: &str) {
    for i in 0..count {
        let (data, place) = next_with_place(c).await;
        assert_eq!(
            (data["n"].as_u64(), place["offset"].as_u64()),
            (Some(i), Some(i + 1)),
            "{who}"
        );
    }
}

/// Every peer's `n` pushes are offsets 1..=n of one epoch, in one and
/// the same order, each push once.
async fn one_order(peers: &mut [Client], n: usize) {
    let mut first: Option<Vec<u64>> = None;
    for (p, peer) in peers.iter_mut().enumerate() {
        let mut seen = Vec::with_capacity(n);
        let mut epoch = None;
        for k in 0..n {
            let (data, place) = next_with_place(peer).await;
            assert_eq!(place["offset"], k as u64 + 1, "peer {p}: offsets follow on");
            let e = place["epoch"].as_str().unwrap().to_owned();
            assert_eq!(epoch.get_or_insert(e.clone()), &e, "peer {p}: one epoch");
            seen.push(data["n"].as_u64().unwrap());
        }
        match &first {
            None => first = Some(seen),
            Some(f) => {
                let differ = f.iter().zip(&seen).filter(|(a, b)| a != b).count();
                assert_eq!(
                    differ, 0,
                    "peer {p} saw {differ} positions in another order"
                );
            }
        }
    }
    let mut all = first.unwrap();
    all.sort_unstable();
    assert_eq!(all, (0..n as u64).collect::<Vec<_>>(), "each push once");
}

/// A node of a cluster whose JetStream stream orders and keeps the pushes
/// (`--history-size` set); returns once the node can store pushes.
async fn history_node(nats: &Nats, name: &str, size: usize) -> Server {
    history_node_via(nats, None, name, size).await
}

/// As [`history_node`], reaching NATS at `url` when given (a proxy).
async fn history_node_via(nats: &Nats, url: Option<String>, name: &str, size: usize) -> Server {
    let s = node_with(nats, name, |c| {
        c.history_size = size;
        c.rtc_shards = 2;
        if let Some(url) = url {
            c.cluster_nats_url = Some(url);
        }
    })
    .await;
    let until = tokio::time::Instant::now() + T;
    loop {
        let (status, body) = api(
            &s,
            "Sora_20160711.PushChannel",
            r#"{"channel_id":"warm-up","data":{}}"#,
        )
        .await;
        if status == 200 {
            return s;
        }
        assert!(tokio::time::Instant::now() < until, "{status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Three nodes on one NATS JetStream, 9 peers (a DataChannel and two
/// WebSocket peers on each), 3 000 pushes from 32 API clients spread over
/// the three nodes: every peer receives offsets 1..3000 of one epoch, all
/// in one and the same order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_peer_of_a_channel_sees_one_order_across_a_cluster() {
    let nats = Nats::jetstream().await;
    let mut nodes = Vec::new();
    for name in ["n1", "n2", "n3"] {
        nodes.push(history_node(&nats, name, 100).await);
    }
    let mut peers = Vec::new();
    for (i, s) in nodes.iter().enumerate() {
        peers.push(switched_client(s, "cluster-order", i % 2 == 0).await);
        peers.push(connected(&opts(s, "cluster-order", "recvonly")).await);
        peers.push(connected(&opts(s, "cluster-order", "recvonly")).await);
    }
    for s in &nodes {
        table_len(s, 3).await;
    }
    const N: usize = 3000;
    let refs: Vec<&Server> = nodes.iter().collect();
    concurrent_pushes_to(&refs, "cluster-order", N, 32).await;
    one_order(&mut peers, N).await;
}

/// In a cluster, a peer that vanishes in the middle of a stream of pushes
/// sent through one node recovers on another node everything it missed,
/// once and in order; GetChannelHistory gives the same on every node; and
/// a peer whose gap the history no longer covers is told so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_recovers_on_another_node_what_was_pushed_through_any() {
    let nats = Nats::jetstream().await;
    let n1 = history_node(&nats, "r1", 1000).await;
    let n2 = history_node(&nats, "r2", 1000).await;
    let n3 = history_node(&nats, "r3", 1000).await;
    // Pushed through the second node; the peer is on the first, and comes
    // back on the third.
    let (place, _) = vanish_midstream_and_recover(&n1, &n2, &n3, "rec-c").await;
    // GetChannelHistory gives the same on every node.
    for s in [&n1, &n2, &n3] {
        all_400_kept(s, "rec-c", &place).await;
    }
}

/// In a cluster with a small history, a peer whose gap the stream no
/// longer covers is told so, on any node, and given what is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_is_told_across_a_cluster_when_history_no_longer_covers_its_gap() {
    let nats = Nats::jetstream().await;
    let n1 = history_node(&nats, "g1", 5).await;
    let n2 = history_node(&nats, "g2", 5).await;
    for i in 0..20 {
        let s = if i % 2 == 0 { &n1 } else { &n2 };
        let (status, body) = api(
            s,
            "Sora_20160711.PushChannel",
            &json!({"channel_id": "gap-c", "data": {"n": i}}).to_string(),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let (_, h) = api(
        &n1,
        "Hato_20261201.GetChannelHistory",
        r#"{"channel_id":"gap-c"}"#,
    )
    .await;
    assert_eq!(h["offset"], 20, "{h}");
    assert_eq!(h["first_offset"], 16, "{h}");
    let place = json!({"epoch": h["epoch"], "offset": 3});
    let mut b = told_expired_and_given_the_last_5(&recovering(&n2, "gap-c", &place)).await;
    no_push(&mut b).await;
}

/// A peer recovering with `o` from offset 3 of a channel that had 20
/// pushes and keeps 5: it is told `expired`, then given pushes 15..20.
async fn told_expired_and_given_the_last_5(o: &ClientOptions) -> Client {
    let mut b = Client::connect(o).await.unwrap();
    let (_, p) = next_with_place(&mut b).await;
    assert_eq!(p["recovery"]["complete"], false, "{p}");
    assert_eq!(p["recovery"]["gap"], "expired");
    assert_eq!(p["recovery"]["offset"], 20);
    for i in 15..20 {
        assert_eq!(
            next_with_place(&mut b).await.0["n"],
            i,
            "what is kept still comes"
        );
    }
    b
}

/// A connect whose metadata asks to recover from `place` (`hato` of the
/// last push seen).
fn recovering(s: &Server, channel: &str, place: &Value) -> ClientOptions {
    let mut o = dc_opts(s, channel, true);
    o.extra.insert(
        "metadata".into(),
        json!({"token": "t", "hato_recover": {"epoch": place["epoch"], "offset": place["offset"]}}),
    );
    o
}

/// Pushes `data: {"n": i}` for `from..to` to `channel`, a millisecond
/// apart, in the background.
fn stream(s: &Server, channel: &str, from: u64, to: u64) -> tokio::task::JoinHandle<()> {
    let (addr, channel) = (s.api_addr.to_string(), channel.to_owned());
    tokio::spawn(async move {
        for i in from..to {
            let body = json!({"channel_id": channel, "data": {"n": i}}).to_string();
            let (status, _, _) = http_to(
                &addr,
                "POST",
                &[("x-sora-target", "Sora_20160711.PushChannel")],
                &body,
            )
            .await;
            assert_eq!(status, 200);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
}

/// A DataChannel peer on `on` receives the first 50 of 400 pushes sent
/// through `through`, vanishes (its PeerConnection killed), and comes back
/// on `back_on` with the last position it saw: it is told the recovery is
/// complete, then receives every later push once, in order. Returns that
/// position and the recovery's status.
async fn vanish_midstream_and_recover(
    on: &Server,
    through: &Server,
    back_on: &Server,
    channel: &str,
) -> (Value, Value) {
    const N: u64 = 400;
    let mut a = switched_client(on, channel, true).await;
    let pushes = stream(through, channel, 0, N);
    let mut place = Value::Null;
    for i in 0..50 {
        let (data, p) = next_with_place(&mut a).await;
        assert_eq!(data["n"], i);
        place = p;
    }
    a.vanish();
    // Away while some pushes go by.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut b = Client::connect(&recovering(back_on, channel, &place))
        .await
        .unwrap();
    let (status, p) = next_with_place(&mut b).await;
    assert_eq!(status, json!({}), "the first push is the recovery's status");
    let recovery = p["recovery"].clone();
    assert_eq!(recovery["complete"], true, "{p}");
    assert_eq!(recovery["epoch"], place["epoch"]);
    for i in 50..N {
        let (data, p) = next_with_place(&mut b).await;
        assert_eq!(data["n"], i, "push {i}, exactly once and in order");
        assert_eq!(p["offset"], i + 1);
    }
    pushes.await.unwrap();
    no_push(&mut b).await;
    (place, recovery)
}

/// A DataChannel peer whose PeerConnection vanishes in the middle of a
/// stream of pushes reconnects with the last offset it saw: it is told the
/// recovery is complete, then receives every push it missed and every
/// later one, each once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_vanishes_recovers_every_push_once_in_order() {
    let s = server_with(|c| c.history_size = 1000).await;
    // Someone stays, so that the channel goes on while the peer is away.
    let _stays = connected(&opts(&s, "rec", "recvonly")).await;
    let (place, recovery) = vanish_midstream_and_recover(&s, &s, &s, "rec").await;
    assert!(
        recovery["offset"].as_u64().unwrap() > 50,
        "{recovery}: pushes went by meanwhile"
    );
    // GetChannelHistory has them too, with their offsets.
    all_400_kept(&s, "rec", &place).await;
}

/// GetChannelHistory on `s` has the 400 pushes of
/// [`vanish_midstream_and_recover`], in `place`'s epoch; asked for those
/// after 398, it lists the last two.
async fn all_400_kept(s: &Server, channel: &str, place: &Value) {
    let (status, h) = api(
        s,
        "Hato_20261201.GetChannelHistory",
        &json!({"channel_id": channel, "since_offset": 398}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{h}");
    assert_eq!(h["offset"], 400);
    assert_eq!(h["epoch"], place["epoch"]);
    assert_eq!(h["first_offset"], 1);
    assert_eq!(h["more"], false);
    assert_eq!(
        h["pushes"],
        json!([{"offset": 399, "to": {"scope": "channel"}, "data": {"n": 398}},
               {"offset": 400, "to": {"scope": "channel"}, "data": {"n": 399}}])
    );
}

/// When the history no longer covers what a peer missed, or the epoch is
/// not the channel's, the peer is told so, and given what is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_is_told_when_history_no_longer_covers_its_gap() {
    let s = server_with(|c| c.history_size = 5).await;
    let _stays = connected(&opts(&s, "gap", "recvonly")).await;
    let mut place = Value::Null;
    for i in 0..20 {
        let (status, _, _) = http(
            &s,
            "POST",
            &[("x-sora-target", "Sora_20160711.PushChannel")],
            &json!({"channel_id": "gap", "data": {"n": i}}).to_string(),
        )
        .await;
        assert_eq!(status, 200);
        if i == 2 {
            let (_, h) = api(
                &s,
                "Hato_20261201.GetChannelHistory",
                r#"{"channel_id":"gap"}"#,
            )
            .await;
            place = json!({"epoch": h["epoch"], "offset": h["offset"]});
        }
    }
    told_expired_and_given_the_last_5(&recovering(&s, "gap", &place)).await;
    // Another epoch: nothing of this one follows from it.
    let stale = json!({"epoch": "not-this-one", "offset": 3});
    let mut c = Client::connect(&recovering(&s, "gap", &stale))
        .await
        .unwrap();
    let (_, p) = next_with_place(&mut c).await;
    assert_eq!(p["recovery"]["gap"], "epoch", "{p}");
    no_push(&mut c).await;
    // A bad hato_recover is refused with a reason.
    let mut bad = dc_opts(&s, "gap", true);
    bad.extra
        .insert("metadata".into(), json!({"hato_recover": {"offset": "x"}}));
    match Client::connect(&bad).await {
        Err(hato::client::ClientError::Refused { code: 4490, reason }) => {
            assert!(reason.starts_with("hato_recover must be"), "{reason}")
        }
        other => panic!("{:?}", other.map(|_| "connected")),
    }
}

/// Pushes to many channels that no one is in leave nothing behind: the
/// order of a channel that keeps nothing and has no connection here is
/// forgotten with its push.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_to_empty_channels_leave_no_state_behind() {
    let s = server().await;
    for i in 0..500 {
        let (status, _, _) = http(
            &s,
            "POST",
            &[("x-sora-target", "Sora_20160711.PushChannel")],
            &json!({"channel_id": format!("nobody-{i}"), "data": {}}).to_string(),
        )
        .await;
        assert_eq!(status, 200);
    }
    let (_, report) = api(&s, "Sora_20171010.GetStatsReport", "").await;
    assert_eq!(report["history"]["channels"], 0, "{}", report["history"]);
    assert_eq!(report["pushes"], 500);
}

/// A GetChannelHistory answer carries at most 8 MiB of pushes (and at
/// least one), says there is more, and gives each `data` byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_answer_is_bounded_in_bytes_and_pages_on() {
    let s = server_with(|c| c.history_size = 20).await;
    let pad = "x".repeat(900 * 1024);
    for i in 0..12 {
        // Key order and an integer past 2^53, as sent.
        let body = format!(
            r#"{{"channel_id":"big","data":{{"z":{i},"a":12345678901234567890123,"pad":"{pad}"}}}}"#
        );
        let (status, _, _) = http(
            &s,
            "POST",
            &[("x-sora-target", "Sora_20160711.PushChannel")],
            &body,
        )
        .await;
        assert_eq!(status, 200);
    }
    let (status, _, text) = http(
        &s,
        "POST",
        &[("x-sora-target", "Hato_20261201.GetChannelHistory")],
        r#"{"channel_id":"big"}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert!(text.len() <= (8 << 20) + 64 * 1024, "{} bytes", text.len());
    assert!(text.contains(r#""data":{"z":0,"a":12345678901234567890123,"pad":""#));
    let h: Value = serde_json::from_str(&text).unwrap();
    let got = h["pushes"].as_array().unwrap().len();
    assert!((1..12).contains(&got), "{got} pushes");
    assert_eq!(h["more"], true);
    // The next page starts after the last one given.
    let (_, next) = api(
        &s,
        "Hato_20261201.GetChannelHistory",
        &json!({"channel_id": "big", "since_offset": got}).to_string(),
    )
    .await;
    assert_eq!(next["pushes"][0]["offset"], got as u64 + 1);
}

/// A PushBatch of 1 000 pushes to one channel, through another node than
/// the peer's, is stored in several messages and reaches its peers (WebSocket and DataChannel) whole,
/// in batch order, with offsets 1..=1000; the answer gives each offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_batch_keeps_its_order_across_a_cluster() {
    let nats = Nats::jetstream().await;
    let n1 = history_node(&nats, "b1", 10).await;
    let n2 = history_node(&nats, "b2", 10).await;
    let mut peer = switched_client(&n1, "batch-c", true).await;
    let mut ws = connected(&opts(&n1, "batch-c", "recvonly")).await;
    let pushes: Vec<Value> = (0..1000)
        .map(|i| json!({"target": "Sora_20160711.PushChannel", "channel_id": "batch-c", "data": {"n": i}}))
        .collect();
    let (status, answer) = api(
        &n2,
        "Hato_20261201.PushBatch",
        &json!({ "pushes": pushes }).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let results = answer["results"].as_array().unwrap();
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["offset"], i as u64 + 1, "{r}");
    }
    pushes_n_at_offset_n_plus_1(&mut ws, 1000, "ws").await;
    pushes_n_at_offset_n_plus_1(&mut peer, 1000, "dc").await;
    no_push(&mut peer).await;
}

/// A TCP proxy in front of NATS that forwards everything, but drops the
/// next `drop` messages the stream republishes on a channel subject (an
/// `HMSG hato.ch.…` frame) on their way to the client: what NATS does to
/// a slow or cut-off subscriber, one message at a time.
async fn lossy_nats_proxy(nats_port: u16, drop: Arc<std::sync::atomic::AtomicUsize>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", nats_port)).await else {
                continue;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            tokio::spawn(async move { tokio::io::copy(&mut cr, &mut sw).await });
            let drop = drop.clone();
            tokio::spawn(async move {
                let mut buf: Vec<u8> = Vec::new();
                let mut chunk = vec![0u8; 65536];
                loop {
                    // Forward every whole frame in the buffer.
                    while let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") {
                        let line = String::from_utf8_lossy(&buf[..eol]).to_string();
                        let words: Vec<&str> = line.split(' ').collect();
                        let body = match words[0] {
                            "MSG" | "HMSG" => words.last().unwrap().parse::<usize>().unwrap() + 2,
                            _ => 0,
                        };
                        let whole = eol + 2 + body;
                        if buf.len() < whole {
                            break;
                        }
                        let frame: Vec<u8> = buf.drain(..whole).collect();
                        let lose = words[0] == "HMSG"
                            && words[1].starts_with("hato.ch.")
                            && drop
                                .fetch_update(
                                    std::sync::atomic::Ordering::SeqCst,
                                    std::sync::atomic::Ordering::SeqCst,
                                    |n| n.checked_sub(1),
                                )
                                .is_ok();
                        if !lose && cw.write_all(&frame).await.is_err() {
                            return;
                        }
                    }
                    match sr.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    format!("nats://127.0.0.1:{port}")
}

/// A node that NATS lost a republished push on the way to reads it back
/// from the stream when the next one reveals the gap: its peer receives
/// every push once, in order, and the node counts the refill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_nats_lost_on_the_way_is_read_back_from_the_stream() {
    let nats = Nats::jetstream().await;
    let drop = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let url = lossy_nats_proxy(nats.port, drop.clone()).await;
    let n1 = history_node_via(&nats, Some(url), "l1", 100).await;
    let n2 = history_node(&nats, "l2", 100).await;
    let mut peer = switched_client(&n1, "lossy", true).await;
    for i in 0..10u64 {
        if i == 4 || i == 7 {
            drop.store(1, std::sync::atomic::Ordering::SeqCst);
        }
        let (status, body) = api(
            &n2,
            "Sora_20160711.PushChannel",
            &json!({"channel_id": "lossy", "data": {"n": i}}).to_string(),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        // One at a time: each push is its own stored message.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        drop.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "two were dropped"
    );
    pushes_n_at_offset_n_plus_1(&mut peer, 10, "dc").await;
    no_push(&mut peer).await;
    let (_, report) = api(&n1, "Sora_20171010.GetStatsReport", "{}").await;
    assert_eq!(report["cluster"]["refilled"], 2, "{}", report["cluster"]);
}

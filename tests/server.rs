//! End-to-end tests over real sockets: hato in-process on ephemeral
//! loopback ports, real WebSockets, real WebRTC peers (the answering side of
//! hato-datachannel), SDK-shaped `connect` messages.

use futures_util::{SinkExt, StreamExt};
use hato::client::{Client, ClientEvent, ClientOptions, Via};
use hato::{Config, Server};
use serde_json::{json, Value};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(10);

#[path = "server/attacks.rs"]
mod attacks;
#[path = "server/control_plane.rs"]
mod control_plane;
#[path = "server/history.rs"]
mod history;

async fn server() -> Server {
    server_with(|_| {}).await
}

async fn server_with(f: impl FnOnce(&mut Config)) -> Server {
    let mut cfg = Config::ephemeral();
    f(&mut cfg);
    Server::start(cfg).await.expect("server starts")
}

async fn connected(opts: &ClientOptions) -> Client {
    let mut c = Client::connect(opts).await.expect("connects");
    assert!(c.wait_connected(T).await, "own connection.created arrives");
    c
}

/// POSTs to the API; returns status and parsed body.
async fn api(server: &Server, target: &str, body: &str) -> (u16, Value) {
    let (status, _, body) = http(server, "POST", &[("x-sora-target", target)], body).await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// A raw HTTP/1.1 request over a fresh TCP connection.
async fn http(
    server: &Server,
    method: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    http_to(&server.api_addr.to_string(), method, headers, body).await
}

/// A raw HTTP/1.1 request to `addr`: status, lowercased head, body.
async fn http_to(
    addr: &str,
    method: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} / HTTP/1.1\r\nhost: hato\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(T, tcp.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_owned())
}

/// Pushes a fresh marker to `channel` and checks that `c` receives it;
/// the transport it came on.
async fn still_served(s: &Server, c: &mut Client, channel: &str) -> Via {
    let marker = hato_signaling::id::new_id();
    push(
        s,
        "Sora_20160711.PushChannel",
        json!({"channel_id": channel, "data": {"marker": marker}}),
    )
    .await;
    let (msg, via) = next_push(c).await.expect("still served");
    assert_eq!(msg["data"]["marker"].as_str(), Some(&*marker));
    via
}

async fn next_push(c: &mut Client) -> Option<(Value, Via)> {
    match c
        .wait_for(T, |e| matches!(e, ClientEvent::Push { .. }))
        .await?
    {
        ClientEvent::Push { text, via, .. } => Some((serde_json::from_slice(&text).unwrap(), via)),
        _ => unreachable!(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_peer_connects_and_receives_a_push() {
    let s = server().await;
    let opts = ClientOptions::new(&s.signaling_url(), "ch1", "recvonly");
    let mut c = connected(&opts).await;
    assert_eq!(c.offer["connection_id"].as_str().unwrap().len(), 26);
    let (status, body) = api(
        &s,
        "Sora_20160711.PushChannel",
        r#"{"channel_id":"ch1","data":{"n":1}}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"data": {"n": 1}, "type": "push"}));
    let (msg, via) = next_push(&mut c).await.expect("push arrives");
    assert_eq!(msg["type"], "push");
    assert_eq!(msg["data"], json!({"n": 1}));
    // Its place in the channel's order: the first push of the channel.
    assert_eq!(msg["hato"]["offset"], 1);
    assert_eq!(msg["hato"]["epoch"].as_str().unwrap().len(), 12);
    assert_eq!(via, Via::WebSocket);
}

fn opts(s: &Server, channel: &str, role: &str) -> ClientOptions {
    ClientOptions::new(&s.signaling_url(), channel, role)
}

fn dc_opts(s: &Server, channel: &str, ignore: bool) -> ClientOptions {
    let mut o = opts(s, channel, "recvonly");
    o.data_channel_signaling = Some(true);
    o.ignore_disconnect_websocket = Some(ignore);
    o
}

/// Waits until the table holds `n` connections (sessions end asynchronously).
async fn table_len(s: &Server, n: usize) {
    let until = tokio::time::Instant::now() + T;
    while s.table().len() != n {
        assert!(
            tokio::time::Instant::now() < until,
            "table has {} connections, want {n}",
            s.table().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts no push arrives within a short window.
async fn no_push(c: &mut Client) {
    let got = c
        .wait_for(Duration::from_millis(300), |e| {
            matches!(e, ClientEvent::Push { .. })
        })
        .await;
    assert!(got.is_none(), "unexpected push: {got:?}");
}

async fn push(s: &Server, target: &str, body: Value) {
    let (status, resp) = api(s, target, &body.to_string()).await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["type"], "push");
    assert_eq!(resp["data"], body["data"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_push_target_routes_to_exactly_its_connections() {
    let s = server().await;
    let mut shared_a = {
        let mut o = opts(&s, "r", "recvonly");
        o.client_id = Some("shared".into());
        connected(&o).await
    };
    let mut shared_b = {
        let mut o = opts(&s, "r", "sendrecv");
        o.client_id = Some("shared".into());
        connected(&o).await
    };
    let mut sendonly = connected(&opts(&s, "r", "sendonly")).await;
    let mut elsewhere = connected(&opts(&s, "other", "recvonly")).await;
    table_len(&s, 4).await;

    push(
        &s,
        "Sora_20160711.PushClient",
        json!({"channel_id": "r", "client_id": "shared", "data": {"to": "client"}}),
    )
    .await;
    for c in [&mut shared_a, &mut shared_b] {
        assert_eq!(next_push(c).await.unwrap().0["data"]["to"], "client");
    }
    no_push(&mut sendonly).await;

    let id = sendonly.connection_id.clone();
    push(
        &s,
        "Sora_20160711.PushConnection",
        json!({"channel_id": "r", "connection_id": id, "data": {"to": "conn"}}),
    )
    .await;
    assert_eq!(
        next_push(&mut sendonly).await.unwrap().0["data"]["to"],
        "conn"
    );
    no_push(&mut shared_a).await;

    for (role, who) in [("recvonly", 0), ("sendrecv", 1), ("sendonly", 2)] {
        push(
            &s,
            "Sora_20201120.PushChannelByRole",
            json!({"channel_id": "r", "role": role, "data": {"role": role}}),
        )
        .await;
        let clients = [&mut shared_a, &mut shared_b, &mut sendonly];
        for (i, c) in clients.into_iter().enumerate() {
            if i == who {
                assert_eq!(next_push(c).await.unwrap().0["data"]["role"], role);
            } else {
                no_push(c).await;
            }
        }
    }

    push(
        &s,
        "Sora_20160711.PushChannel",
        json!({"channel_id": "r", "data": {"to": "all"}}),
    )
    .await;
    for c in [&mut shared_a, &mut shared_b, &mut sendonly] {
        assert_eq!(next_push(c).await.unwrap().0["data"]["to"], "all");
    }
    no_push(&mut elsewhere).await;

    // Nobody there is still a success.
    push(
        &s,
        "Sora_20160711.PushChannel",
        json!({"channel_id": "empty", "data": {}}),
    )
    .await;
    push(
        &s,
        "Sora_20160711.PushConnection",
        json!({"channel_id": "r", "connection_id": "nobody", "data": {}}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_created_and_destroyed_reach_the_channel() {
    let s = server().await;
    let mut first = {
        let mut o = opts(&s, "n", "sendrecv");
        o.extra
            .insert("signaling_notify_metadata".into(), json!({"name": "first"}));
        connected(&o).await
    };
    let mut second = Client::connect(&opts(&s, "n", "recvonly")).await.unwrap();
    let own = second
        .wait_for(T, |e| matches!(e, ClientEvent::Notify { .. }))
        .await
        .unwrap();
    let ClientEvent::Notify { message, via } = own else {
        unreachable!()
    };
    assert_eq!(via, Via::WebSocket);
    assert_eq!(message["event_type"], "connection.created");
    assert_eq!(message["connection_id"], second.connection_id.as_str());
    assert_eq!(message["channel_connections"], 2);
    assert_eq!(
        message["data"][0]["connection_id"],
        first.connection_id.as_str()
    );
    assert_eq!(message["data"][0]["metadata"], json!({"name": "first"}));

    let seen = first.wait_for(T, |e| matches!(e, ClientEvent::Notify { message, .. } if message["event_type"] == "connection.created")).await.unwrap();
    let ClientEvent::Notify { message, .. } = seen else {
        unreachable!()
    };
    assert_eq!(message["connection_id"], second.connection_id.as_str());
    assert_eq!(message["role"], "recvonly");
    assert_eq!(message["channel_recvonly_connections"], 1);

    second.send_ws(r#"{"type":"disconnect","reason":"NO-ERROR"}"#);
    let gone = first.wait_for(T, |e| matches!(e, ClientEvent::Notify { message, .. } if message["event_type"] == "connection.destroyed")).await.unwrap();
    let ClientEvent::Notify { message, .. } = gone else {
        unreachable!()
    };
    assert_eq!(message["connection_id"], second.connection_id.as_str());
    assert_eq!(message["channel_connections"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_pushes_arrive_in_order() {
    let s = server().await;
    let mut c = connected(&opts(&s, "order", "recvonly")).await;
    for i in 0..100 {
        push(
            &s,
            "Sora_20160711.PushChannel",
            json!({"channel_id": "order", "data": {"seq": i}}),
        )
        .await;
    }
    for i in 0..100 {
        let (msg, _) = next_push(&mut c)
            .await
            .unwrap_or_else(|| panic!("push {i} lost"));
        assert_eq!(msg["data"]["seq"], i);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_closes_with_type_disconnect_and_empties_the_table() {
    let s = server().await;
    let mut c = connected(&opts(&s, "d", "recvonly")).await;
    table_len(&s, 1).await;
    c.send_ws(r#"{"type":"disconnect","reason":"NO-ERROR"}"#);
    expect_ws_close(&mut c, 1000, "TYPE-DISCONNECT").await;
    table_len(&s, 0).await;

    // A WebSocket that just drops ends the session the same way.
    let c = connected(&opts(&s, "d", "recvonly")).await;
    table_len(&s, 1).await;
    c.drop_ws();
    table_len(&s, 0).await;
}

/// Opens a raw WebSocket and sends `frames`; returns the close code and reason.
async fn refused(s: &Server, frames: Vec<Message>) -> (u16, String) {
    let (mut ws, _) = tokio_tungstenite::connect_async(s.signaling_url())
        .await
        .unwrap();
    for f in frames {
        ws.send(f).await.unwrap();
    }
    let close = tokio::time::timeout(T, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(f)))) => {
                    return (u16::from(f.code), f.reason.to_string())
                }
                Some(Ok(Message::Text(t))) if t.contains("\"offer\"") => continue,
                Some(Ok(m)) => panic!("unexpected {m:?}"),
                other => panic!("no close frame: {other:?}"),
            }
        }
    });
    close.await.expect("closed in time")
}

fn text(v: Value) -> Message {
    Message::text(v.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_signaling_input_closes_4490_and_harms_no_one() {
    let s = server_with(|c| {
        c.connect_timeout_ms = 300;
        c.answer_timeout_ms = 300;
    })
    .await;
    let mut bystander = connected(&opts(&s, "bad", "recvonly")).await;
    let good = json!({"type": "connect", "role": "recvonly", "channel_id": "bad"});
    let cases: Vec<(Vec<Message>, &str)> = vec![
        (vec![Message::text("{not json")], "invalid JSON"),
        (vec![Message::binary(b"{}".to_vec())], "binary"),
        (
            vec![text(json!({"type": "connect", "role": "recvonly"}))],
            "channel_id is missing",
        ),
        (
            vec![text(
                json!({"type": "connect", "role": "recvonly", "channel_id": "x".repeat(256)}),
            )],
            "longer than 255",
        ),
        (
            vec![text(
                json!({"type": "connect", "role": "publisher", "channel_id": "c"}),
            )],
            "role must be",
        ),
        (
            vec![text(json!({"type": "answer", "sdp": "v=0"}))],
            "first message must be connect",
        ),
        (vec![text(json!({"type": 7}))], "type"),
        (
            vec![text(good.clone()), text(good.clone())],
            "connect was already received",
        ),
        (
            vec![
                text(good.clone()),
                text(json!({"type": "answer", "sdp": "garbage"})),
            ],
            "answer could not be applied",
        ),
        (vec![], "no connect"),
        (vec![text(good.clone())], "no answer"),
    ];
    for (frames, want) in cases {
        let (code, reason) = refused(&s, frames).await;
        assert_eq!(code, 4490, "{want}: {reason}");
        assert!(reason.contains(want), "reason {reason:?} lacks {want:?}");
    }
    // Those refused before an offer are counted by kind in
    // hato_connects_refused_total: the first seven, and the one that sent
    // nothing. The others ended after their offer (hato_disconnects_total).
    let refused_as = |kind: &str| {
        s.shared
            .metrics
            .refused_connects
            .get_or_create(&hato::metrics::Reason {
                reason: kind.into(),
            })
            .get()
    };
    assert_eq!((refused_as("invalid"), refused_as("no_connect")), (7, 1));
    // A peer that vanishes mid-handshake, after the offer.
    let (mut ws, _) = tokio_tungstenite::connect_async(s.signaling_url())
        .await
        .unwrap();
    ws.send(text(good.clone())).await.unwrap();
    let _offer = ws.next().await;
    drop(ws);
    // A path other than /signaling is refused at the handshake.
    let other = format!("ws://{}/other", s.signaling_addr);
    assert!(tokio_tungstenite::connect_async(other).await.is_err());

    table_len(&s, 1).await;
    push(
        &s,
        "Sora_20160711.PushChannel",
        json!({"channel_id": "bad", "data": {"still": "here"}}),
    )
    .await;
    assert_eq!(
        next_push(&mut bystander).await.unwrap().0["data"]["still"],
        "here"
    );
    // And new peers still connect.
    connected(&opts(&s, "bad", "recvonly")).await;
}

/// Requests pipelined in one write are answered in order, a bad one among
/// them with its 400 and no harm to the ones after it, and the pushes
/// arrive in the order they were sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_api_calls_are_answered_in_order() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = server().await;
    let mut peer = connected(&opts(&s, "piped", "recvonly")).await;
    let call = |body: &str, last: bool| {
        format!(
            "POST / HTTP/1.1\r\nhost: h\r\nx-sora-target: Sora_20160711.PushChannel\r\n{}content-length: {}\r\n\r\n{body}",
            if last { "connection: close\r\n" } else { "" },
            body.len()
        )
    };
    let mut batch = String::new();
    for n in 0..20 {
        let body = if n == 7 {
            "{not json".to_string()
        } else {
            json!({"channel_id": "piped", "data": {"n": n}}).to_string()
        };
        batch.push_str(&call(&body, n == 19));
    }
    let mut tcp = tokio::net::TcpStream::connect(s.api_addr).await.unwrap();
    tcp.write_all(batch.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(T, tcp.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    let statuses: Vec<&str> = text
        .split("HTTP/1.1 ")
        .skip(1)
        .map(|answer| &answer[..3])
        .collect();
    let mut want = vec!["200"; 20];
    want[7] = "400";
    assert_eq!(statuses, want, "{text}");
    for n in (0..20).filter(|n| *n != 7) {
        let (push, _) = next_push(&mut peer).await.expect("a push");
        assert_eq!(push["data"]["n"], n);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_are_json_with_error_type() {
    let s = server_with(|c| c.api_body_limit = 1000).await;
    let pc = "Sora_20160711.PushChannel";
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (pc, "not json".into(), 400, "INVALID-JSON"),
        (pc, "[1,2]".into(), 400, "INVALID-BODY"),
        (pc, r#"{"data":{}}"#.into(), 400, "MISSING-KEY"),
        (pc, r#"{"channel_id":"c"}"#.into(), 400, "MISSING-KEY"),
        (
            pc,
            r#"{"channel_id":1,"data":{}}"#.into(),
            400,
            "INVALID-TYPE",
        ),
        (
            pc,
            r#"{"channel_id":"c","data":[1]}"#.into(),
            400,
            "INVALID-DATA",
        ),
        (
            pc,
            r#"{"channel_id":"c","data":"s"}"#.into(),
            400,
            "INVALID-DATA",
        ),
        (
            "Sora_20160711.PushClient",
            r#"{"channel_id":"c","data":{}}"#.into(),
            400,
            "MISSING-KEY",
        ),
        (
            "Sora_20160711.PushConnection",
            r#"{"channel_id":"c","connection_id":5,"data":{}}"#.into(),
            400,
            "INVALID-TYPE",
        ),
        (
            "Sora_20201120.PushChannelByRole",
            r#"{"channel_id":"c","role":"admin","data":{}}"#.into(),
            400,
            "INVALID-ROLE",
        ),
        ("Sora_20160711.Nope", "{}".into(), 400, "UNKNOWN-TARGET"),
        (
            pc,
            format!(
                r#"{{"channel_id":"c","data":{{"x":"{}"}}}}"#,
                "a".repeat(2000)
            ),
            413,
            "REQUEST-TOO-LARGE",
        ),
    ];
    for (target, body, status, error_type) in cases {
        let (got, head, resp) = http(&s, "POST", &[("x-sora-target", target)], &body).await;
        assert_eq!(got, status, "{target} {body}: {resp}");
        assert!(head.contains("content-type: application/json"), "{head}");
        let v: Value = serde_json::from_str(&resp).unwrap();
        assert_eq!(v["error_type"], error_type, "{body}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (status, _, body) = http(&s, "POST", &[], "{}").await;
    assert_eq!(
        (
            status,
            serde_json::from_str::<Value>(&body).unwrap()["error_type"].clone()
        ),
        (400, json!("MISSING-TARGET"))
    );
    let (status, head, _) = http(&s, "GET", &[], "").await;
    assert_eq!(status, 405);
    assert!(head.contains("allow: post, options"), "{head}");
    let (status, _, _) = http(&s, "OPTIONS", &[], "").await;
    assert_eq!(status, 405, "no preflight without a CORS origin");
    // The header name is matched case-insensitively.
    let (status, _, body) = http(
        &s,
        "POST",
        &[("X-Sora-Target", pc)],
        r#"{"channel_id":"c","data":{"k":1}}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"data": {"k": 1}, "type": "push"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_when_an_origin_is_configured() {
    let s = server_with(|c| c.api_cors_origin = Some("https://app.example".into())).await;
    let (status, head, _) = http(
        &s,
        "OPTIONS",
        &[
            ("origin", "https://app.example"),
            ("access-control-request-method", "POST"),
        ],
        "",
    )
    .await;
    assert!(status == 204 || status == 200, "{status}");
    for h in [
        "access-control-allow-origin: https://app.example",
        "access-control-allow-methods: post, options",
        "access-control-allow-headers: origin, x-requested-with, content-type, accept, authorization, idempotency-key, x-sora-target",
        "access-control-max-age: 1000",
    ] {
        assert!(head.contains(h), "{h} missing from {head}");
    }
    let (status, head, _) = http(
        &s,
        "POST",
        &[("x-sora-target", "Sora_20160711.PushChannel")],
        r#"{"channel_id":"c","data":{}}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert!(head.contains("access-control-allow-origin: https://app.example"));
}

/// A peer that completes WebRTC but never reads its WebSocket: its outbox
/// fills and it is disconnected, while others keep receiving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_cannot_keep_up_is_disconnected() {
    // Bounded in items, and in bytes whatever the number of items.
    for (items, bytes) in [(8, 8 << 20), (100_000, 1 << 20)] {
        let s = server_with(|c| {
            c.outbox_capacity = items;
            c.outbox_capacity_bytes = bytes;
        })
        .await;
        cannot_keep_up(&s).await;
    }
}

async fn cannot_keep_up(s: &Server) {
    let mut healthy = connected(&opts(s, "slow", "recvonly")).await;
    let (mut ws, offer) = offer_for(
        &s.signaling_url(),
        json!({"type": "connect", "role": "recvonly", "channel_id": "slow"}),
    )
    .await;
    let (_peer, answer, _events) = hato::client::default_engine()
        .answer(offer["sdp"].as_str().unwrap())
        .await
        .unwrap();
    ws.send(text(json!({"type": "answer", "sdp": answer})))
        .await
        .unwrap();
    table_len(s, 2).await;
    // Never read `ws` again. Big pushes fill the socket buffers, then the outbox.
    let big = "x".repeat(200_000);
    let mut pushes = 0;
    while s.table().len() == 2 && pushes < 2000 {
        push(
            s,
            "Sora_20160711.PushChannel",
            json!({"channel_id": "slow", "data": {"big": big}}),
        )
        .await;
        pushes += 1;
    }
    table_len(s, 1).await;
    assert!(
        s.shared
            .table
            .stats
            .outbox_overflows
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    // The healthy peer got every push, in order, none lost.
    for _ in 0..pushes {
        assert!(next_push(&mut healthy).await.is_some());
    }
    drop(ws);
}

/// A DataChannel-signaling peer, returned once switched (checking the
/// `ignore_disconnect_websocket` it was given) with its channels open.
async fn switched_client(s: &Server, channel: &str, ignore: bool) -> Client {
    let mut c = Client::connect(&dc_opts(s, channel, ignore)).await.unwrap();
    assert_eq!(switched(&mut c).await, ignore);
    c
}

/// Waits for the WebSocket Close frame and checks its code and reason.
async fn expect_ws_close(c: &mut Client, code: u16, reason: &str) {
    let ev = c
        .wait_for(T, |e| matches!(e, ClientEvent::WebSocketClosed { .. }))
        .await
        .expect("the WebSocket closes");
    assert!(
        matches!(&ev, ClientEvent::WebSocketClosed { code: got, reason: r } if *got == code && r == reason),
        "want {code} {reason}, got {ev:?}"
    );
}

/// Waits for `{"type":"close"}` on `signaling` and checks its code and reason.
async fn expect_server_close(c: &mut Client, code: u16, reason: &str) {
    let ev = c
        .wait_for(T, |e| matches!(e, ClientEvent::ServerClose { .. }))
        .await
        .expect("close on signaling");
    assert!(
        matches!(&ev, ClientEvent::ServerClose { code: got, reason: r } if *got == code && r == reason),
        "want {code} {reason}, got {ev:?}"
    );
}

/// Waits for `switched` and for the four channels to be open on this side
/// too (as sora-rust-sdk does before it uses them).
async fn switched(c: &mut Client) -> bool {
    let (mut open, mut ignore) = (0, None);
    while open < 4 || ignore.is_none() {
        match c.next_event(T).await {
            Some(ClientEvent::Switched {
                ignore_disconnect_websocket,
            }) => ignore = Some(ignore_disconnect_websocket),
            Some(ClientEvent::Open(_)) => open += 1,
            Some(_) => {}
            None => panic!("no switched ({open} channels open)"),
        }
    }
    ignore.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datachannel_signaling_offer_lists_exactly_the_system_channels() {
    let s = server().await;
    let mut o = dc_opts(&s, "dc", false);
    o.extra.insert(
        "data_channels".into(),
        json!([{"label": "#chat", "direction": "sendrecv"}]),
    );
    let mut c = Client::connect(&o).await.unwrap();
    let dcs = c.offer["data_channels"].as_array().unwrap().clone();
    let got: Vec<(String, String, bool)> = dcs
        .iter()
        .map(|d| {
            (
                d["label"].as_str().unwrap().into(),
                d["direction"].as_str().unwrap().into(),
                d["compress"].as_bool().unwrap(),
            )
        })
        .collect();
    let want = [
        ("signaling", "sendrecv"),
        ("notify", "recvonly"),
        ("push", "recvonly"),
        ("stats", "sendrecv"),
    ];
    assert_eq!(got, want.map(|(l, d)| (l.to_owned(), d.to_owned(), false)));
    assert_eq!(c.offer["data_channel_signaling"], true);
    let mut opened = Vec::new();
    let mut switched = None;
    while opened.len() < 4 || switched.is_none() {
        match c.next_event(T).await.expect("channels open, then switched") {
            ClientEvent::Open(l) => opened.push(l),
            ClientEvent::Switched {
                ignore_disconnect_websocket,
            } => switched = Some(ignore_disconnect_websocket),
            _ => {}
        }
    }
    // Nothing else opens (no #chat channel: messaging is not offered).
    assert!(c
        .wait_for(Duration::from_millis(300), |e| matches!(
            e,
            ClientEvent::Open(_)
        ))
        .await
        .is_none());
    opened.sort();
    assert_eq!(opened, ["notify", "push", "signaling", "stats"]);
    assert_eq!(switched, Some(false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_goes_over_the_push_datachannel_after_switched() {
    for compress in [false, true] {
        let s = server_with(|c| c.data_channel_compress = compress).await;
        let mut c = switched_client(&s, "dc", false).await;
        assert_eq!(c.offer["data_channels"][2]["compress"], compress);
        push(
            &s,
            "Sora_20160711.PushChannel",
            json!({"channel_id": "dc", "data": {"via": "dc"}}),
        )
        .await;
        let (mut msg, via) = next_push(&mut c).await.unwrap();
        assert_eq!(msg["hato"]["offset"], 1);
        msg.as_object_mut().unwrap().remove("hato");
        assert_eq!(
            (msg, via),
            (
                json!({"type": "push", "data": {"via": "dc"}}),
                Via::DataChannel
            ),
            "compress {compress}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignore_disconnect_websocket_survives_every_kind_of_websocket_loss() {
    let s = server().await;
    // JS closes with no status (1005), CPP drops TCP, RS closes 1000.
    for how in ["1005", "drop", "1000"] {
        let channel = format!("ig-{how}");
        let mut c = switched_client(&s, &channel, true).await;
        match how {
            "1005" => c.close_ws(1005, ""),
            "drop" => c.drop_ws(),
            _ => c.close_ws(1000, "switching to datachannel"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            s.table()
                .lookup(&channel, hato_signaling::api::Audience::Channel)
                .len(),
            1,
            "{how}: session kept"
        );
        push(
            &s,
            "Sora_20160711.PushChannel",
            json!({"channel_id": channel, "data": {"after": how}}),
        )
        .await;
        let (msg, via) = next_push(&mut c)
            .await
            .unwrap_or_else(|| panic!("{how}: push lost"));
        assert_eq!(
            (msg["data"]["after"].as_str(), via),
            (Some(how), Via::DataChannel)
        );
        // A dead peer is still noticed without the WebSocket.
        c.close_peer();
        let until = tokio::time::Instant::now() + Duration::from_secs(20);
        while !s
            .table()
            .lookup(&channel, hato_signaling::api::Audience::Channel)
            .is_empty()
        {
            assert!(
                tokio::time::Instant::now() < until,
                "{how}: dead peer never cleaned up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_mode_ends_when_the_websocket_goes() {
    let s = server().await;
    let c = switched_client(&s, "hy", false).await;
    table_len(&s, 1).await;
    c.close_ws(1000, "");
    table_len(&s, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datachannel_disconnect_in_each_mode() {
    let s = server().await;
    // Hybrid: the WebSocket closes 1000 TYPE-DISCONNECT and the channels close.
    let mut c = switched_client(&s, "dd", false).await;
    c.send_dc(
        "signaling",
        r#"{"type":"disconnect","reason":"NO-ERROR"}"#,
        false,
    );
    expect_ws_close(&mut c, 1000, "TYPE-DISCONNECT").await;
    assert!(c
        .wait_for(T, |e| matches!(e, ClientEvent::ChannelClosed(_)))
        .await
        .is_some());
    table_len(&s, 0).await;

    // DataChannel only (compressed): every channel closes.
    let s = server_with(|c| c.data_channel_compress = true).await;
    let mut c = switched_client(&s, "dd", true).await;
    c.close_ws(1005, "");
    c.send_dc(
        "signaling",
        r#"{"type":"disconnect","reason":"NO-ERROR"}"#,
        false,
    );
    let mut closed = 0;
    while closed < 4 {
        match c.next_event(T).await {
            Some(ClientEvent::ChannelClosed(_)) => closed += 1,
            Some(ClientEvent::PeerFailed(_)) | None => break,
            _ => {}
        }
    }
    assert!(closed >= 1, "channels closed: {closed}");
    table_len(&s, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_ends_a_datachannel_only_session_with_a_close_message() {
    let s = server().await;
    let mut c = switched_client(&s, "api", true).await;
    c.close_ws(1005, "");
    let id = c.connection_id.clone();
    let (status, body) = api(
        &s,
        "Sora_20151104.DisconnectConnection",
        &json!({"channel_id": "api", "connection_id": id}).to_string(),
    )
    .await;
    assert_eq!(
        (status, body),
        (200, json!({"channel_id": "api", "connection_id": id}))
    );
    expect_server_close(&mut c, 1000, "DISCONNECTED-API").await;
    assert!(c
        .wait_for(T, |e| matches!(e, ClientEvent::ChannelClosed(_)))
        .await
        .is_some());
    table_len(&s, 0).await;
    // And the PeerConnection's end reaches the peer (SCTP ABORT, DTLS
    // close_notify), here from a shard left with no peer at all: within
    // T, where a lost goodbye would leave it to ICE (~12 s).
    assert!(
        c.wait_for(T, |e| matches!(e, ClientEvent::PeerFailed(_)))
            .await
            .is_some(),
        "the peer never heard that the server closed its PeerConnection"
    );

    // With the WebSocket up, the reason rides on its Close frame.
    let mut c = connected(&opts(&s, "api", "recvonly")).await;
    api(
        &s,
        "Sora_20151104.DisconnectChannel",
        r#"{"channel_id":"api"}"#,
    )
    .await;
    expect_ws_close(&mut c, 1000, "DISCONNECTED-API").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_datachannel_input_and_a_zlib_bomb_are_dropped() {
    for compress in [false, true] {
        let s = server_with(|c| c.data_channel_compress = compress).await;
        let mut c = switched_client(&s, "mal", false).await;
        // 8 MiB of spaces in ~40 KiB; the server caps inflating at 1 MiB.
        let bomb = hato_signaling::zlib::compress(&vec![b' '; 8 << 20]);
        assert!(bomb.len() < 65_536, "{}", bomb.len());
        let garbage: Vec<(&str, Vec<u8>, bool)> = vec![
            ("signaling", b"not json".to_vec(), true),
            ("signaling", vec![0xff, 0x00, 0x13], false),
            ("signaling", br#"{"type":"offer","sdp":"x"}"#.to_vec(), true),
            (
                "signaling",
                br#"{"type":"answer","sdp":"x"}"#.to_vec(),
                false,
            ),
            ("stats", br#"{"no":"type"}"#.to_vec(), true),
            ("push", br#"{"type":"push","data":{}}"#.to_vec(), true),
            (
                "notify",
                br#"{"type":"candidate","candidate":7}"#.to_vec(),
                false,
            ),
            ("signaling", bomb, false),
        ];
        for (label, data, text) in garbage {
            c.send_dc_raw(label, &data, text);
        }
        // Well-formed messages in every shape the SDKs use still work.
        c.send_dc("signaling", r#"{"type":"pong"}"#, false);
        c.send_dc("stats", r#"{"type":"stats","reports":[]}"#, true);
        c.send_dc("signaling", r#"{"type":"candidate","candidate":""}"#, true);
        push(
            &s,
            "Sora_20160711.PushChannel",
            json!({"channel_id": "mal", "data": {"ok": compress}}),
        )
        .await;
        let (msg, via) = next_push(&mut c).await.expect("still served");
        assert_eq!(
            (msg["data"]["ok"].as_bool(), via),
            (Some(compress), Via::DataChannel)
        );
        assert_eq!(s.table().len(), 1);
        connected(&opts(&s, "mal", "recvonly")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_too_large_for_the_datachannel_gets_413() {
    // 413 only for a push over hato's own --data-channel-message-limit
    // that a DataChannel-only peer would need; a hybrid peer gets it on its
    // WebSocket.
    let s = server_with(|c| c.data_channel_message_limit = 10_000).await;
    let mut hybrid = switched_client(&s, "big", false).await;
    let dc_only = switched_client(&s, "big", true).await;
    let body = json!({"channel_id": "big", "data": {"x": "y".repeat(20_000)}}).to_string();
    let (status, resp) = api(&s, "Sora_20160711.PushChannel", &body).await;
    assert_eq!(status, 413);
    assert_eq!(resp["error_type"], "PUSH-TOO-LARGE");
    no_push(&mut hybrid).await;
    drop(dc_only);
    table_len(&s, 1).await;
    let (status, _) = api(&s, "Sora_20160711.PushChannel", &body).await;
    assert_eq!(status, 200);
    let (msg, via) = next_push(&mut hybrid).await.unwrap();
    assert_eq!(
        (msg["data"]["x"].as_str().map(str::len), via),
        (Some(20_000), Via::WebSocket)
    );
    push(
        &s,
        "Sora_20160711.PushChannel",
        json!({"channel_id": "big", "data": {"x": "y".repeat(5_000)}}),
    )
    .await;
    assert_eq!(next_push(&mut hybrid).await.unwrap().1, Via::DataChannel);
}

/// Pushes without pause while peers of every mode connect and switch:
/// each peer gets every push from its first on, once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_pushes_across_connect_and_switch_lose_and_reorder_nothing() {
    let s = server().await;
    let api_addr = s.api_addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pusher = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut seq = 0u64;
            let mut tcp = tokio::net::TcpStream::connect(api_addr).await.unwrap();
            use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
            let (r, mut w) = tcp.split();
            let mut r = BufReader::new(r);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let body = json!({"channel_id": "flow", "data": {"seq": seq}}).to_string();
                let req = format!("POST / HTTP/1.1\r\nhost: h\r\nx-sora-target: Sora_20160711.PushChannel\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                w.write_all(req.as_bytes()).await.unwrap();
                let mut len = 0;
                loop {
                    let mut line = String::new();
                    r.read_line(&mut line).await.unwrap();
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length: ") {
                        len = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut b = vec![0; len];
                r.read_exact(&mut b).await.unwrap();
                seq += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            seq
        })
    };
    // WebSocket only, hybrid, DataChannel only.
    let modes = [
        (None, None),
        (Some(true), Some(false)),
        (Some(true), Some(true)),
    ];
    let mut clients = Vec::new();
    for round in 0..3 {
        for (i, (dcs, ignore)) in modes.iter().enumerate() {
            let mut o = opts(&s, "flow", "recvonly");
            o.data_channel_signaling = *dcs;
            o.ignore_disconnect_websocket = *ignore;
            clients.push((
                format!("round {round} mode {i}"),
                Client::connect(&o).await.unwrap(),
            ));
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = pusher.await.unwrap();
    assert!(sent > 100, "only {sent} pushes");
    for (name, mut c) in clients {
        let mut seqs = Vec::new();
        let mut vias = std::collections::HashSet::new();
        while let Some(ev) = c.next_event(Duration::from_millis(500)).await {
            if let ClientEvent::Push { text, via, .. } = ev {
                let v: Value = serde_json::from_slice(&text).unwrap();
                seqs.push(v["data"]["seq"].as_u64().unwrap());
                vias.insert(via);
            }
            if seqs.last() == Some(&(sent - 1)) {
                break;
            }
        }
        assert!(!seqs.is_empty(), "{name}: nothing received");
        let first = seqs[0];
        let want: Vec<u64> = (first..sent).collect();
        assert_eq!(
            seqs, want,
            "{name}: lost, duplicated or reordered (vias {vias:?})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_tells_every_peer_why() {
    let s = server().await;
    let mut ws_peer = connected(&opts(&s, "bye", "recvonly")).await;
    let mut dc_only = switched_client(&s, "bye", true).await;
    // A WebSocket that has not sent its connect yet.
    let (mut early, _) = tokio_tungstenite::connect_async(s.signaling_url())
        .await
        .unwrap();
    dc_only.close_ws(1005, "");
    table_len(&s, 2).await;
    s.shutdown(T).await;
    expect_ws_close(&mut ws_peer, 1000, "SHUTDOWN").await;
    expect_server_close(&mut dc_only, 1000, "SHUTDOWN").await;
    match tokio::time::timeout(T, early.next()).await {
        Ok(Some(Ok(Message::Close(Some(f))))) => {
            assert_eq!((u16::from(f.code), f.reason.as_str()), (1000, "SHUTDOWN"))
        }
        other => panic!("no Close before the offer: {other:?}"),
    }
    assert_eq!(
        s.shared.sessions.load(std::sync::atomic::Ordering::Acquire),
        0
    );
    assert!(s.table().is_empty());
}

/// The engine's count of peers whose state exists.
fn live_peers(s: &Server) -> usize {
    s.shared
        .engine
        .stats()
        .live_peers
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// One of the engine's counters now.
fn engine_count(
    s: &Server,
    counter: fn(&hato_datachannel::Stats) -> &std::sync::atomic::AtomicU64,
) -> u64 {
    counter(s.shared.engine.stats()).load(std::sync::atomic::Ordering::Relaxed)
}

async fn live_peers_reach(s: &Server, n: usize) {
    let until = tokio::time::Instant::now() + T;
    while live_peers(s) != n {
        assert!(
            tokio::time::Instant::now() < until,
            "{} peers' engine state still live, want {n}",
            live_peers(s)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every way a session ends frees its PeerConnection: a client that
/// disconnects, one whose WebSocket drops, one refused before its answer,
/// and a DataChannel-only one that closes its PeerConnection, in both
/// signaling modes; then nothing of any of them is left in the engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_engine_state_does_not_outlive_its_session() {
    let s = server_with(|c| c.answer_timeout_ms = 300).await;
    for round in 0..2 {
        // WebSocket signaling: disconnect, then a dropped TCP connection.
        let c = connected(&opts(&s, "free", "recvonly")).await;
        c.send_ws(r#"{"type":"disconnect","reason":"NO-ERROR"}"#);
        let d = connected(&opts(&s, "free", "recvonly")).await;
        d.drop_ws();
        // Hybrid and DataChannel-only, switched; the latter closes its PC.
        let mut h = switched_client(&s, "free", false).await;
        h.send_dc(
            "signaling",
            r#"{"type":"disconnect","reason":"NO-ERROR"}"#,
            false,
        );
        expect_ws_close(&mut h, 1000, "TYPE-DISCONNECT").await;
        let o = switched_client(&s, "free", true).await;
        o.close_ws(1005, "");
        o.close_peer();
        // Never answers: refused when the answer timeout passes.
        let (mut ws, _) = tokio_tungstenite::connect_async(s.signaling_url())
            .await
            .unwrap();
        ws.send(text(
            json!({"type": "connect", "role": "recvonly", "channel_id": "free"}),
        ))
        .await
        .unwrap();
        assert!(
            live_peers(&s) > 0,
            "round {round}: peers exist while connected"
        );
        table_len(&s, 0).await;
        live_peers_reach(&s, 0).await;
        drop((c, d, h, o, ws));
    }
    assert!(s.shared.sessions.load(std::sync::atomic::Ordering::Acquire) == 0);
}

/// Datagrams from strangers on the shared WebRTC port — garbage, STUN
/// with a made-up ufrag, STUN naming a real peer's ufrag with the wrong
/// password, a forged DTLS record — are dropped and counted; the
/// connected peer keeps receiving pushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_on_the_webrtc_port_are_dropped_and_harm_no_one() {
    let s = server().await;
    let mut c = switched_client(&s, "udp", true).await;
    let offer_sdp = c.offer["sdp"].as_str().unwrap().to_owned();
    let ufrag = offer_sdp
        .lines()
        .find_map(|l| l.strip_prefix("a=ice-ufrag:"))
        .unwrap()
        .trim()
        .to_owned();
    let stats = || {
        let e = s.shared.engine.stats();
        (
            e.dropped_unknown.load(std::sync::atomic::Ordering::Relaxed),
            e.dropped_integrity
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    };
    let before = stats();
    let stranger = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // MESSAGE-INTEGRITY keyed with a password the server never gave out.
    let stun = |username: &str| binding_request(username, "not-the-password");
    for addr in s.rtc_addrs() {
        stranger.send_to(b"garbage", addr).await.unwrap();
        stranger
            .send_to(&stun("nosuchufrag:x"), addr)
            .await
            .unwrap();
        stranger
            .send_to(&stun(&format!("{ufrag}:x")), addr)
            .await
            .unwrap();
        // A DTLS application-data record header with junk after it.
        stranger
            .send_to(
                &[23, 254, 253, 0, 1, 0, 0, 0, 0, 0, 9, 0, 4, 1, 2, 3, 4],
                addr,
            )
            .await
            .unwrap();
    }
    let n = s.rtc_addrs().len() as u64;
    let until = tokio::time::Instant::now() + T;
    loop {
        let now = stats();
        // "nosuchufrag" is dropped by the kernel filter, uncounted.
        if now.0 - before.0 >= 2 * n && now.1 - before.1 >= 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "drops not counted: {before:?} -> {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(still_served(&s, &mut c, "udp").await, Via::DataChannel);
}

/// A STUN Binding request with `USERNAME` and a `MESSAGE-INTEGRITY` keyed
/// with `pwd`.
use hato_datachannel::signed_binding_request as binding_request;

/// A peer that signs Binding requests from 40 source addresses (it has
/// the password: it is the peer, or one who learnt it) binds 32 in all,
/// its real one included: each would be a peer-reflexive candidate in its
/// ICE agent, checked and searched for every STUN message, without bound.
/// The rest are refused and counted; the peer is still served. And the
/// bound ones get its ICE agent's checks only at the peer's pace: their
/// requests prove nothing (a peer can forge their source), and unpaced,
/// each would get a check every 20 ms for as long as ICE tries — a
/// reflection at whatever addresses the peer names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_binds_at_most_32_source_addresses() {
    let s = server().await;
    let mut c = switched_client(&s, "many", true).await;
    let attr = |sdp: &str, name: &str| {
        let prefix = format!("a={name}:");
        let line = sdp.lines().find_map(|l| l.strip_prefix(prefix.as_str()));
        line.unwrap().trim().to_owned()
    };
    let offer = c.offer["sdp"].as_str().unwrap().to_owned();
    let username = format!(
        "{}:{}",
        attr(&offer, "ice-ufrag"),
        attr(&c.answer, "ice-ufrag")
    );
    let request = binding_request(&username, &attr(&offer, "ice-pwd"));
    let refused = || engine_count(&s, |e| &e.refused_candidates);
    let before = refused();
    let started = tokio::time::Instant::now();
    let mut sockets = Vec::new();
    for _ in 0..40 {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for addr in s.rtc_addrs() {
            socket.send_to(&request, addr).await.unwrap();
        }
        sockets.push(socket);
    }
    // The peer's own address is bound already: 31 more, 9 refused.
    let until = tokio::time::Instant::now() + T;
    while refused() - before < 9 {
        assert!(
            tokio::time::Instant::now() < until,
            "{} refused",
            refused() - before
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(still_served(&s, &mut c, "many").await, Via::DataChannel);
    assert_eq!(refused() - before, 9);
    // Asked again every 250 ms for 3 s (each request makes the agent check
    // its address back): what came to the 40 addresses, none of which
    // answers.
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        for socket in &sockets {
            for addr in s.rtc_addrs() {
                socket.send_to(&request, addr).await.unwrap();
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut buf = [0u8; 1500];
    let mut back = 0;
    for socket in &sockets {
        while socket.try_recv(&mut buf).is_ok() {
            back += 1;
        }
    }
    let (burst, rate) = hato_datachannel::PEER_CHECKS;
    let allowed = f64::from(burst) + f64::from(rate) * seconds;
    assert!(
        f64::from(back) <= allowed,
        "{back} datagrams to the 40 addresses in {seconds:.1} s (the peer's pace allows {allowed:.0})"
    );
    assert!(back > 0, "the bound addresses were never checked");
}

/// A switched DataChannel peer that stops acknowledging is disconnected
/// with OUTBOX-OVERFLOW once 8 MiB wait for it; a healthy peer in the same
/// channel gets every push, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_datachannel_peer_that_stops_acknowledging_is_disconnected() {
    let s = server().await;
    let mut healthy = switched_client(&s, "frozen", true).await;
    let frozen = switched_client(&s, "frozen", true).await;
    table_len(&s, 2).await;
    frozen.stall_peer();
    let big = "x".repeat(200_000);
    let mut pushes = 0;
    while s.table().len() == 2 && pushes < 100 {
        push(
            &s,
            "Sora_20160711.PushChannel",
            json!({"channel_id": "frozen", "data": {"n": pushes, "big": big}}),
        )
        .await;
        pushes += 1;
    }
    table_len(&s, 1).await;
    assert!(
        pushes > 40,
        "disconnected after only {pushes} pushes of 200 KB"
    );
    assert!(
        s.shared
            .table
            .stats
            .outbox_overflows
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    for n in 0..pushes {
        let (msg, via) = next_push(&mut healthy).await.expect("every push arrives");
        assert_eq!(
            (msg["data"]["n"].as_u64(), via),
            (Some(n), Via::DataChannel)
        );
    }
    drop(frozen);
}

/// A peer that sends no ICE checks of its own (keep-alive off) is kept by
/// the server's checks: its session outlives the ICE consent timeout (12 s
/// here, to keep the test short). (The server checks only peers that do
/// not check it themselves, as Chromium does; see docs/configuration.md.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_checks_is_kept_alive_by_the_servers_checks() {
    let s = server_with(|c| c.ice_consent_timeout_ms = 12_000).await;
    let mut o = dc_opts(&s, "silent", true);
    o.engine = hato_datachannel::Engine::start(hato_datachannel::EngineConfig {
        keepalive: Duration::ZERO,
        ..hato_datachannel::EngineConfig::client()
    })
    .unwrap();
    let mut c = Client::connect(&o).await.unwrap();
    assert!(switched(&mut c).await);
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(s.table().len(), 1, "the silent peer's session ended");
    assert_eq!(still_served(&s, &mut c, "silent").await, Via::DataChannel);
}

/// A connected peer that checks the selected pair (as browsers do every
/// 2.5 s, hato's client every 2 s) has its checks answered by the shard,
/// outside the WebRTC core, and the core's ICE agent still counts them: the
/// idle session outlives the ICE consent timeout (12 s here) (the server
/// sends no checks of its own to a peer that checks), and the peer, whose
/// agent accepts only answers that pass MESSAGE-INTEGRITY and FINGERPRINT,
/// stays connected and takes a push.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checking_peer_is_answered_by_its_shard_and_stays_connected() {
    let s = server_with(|c| c.ice_consent_timeout_ms = 12_000).await;
    let mut c = switched_client(&s, "checking", true).await;
    let answered = || engine_count(&s, |e| &e.answered_checks);
    let before = answered();
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(s.table().len(), 1, "the idle peer's session ended");
    let during = answered() - before;
    assert!(during >= 4, "{during} checks answered by the shard in 15 s");
    assert_eq!(still_served(&s, &mut c, "checking").await, Via::DataChannel);
}

/// A peer from which nothing arrives for 15 s (its network down, or its
/// datagrams dropped by a server too busy to read them) is within ICE
/// consent's 30 s: its session stays and it takes a push when it is back.
/// (Until 2026-12-06 hato gave up after 12 s: at 50 000 peers on two
/// shared cores, 1 600 sessions ended so at the end of the connect storm.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_silent_for_15_s_is_kept_and_served_when_it_is_back() {
    let s = server().await;
    let mut c = switched_client(&s, "blip", true).await;
    c.freeze_peer(Duration::from_secs(15));
    tokio::time::sleep(Duration::from_secs(16)).await;
    assert_eq!(s.table().len(), 1, "the silent peer's session ended");
    assert_eq!(still_served(&s, &mut c, "blip").await, Via::DataChannel);
}

/// A push sent while its peer's network is down arrives within seconds of
/// the network coming back: the first datagram heard from the peer after
/// its silence makes the server resend what SCTP holds for it at once, and
/// SCTP resends until the session ends (datachannel/patched/rtc-sctp).
/// Without the first, its retransmissions came 1, 2, 4, 8, 16 s apart, and
/// the peer back 19 s after the push waited 12 s more for it; without the
/// second, after six in a row the core stopped resending it at all, so it
/// never came, nor any push behind it on the ordered stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_sent_while_its_peer_is_away_arrives_soon_after_it_is_back() {
    let s = server().await;
    let mut c = switched_client(&s, "away", true).await;
    c.freeze_peer(Duration::from_secs(20));
    tokio::time::sleep(Duration::from_secs(1)).await;
    push(
        &s,
        "Sora_20160711.PushChannel",
        json!({"channel_id": "away", "data": {"n": 1}}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(19)).await;
    let got = c
        .wait_for(Duration::from_secs(6), |e| {
            matches!(e, ClientEvent::Push { .. })
        })
        .await;
    let Some(ClientEvent::Push { text, .. }) = got else {
        panic!("the push did not arrive within 6 s of the peer's return");
    };
    let msg: Value = serde_json::from_slice(&text).unwrap();
    assert_eq!(msg["data"]["n"], 1);
    let (_, report) = api(&s, "Sora_20171010.GetStatsReport", "").await;
    assert_eq!(report["sctp"]["resent_on_return"], 1, "{report}");
}

/// ... and one silent past the consent timeout is ended (PEER-FAILED).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_silent_past_the_consent_timeout_is_ended() {
    let s = server_with(|c| c.ice_consent_timeout_ms = 6_000).await;
    let c = switched_client(&s, "gone", true).await;
    c.freeze_peer(Duration::from_secs(60));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(s.table().len(), 1, "ended before the consent timeout");
    table_len(&s, 0).await;
}

/// ... and so is one whose address keeps sending datagrams that are not
/// STUN (forged, here by its own frozen engine: in place of each consent
/// check, every 2 s, as many bytes that look like STUN by their first byte
/// but are none): only authenticated STUN counts as consent
/// (datachannel/patched/rtc-ice). Counted, the datagrams kept the session
/// for as long as they came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_datagrams_from_a_vanished_peers_address_do_not_keep_it() {
    let s = server_with(|c| c.ice_consent_timeout_ms = 6_000).await;
    let c = switched_client(&s, "forged", true).await;
    let dropped_unknown = |s: &Server| engine_count(s, |e| &e.dropped_unknown);
    let unknown_before = dropped_unknown(&s);
    c.freeze_peer_forging(Duration::from_secs(60));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(s.table().len(), 1, "ended before the consent timeout");
    table_len(&s, 0).await;
    // The forged datagrams reached the peer's state (they were not
    // dropped as coming from nowhere), so they were there to be counted.
    assert_eq!(dropped_unknown(&s), unknown_before);
}

/// Connects by hand with DataChannel signaling and answers with
/// `a=max-message-size:size`; returns the WebSocket and the peer's events.
/// A signaling WebSocket opened by hand: it sends `connect` and returns
/// with hato's `offer`.
async fn offer_for(url: &str, connect: Value) -> (RawWs, Value) {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(text(connect)).await.unwrap();
    let offer: Value = match ws.next().await {
        Some(Ok(Message::Text(t))) => serde_json::from_str(&t).unwrap(),
        o => panic!("{o:?}"),
    };
    (ws, offer)
}

type RawWs =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A DataChannel-signaling peer answering by hand: `size` replaces its
/// answer's `a=max-message-size` (`None`: drops it, as libwebrtc's native
/// SDKs do); `connect` adds `extra`.
async fn answer_with_max_message_size(
    s: &Server,
    channel: &str,
    size: Option<usize>,
    extra: Value,
) -> (
    RawWs,
    hato_datachannel::Peer,
    tokio::sync::mpsc::Receiver<hato_datachannel::PeerEvent>,
) {
    let mut connect = json!({"type": "connect", "role": "recvonly", "channel_id": channel,
                         "data_channel_signaling": true});
    for (k, v) in extra.as_object().unwrap() {
        connect[k] = v.clone();
    }
    let (mut ws, offer) = offer_for(&s.signaling_url(), connect).await;
    let (peer, answer, events) = hato::client::default_engine()
        .answer(offer["sdp"].as_str().unwrap())
        .await
        .unwrap();
    assert!(answer.contains("a=max-message-size:"), "{answer}");
    let answer: String = answer
        .lines()
        .filter_map(|l| match (l.strip_prefix("a=max-message-size:"), size) {
            (Some(_), Some(size)) => Some(format!("a=max-message-size:{size}\r\n")),
            (Some(_), None) => None,
            (None, _) => Some(format!("{l}\r\n")),
        })
        .collect();
    ws.send(text(json!({"type": "answer", "sdp": answer})))
        .await
        .unwrap();
    (ws, peer, events)
}

/// The next message on DataChannel `label`, as text.
async fn next_on(
    events: &mut tokio::sync::mpsc::Receiver<hato_datachannel::PeerEvent>,
    want: &str,
) -> Option<String> {
    tokio::time::timeout(T, async {
        while let Some(ev) = events.recv().await {
            if let hato_datachannel::PeerEvent::Message(m) = ev {
                if &*m.label == want {
                    return Some(String::from_utf8_lossy(&m.data).into_owned());
                }
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

/// The next text frame on a raw WebSocket that contains `needle`.
async fn next_ws_text<S>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
    needle: &str,
) -> Option<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::time::timeout(T, async {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Text(t) = m {
                if t.contains(needle) {
                    return Some(t.to_string());
                }
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

/// A peer whose answer takes small messages no longer vetoes a push for
/// its channel: it is skipped and counted, everyone else gets the push. An
/// answer below 1 KiB is refused at connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_max_message_size_never_vetoes_a_push() {
    let s = server().await;
    let mut honest = switched_client(&s, "veto", true).await;
    // Hybrid (its WebSocket stays) and DataChannel-only, both taking 2000.
    let (mut hybrid_ws, _p1, mut hybrid) =
        answer_with_max_message_size(&s, "veto", Some(2000), json!({})).await;
    let (mut dc_only_ws, _p2, mut dc_only) = answer_with_max_message_size(
        &s,
        "veto",
        Some(2000),
        json!({"ignore_disconnect_websocket": true}),
    )
    .await;
    table_len(&s, 3).await;
    assert!(next_ws_text(&mut dc_only_ws, "switched").await.is_some());
    assert!(next_ws_text(&mut hybrid_ws, "switched").await.is_some());
    push(
        &s,
        "Sora_20160711.PushChannel",
        json!({"channel_id": "veto", "data": {"x": "y".repeat(5_000)}}),
    )
    .await;
    let (msg, via) = next_push(&mut honest)
        .await
        .expect("the honest peer gets it");
    assert_eq!(
        (msg["data"]["x"].as_str().map(str::len), via),
        (Some(5_000), Via::DataChannel)
    );
    let got = next_ws_text(&mut hybrid_ws, "\"push\"")
        .await
        .expect("the hybrid peer gets it on its WebSocket");
    assert!(got.contains(&"y".repeat(5_000)));
    let undeliverable = || {
        s.shared
            .table
            .stats
            .undeliverable
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(
        undeliverable(),
        1,
        "the DataChannel-only peer is skipped and counted"
    );
    // A push that fits reaches both small peers on their push channel.
    push(
        &s,
        "Sora_20160711.PushChannel",
        json!({"channel_id": "veto", "data": {"small": true}}),
    )
    .await;
    assert!(next_push(&mut honest).await.is_some());
    for events in [&mut hybrid, &mut dc_only] {
        let got = next_on(events, "push")
            .await
            .expect("the small peer gets the push that fits");
        assert!(got.contains(r#""small":true"#), "{got}");
        assert!(!got.contains("yyyy"), "the big push was not sent on it");
    }

    // Below 1 KiB: refused at connect with 4490 and a reason.
    let (mut ws, _peer, _events) =
        answer_with_max_message_size(&s, "veto", Some(300), json!({})).await;
    match tokio::time::timeout(T, ws.next()).await {
        Ok(Some(Ok(Message::Close(Some(f))))) => assert_eq!(
            (u16::from(f.code), f.reason.as_str()),
            (4490, "a=max-message-size:300 is below 1024 bytes")
        ),
        other => panic!("no 4490: {other:?}"),
    }
}

/// A 100 KB push reaches a WebSocket peer, a hybrid DataChannel peer and
/// a DataChannel-only native peer (its connect names `libwebrtc`, its
/// answer has no a=max-message-size, as the Python and C++ SDKs send).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_kb_push_reaches_every_kind_of_peer() {
    let s = server().await;
    let mut ws_peer = connected(&opts(&s, "big100", "recvonly")).await;
    let mut hybrid = switched_client(&s, "big100", false).await;
    let (mut native_ws, _peer, mut native) = answer_with_max_message_size(
        &s,
        "big100",
        None,
        json!({"ignore_disconnect_websocket": true, "libwebrtc": "Shiguredo-build M138",
               "sora_client": "Sora Python SDK 2025.5.0"}),
    )
    .await;
    table_len(&s, 3).await;
    assert!(next_ws_text(&mut native_ws, "switched").await.is_some());
    let big = "z".repeat(100_000);
    push(
        &s,
        "Sora_20160711.PushChannel",
        json!({"channel_id": "big100", "data": {"big": big}}),
    )
    .await;
    for (c, via) in [
        (&mut ws_peer, Via::WebSocket),
        (&mut hybrid, Via::DataChannel),
    ] {
        let (msg, got) = next_push(c).await.expect("delivered");
        assert_eq!(
            (msg["data"]["big"].as_str().map(str::len), got),
            (Some(100_000), via)
        );
    }
    let got = next_on(&mut native, "push")
        .await
        .expect("the native peer gets it on its push channel");
    assert!(got.contains(&big));
    assert_eq!(
        s.shared
            .table
            .stats
            .undeliverable
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// `data` reaches every peer, and the API's answer, byte for byte as the
/// backend sent it: key order, integers beyond f64, exponents beyond its
/// range and whitespace are never parsed and printed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_data_passes_through_byte_for_byte() {
    let s = server().await;
    let mut ws_peer = connected(&opts(&s, "raw", "recvonly")).await;
    let mut dc_peer = switched_client(&s, "raw", true).await;
    table_len(&s, 2).await;
    let data = r#"{"z":1, "a":{"n":12345678901234567890123,"x":1e400},"m":"\u00e9"}"#;
    let body = format!(r#"{{"channel_id":"raw","data":{data}}}"#);
    let (status, _, answer) = http(
        &s,
        "POST",
        &[("x-sora-target", "Sora_20160711.PushChannel")],
        &body,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, format!(r#"{{"data":{data},"type":"push"}}"#));
    // `data` byte for byte, then the push's place in its channel.
    let expected = format!(r#"{{"type":"push","data":{data},"hato":{{"epoch":"#);
    for (c, via) in [
        (&mut ws_peer, Via::WebSocket),
        (&mut dc_peer, Via::DataChannel),
    ] {
        match c
            .wait_for(T, |e| matches!(e, ClientEvent::Push { .. }))
            .await
        {
            Some(ClientEvent::Push { text, via: got, .. }) => {
                let text = std::str::from_utf8(&text).unwrap();
                assert!(text.starts_with(&expected), "{text}");
                assert!(text.ends_with(r#","offset":1}}"#), "{text}");
                assert_eq!(got, via);
            }
            other => panic!("{via:?}: {other:?}"),
        }
    }
    // Data that is not an object is still refused, without a tree.
    for bad in [r#"[1]"#, r#""s""#, "1e400"] {
        let (status, v) = api(
            &s,
            "Sora_20160711.PushChannel",
            &format!(r#"{{"channel_id":"raw","data":{bad}}}"#),
        )
        .await;
        assert_eq!(
            (status, v["error_type"].as_str()),
            (400, Some("INVALID-DATA")),
            "{bad}"
        );
    }
}

/// Opens a WebSocket to /signaling from `source` (an address of the
/// loopback network) without sending anything: the HTTP status of the
/// upgrade, and the socket when it was 101.
async fn upgrade_from(
    s: &Server,
    source: &str,
) -> (
    u16,
    String,
    Option<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>>,
) {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let tcp = sock.connect(s.signaling_addr).await.unwrap();
    match tokio_tungstenite::client_async(s.signaling_url(), tcp).await {
        Ok((ws, resp)) => (resp.status().as_u16(), String::new(), Some(ws)),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => (
            resp.status().as_u16(),
            String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned(),
            None,
        ),
        Err(e) => panic!("{e}"),
    }
}

/// --max-connections, --max-connections-per-ip and --max-handshakes: the
/// connection over a limit gets 503 with a JSON reason before its upgrade,
/// the connected peer keeps getting pushes, and a place that frees up is
/// taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limits_refuse_with_503_and_harm_no_one() {
    let s = server_with(|c| {
        c.max_connections = 3;
        c.max_connections_per_ip = 2;
        c.max_handshakes = 1;
    })
    .await;
    let mut member = connected(&opts(&s, "lim", "recvonly")).await;
    let refused = |body: &str| -> String {
        let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
        v["error_type"].as_str().unwrap_or(body).to_owned()
    };
    // One handshake in flight (upgraded, no connect yet) takes the only
    // handshake place.
    let (status, _, pending) = upgrade_from(&s, "127.0.0.1").await;
    assert_eq!(status, 101);
    let (status, body, _) = upgrade_from(&s, "127.0.0.2").await;
    assert_eq!(
        (status, refused(&body)),
        (503, "TOO-MANY-HANDSHAKES".into())
    );
    drop(pending);
    let admission = &s.shared.admission;
    for _ in 0..200 {
        if admission.connections() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(admission.connections(), 1);
    // Per address: 127.0.0.1 holds the member and a second peer.
    let _second = connected(&opts(&s, "lim", "recvonly")).await;
    let (status, body, _) = upgrade_from(&s, "127.0.0.1").await;
    assert_eq!(
        (status, refused(&body)),
        (503, "TOO-MANY-CONNECTIONS".into())
    );
    // Whole server: the third place goes to 127.0.0.3, the fourth is refused.
    let (status, _, _third) = upgrade_from(&s, "127.0.0.3").await;
    assert_eq!(status, 101);
    let (status, body, _) = upgrade_from(&s, "127.0.0.4").await;
    assert_eq!((status, refused(&body)), (503, "SERVER-FULL".into()));
    assert_eq!(
        admission.refused.load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    // The member never noticed.
    push(
        &s,
        "Sora_20160711.PushChannel",
        json!({"channel_id": "lim", "data": {"still": "here"}}),
    )
    .await;
    let (msg, _) = next_push(&mut member).await.unwrap();
    assert_eq!(msg["data"]["still"], "here");
}

/// Reads until EOF or `limit`; true when the server closed the socket.
async fn closed_within(tcp: &mut tokio::net::TcpStream, limit: Duration) -> (bool, String) {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let closed = tokio::time::timeout(limit, tcp.read_to_end(&mut out))
        .await
        .is_ok();
    (closed, String::from_utf8_lossy(&out).into_owned())
}

/// A client that sends half a request head is closed within the header
/// timeout; half a body gets 408; an idle keep-alive connection is closed
/// after the idle timeout; one over --api-max-connections gets 503. The
/// API keeps answering everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_timeouts_and_connection_cap() {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    let s = server_with(|c| {
        c.api_header_timeout_ms = 300;
        c.api_body_timeout_ms = 300;
        c.api_idle_timeout_ms = 600;
        c.api_max_connections = 3;
    })
    .await;
    let started = std::time::Instant::now();
    let mut half_head = TcpStream::connect(s.api_addr).await.unwrap();
    half_head
        .write_all(b"POST / HTTP/1.1\r\nhost: hato\r\nx-sora-tar")
        .await
        .unwrap();
    let mut half_body = TcpStream::connect(s.api_addr).await.unwrap();
    half_body
        .write_all(b"POST / HTTP/1.1\r\nhost: hato\r\nx-sora-target: Sora_20160711.PushChannel\r\ncontent-length: 100\r\n\r\n{\"chan")
        .await
        .unwrap();
    // One request, then nothing: idle on a keep-alive connection.
    let mut idle = TcpStream::connect(s.api_addr).await.unwrap();
    idle.write_all(b"GET /.ok HTTP/1.1\r\nhost: hato\r\n\r\n")
        .await
        .unwrap();
    // Three connections held: a fourth is refused, with a JSON 503.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (status, head, body) = http(&s, "POST", &[], "{}").await;
    assert_eq!(status, 503, "{head}{body}");
    assert!(body.contains("TOO-MANY-CONNECTIONS"), "{body}");

    let (closed, got) = closed_within(&mut half_head, T).await;
    assert!(closed && got.is_empty(), "half a head: {got:?}");
    let header_closed = started.elapsed();
    let (closed, got) = closed_within(&mut half_body, T).await;
    assert!(
        closed && got.starts_with("HTTP/1.1 408"),
        "half a body: {got:?}"
    );
    assert!(got.contains("REQUEST-TIMEOUT"), "{got}");
    let (closed, got) = closed_within(&mut idle, T).await;
    assert!(closed && got.starts_with("HTTP/1.1 200"), "idle: {got:?}");
    let idle_closed = started.elapsed();
    assert!(
        header_closed < idle_closed,
        "the header timeout ({header_closed:?}) is not the idle one ({idle_closed:?})"
    );
    // Places are free again, and the API answers.
    let (status, _) = api(
        &s,
        "Sora_20160711.PushChannel",
        r#"{"channel_id":"x","data":{}}"#,
    )
    .await;
    assert_eq!(status, 200);
}

/// The hato binary, started by bash after `prelude`, on ephemeral ports
/// with its default logging: the process (killed on drop), its signaling
/// and API addresses, and its log lines.
async fn spawn_hato(
    prelude: &str,
    args: &str,
) -> (
    tokio::process::Child,
    String,
    String,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "{prelude} exec {} --signaling-addr 127.0.0.1:0 --api-addr 127.0.0.1:0 --rtc-addr 127.0.0.1:0 --rtc-shards 1 {args}",
            env!("CARGO_BIN_EXE_hato")
        ))
        .env_remove("HATO_LOG")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut signaling, mut api) = (None, None);
    while signaling.is_none() {
        let line = tokio::time::timeout(T, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .expect("hato says where it serves");
        let json: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        let field = |name: &str| {
            let text = match json["fields"][name].as_str() {
                Some(v) => format!("{name}={v}"),
                None => line.clone(),
            };
            text.split(&format!("{name}=")).nth(1).map(|r| {
                r.split_whitespace()
                    .next()
                    .unwrap()
                    .trim_start_matches("wss://")
                    .trim_start_matches("https://")
                    .trim_start_matches("ws://")
                    .trim_start_matches("http://")
                    .split('/')
                    .next()
                    .unwrap()
                    .to_owned()
            })
        };
        if line.contains("hato is serving") {
            signaling = field("signaling");
            api = field("api");
        }
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, signaling.unwrap(), api.unwrap(), rx)
}

/// The hato binary with at most 48 open files: a flood of connections
/// exhausts them, the accept loop says so at most once a second, and once
/// the flood goes the server serves a new peer again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_is_logged_once_a_second_and_survived() {
    let (child, signaling, api, mut lines) = spawn_hato("ulimit -n 48 &&", "").await;
    let lines = tokio::spawn(async move {
        let mut fd_lines = Vec::new();
        while let Some(line) = lines.recv().await {
            if line.contains("out of file descriptors") {
                fd_lines.push(std::time::Instant::now());
            }
        }
        fd_lines
    });
    let flood_started = std::time::Instant::now();
    let mut flood = Vec::new();
    for _ in 0..80 {
        flood.push(tokio::net::TcpStream::connect(&signaling).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let flood_time = flood_started.elapsed();
    drop(flood);
    // Serving again: a WebSocket peer connects and gets a push.
    let url = format!("ws://{signaling}/signaling");
    let mut peer = loop {
        let o = ClientOptions::new(&url, "fd", "recvonly");
        match Client::connect(&o).await {
            Ok(mut c) => {
                if c.wait_connected(T).await {
                    break c;
                }
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
        assert!(
            flood_started.elapsed() < Duration::from_secs(30),
            "never served again"
        );
    };
    let (status, _, body) = http_to(
        &api,
        "POST",
        &[("x-sora-target", "Sora_20160711.PushChannel")],
        r#"{"channel_id":"fd","data":{"ok":1}}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (msg, _) = next_push(&mut peer).await.unwrap();
    assert_eq!(msg["data"]["ok"], 1);
    drop(peer);
    drop(child);
    let fd_lines = lines.await.unwrap();
    eprintln!("{} out-of-fds lines in {flood_time:?}", fd_lines.len());
    assert!(!fd_lines.is_empty(), "running out was never logged");
    let allowed = flood_time.as_secs() as usize + 2;
    assert!(
        fd_lines.len() <= allowed,
        "{} lines in {flood_time:?}",
        fd_lines.len()
    );
}

/// `signaling_notify_metadata` over --notify-metadata-limit is refused at
/// connect; a joiner's own connection.created carries at most 256 KiB of
/// the others' metadata (the rest are listed by id), so one join never
/// builds N × the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_metadata_is_bounded() {
    let s = server_with(|c| c.notify_metadata_limit = 200_000).await;
    let big = |n: usize| json!({"pad": "m".repeat(n)});
    let mut too_big = json!({"type": "connect", "role": "recvonly", "channel_id": "meta"});
    too_big["signaling_notify_metadata"] = big(200_001);
    let (code, reason) = refused(&s, vec![text(too_big)]).await;
    assert_eq!(code, 4490);
    assert!(reason.contains("--notify-metadata-limit"), "{reason}");

    let with_metadata = |n: usize| {
        let mut o = opts(&s, "meta", "recvonly");
        o.extra.insert("signaling_notify_metadata".into(), big(n));
        o
    };
    let _a = connected(&with_metadata(150_000)).await;
    let _b = connected(&with_metadata(150_000)).await;
    let mut joiner = Client::connect(&opts(&s, "meta", "recvonly"))
        .await
        .unwrap();
    let id = joiner.connection_id.clone();
    let created = match joiner
        .wait_for(T, |e| {
            matches!(e, ClientEvent::Notify { message, .. }
                if message["event_type"] == "connection.created" && message["connection_id"] == id.as_str())
        })
        .await
    {
        Some(ClientEvent::Notify { message, .. }) => message,
        other => panic!("{other:?}"),
    };
    let listed = created["data"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    let with: Vec<bool> = listed.iter().map(|e| e.get("metadata").is_some()).collect();
    assert_eq!(with.iter().filter(|w| **w).count(), 1, "{with:?}");
    assert!(listed.iter().all(|e| e["connection_id"].is_string()));
}

/// Channels a peer opens itself — one named like hato's own `signaling` —
/// are closed by hato and counted; the session goes on, pushes still come
/// on hato's `push` channel, and hato's own `signaling` still carries the
/// peer's `disconnect`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_a_peer_opens_are_refused_and_counted() {
    let s = server().await;
    let mut c = switched_client(&s, "own", true).await;
    let refused = || engine_count(&s, |e| &e.refused_channels);
    c.open_channel("signaling");
    c.open_channel("#spam");
    for _ in 0..500 {
        if refused() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(refused(), 2);
    // Let the closes reach the client, so that its sends on `signaling`
    // take hato's channel again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(still_served(&s, &mut c, "own").await, Via::DataChannel);
    assert_eq!(s.table().len(), 1);
    c.send_dc(
        "signaling",
        r#"{"type":"disconnect","reason":"NO-ERROR"}"#,
        true,
    );
    table_len(&s, 0).await;
}

/// A peer that closes hato's `push` channel mid-session would lose every
/// later push without a word: the session ends with DATA-CHANNEL-CLOSED
/// (a `close` message on `signaling`, DataChannel-only) and is counted; a
/// send on a channel that is gone is reported and counted by the engine.
/// Everyone else keeps being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_datachannel_ends_the_session_with_a_reason() {
    let s = server().await;
    let mut other = switched_client(&s, "lost", true).await;
    let mut c = switched_client(&s, "lost", true).await;
    c.close_channel("push");
    expect_server_close(&mut c, 1000, "DATA-CHANNEL-CLOSED").await;
    table_len(&s, 1).await;
    assert_eq!(
        s.shared
            .table
            .stats
            .channel_failures
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    push(
        &s,
        "Sora_20160711.PushChannel",
        json!({"channel_id": "lost", "data": {"n": 1}}),
    )
    .await;
    assert!(next_push(&mut other).await.is_some());

    // The engine: a send on a channel that does not exist is an event
    // (once) and a count, not a debug line.
    let engine = hato::client::default_engine();
    let (offerer, offer, mut offer_events) = s.shared.engine.offer(&["push"]).await.unwrap();
    let (_answerer, answer, _answer_events) = engine.answer(&offer).await.unwrap();
    offerer.apply_answer(&answer).await.unwrap();
    let failed_before = engine_count(&s, |e| &e.failed_sends);
    offerer.send("nope", bytes::Bytes::from_static(b"x"), true);
    offerer.send("nope", bytes::Bytes::from_static(b"y"), true);
    let ev = tokio::time::timeout(T, async {
        while let Some(ev) = offer_events.recv().await {
            if let hato_datachannel::PeerEvent::SendFailed { label, .. } = ev {
                return Some(label);
            }
        }
        None
    })
    .await
    .unwrap();
    assert_eq!(ev.as_deref(), Some("nope"));
    let failed = || engine_count(&s, |e| &e.failed_sends) - failed_before;
    for _ in 0..200 {
        if failed() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(failed(), 2);
}

/// A peer that sends a thousand malformed messages makes hato log at most
/// 20 lines a second about it (the flood guard of src/logging.rs), and is
/// still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_flood_the_log() {
    let (_child, signaling, api, mut lines) = spawn_hato("", "").await;
    let url = format!("ws://{signaling}/signaling");
    let mut o = ClientOptions::new(&url, "flood", "recvonly");
    o.data_channel_signaling = Some(true);
    o.ignore_disconnect_websocket = Some(false);
    let mut c = Client::connect(&o).await.unwrap();
    assert!(!switched(&mut c).await, "hybrid");
    let started = std::time::Instant::now();
    for i in 0..1000 {
        c.send_dc_raw("signaling", format!("not json {i}").as_bytes(), true);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let elapsed = started.elapsed();
    let mut dropped_lines = 0;
    while let Ok(line) = lines.try_recv() {
        if line.contains("DataChannel message dropped") {
            dropped_lines += 1;
        }
    }
    eprintln!("{dropped_lines} lines for 1000 malformed messages in {elapsed:?}");
    assert!(dropped_lines >= 1, "the first ones are logged");
    assert!(
        dropped_lines <= 20 * (elapsed.as_secs() as usize + 1),
        "{dropped_lines} lines in {elapsed:?}"
    );
    let (status, _, _) = http_to(
        &api,
        "POST",
        &[("x-sora-target", "Sora_20160711.PushChannel")],
        r#"{"channel_id":"flood","data":{"still":"served"}}"#,
    )
    .await;
    assert_eq!(status, 200);
    let (msg, _) = next_push(&mut c).await.expect("still served");
    assert_eq!(msg["data"]["still"], "served");
}

/// --api-token: every call needs `Authorization: Bearer <token>`; without
/// it, or with another, 401 and a JSON error, and nothing is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_token_is_required_when_set() {
    let s = server_with(|c| c.api_token = Some("s3cret".into())).await;
    let mut c = connected(&opts(&s, "tok", "recvonly")).await;
    let body = r#"{"channel_id":"tok","data":{"n":1}}"#;
    let target = ("x-sora-target", "Sora_20160711.PushChannel");
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("s3cret"),
        Some("Bearer s3cre"),
    ] {
        let mut headers = vec![target];
        if let Some(a) = auth {
            headers.push(("authorization", a));
        }
        let (status, head, answer) = http(&s, "POST", &headers, body).await;
        assert_eq!(status, 401, "{auth:?}");
        assert!(head.contains("www-authenticate: bearer"), "{head}");
        assert!(answer.contains("UNAUTHORIZED"), "{answer}");
    }
    no_push(&mut c).await;
    let (status, _, _) = http(
        &s,
        "POST",
        &[target, ("authorization", "Bearer s3cret")],
        body,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(next_push(&mut c).await.unwrap().0["data"]["n"], 1);
}

/// A real HTTP webhook for the tests: answers by the `answer` key of the
/// peer's `metadata`, and keeps every request body it got.
async fn auth_webhook() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use http_body_util::{BodyExt, Full};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/auth", listener.local_addr().unwrap());
    let seen: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let log = log.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let log = log.clone();
                        async move {
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let text = String::from_utf8_lossy(&body).into_owned();
                            log.lock().unwrap().push(text.clone());
                            let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                            let (status, answer) =
                                match v["metadata"]["answer"].as_str().unwrap_or("allow") {
                                    "deny" => (
                                        200,
                                        r#"{"allowed":false,"reason":"NOT-ON-THE-LIST"}"#
                                            .to_owned(),
                                    ),
                                    "override" => (
                                        200,
                                        json!({"allowed": true, "client_id": "from-hook",
                                "metadata": {"greeting": "hi"}, "authn_metadata": {"user": "u1"},
                                "signaling_notify_metadata": {"shown": "by hook"}})
                                        .to_string(),
                                    ),
                                    "slow" => {
                                        tokio::time::sleep(Duration::from_secs(3)).await;
                                        (200, r#"{"allowed":true}"#.to_owned())
                                    }
                                    "quiet" => (
                                        200,
                                        r#"{"allowed":true,"signaling_notify":false}"#.to_owned(),
                                    ),
                                    "500" => (500, "oops".to_owned()),
                                    "garbage" => (200, "hello".to_owned()),
                                    _ => (200, r#"{"allowed":true}"#.to_owned()),
                                };
                            let mut resp =
                                hyper::Response::new(Full::new(bytes::Bytes::from(answer)));
                            *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (url, seen)
}

fn with_answer(s: &Server, channel: &str, answer: &str) -> ClientOptions {
    let mut o = opts(s, channel, "recvonly");
    o.extra.insert("metadata".into(), json!({"answer": answer}));
    o
}

/// The auth webhook decides who connects: allowed (the request carries
/// metadata exactly as sent), overrides seen by the client (offer) and by
/// others (notify), denied with its reason (Close 4490), and a timeout, a
/// 500, a garbage answer and an unreachable webhook each refused with a
/// reason that says which — while a peer the webhook allows at the same
/// time is not held up by the slow one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auth_webhook_decides_who_connects() {
    let (url, seen) = auth_webhook().await;
    let s = server_with(|c| {
        c.auth_webhook_url = Some(url.clone());
        c.auth_webhook_timeout_ms = 1000;
        c.node_name = Some("node-a".into());
    })
    .await;
    // Allowed; the webhook sees metadata byte for byte.
    let (mut ws, _) = tokio_tungstenite::connect_async(s.signaling_url())
        .await
        .unwrap();
    ws.send(Message::text(
        r#"{"type":"connect","role":"recvonly","channel_id":"auth","metadata":{"z":1, "answer":"allow","a":[2]},"sora_client":"Sora JavaScript SDK 2026.1.0"}"#,
    ))
    .await
    .unwrap();
    assert!(
        next_ws_text(&mut ws, "\"offer\"").await.is_some(),
        "allowed: an offer"
    );
    drop(ws);
    let first = seen.lock().unwrap()[0].clone();
    assert!(
        first.starts_with(r#"{"metadata":{"z":1, "answer":"allow","a":[2]},"#),
        "{first}"
    );
    let req: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(
        (
            req["channel_id"].as_str(),
            req["role"].as_str(),
            req["node_name"].as_str()
        ),
        (Some("auth"), Some("recvonly"), Some("node-a"))
    );
    assert_eq!(req["sora_client"]["raw"], "Sora JavaScript SDK 2026.1.0");
    assert!(
        req["connection_id"].is_string() && req["id"].is_string() && req["timestamp"].is_string()
    );
    assert_eq!(req["channel_connections"], 0);

    // Overrides: the client's offer, and what the others are told.
    let mut watcher = connected(&with_answer(&s, "auth", "allow")).await;
    let overridden = connected(&with_answer(&s, "auth", "override")).await;
    assert_eq!(overridden.offer["metadata"], json!({"greeting": "hi"}));
    assert_eq!(overridden.offer["client_id"], "from-hook");
    let id = overridden.connection_id.clone();
    let created = watcher
        .wait_for(T, |e| matches!(e, ClientEvent::Notify { message, .. }
            if message["event_type"] == "connection.created" && message["connection_id"] == id.as_str()))
        .await;
    let Some(ClientEvent::Notify { message, .. }) = created else {
        panic!("{created:?}")
    };
    assert_eq!(message["client_id"], "from-hook");
    assert_eq!(message["authn_metadata"], json!({"user": "u1"}));
    assert_eq!(message["metadata"], json!({"shown": "by hook"}));

    // Denied, and each kind of failure, with a reason that says which;
    // the slow one runs beside an allowed peer that is not held up.
    let slow = tokio::spawn({
        let o = with_answer(&s, "auth", "slow");
        async move { Client::connect(&o).await.err() }
    });
    let started = std::time::Instant::now();
    let _quick = connected(&with_answer(&s, "auth", "allow")).await;
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "held up by the slow webhook call"
    );
    for (answer, want) in [
        ("deny", "NOT-ON-THE-LIST"),
        ("500", "AUTH-WEBHOOK-ERROR: the webhook answered 500"),
        (
            "garbage",
            "AUTH-WEBHOOK-ERROR: the answer is not a JSON object",
        ),
    ] {
        match Client::connect(&with_answer(&s, "auth", answer)).await {
            Err(hato::client::ClientError::Refused { code, reason }) => {
                assert_eq!(code, 4490, "{answer}");
                assert!(reason.starts_with(want), "{answer}: {reason}");
            }
            other => panic!("{answer}: {:?}", other.map(|c| c.connection_id)),
        }
    }
    match slow.await.unwrap() {
        Some(hato::client::ClientError::Refused { code: 4490, reason }) => {
            assert!(reason.starts_with("AUTH-WEBHOOK-TIMEOUT"), "{reason}")
        }
        other => panic!("slow: {other:?}"),
    }
    table_len(&s, 3).await;

    // Unreachable.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}/auth", closed.local_addr().unwrap());
    drop(closed);
    let s2 = server_with(|c| c.auth_webhook_url = Some(dead)).await;
    match Client::connect(&opts(&s2, "auth", "recvonly")).await {
        Err(hato::client::ClientError::Refused { code: 4490, reason }) => {
            assert!(
                reason.starts_with("AUTH-WEBHOOK-ERROR: cannot reach"),
                "{reason}"
            )
        }
        other => panic!("unreachable: {:?}", other.map(|c| c.connection_id)),
    }
    assert_eq!(s2.table().len(), 0);
}

/// ListConnections, ListChannelConnections and GetStatsReport over
/// connections in two channels, three roles and both transports; the
/// parameterless targets take an empty body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_and_stats_targets() {
    let s = server().await;
    let _a = connected(&opts(&s, "la", "recvonly")).await;
    let _b = connected(&opts(&s, "la", "sendonly")).await;
    let _c = switched_client(&s, "lb", true).await;
    let _d = connected(&opts(&s, "lb", "sendrecv")).await;
    table_len(&s, 4).await;
    let (status, all) = api(&s, "Sora_20201013.ListConnections", "").await;
    assert_eq!(status, 200, "{all}");
    let all = all.as_array().unwrap().clone();
    assert_eq!(all.len(), 4);
    for c in &all {
        for key in [
            "channel_id",
            "client_id",
            "bundle_id",
            "connection_id",
            "session_id",
            "role",
            "created_time",
            "transport",
        ] {
            assert!(c[key].is_string(), "{key} in {c}");
        }
    }
    let dc: Vec<_> = all
        .iter()
        .filter(|c| c["transport"] == "datachannel")
        .collect();
    assert_eq!(dc.len(), 1);
    assert_eq!(
        (
            dc[0]["channel_id"].as_str(),
            dc[0]["connection_id"].as_str()
        ),
        (Some("lb"), Some(&*_c.connection_id))
    );
    let (status, la) = api(
        &s,
        "Sora_20201013.ListChannelConnections",
        r#"{"channel_id":"la"}"#,
    )
    .await;
    assert_eq!(status, 200);
    let mut roles: Vec<&str> = la
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["role"].as_str().unwrap())
        .collect();
    roles.sort();
    assert_eq!(roles, ["recvonly", "sendonly"]);
    let (status, err) = api(&s, "Sora_20201013.ListChannelConnections", "").await;
    assert_eq!(
        (status, err["error_type"].as_str()),
        (400, Some("INVALID-JSON"))
    );

    push(
        &s,
        "Sora_20160711.PushChannel",
        json!({"channel_id": "lb", "data": {}}),
    )
    .await;
    push(
        &s,
        "Sora_20160711.PushConnection",
        json!({"channel_id": "la", "connection_id": _a.connection_id, "data": {}}),
    )
    .await;
    let (status, report) = api(&s, "Sora_20171010.GetStatsReport", "").await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["total_connections"], 4);
    assert_eq!(
        report["connections"],
        json!({"sendrecv": 1, "sendonly": 1, "recvonly": 2})
    );
    assert_eq!(
        report["connections_by_transport"]["datachannel"]["recvonly"],
        1
    );
    assert_eq!(report["pushes_by_target"]["PushChannel"], 1);
    assert_eq!(report["pushes_by_target"]["PushConnection"], 1);
    assert_eq!(report["deliveries"], 3);
    assert_eq!(
        report["deliveries_by_transport"],
        json!({"websocket": 2, "datachannel": 1})
    );
}

/// Event webhooks: created and destroyed (with the reason) in order per
/// connection, failed for a connection that never came up; a webhook that
/// is down or stuck leaves every session alone, and what it could not take
/// is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_webhooks_in_order_and_never_in_the_way() {
    let (url, seen) = auth_webhook().await;
    let s = server_with(|c| c.event_webhook_url = Some(url.clone())).await;
    let a = connected(&opts(&s, "ev", "recvonly")).await;
    let a_id = a.connection_id.clone();
    a.send_ws(r#"{"type":"disconnect","reason":"NO-ERROR"}"#);
    table_len(&s, 0).await;
    let mut b = opts(&s, "ev", "sendonly");
    b.abandon = Some(hato::client::Abandon::AfterAnswer);
    assert!(matches!(
        Client::connect(&b).await,
        Err(hato::client::ClientError::Abandoned)
    ));
    let events = |seen: &std::sync::Mutex<Vec<String>>| -> Vec<Value> {
        seen.lock()
            .unwrap()
            .iter()
            .map(|t| serde_json::from_str(t).unwrap())
            .collect()
    };
    let mut got = Vec::new();
    for _ in 0..100 {
        got = events(&seen);
        if got.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let of_a: Vec<(&str, &str)> = got
        .iter()
        .filter(|e| e["connection_id"] == a_id.as_str())
        .map(|e| {
            (
                e["type"].as_str().unwrap(),
                e["data"]["reason"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        of_a,
        [
            ("connection.created", ""),
            ("connection.destroyed", "TYPE-DISCONNECT")
        ]
    );
    let created = got
        .iter()
        .find(|e| e["type"] == "connection.created")
        .unwrap();
    for key in [
        "timestamp",
        "id",
        "node_name",
        "session_id",
        "client_id",
        "bundle_id",
    ] {
        assert!(created[key].is_string(), "{key}: {created}");
    }
    assert_eq!(created["data"]["channel_connections"], 1);
    let failed: Vec<&Value> = got
        .iter()
        .filter(|e| e["type"] == "connection.failed")
        .collect();
    assert_eq!(failed.len(), 1, "{got:?}");
    assert_eq!(failed[0]["role"], "sendonly");
    // It went away (its WebSocket with it) before ICE came up.
    assert_eq!(
        failed[0]["data"]["reason"], "WEBSOCKET-ONCLOSE",
        "{}",
        failed[0]
    );

    // A webhook that never answers: the sessions go on; what cannot be
    // queued is dropped and counted.
    let stuck = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stuck_url = format!("http://{}/events", stuck.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((tcp, _)) = stuck.accept().await {
            open.push(tcp);
        }
    });
    let s2 = server_with(|c| {
        c.event_webhook_url = Some(stuck_url);
        c.event_webhook_queue = 4;
        c.event_webhook_timeout_ms = 10_000;
    })
    .await;
    let started = std::time::Instant::now();
    let mut peers = Vec::new();
    // Four workers, each holding one event in flight and one queued:
    // eight events can always be absorbed (connection ids spread them
    // 2-2-2-2 about one time in 26), sixteen never.
    for _ in 0..16 {
        peers.push(connected(&opts(&s2, "stuck", "recvonly")).await);
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "sessions waited on the webhook"
    );
    push(
        &s2,
        "Sora_20160711.PushChannel",
        json!({"channel_id": "stuck", "data": {"still": "served"}}),
    )
    .await;
    for p in &mut peers {
        assert!(next_push(p).await.is_some());
    }
    let counters = &s2.shared.event_webhook.as_ref().unwrap().counters;
    assert!(counters.dropped.load(std::sync::atomic::Ordering::Relaxed) > 0);
    held.abort();

    // One that is down: each event is retried, then given up and counted.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}/events", closed.local_addr().unwrap());
    drop(closed);
    let s3 = server_with(|c| {
        c.event_webhook_url = Some(dead);
        c.event_webhook_retries = 1;
    })
    .await;
    let mut p = connected(&opts(&s3, "down", "recvonly")).await;
    push(
        &s3,
        "Sora_20160711.PushChannel",
        json!({"channel_id": "down", "data": {}}),
    )
    .await;
    assert!(next_push(&mut p).await.is_some());
    let counters = &s3.shared.event_webhook.as_ref().unwrap().counters;
    for _ in 0..100 {
        if counters.given_up.load(std::sync::atomic::Ordering::Relaxed) >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        counters.given_up.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(
        counters
            .failed_calls
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

/// `GET /.ok`: 200 while serving; 503 from the moment shutdown begins,
/// while sessions are still ending (a stalled DataChannel peer keeps the
/// shutdown busy for a couple of seconds), so a load balancer drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_during_shutdown() {
    let s = std::sync::Arc::new(server().await);
    let (status, _, body) = http(&s, "GET", &[], "").await;
    assert_eq!(status, 405, "GET / is not health: {body}");
    let api = s.api_addr.to_string();
    assert_eq!(get(&api, "/.ok").await, (200, r#"{"status":"ok"}"#.into()));
    let c = switched_client(&s, "drain", true).await;
    c.stall_peer();
    let down = tokio::spawn({
        let s = s.clone();
        async move { s.shutdown(Duration::from_secs(5)).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!down.is_finished(), "the stalled peer keeps shutdown busy");
    assert_eq!(
        get(&api, "/.ok").await,
        (503, r#"{"status":"shutting-down"}"#.into())
    );
    down.await.unwrap();
}

/// --log-format json: every line is a JSON object with timestamp, level,
/// target and message; a session's lines carry its connection_id,
/// channel_id and client_id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_parse_line_by_line() {
    let (_child, signaling, _api, mut lines) = spawn_hato("", "--log-format json").await;
    let url = format!("ws://{signaling}/signaling");
    let mut o = ClientOptions::new(&url, "logs", "recvonly");
    o.client_id = Some("alice".into());
    let mut c = Client::connect(&o).await.unwrap();
    assert!(c.wait_connected(T).await);
    let id = c.connection_id.clone();
    c.send_ws(r#"{"type":"disconnect","reason":"NO-ERROR"}"#);
    let mut seen_session = false;
    let until = tokio::time::Instant::now() + T;
    while !seen_session {
        let line = tokio::time::timeout_at(until, lines.recv())
            .await
            .expect("a session line in time")
            .expect("hato still logging");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for key in ["timestamp", "level", "target"] {
            assert!(v[key].is_string(), "{key} in {line}");
        }
        assert!(v["fields"]["message"].is_string(), "{line}");
        if v["span"]["connection_id"] == id.as_str() {
            assert_eq!(v["span"]["channel_id"], "logs", "{line}");
            assert_eq!(v["span"]["client_id"], "alice", "{line}");
            seen_session = true;
        }
    }
}

/// GET /metrics on --metrics-addr, read with a Prometheus text-format
/// parser; counters move as peers connect, pushes go out and peers leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move() {
    let s = server_with(|c| c.metrics_addr = Some("127.0.0.1:0".parse().unwrap())).await;
    let addr = s.metrics_addr.unwrap().to_string();
    let scrape = || scrape_metrics(&addr);
    let value = metric;
    let before = scrape().await;
    assert_eq!(value(&before, "hato_connects_total", &[]), 0.0);
    assert!(value(&before, "process_resident_memory_bytes", &[]) > 0.0);
    assert!(value(&before, "process_open_fds", &[]) > 0.0);

    let ws = connected(&opts(&s, "m", "recvonly")).await;
    let mut dc = switched_client(&s, "m", true).await;
    push(
        &s,
        "Sora_20160711.PushChannel",
        json!({"channel_id": "m", "data": {}}),
    )
    .await;
    assert!(next_push(&mut dc).await.is_some());
    let (status, _) = api(&s, "Sora_20160711.PushChannel", r#"{"channel_id":"m"}"#).await;
    assert_eq!(status, 400);
    ws.send_ws(r#"{"type":"disconnect","reason":"NO-ERROR"}"#);
    table_len(&s, 1).await;

    let after = scrape().await;
    assert_eq!(value(&after, "hato_connects_total", &[]), 2.0);
    let push_ok = [("target", "Sora_20160711.PushChannel"), ("outcome", "ok")];
    assert_eq!(value(&after, "hato_pushes_total", &push_ok), 1.0);
    let push_bad = [
        ("target", "Sora_20160711.PushChannel"),
        ("outcome", "MISSING-KEY"),
    ];
    assert_eq!(value(&after, "hato_pushes_total", &push_bad), 1.0);
    assert_eq!(
        value(
            &after,
            "hato_disconnects_total",
            &[("reason", "TYPE-DISCONNECT")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "hato_deliveries_total",
            &[("transport", "datachannel")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "hato_deliveries_total",
            &[("transport", "websocket")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "hato_connections",
            &[("role", "recvonly"), ("transport", "datachannel")]
        ),
        1.0
    );
    assert_eq!(
        value(&after, "hato_connections", &[("transport", "websocket")]),
        0.0
    );
    // The DataChannel peer's first DTLS flight reached hato before hato's
    // ICE agent had heard its nomination succeed (hato's client, like a
    // browser, starts DTLS as soon as it is nominated): held, not dropped,
    // and none lost for want of room.
    assert!(value(&after, "hato_datagrams_held_total", &[("reason", "ice")]) >= 1.0);
    assert_eq!(
        value(&after, "hato_drops_total", &[("reason", "datagram_early")]),
        0.0
    );
    assert!(after
        .samples
        .iter()
        .any(|smp| smp.metric == "hato_offer_to_connected_seconds"));
    // Health on the metrics listener too.
    assert_eq!(get(&addr, "/.ok").await, (200, r#"{"status":"ok"}"#.into()));

    // One set of names: every drop, hold and pacing reason of
    // GetStatsReport is a label of the same metric with the same value,
    // and /.hato/stats has the same drops, holds, pacing and SCTP events.
    let (_, report) = api(&s, "Sora_20171010.GetStatsReport", "").await;
    let (_, runtime) = get(&s.api_addr.to_string(), "/.hato/stats").await;
    let runtime: Value = serde_json::from_str(&runtime).unwrap();
    let scraped = scrape().await;
    for (key, metric_name) in [
        ("drops", "hato_drops_total"),
        ("held", "hato_datagrams_held_total"),
        ("paced", "hato_paced_total"),
    ] {
        let group = report[key].as_object().unwrap();
        assert!(group.len() >= 2, "{key}: {group:?}");
        for (reason, v) in group {
            assert_eq!(
                value(&scraped, metric_name, &[("reason", reason)]),
                v.as_f64().unwrap(),
                "{key}.{reason}"
            );
        }
    }
    assert_eq!(
        value(
            &scraped,
            "hato_sctp_events_total",
            &[("event", "resent_on_return")]
        ),
        report["sctp"]["resent_on_return"].as_f64().unwrap()
    );
    for key in ["drops", "held", "paced", "sctp", "deliveries"] {
        assert_eq!(runtime[key], report[key], "{key}");
    }
    assert_eq!(report["deliveries"], 2);
    assert_eq!(report["drops"]["outbox_overflow"], 0);
}

/// `GET path` over a fresh connection: status and body.
async fn get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: hato\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (
        head.split(' ').nth(1).unwrap().parse().unwrap(),
        body.to_owned(),
    )
}

/// --config hato.toml: the file sets the ports the binary serves on; an
/// environment variable beats the file and a flag beats both
/// (--print-config shows the effective values); an unknown key or a bad
/// value stops start-up naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_sets_ports_and_yields_to_env_and_flags() {
    let dir = std::env::temp_dir().join(format!("hato-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (sig, api) = (free(), free());
    let file = dir.join("hato.toml");
    std::fs::write(
        &file,
        format!(
            "signaling_addr = \"{sig}\"\napi_addr = \"{api}\"\nrtc_addr = \"127.0.0.1:0\"\nrtc_shards = 1\nmax_connections = 10\nnotify_metadata_limit = 100\ndata_channel_signaling = true\npublic_ips = [\"192.0.2.7\"]\n"
        ),
    )
    .unwrap();
    let hato = env!("CARGO_BIN_EXE_hato");
    let print = |env: &[(&str, &str)], flags: &[&str]| {
        let mut cmd = std::process::Command::new(hato);
        cmd.arg("--config")
            .arg(&file)
            .arg("--print-config")
            .args(flags);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let effective = print(&[], &[]);
    for line in [
        "max_connections = 10",
        "data_channel_signaling = true",
        "public_ips = [\"192.0.2.7\"]",
        "notify_metadata_limit = 100",
    ] {
        assert!(
            effective.lines().any(|l| l == line),
            "{line} in\n{effective}"
        );
    }
    let effective = print(
        &[
            ("HATO_MAX_CONNECTIONS", "20"),
            ("HATO_NOTIFY_METADATA_LIMIT", "200"),
        ],
        &["--notify-metadata-limit", "300"],
    );
    assert!(
        effective.lines().any(|l| l == "max_connections = 20"),
        "env beats the file:\n{effective}"
    );
    assert!(
        effective
            .lines()
            .any(|l| l == "notify_metadata_limit = 300"),
        "a flag beats both:\n{effective}"
    );

    // The file's ports are the ones served.
    let mut child = tokio::process::Command::new(hato)
        .arg("--config")
        .arg(&file)
        .env("HATO_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("ws://{sig}/signaling");
    let mut served = false;
    for _ in 0..100 {
        if let Ok(mut c) = Client::connect(&ClientOptions::new(&url, "cfg", "recvonly")).await {
            assert!(c.wait_connected(T).await);
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "nothing served on {sig}");
    assert_eq!(get(&api.to_string(), "/.ok").await.0, 200);
    let _ = child.start_kill();

    for (text, want) in [
        ("nope = 1\n", "unknown key \"nope\""),
        (
            "max_connections = \"many\"\n",
            "invalid value 'many' for '--max-connections",
        ),
    ] {
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, text).unwrap();
        let out = std::process::Command::new(hato)
            .arg("--config")
            .arg(&bad)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text}");
        assert!(err.contains(want), "{text}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A TLS client for the tests, trusting exactly `roots` (PEM).
fn tls_connector(roots: &[&str]) -> tokio_rustls::TlsConnector {
    let mut store = rustls::RootCertStore::empty();
    for pem in roots {
        use rustls::pki_types::pem::PemObject;
        store
            .add(rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
            .unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

async fn tls_to(
    connector: &tokio_rustls::TlsConnector,
    addr: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.expect("TLS handshake")
}

/// POSTs a push over https; the status.
async fn https_push(connector: &tokio_rustls::TlsConnector, api: &str, body: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = tls_to(connector, api).await;
    let req = format!(
        "POST / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\nx-sora-target: Sora_20160711.PushChannel\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out);
    text.split(' ').nth(1).unwrap_or("0").parse().unwrap_or(0)
}

/// --tls-cert/--tls-key: a peer connects over wss:// and receives a push
/// sent over https://; on SIGHUP the certificate files are read again —
/// new connections get the new certificate while the connected peer stays
/// and keeps receiving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_wss_and_https_and_reloads_on_sighup() {
    let dir = std::env::temp_dir().join(format!("hato-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    let make = || rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let first = make();
    std::fs::write(&cert_path, first.cert.pem()).unwrap();
    std::fs::write(&key_path, first.signing_key.serialize_pem()).unwrap();
    let args = format!(
        "--tls-cert {} --tls-key {}",
        cert_path.display(),
        key_path.display()
    );
    let (child, signaling, api, _lines) = spawn_hato("", &args).await;
    let second = make();
    let connector = tls_connector(&[&first.cert.pem(), &second.cert.pem()]);

    let tls = tls_to(&connector, &signaling).await;
    let (mut ws, _) = tokio_tungstenite::client_async("wss://localhost/signaling", tls)
        .await
        .expect("WebSocket over TLS");
    ws.send(text(
        json!({"type": "connect", "role": "recvonly", "channel_id": "tls"}),
    ))
    .await
    .unwrap();
    let offer: Value =
        serde_json::from_str(&next_ws_text(&mut ws, "\"offer\"").await.unwrap()).unwrap();
    let (_peer, answer, _events) = hato::client::default_engine()
        .answer(offer["sdp"].as_str().unwrap())
        .await
        .unwrap();
    ws.send(text(json!({"type": "answer", "sdp": answer})))
        .await
        .unwrap();
    assert!(next_ws_text(&mut ws, "connection.created").await.is_some());
    let body = r#"{"channel_id":"tls","data":{"over":"https"}}"#;
    assert_eq!(https_push(&connector, &api, body).await, 200);
    let got = next_ws_text(&mut ws, "\"push\"")
        .await
        .expect("the push over wss");
    assert!(got.contains(r#""over":"https""#), "{got}");

    // Reload: new files, SIGHUP.
    std::fs::write(&cert_path, second.cert.pem()).unwrap();
    std::fs::write(&key_path, second.signing_key.serialize_pem()).unwrap();
    let pid = child.id().unwrap() as i32;
    // SAFETY: signals the child this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let want = second.cert.der().to_vec();
    let mut reloaded = false;
    for _ in 0..50 {
        let tls = tls_to(&connector, &api).await;
        let presented = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        if presented == want {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reloaded, "the new certificate is served after SIGHUP");
    let body = r#"{"channel_id":"tls","data":{"after":"reload"}}"#;
    assert_eq!(https_push(&connector, &api, body).await, 200);
    let got = next_ws_text(&mut ws, "\"push\"")
        .await
        .expect("the peer stayed");
    assert!(got.contains(r#""after":"reload""#), "{got}");
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every push answer says in `x-hato-recipients` how many connections it
/// was queued to — 0 when nobody matched — and the body stays Sora's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_answers_carry_the_recipient_count() {
    let s = server().await;
    let a = connected(&opts(&s, "rc", "recvonly")).await;
    let _b = switched_client(&s, "rc", true).await;
    table_len(&s, 2).await;
    for (target, body, want) in [
        (
            "Sora_20160711.PushChannel",
            json!({"channel_id": "rc", "data": {}}),
            2,
        ),
        (
            "Sora_20160711.PushChannel",
            json!({"channel_id": "nobody", "data": {}}),
            0,
        ),
        (
            "Sora_20160711.PushConnection",
            json!({"channel_id": "rc", "connection_id": a.connection_id, "data": {}}),
            1,
        ),
    ] {
        let (status, head, answer) =
            http(&s, "POST", &[("x-sora-target", target)], &body.to_string()).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer, r#"{"data":{},"type":"push"}"#);
        assert_eq!(recipients_in(&head), Some(want), "{target} {body}: {head}");
    }
}

/// Idempotency-Key: a retried push is answered again and delivered once;
/// the key with another body is 422; keys expire with the window and are
/// bounded in number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_retries_deliver_once() {
    let s = server_with(|c| {
        c.idempotency_window = 1;
        c.idempotency_max_keys = 3;
    })
    .await;
    let mut c = connected(&opts(&s, "idem", "recvonly")).await;
    let target = ("x-sora-target", "Sora_20160711.PushChannel");
    let body = r#"{"channel_id":"idem","data":{"n":1}}"#;
    let send = |key: &'static str, body: &'static str| {
        let s = &s;
        async move { http(s, "POST", &[target, ("idempotency-key", key)], body).await }
    };
    let (status, head, first) = send("k1", body).await;
    assert_eq!(status, 200);
    assert!(!head.contains("idempotent-replayed"), "{head}");
    assert_eq!(next_push(&mut c).await.unwrap().0["data"]["n"], 1);
    let (status, head, again) = send("k1", body).await;
    assert_eq!((status, &again), (200, &first));
    assert!(head.contains("idempotent-replayed: true"), "{head}");
    assert!(head.contains("x-hato-recipients: 1"), "{head}");
    // The same place in the channel, not a new one.
    assert!(head.contains("x-hato-offset: 1\r\n"), "{head}");
    assert!(head.contains("x-hato-epoch: "), "{head}");
    no_push(&mut c).await;
    let (status, _, err) = send("k1", r#"{"channel_id":"idem","data":{"n":2}}"#).await;
    assert_eq!(status, 422, "{err}");
    assert!(err.contains("IDEMPOTENCY-KEY-REUSED"), "{err}");
    // Another key is another call.
    assert_eq!(send("k2", body).await.0, 200);
    assert!(next_push(&mut c).await.is_some());
    // At most three live keys.
    assert_eq!(send("k3", body).await.0, 200);
    assert!(next_push(&mut c).await.is_some());
    let (status, _, err) = send("k4", body).await;
    assert_eq!(status, 503, "{err}");
    assert!(err.contains("IDEMPOTENCY-STORE-FULL"), "{err}");
    // After the window the key is new again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, head, _) = send("k1", body).await;
    assert_eq!(status, 200);
    assert!(!head.contains("idempotent-replayed"), "{head}");
    assert!(next_push(&mut c).await.is_some());
}

/// Hato_20261201.PushBatch: items validated first (one bad item: 400
/// naming it, nothing delivered), then applied in order; the answer lists
/// each item's result and recipient count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_validated_whole_and_delivered_in_order() {
    let s = server().await;
    let mut ws = connected(&opts(&s, "bt", "recvonly")).await;
    let mut dc = switched_client(&s, "bt", true).await;
    table_len(&s, 2).await;
    let bad = json!({"pushes": [
        {"target": "Sora_20160711.PushChannel", "channel_id": "bt", "data": {"n": 0}},
        {"target": "Sora_20160711.PushChannel", "channel_id": "bt"}
    ]});
    let (status, err) = api(&s, "Hato_20261201.PushBatch", &bad.to_string()).await;
    assert_eq!(status, 400);
    assert_eq!(err["message"], "pushes[1]: data is missing");
    no_push(&mut ws).await;
    let mut pushes: Vec<Value> = (1..=5)
        .map(|n| json!({"target": "Sora_20160711.PushChannel", "channel_id": "bt", "data": {"n": n}}))
        .collect();
    pushes.push(
        json!({"target": "Sora_20160711.PushConnection", "channel_id": "bt",
                       "connection_id": ws.connection_id, "data": {"n": 6}}),
    );
    pushes.push(
        json!({"target": "Sora_20160711.PushChannel", "channel_id": "empty", "data": {"n": 7}}),
    );
    let (status, answer) = api(
        &s,
        "Hato_20261201.PushBatch",
        &json!({"pushes": pushes}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let counts: Vec<u64> = answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["recipients"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, [2, 2, 2, 2, 2, 1, 0]);
    for (c, want) in [
        (&mut ws, vec![1, 2, 3, 4, 5, 6]),
        (&mut dc, vec![1, 2, 3, 4, 5]),
    ] {
        let mut got = Vec::new();
        for _ in 0..want.len() {
            got.push(next_push(c).await.unwrap().0["data"]["n"].as_u64().unwrap());
        }
        assert_eq!(got, want);
    }
}

// ---- Cluster (--cluster-nats-url): nodes in-process and as processes,
// ---- one real nats-server (Debian's; tests/run installs it).

/// A nats-server on a loopback port, restartable on the same port.
struct Nats {
    port: u16,
    child: Option<std::process::Child>,
}

impl Nats {
    fn binary() -> String {
        for dir in std::env::var("PATH")
            .unwrap_or_default()
            .split(':')
            .chain(["/usr/sbin", "/usr/bin"])
        {
            let p = format!("{dir}/nats-server");
            if std::path::Path::new(&p).exists() {
                return p;
            }
        }
        panic!("nats-server not found: `apt-get install nats-server` (tests/run does it)");
    }

    /// Started on a port nats-server picks itself (`-p -1`, read back from
    /// its ports file): two tests picking "a free port" at once could pick
    /// the same one and share a server.
    async fn start() -> Nats {
        Self::start_with(&[]).await
    }

    async fn start_with(extra: &[&str]) -> Nats {
        let dir = std::env::temp_dir().join(format!("hato-nats-{}", hato_signaling::id::new_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = std::process::Command::new(Self::binary())
            .args(["-a", "127.0.0.1", "-p", "-1", "--ports_file_dir"])
            .arg(&dir)
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server starts");
        let until = tokio::time::Instant::now() + T;
        let port = loop {
            let ports = std::fs::read_dir(&dir)
                .unwrap()
                .flatten()
                .find_map(|e| std::fs::read_to_string(e.path()).ok())
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .and_then(|v| v["nats"][0].as_str().map(str::to_owned));
            if let Some(url) = ports {
                break url.rsplit(':').next().unwrap().parse::<u16>().unwrap();
            }
            assert!(
                tokio::time::Instant::now() < until,
                "nats-server writes its ports file"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let _ = std::fs::remove_dir_all(&dir);
        let n = Nats {
            port,
            child: Some(child),
        };
        n.wait_listening().await;
        n
    }

    /// With JetStream, its store in a directory of its own.
    async fn jetstream() -> Nats {
        let dir = std::env::temp_dir().join(format!("hato-js-{}", hato_signaling::id::new_id()));
        Self::start_with(&["-js", "-sd", dir.to_str().unwrap()]).await
    }

    /// Starts it again on the same port.
    async fn restart(&mut self) {
        let child = std::process::Command::new(Self::binary())
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        self.wait_listening().await;
    }

    async fn wait_listening(&self) {
        let until = tokio::time::Instant::now() + T;
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(tokio::time::Instant::now() < until, "nats-server listens");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn node(nats: &Nats, name: &str) -> Server {
    node_with(nats, name, |_| {}).await
}

async fn node_with(nats: &Nats, name: &str, f: impl FnOnce(&mut Config)) -> Server {
    server_with(|c| {
        c.cluster_nats_url = Some(nats.url());
        c.node_name = Some(name.into());
        c.cluster_node_timeout_ms = 1500;
        c.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
        f(c);
    })
    .await
}

/// Waits until `s` knows `want` other nodes as alive.
async fn knows_nodes(s: &Server, want: &[&str]) {
    let cluster = s.shared.cluster.as_ref().unwrap();
    let until = tokio::time::Instant::now() + T;
    loop {
        let mut live: Vec<String> = cluster.live_nodes().into_iter().collect();
        live.sort();
        if live == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "live nodes {live:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `s` counts `n` connections in `channel`, whichever node holds them.
async fn channel_count(s: &Server, channel: &str, n: usize) {
    let until = tokio::time::Instant::now() + T;
    while s.table().counts(channel).all != n {
        assert!(
            tokio::time::Instant::now() < until,
            "{} connections counted in {channel}, want {n}",
            s.table().counts(channel).all
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn recipients(s: &Server, target: &str, body: Value) -> u64 {
    let (status, head, resp) =
        http(s, "POST", &[("x-sora-target", target)], &body.to_string()).await;
    assert_eq!(status, 200, "{resp}");
    let v: Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(v["data"], body["data"]);
    recipients_in(&head).expect("x-hato-recipients")
}

/// The `x-hato-recipients` of an answer's (lowercased) head.
fn recipients_in(head: &str) -> Option<u64> {
    head.lines()
        .find_map(|l| l.strip_prefix("x-hato-recipients: "))
        .and_then(|v| v.trim().parse().ok())
}

/// Every push and disconnect target accepted by node A reaches exactly
/// its connections on nodes B and C; one API node's pushes arrive in
/// order on every node; notify, counts and listings cover the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_of_three_nodes_serves_every_target_everywhere() {
    let nats = Nats::start().await;
    let (hook_url, hook_seen) = auth_webhook().await;
    let a = node_with(&nats, "a", |c| c.event_webhook_url = Some(hook_url)).await;
    let b = node(&nats, "b").await;
    let c = node(&nats, "c").await;
    knows_nodes(&a, &["b", "c"]).await;
    knows_nodes(&b, &["a", "c"]).await;
    knows_nodes(&c, &["a", "b"]).await;

    // B: a WebSocket peer (client x); C: a switched DataChannel peer
    // (sendrecv) and a WebSocket peer (client x, sendonly).
    let mut on_b = {
        let mut o = opts(&b, "k", "recvonly");
        o.client_id = Some("x".into());
        o.extra
            .insert("signaling_notify_metadata".into(), json!({"on": "b"}));
        connected(&o).await
    };
    let mut dc_on_c = {
        let mut o = dc_opts(&c, "k", true);
        o.role = "sendrecv".into();
        let mut cl = Client::connect(&o).await.unwrap();
        assert!(switched(&mut cl).await);
        cl
    };
    let mut ws_on_c = {
        let mut o = opts(&c, "k", "sendonly");
        o.client_id = Some("x".into());
        connected(&o).await
    };
    channel_count(&a, "k", 3).await;

    // PushChannel: everyone, on both nodes; A counts them as recipients.
    let n = recipients(
        &a,
        "Sora_20160711.PushChannel",
        json!({"channel_id": "k", "data": {"t": "all"}}),
    )
    .await;
    assert_eq!(n, 3);
    for cl in [&mut on_b, &mut dc_on_c, &mut ws_on_c] {
        let (m, _) = next_push(cl).await.expect("PushChannel crosses nodes");
        assert_eq!(m["data"]["t"], "all");
    }
    // PushClient x: the two x's, on B and C.
    push(
        &a,
        "Sora_20160711.PushClient",
        json!({"channel_id": "k", "client_id": "x", "data": {"t": "x"}}),
    )
    .await;
    for cl in [&mut on_b, &mut ws_on_c] {
        assert_eq!(next_push(cl).await.unwrap().0["data"]["t"], "x");
    }
    no_push(&mut dc_on_c).await;
    // PushConnection: the DataChannel peer on C only, over its DataChannel.
    push(
        &a,
        "Sora_20160711.PushConnection",
        json!({"channel_id": "k", "connection_id": dc_on_c.connection_id, "data": {"t": "one"}}),
    )
    .await;
    let (m, via) = next_push(&mut dc_on_c).await.unwrap();
    assert_eq!(
        (m["data"]["t"].as_str(), via),
        (Some("one"), Via::DataChannel)
    );
    // PushChannelByRole sendonly: the WebSocket peer on C only.
    push(
        &a,
        "Sora_20201120.PushChannelByRole",
        json!({"channel_id": "k", "role": "sendonly", "data": {"t": "role"}}),
    )
    .await;
    assert_eq!(
        next_push(&mut ws_on_c).await.unwrap().0["data"]["t"],
        "role"
    );
    no_push(&mut on_b).await;
    no_push(&mut dc_on_c).await;

    // Order: 200 pushes accepted by A, in order on B and on C's DataChannel.
    for i in 0..200 {
        push(
            &a,
            "Sora_20160711.PushChannel",
            json!({"channel_id": "k", "data": {"i": i}}),
        )
        .await;
    }
    for cl in [&mut on_b, &mut dc_on_c, &mut ws_on_c] {
        for i in 0..200 {
            let (m, _) = next_push(cl).await.expect("all 200 arrive");
            assert_eq!(m["data"]["i"], i, "in the order A accepted them");
        }
    }

    // notify: a peer joining on A sees the whole channel; B's peer sees it join.
    let mut on_a = Client::connect(&opts(&a, "k", "recvonly")).await.unwrap();
    let own = on_a
        .wait_for(T, |e| matches!(e, ClientEvent::Notify { .. }))
        .await
        .unwrap();
    let ClientEvent::Notify { message, .. } = own else {
        unreachable!()
    };
    assert_eq!(message["event_type"], "connection.created");
    assert_eq!(message["channel_connections"], 4);
    assert_eq!(message["channel_recvonly_connections"], 2);
    assert_eq!(message["channel_sendrecv_connections"], 1);
    let mut present: Vec<String> = message["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["connection_id"].as_str().unwrap().to_owned())
        .collect();
    present.sort();
    let mut want = vec![
        on_b.connection_id.clone(),
        dc_on_c.connection_id.clone(),
        ws_on_c.connection_id.clone(),
    ];
    want.sort();
    assert_eq!(present, want);
    assert!(message["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["metadata"] == json!({"on": "b"})));
    let seen = on_b
        .wait_for(T, |e| matches!(e, ClientEvent::Notify { message, .. } if message["event_type"] == "connection.created" && message["connection_id"] == on_a.connection_id.as_str()))
        .await
        .expect("B's peer hears of A's");
    let ClientEvent::Notify { message, .. } = seen else {
        unreachable!()
    };
    assert_eq!(message["channel_connections"], 4);
    // A's event webhook counts the whole channel too.
    let until = tokio::time::Instant::now() + T;
    let created = loop {
        let found = hook_seen.lock().unwrap().iter().find_map(|t| {
            let e: Value = serde_json::from_str(t).ok()?;
            (e["type"] == "connection.created" && e["connection_id"] == on_a.connection_id.as_str())
                .then_some(e)
        });
        if let Some(e) = found {
            break e;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "A's connection.created webhook"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(created["node_name"], "a");
    assert_eq!(created["data"]["channel_connections"], 4);
    assert_eq!(created["data"]["channel_recvonly_connections"], 2);

    // Listing on any node: the whole cluster, each with its node.
    channel_count(&b, "k", 4).await;
    for s in [&a, &b] {
        let (status, head, body) = http(
            s,
            "POST",
            &[("x-sora-target", "Sora_20201013.ListChannelConnections")],
            r#"{"channel_id":"k"}"#,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert!(!head.contains("x-hato-partial"), "{head}");
        let list: Vec<Value> = serde_json::from_str(&body).unwrap();
        let mut nodes: Vec<&str> = list
            .iter()
            .map(|c| c["node_name"].as_str().unwrap())
            .collect();
        nodes.sort();
        assert_eq!(nodes, ["a", "b", "c", "c"]);
    }
    let (_, all) = api(&c, "Sora_20201013.ListConnections", "").await;
    assert_eq!(all.as_array().unwrap().len(), 4);

    // Disconnects cross nodes too: A ends B's peer, then everyone on C by role.
    let (status, _) = api(
        &a,
        "Sora_20151104.DisconnectConnection",
        &json!({"channel_id": "k", "connection_id": on_b.connection_id}).to_string(),
    )
    .await;
    assert_eq!(status, 200);
    expect_ws_close(&mut on_b, 1000, "DISCONNECTED-API").await;
    let gone = on_a
        .wait_for(T, |e| matches!(e, ClientEvent::Notify { message, .. } if message["event_type"] == "connection.destroyed"))
        .await
        .expect("A's peer hears B's leave");
    let ClientEvent::Notify { message, .. } = gone else {
        unreachable!()
    };
    assert_eq!(message["connection_id"], on_b.connection_id.as_str());
    assert_eq!(message["channel_connections"], 3);
    let (status, _) = api(
        &b,
        "Sora_20201120.DisconnectChannelByRole",
        r#"{"channel_id":"k","role":"sendonly"}"#,
    )
    .await;
    assert_eq!(status, 200);
    expect_ws_close(&mut ws_on_c, 1000, "DISCONNECTED-API").await;
    table_len(&c, 1).await;
    channel_count(&a, "k", 2).await;

    // A batch accepted by A: in order on B's new peer, one message per channel.
    let mut batch_peer = connected(&opts(&b, "batch", "recvonly")).await;
    channel_count(&a, "batch", 1).await;
    let items: Vec<Value> = (0..5)
        .map(|i| json!({"target": "Sora_20160711.PushChannel", "channel_id": "batch", "data": {"b": i}}))
        .collect();
    let (status, body) = api(
        &a,
        "Hato_20261201.PushBatch",
        &json!({"pushes": items}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for i in 0..5 {
        assert_eq!(next_push(&mut batch_peer).await.unwrap().0["data"]["b"], i);
    }

    // Garbage on every hato subject, from a stranger on the same NATS:
    // dropped, and the cluster serves on.
    let stranger = async_nats::connect(nats.url()).await.unwrap();
    let garbage: [&[u8]; 7] = [
        b"",
        b"not json",
        br#"{"t":"join","node":"z","epoch":1,"seq":1}"#,
        br#"{"t":"leave","node":"b","epoch":0,"seq":99,"channel_id":"k","connection_id":"x"}"#,
        br#"{"channel_id":"batch","items":[{"op":"push","scope":"role","key":"nobody","data":{}}]}"#,
        br#"{"channel_id":"batch","items":[{"op":"explode","scope":"channel"}]}"#,
        br#"{"node":"q","epoch":1,"seq":1,"part":5,"parts":1,"items":[]}"#,
    ];
    let batch_subject = format!(
        "hato.ch.{}",
        "batch"
            .bytes()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    for subject in [
        "hato.presence",
        "hato.list",
        &batch_subject,
        "hato.snapshot.61",
    ] {
        for g in garbage {
            stranger
                .publish(subject.to_owned(), g.to_vec().into())
                .await
                .unwrap();
        }
    }
    stranger.flush().await.unwrap();
    no_push(&mut batch_peer).await;
    push(
        &a,
        "Sora_20160711.PushChannel",
        json!({"channel_id": "batch", "data": {"after": "garbage"}}),
    )
    .await;
    assert_eq!(
        next_push(&mut batch_peer).await.unwrap().0["data"]["after"],
        "garbage"
    );
    knows_nodes(&a, &["b", "c"]).await;

    // What the nodes counted, as Prometheus reads it.
    let ma = scrape_metrics(&a.metrics_addr.unwrap().to_string()).await;
    let mb = scrape_metrics(&b.metrics_addr.unwrap().to_string()).await;
    assert_eq!(metric(&ma, "hato_cluster_nodes", &[]), 2.0);
    assert_eq!(metric(&ma, "hato_cluster_nats_connected", &[]), 1.0);
    assert!(metric(&ma, "hato_cluster_events_total", &[("event", "published")]) >= 200.0);
    assert!(metric(&mb, "hato_cluster_events_total", &[("event", "received")]) >= 200.0);
    assert_eq!(
        metric(
            &ma,
            "hato_cluster_events_total",
            &[("event", "unavailable")]
        ),
        0.0
    );
}

/// Credentials in --cluster-nats-url are sent (async-nats parses them
/// but leaves them out of its CONNECT): right ones join, wrong ones are
/// refused by NATS, and that node's pushes get 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_the_nats_url_are_used() {
    let nats = Nats::start_with(&["--user", "hato", "--pass", "s3cret"]).await;
    let with = |creds: &'static str, name: &'static str| {
        let url = nats.url().replace("nats://", &format!("nats://{creds}@"));
        server_with(move |c| {
            c.cluster_nats_url = Some(url);
            c.node_name = Some(name.into());
            c.cluster_node_timeout_ms = 1500;
        })
    };
    let a = with("hato:s3cret", "a").await;
    let b = with("hato:s3cret", "b").await;
    let intruder = with("hato:wrong", "x").await;
    knows_nodes(&a, &["b"]).await;
    knows_nodes(&b, &["a"]).await;
    let (status, err) = api(
        &intruder,
        "Sora_20160711.PushChannel",
        r#"{"channel_id":"k","data":{}}"#,
    )
    .await;
    assert_eq!(
        (status, err["error_type"].as_str()),
        (503, Some("CLUSTER-UNAVAILABLE"))
    );
    let (_, report) = api(&intruder, "Sora_20171010.GetStatsReport", "").await;
    assert_eq!(report["cluster"]["nats"], "disconnected");
}

/// A node killed without a word leaves every count within the node
/// timeout; with NATS gone, pushes that need other nodes get 503
/// CLUSTER-UNAVAILABLE while local peers keep their sessions; NATS back,
/// the cluster serves again by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_survives_a_killed_node_and_a_nats_restart() {
    let mut nats = Nats::start().await;
    let a = node(&nats, "a").await;
    let b = node(&nats, "b").await;
    // Node C is a process, to be killed with SIGKILL.
    let (mut c_proc, c_signaling, _c_api, _lines) = spawn_hato(
        "",
        &format!(
            "--cluster-nats-url {} --node-name c,ノード --cluster-node-timeout-ms 1500",
            nats.url()
        ),
    )
    .await;
    knows_nodes(&a, &["b", "c,ノード"]).await;
    let mut on_a = connected(&opts(&a, "k", "recvonly")).await;
    let mut on_b = connected(&opts(&b, "k", "recvonly")).await;
    let on_c = connected(&ClientOptions::new(
        &format!("ws://{c_signaling}/signaling"),
        "k",
        "recvonly",
    ))
    .await;
    channel_count(&a, "k", 3).await;

    // A node that stops answering (frozen) but is not yet taken for dead:
    // the listing waits --cluster-request-timeout-ms, then answers without
    // it and names it.
    let c_pid = c_proc.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-STOP", &c_pid])
        .status()
        .unwrap()
        .success());
    let (status, head, body) = http(
        &a,
        "POST",
        &[("x-sora-target", "Sora_20201013.ListChannelConnections")],
        r#"{"channel_id":"k"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        head.contains("x-hato-partial: c%2c%e3%83%8e%e3%83%bc%e3%83%89\r\n"),
        "{head}{body}"
    );
    assert_eq!(serde_json::from_str::<Vec<Value>>(&body).unwrap().len(), 2);

    c_proc.start_kill().unwrap();
    let _ = c_proc.wait().await;
    let gone = on_a
        .wait_for(T, |e| matches!(e, ClientEvent::Notify { message, .. } if message["event_type"] == "connection.destroyed"))
        .await
        .expect("the dead node's peer leaves A's channel");
    let ClientEvent::Notify { message, .. } = gone else {
        unreachable!()
    };
    assert_eq!(message["connection_id"], on_c.connection_id.as_str());
    assert_eq!(message["channel_connections"], 2);
    knows_nodes(&a, &["b"]).await;
    let (status, head, body) = http(
        &a,
        "POST",
        &[("x-sora-target", "Sora_20201013.ListConnections")],
        "",
    )
    .await;
    assert_eq!(status, 200);
    assert!(!head.contains("x-hato-partial"));
    assert_eq!(serde_json::from_str::<Vec<Value>>(&body).unwrap().len(), 2);

    // NATS goes away.
    nats.kill();
    let until = tokio::time::Instant::now() + T;
    let (status, head, body) = loop {
        let r = http(
            &a,
            "POST",
            &[("x-sora-target", "Sora_20160711.PushChannel")],
            r#"{"channel_id":"k","data":{"t":"outage"}}"#,
        )
        .await;
        if r.0 != 200 || tokio::time::Instant::now() > until {
            break r;
        }
        // Pushes accepted before A saw the connection drop.
        let _ = next_push(&mut on_a).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, 503, "{body}");
    assert!(head.contains("retry-after: 1"), "{head}");
    let err: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error_type"], "CLUSTER-UNAVAILABLE");
    no_push(&mut on_a).await;
    // A push to a connection of this very node needs no other node.
    push(
        &a,
        "Sora_20160711.PushConnection",
        json!({"channel_id": "k", "connection_id": on_a.connection_id, "data": {"t": "local"}}),
    )
    .await;
    assert_eq!(next_push(&mut on_a).await.unwrap().0["data"]["t"], "local");
    let (status, _) = api(&a, "Sora_20201013.ListConnections", "").await;
    assert_eq!(status, 503);
    // A new peer still connects to A, and is served by A alone.
    let mut newcomer = connected(&opts(&a, "k2", "recvonly")).await;
    push(
        &a,
        "Sora_20160711.PushConnection",
        json!({"channel_id": "k2", "connection_id": newcomer.connection_id, "data": {"t": "new"}}),
    )
    .await;
    assert_eq!(
        next_push(&mut newcomer).await.unwrap().0["data"]["t"],
        "new"
    );

    // NATS back on the same port: the nodes reconnect, find each other
    // again, and a push accepted by A reaches B's peer.
    nats.restart().await;
    knows_nodes(&a, &["b"]).await;
    knows_nodes(&b, &["a"]).await;
    channel_count(&a, "k", 2).await;
    channel_count(&b, "k", 2).await;
    let until = tokio::time::Instant::now() + T;
    loop {
        let (status, _) = api(
            &a,
            "Sora_20160711.PushChannel",
            r#"{"channel_id":"k","data":{"t":"back"}}"#,
        )
        .await;
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "pushes are accepted again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Pushes A accepted just before it saw NATS go may come first.
    for cl in [&mut on_a, &mut on_b] {
        let mut got_back = false;
        while let Some((m, _)) = next_push(cl).await {
            if m["data"]["t"] == "back" {
                got_back = true;
                break;
            }
            assert_eq!(m["data"]["t"], "outage");
        }
        assert!(got_back, "the push after the outage arrives");
    }
    still_served(&a, &mut on_a, "k").await;
}

/// GETs `/metrics` and parses it as Prometheus would.
async fn scrape_metrics(addr: &str) -> prometheus_parse::Scrape {
    let (status, text) = get(addr, "/metrics").await;
    assert_eq!(status, 200, "{text}");
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines).expect("Prometheus text format")
}

/// The sum of the samples of `name` whose labels include `labels`.
fn metric(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|smp| {
            smp.metric == name && labels.iter().all(|(k, v)| smp.labels.get(k) == Some(*v))
        })
        .map(|smp| match smp.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

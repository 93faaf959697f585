//! End-to-end tests over real sockets: hato in-process on ephemeral
//! loopback ports, real WebSockets, real WebRTC peers (the answering side of
//! hato-datachannel), SDK-shaped `connect` messages.

use hato::client::{Client, ClientEvent, ClientOptions, Via};
use hato::{Config, Server};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

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
async fn http(server: &Server, method: &str, headers: &[(&str, &str)], body: &str) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(server.api_addr).await.unwrap();
    let mut req = format!("{method} / HTTP/1.1\r\nhost: hato\r\nconnection: close\r\ncontent-length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(T, tcp.read_to_end(&mut out)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_owned())
}

async fn next_push(c: &mut Client) -> Option<(Value, Via)> {
    match c.wait_for(T, |e| matches!(e, ClientEvent::Push { .. })).await? {
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
    let (status, body) = api(&s, "Sora_20160711.PushChannel", r#"{"channel_id":"ch1","data":{"n":1}}"#).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"data": {"n": 1}, "type": "push"}));
    let (msg, via) = next_push(&mut c).await.expect("push arrives");
    assert_eq!(msg, json!({"type": "push", "data": {"n": 1}}));
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
        assert!(tokio::time::Instant::now() < until, "table has {} connections, want {n}", s.table().len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts no push arrives within a short window.
async fn no_push(c: &mut Client) {
    let got = c
        .wait_for(Duration::from_millis(300), |e| matches!(e, ClientEvent::Push { .. }))
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
    let mut shared_a = { let mut o = opts(&s, "r", "recvonly"); o.client_id = Some("shared".into()); connected(&o).await };
    let mut shared_b = { let mut o = opts(&s, "r", "sendrecv"); o.client_id = Some("shared".into()); connected(&o).await };
    let mut sendonly = connected(&opts(&s, "r", "sendonly")).await;
    let mut elsewhere = connected(&opts(&s, "other", "recvonly")).await;
    table_len(&s, 4).await;

    push(&s, "Sora_20160711.PushClient", json!({"channel_id": "r", "client_id": "shared", "data": {"to": "client"}})).await;
    for c in [&mut shared_a, &mut shared_b] {
        assert_eq!(next_push(c).await.unwrap().0["data"]["to"], "client");
    }
    no_push(&mut sendonly).await;

    let id = sendonly.connection_id.clone();
    push(&s, "Sora_20160711.PushConnection", json!({"channel_id": "r", "connection_id": id, "data": {"to": "conn"}})).await;
    assert_eq!(next_push(&mut sendonly).await.unwrap().0["data"]["to"], "conn");
    no_push(&mut shared_a).await;

    for (role, who) in [("recvonly", 0), ("sendrecv", 1), ("sendonly", 2)] {
        push(&s, "Sora_20201120.PushChannelByRole", json!({"channel_id": "r", "role": role, "data": {"role": role}})).await;
        let clients = [&mut shared_a, &mut shared_b, &mut sendonly];
        for (i, c) in clients.into_iter().enumerate() {
            if i == who {
                assert_eq!(next_push(c).await.unwrap().0["data"]["role"], role);
            } else {
                no_push(c).await;
            }
        }
    }

    push(&s, "Sora_20160711.PushChannel", json!({"channel_id": "r", "data": {"to": "all"}})).await;
    for c in [&mut shared_a, &mut shared_b, &mut sendonly] {
        assert_eq!(next_push(c).await.unwrap().0["data"]["to"], "all");
    }
    no_push(&mut elsewhere).await;

    // Nobody there is still a success.
    push(&s, "Sora_20160711.PushChannel", json!({"channel_id": "empty", "data": {}})).await;
    push(&s, "Sora_20160711.PushConnection", json!({"channel_id": "r", "connection_id": "nobody", "data": {}})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_created_and_destroyed_reach_the_channel() {
    let s = server().await;
    let mut first = { let mut o = opts(&s, "n", "sendrecv"); o.extra.insert("signaling_notify_metadata".into(), json!({"name": "first"})); connected(&o).await };
    let mut second = Client::connect(&opts(&s, "n", "recvonly")).await.unwrap();
    let own = second.wait_for(T, |e| matches!(e, ClientEvent::Notify { .. })).await.unwrap();
    let ClientEvent::Notify { message, via } = own else { unreachable!() };
    assert_eq!(via, Via::WebSocket);
    assert_eq!(message["event_type"], "connection.created");
    assert_eq!(message["connection_id"], second.connection_id.as_str());
    assert_eq!(message["channel_connections"], 2);
    assert_eq!(message["data"][0]["connection_id"], first.connection_id.as_str());
    assert_eq!(message["data"][0]["metadata"], json!({"name": "first"}));

    let seen = first.wait_for(T, |e| matches!(e, ClientEvent::Notify { message, .. } if message["event_type"] == "connection.created")).await.unwrap();
    let ClientEvent::Notify { message, .. } = seen else { unreachable!() };
    assert_eq!(message["connection_id"], second.connection_id.as_str());
    assert_eq!(message["role"], "recvonly");
    assert_eq!(message["channel_recvonly_connections"], 1);

    second.send_ws(r#"{"type":"disconnect","reason":"NO-ERROR"}"#);
    let gone = first.wait_for(T, |e| matches!(e, ClientEvent::Notify { message, .. } if message["event_type"] == "connection.destroyed")).await.unwrap();
    let ClientEvent::Notify { message, .. } = gone else { unreachable!() };
    assert_eq!(message["connection_id"], second.connection_id.as_str());
    assert_eq!(message["channel_connections"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_pushes_arrive_in_order() {
    let s = server().await;
    let mut c = connected(&opts(&s, "order", "recvonly")).await;
    for i in 0..100 {
        push(&s, "Sora_20160711.PushChannel", json!({"channel_id": "order", "data": {"seq": i}})).await;
    }
    for i in 0..100 {
        let (msg, _) = next_push(&mut c).await.unwrap_or_else(|| panic!("push {i} lost"));
        assert_eq!(msg["data"]["seq"], i);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_closes_with_type_disconnect_and_empties_the_table() {
    let s = server().await;
    let mut c = connected(&opts(&s, "d", "recvonly")).await;
    table_len(&s, 1).await;
    c.send_ws(r#"{"type":"disconnect","reason":"NO-ERROR"}"#);
    let ev = c.wait_for(T, |e| matches!(e, ClientEvent::WebSocketClosed { .. })).await.unwrap();
    assert!(matches!(ev, ClientEvent::WebSocketClosed { code: 1000, ref reason } if reason == "TYPE-DISCONNECT"), "{ev:?}");
    table_len(&s, 0).await;

    // A WebSocket that just drops ends the session the same way.
    let c = connected(&opts(&s, "d", "recvonly")).await;
    table_len(&s, 1).await;
    c.drop_ws();
    table_len(&s, 0).await;
}

/// Opens a raw WebSocket and sends `frames`; returns the close code and reason.
async fn refused(s: &Server, frames: Vec<Message>) -> (u16, String) {
    let (mut ws, _) = tokio_tungstenite::connect_async(s.signaling_url()).await.unwrap();
    for f in frames {
        ws.send(f).await.unwrap();
    }
    let close = tokio::time::timeout(T, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(f)))) => return (u16::from(f.code), f.reason.to_string()),
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
        (vec![text(json!({"type": "connect", "role": "recvonly"}))], "channel_id is missing"),
        (vec![text(json!({"type": "connect", "role": "recvonly", "channel_id": "x".repeat(256)}))], "longer than 255"),
        (vec![text(json!({"type": "connect", "role": "publisher", "channel_id": "c"}))], "role must be"),
        (vec![text(json!({"type": "answer", "sdp": "v=0"}))], "first message must be connect"),
        (vec![text(json!({"type": 7}))], "type"),
        (vec![text(good.clone()), text(good.clone())], "connect was already received"),
        (vec![text(good.clone()), text(json!({"type": "answer", "sdp": "garbage"}))], "answer could not be applied"),
        (vec![], "no connect"),
        (vec![text(good.clone())], "no answer"),
    ];
    for (frames, want) in cases {
        let (code, reason) = refused(&s, frames).await;
        assert_eq!(code, 4490, "{want}: {reason}");
        assert!(reason.contains(want), "reason {reason:?} lacks {want:?}");
    }
    // A peer that vanishes mid-handshake, after the offer.
    let (mut ws, _) = tokio_tungstenite::connect_async(s.signaling_url()).await.unwrap();
    ws.send(text(good.clone())).await.unwrap();
    let _offer = ws.next().await;
    drop(ws);
    // A path other than /signaling is refused at the handshake.
    let other = format!("ws://{}/other", s.signaling_addr);
    assert!(tokio_tungstenite::connect_async(other).await.is_err());

    table_len(&s, 1).await;
    push(&s, "Sora_20160711.PushChannel", json!({"channel_id": "bad", "data": {"still": "here"}})).await;
    assert_eq!(next_push(&mut bystander).await.unwrap().0["data"]["still"], "here");
    // And new peers still connect.
    connected(&opts(&s, "bad", "recvonly")).await;
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
        (pc, r#"{"channel_id":1,"data":{}}"#.into(), 400, "INVALID-TYPE"),
        (pc, r#"{"channel_id":"c","data":[1]}"#.into(), 400, "INVALID-DATA"),
        (pc, r#"{"channel_id":"c","data":"s"}"#.into(), 400, "INVALID-DATA"),
        ("Sora_20160711.PushClient", r#"{"channel_id":"c","data":{}}"#.into(), 400, "MISSING-KEY"),
        ("Sora_20160711.PushConnection", r#"{"channel_id":"c","connection_id":5,"data":{}}"#.into(), 400, "INVALID-TYPE"),
        ("Sora_20201120.PushChannelByRole", r#"{"channel_id":"c","role":"admin","data":{}}"#.into(), 400, "INVALID-ROLE"),
        ("Sora_20160711.Nope", "{}".into(), 400, "UNKNOWN-TARGET"),
        (pc, format!(r#"{{"channel_id":"c","data":{{"x":"{}"}}}}"#, "a".repeat(2000)), 413, "REQUEST-TOO-LARGE"),
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
    assert_eq!((status, serde_json::from_str::<Value>(&body).unwrap()["error_type"].clone()), (400, json!("MISSING-TARGET")));
    let (status, head, _) = http(&s, "GET", &[], "").await;
    assert_eq!(status, 405);
    assert!(head.contains("allow: post, options"), "{head}");
    let (status, _, _) = http(&s, "OPTIONS", &[], "").await;
    assert_eq!(status, 405, "no preflight without a CORS origin");
    // The header name is matched case-insensitively.
    let (status, _, body) = http(&s, "POST", &[("X-Sora-Target", pc)], r#"{"channel_id":"c","data":{"k":1}}"#).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), json!({"data": {"k": 1}, "type": "push"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_when_an_origin_is_configured() {
    let s = server_with(|c| c.api_cors_origin = Some("https://app.example".into())).await;
    let (status, head, _) = http(&s, "OPTIONS", &[("origin", "https://app.example"), ("access-control-request-method", "POST")], "").await;
    assert!(status == 204 || status == 200, "{status}");
    for h in [
        "access-control-allow-origin: https://app.example",
        "access-control-allow-methods: post, options",
        "access-control-allow-headers: origin, x-requested-with, content-type, accept, x-sora-target",
        "access-control-max-age: 1000",
    ] {
        assert!(head.contains(h), "{h} missing from {head}");
    }
    let (status, head, _) = http(&s, "POST", &[("x-sora-target", "Sora_20160711.PushChannel")], r#"{"channel_id":"c","data":{}}"#).await;
    assert_eq!(status, 200);
    assert!(head.contains("access-control-allow-origin: https://app.example"));
}

/// A peer that completes WebRTC but never reads its WebSocket: its outbox
/// fills and it is disconnected, while others keep receiving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_cannot_keep_up_is_disconnected() {
    let s = server_with(|c| c.outbox_capacity = 8).await;
    let mut healthy = connected(&opts(&s, "slow", "recvonly")).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(s.signaling_url()).await.unwrap();
    ws.send(text(json!({"type": "connect", "role": "recvonly", "channel_id": "slow"}))).await.unwrap();
    let offer: Value = match ws.next().await { Some(Ok(Message::Text(t))) => serde_json::from_str(&t).unwrap(), o => panic!("{o:?}") };
    let (_peer, answer, _events) = hato_datachannel::Peer::answer(&Default::default(), offer["sdp"].as_str().unwrap()).await.unwrap();
    ws.send(text(json!({"type": "answer", "sdp": answer}))).await.unwrap();
    table_len(&s, 2).await;
    // Never read `ws` again. Big pushes fill the socket buffers, then the outbox.
    let big = "x".repeat(200_000);
    let mut pushes = 0;
    while s.table().len() == 2 && pushes < 2000 {
        push(&s, "Sora_20160711.PushChannel", json!({"channel_id": "slow", "data": {"big": big}})).await;
        pushes += 1;
    }
    table_len(&s, 1).await;
    assert!(s.shared.table.stats.overflows.load(std::sync::atomic::Ordering::Relaxed) > 0);
    // The healthy peer got every push, in order, none lost.
    for _ in 0..pushes {
        assert!(next_push(&mut healthy).await.is_some());
    }
    drop(ws);
}

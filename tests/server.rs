//! End-to-end tests over real sockets: hato in-process on ephemeral
//! loopback ports, real WebSockets, real WebRTC peers (the answering side of
//! hato-datachannel), SDK-shaped `connect` messages.

use hato::client::{Client, ClientEvent, ClientOptions, Via};
use hato::{Config, Server};
use serde_json::{json, Value};
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

async fn server() -> Server {
    server_with(|_| {}).await
}

async fn server_with(f: impl FnOnce(&mut Config)) -> Server {
    let _ = tracing_subscriber_init();
    let mut cfg = Config::ephemeral();
    f(&mut cfg);
    Server::start(cfg).await.expect("server starts")
}

fn tracing_subscriber_init() -> Option<()> {
    None
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

//! hato-load: loads a Sora-compatible push server (hato, or Sora itself)
//! with virtual WebRTC peers and pushes through its HTTP API, and reports
//! connect times, delivery latency, loss and server cost.
//!
//! Every run is bounded: a duration cap, a peer cap, loopback targets unless
//! told otherwise.

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use hato::client::{now_us, Client, ClientEvent, ClientOptions, Via};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// PushChannel to each channel: fan-out to every peer in it.
    Channel,
    /// PushConnection to each peer in turn.
    Connection,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Arrival {
    /// Fixed arrival rate: push k leaves at start + k/rate, however slow the server.
    Open,
    /// Each API connection sends its next push when the last one is answered.
    Closed,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "hato-load",
    version,
    about = "Load a Sora-compatible push server with virtual WebRTC peers and pushes"
)]
struct Args {
    /// Signaling URL of the server under test.
    #[arg(long, default_value = "ws://127.0.0.1:5000/signaling")]
    signaling_url: String,
    /// HTTP API URL of the server under test.
    #[arg(long, default_value = "http://127.0.0.1:3000/")]
    api_url: String,
    /// Virtual peers to connect (at most 20000).
    #[arg(long, default_value_t = 10)]
    peers: usize,
    /// New peers started per second.
    #[arg(long, default_value_t = 200.0)]
    hatch_rate: f64,
    /// Peers connecting at the same time, at most.
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Channel id; with --channels > 1, "{n}" in it is replaced by the channel number.
    #[arg(long, default_value = "load-{n}")]
    channel: String,
    /// Channels the peers are spread over, round-robin.
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// Role of every peer.
    #[arg(long, default_value = "recvonly")]
    role: String,
    /// client_id pattern; "{i}" is the peer number. Unset: the server's default.
    #[arg(long)]
    client_id: Option<String>,
    /// Ask for DataChannel signaling (pushes on the push DataChannel).
    #[arg(long)]
    data_channel_signaling: bool,
    /// With DataChannel signaling, ask to drop the WebSocket after switched.
    #[arg(long)]
    ignore_disconnect_websocket: bool,
    /// Push scenario.
    #[arg(long, value_enum, default_value_t = Scenario::Channel)]
    scenario: Scenario,
    /// API calls per second (open arrival), or the cap for closed arrival (0: none).
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Arrival model of the API calls.
    #[arg(long, value_enum, default_value_t = Arrival::Open)]
    arrival: Arrival,
    /// Keep-alive HTTP connections used for pushing.
    #[arg(long, default_value_t = 1)]
    api_connections: usize,
    /// Seconds of pushing (at most 600).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Extra bytes of padding in each push's data.
    #[arg(long, default_value_t = 0)]
    payload_bytes: usize,
    /// Seconds between the last peer connected and the first push. Every
    /// connect sends `connection.created` to everyone in the channel, so
    /// N peers queue ~N²/2 notifies; pushes sent before those are out
    /// measure the connect storm, not push latency.
    #[arg(long, default_value_t = 2.0)]
    settle: f64,
    /// Seconds to wait for the last deliveries after the last push.
    #[arg(long, default_value_t = 3.0)]
    drain: f64,
    /// Process id of the server, for its RSS and CPU time (same machine only).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Process name of the server, when the pid is not known (e.g. "hato").
    #[arg(long)]
    server_process: Option<String>,
    /// Write the JSON summary here ("-": stdout).
    #[arg(long)]
    json: Option<String>,
    /// Fail (exit 1) when the delivery p99 exceeds this many ms.
    #[arg(long)]
    max_p99_ms: Option<f64>,
    /// Fail when more deliveries than this are lost.
    #[arg(long)]
    max_lost: Option<u64>,
    /// Fail when fewer than this fraction of peers connect (0..1).
    #[arg(long)]
    min_connect_success: Option<f64>,
    /// Allow non-loopback targets (only towards hosts you run).
    #[arg(long)]
    allow_remote: bool,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

/// The part of a push hato-load reads: its sequence number and send time
/// (µs); the padding and everything else is skipped, not built.
#[derive(serde::Deserialize)]
struct SeqPush {
    data: Seq,
}

#[derive(serde::Deserialize)]
struct Seq {
    seq: u64,
    ts: u64,
}

/// What one peer saw.
#[derive(Default)]
struct PeerRecord {
    latencies: Option<Histogram<u64>>,
    /// (seq, latency µs) of each first receipt, for last-peer latency.
    firsts: Vec<(u64, u64)>,
    seen: Vec<bool>,
    received: u64,
    duplicated: u64,
    out_of_order: u64,
    last_seq: Option<u64>,
    by_ws: u64,
    by_dc: u64,
}

impl PeerRecord {
    fn record(&mut self, seq: u64, latency_us: u64, via: Via) {
        let i = seq as usize;
        if self.seen.len() <= i {
            self.seen.resize(i + 1, false);
        }
        if self.seen[i] {
            self.duplicated += 1;
            return;
        }
        self.seen[i] = true;
        self.received += 1;
        match via {
            Via::WebSocket => self.by_ws += 1,
            Via::DataChannel => self.by_dc += 1,
        }
        if self.last_seq.is_some_and(|l| seq < l) {
            self.out_of_order += 1;
        }
        self.last_seq = Some(self.last_seq.map_or(seq, |l| l.max(seq)));
        let _ = self
            .latencies
            .get_or_insert_with(hist)
            .record(latency_us.max(1));
        self.firsts.push((seq, latency_us));
    }
}

struct Peer {
    connection_id: String,
    channel: usize,
    record: Arc<Mutex<PeerRecord>>,
}

#[derive(Default)]
struct Counters {
    connected: AtomicUsize,
    failed: AtomicUsize,
    pushes_ok: AtomicU64,
    pushes_failed: AtomicU64,
    deliveries: AtomicU64,
}

fn proc_stat(pid: u32) -> Option<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some((rss_kb, ticks as f64 / 100.0))
}

/// The live process called `name` (zombies left by a killed server skipped).
fn find_pid(name: &str) -> Option<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let state = stat.rsplit(')').next()?.split_whitespace().next()?;
        (comm.trim() == name && pid != me && state != "Z").then_some(pid)
    })
}

fn is_loopback_url(url: &str) -> bool {
    let authority = url
        .split("://")
        .nth(1)
        .unwrap_or("")
        .split('/')
        .next()
        .unwrap_or("");
    if authority.starts_with("[::1]") {
        return true;
    }
    let host = authority.split(':').next().unwrap_or("");
    host == "localhost"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn quantiles(h: &Histogram<u64>, scale: f64) -> Value {
    if h.is_empty() {
        return Value::Null;
    }
    json!({
        "p50": h.value_at_quantile(0.50) as f64 / scale,
        "p90": h.value_at_quantile(0.90) as f64 / scale,
        "p95": h.value_at_quantile(0.95) as f64 / scale,
        "p99": h.value_at_quantile(0.99) as f64 / scale,
        "max": h.max() as f64 / scale,
        "count": h.len(),
    })
}

async fn connect_peer(args: &Args, i: usize) -> Result<(Client, Duration, Duration), String> {
    let channel = i % args.channels;
    let mut opts = ClientOptions::new(
        &args.signaling_url,
        &args.channel.replace("{n}", &channel.to_string()),
        &args.role,
    );
    opts.client_id = args
        .client_id
        .as_ref()
        .map(|p| p.replace("{i}", &i.to_string()));
    opts.data_channel_signaling = Some(args.data_channel_signaling);
    opts.ignore_disconnect_websocket = Some(args.ignore_disconnect_websocket);
    opts.extra.insert("sora_client".into(), json!("hato-load"));
    let start = Instant::now();
    let mut c = Client::connect(&opts).await.map_err(|e| e.to_string())?;
    // Connected: own connection.created; with DataChannel signaling also
    // switched and the push channel open.
    let (mut created, mut switched, mut push_open) = (
        false,
        !args.data_channel_signaling,
        !args.data_channel_signaling,
    );
    let mut push_open_at = None;
    let id = c.connection_id.clone();
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    while !(created && switched && push_open) {
        match tokio::time::timeout_at(until, c.events.recv()).await {
            Ok(Some(ClientEvent::Notify { message, .. })) => {
                created |= message["event_type"] == "connection.created"
                    && message["connection_id"] == id.as_str()
            }
            Ok(Some(ClientEvent::Switched { .. })) => switched = true,
            Ok(Some(ClientEvent::Open(l))) if l == "push" => {
                push_open = true;
                push_open_at = Some(Instant::now());
            }
            Ok(Some(ClientEvent::WebSocketClosed { code, reason })) if !switched => {
                return Err(format!("closed {code} {reason}"))
            }
            Ok(Some(ClientEvent::PeerFailed(r))) => return Err(format!("peer failed: {r}")),
            Ok(Some(_)) => {}
            Ok(None) => return Err("client ended".into()),
            Err(_) => return Err("not connected within 30 s".into()),
        }
    }
    let offer_to_ready = push_open_at
        .unwrap_or_else(Instant::now)
        .duration_since(c.offer_at);
    Ok((c, start.elapsed(), offer_to_ready))
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn api_connection(api_url: &str) -> Result<Sender, String> {
    let authority = api_url
        .split("://")
        .nth(1)
        .unwrap_or("")
        .split('/')
        .next()
        .unwrap_or("")
        .to_owned();
    let tcp = tokio::net::TcpStream::connect(&authority)
        .await
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(send)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if args.peers == 0 || args.peers > 20_000 {
        eprintln!("hato-load: --peers must be 1..=20000");
        std::process::exit(2);
    }
    if !(args.duration > 0.0 && args.duration <= 600.0) || args.drain > 60.0 || args.settle > 60.0 {
        eprintln!("hato-load: --duration must be in (0, 600] s, --drain and --settle at most 60 s: runs are bounded");
        std::process::exit(2);
    }
    if args.arrival == Arrival::Open && args.rate <= 0.0 {
        eprintln!("hato-load: open arrival needs --rate > 0");
        std::process::exit(2);
    }
    if !(args.allow_remote
        || is_loopback_url(&args.signaling_url) && is_loopback_url(&args.api_url))
    {
        eprintln!("hato-load: targets must be loopback; pass --allow-remote for a host you run");
        std::process::exit(2);
    }
    let tty = std::io::stderr().is_terminal();
    let server_pid = args
        .server_pid
        .or_else(|| args.server_process.as_deref().and_then(find_pid));
    let before = server_pid.and_then(proc_stat);
    let counters = Arc::new(Counters::default());
    let failures: Arc<Mutex<std::collections::BTreeMap<String, usize>>> = Arc::default();
    let connect_hist = Arc::new(Mutex::new(hist()));
    let ready_hist = Arc::new(Mutex::new(hist()));

    // Phase 1: connect the peers at the hatch rate, bounded concurrency.
    let sem = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut joins = Vec::new();
    let t0 = Instant::now();
    for i in 0..args.peers {
        let at = t0 + Duration::from_secs_f64(i as f64 / args.hatch_rate.max(0.001));
        tokio::time::sleep_until(at.into()).await;
        let permit = sem.clone().acquire_owned().await.expect("semaphore open");
        let (a, c, f, ch, rh) = (
            args.clone(),
            counters.clone(),
            failures.clone(),
            connect_hist.clone(),
            ready_hist.clone(),
        );
        joins.push(tokio::spawn(async move {
            let result = connect_peer(&a, i).await;
            drop(permit);
            match result {
                Ok((client, took, ready)) => {
                    c.connected.fetch_add(1, Ordering::Relaxed);
                    let _ = ch.lock().unwrap().record(took.as_micros().max(1) as u64);
                    let _ = rh.lock().unwrap().record(ready.as_micros().max(1) as u64);
                    Some((i, client))
                }
                Err(e) => {
                    c.failed.fetch_add(1, Ordering::Relaxed);
                    *f.lock().unwrap().entry(e).or_default() += 1;
                    None
                }
            }
        }));
        if tty && i % 10 == 0 {
            eprint!(
                "\rconnecting: {} connected, {} failed   ",
                counters.connected.load(Ordering::Relaxed),
                counters.failed.load(Ordering::Relaxed)
            );
        }
    }
    let mut clients = Vec::new();
    for j in joins {
        if let Ok(Some(c)) = j.await {
            clients.push(c);
        }
    }
    let connect_secs = t0.elapsed().as_secs_f64();
    let connected_rss = server_pid.and_then(proc_stat);

    // Phase 2: every peer records what it receives.
    let mut peers = Vec::new();
    let mut per_channel = vec![0u64; args.channels];
    for (i, mut client) in clients {
        let record = Arc::new(Mutex::new(PeerRecord::default()));
        let channel = i % args.channels;
        per_channel[channel] += 1;
        peers.push(Peer {
            connection_id: client.connection_id.clone(),
            channel,
            record: record.clone(),
        });
        let counters = counters.clone();
        tokio::spawn(async move {
            while let Some(ev) = client.events.recv().await {
                if let ClientEvent::Push { text, via, at_us } = ev {
                    let Ok(SeqPush {
                        data: Seq { seq, ts },
                    }) = serde_json::from_slice(&text)
                    else {
                        continue;
                    };
                    record
                        .lock()
                        .unwrap()
                        .record(seq, at_us.saturating_sub(ts), via);
                    counters.deliveries.fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(client);
        });
    }
    let targets: Arc<Vec<(String, usize)>> = Arc::new(
        peers
            .iter()
            .map(|p| (p.connection_id.clone(), p.channel))
            .collect(),
    );

    // Phase 3: push, once the connect storm has settled.
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    let pushing = server_pid.and_then(proc_stat);
    let next = Arc::new(AtomicU64::new(0));
    let push_start = Instant::now();
    let end = push_start + Duration::from_secs_f64(args.duration);
    let accepted: Arc<Mutex<Vec<(u64, usize)>>> = Arc::default();
    let api_latency = Arc::new(Mutex::new(hist()));
    let mut workers = Vec::new();
    let pad = "x".repeat(args.payload_bytes);
    for _ in 0..args.api_connections.max(1) {
        let (args, next, accepted, counters, targets, api_latency, pad) = (
            args.clone(),
            next.clone(),
            accepted.clone(),
            counters.clone(),
            targets.clone(),
            api_latency.clone(),
            pad.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut send = match api_connection(&args.api_url).await {
                Ok(s) => s,
                Err(e) => return eprintln!("hato-load: API connection failed: {e}"),
            };
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if args.rate > 0.0 {
                    let at = push_start + Duration::from_secs_f64(seq as f64 / args.rate);
                    if at >= end {
                        break;
                    }
                    tokio::time::sleep_until(at.into()).await;
                } else if Instant::now() >= end {
                    break;
                }
                let (target, body, channel) = match args.scenario {
                    Scenario::Channel => {
                        let ch = (seq as usize) % args.channels;
                        let body = json!({"channel_id": args.channel.replace("{n}", &ch.to_string()), "data": {"seq": seq, "ts": now_us(), "pad": pad}});
                        ("Sora_20160711.PushChannel", body, ch)
                    }
                    Scenario::Connection => {
                        if targets.is_empty() { break; }
                        let (id, ch) = &targets[(seq as usize) % targets.len()];
                        let body = json!({"channel_id": args.channel.replace("{n}", &ch.to_string()), "connection_id": id, "data": {"seq": seq, "ts": now_us(), "pad": pad}});
                        ("Sora_20160711.PushConnection", body, *ch)
                    }
                };
                let req = hyper::Request::post(&args.api_url)
                    .header("host", "hato")
                    .header("x-sora-target", target)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body.to_string())))
                    .expect("valid request");
                let sent = Instant::now();
                if send.ready().await.is_err() { break; }
                match send.send_request(req).await {
                    Ok(resp) => {
                        let ok = resp.status() == 200;
                        let _ = resp.into_body().collect().await;
                        let _ = api_latency.lock().unwrap().record(sent.elapsed().as_micros().max(1) as u64);
                        if ok {
                            counters.pushes_ok.fetch_add(1, Ordering::Relaxed);
                            accepted.lock().unwrap().push((seq, channel));
                        } else {
                            counters.pushes_failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => {
                        counters.pushes_failed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        }));
    }
    // Live progress on a terminal.
    let progress = {
        let (counters, peers_records): (_, Vec<_>) = (
            counters.clone(),
            peers.iter().map(|p| p.record.clone()).collect(),
        );
        tokio::spawn(async move {
            if !tty {
                return;
            }
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let mut h = hist();
                for r in &peers_records {
                    if let Some(l) = &r.lock().unwrap().latencies {
                        let _ = h.add(l);
                    }
                }
                eprint!(
                    "\rpeers {} | pushes {} | deliveries {} | p99 {:.1} ms     ",
                    counters.connected.load(Ordering::Relaxed),
                    counters.pushes_ok.load(Ordering::Relaxed),
                    counters.deliveries.load(Ordering::Relaxed),
                    if h.is_empty() {
                        0.0
                    } else {
                        h.value_at_quantile(0.99) as f64 / 1000.0
                    },
                );
            }
        })
    };
    for w in workers {
        let _ = w.await;
    }
    let push_secs = push_start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(args.drain)).await;
    progress.abort();
    if tty {
        eprintln!();
    }
    let after = server_pid.and_then(proc_stat);

    // Phase 4: report.
    let accepted = accepted.lock().unwrap().clone();
    let mut latency = hist();
    let mut last_peer = hist();
    let (mut received, mut duplicated, mut out_of_order, mut by_ws, mut by_dc) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut max_by_seq: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    let mut expected = 0u64;
    for (seq, channel) in &accepted {
        expected += if args.scenario == Scenario::Channel {
            per_channel[*channel]
        } else {
            1
        };
        max_by_seq.insert(*seq, 0);
    }
    for p in &peers {
        let r = p.record.lock().unwrap();
        received += r.received;
        duplicated += r.duplicated;
        out_of_order += r.out_of_order;
        by_ws += r.by_ws;
        by_dc += r.by_dc;
        if let Some(h) = &r.latencies {
            let _ = latency.add(h);
        }
        for (seq, lat) in &r.firsts {
            if let Some(m) = max_by_seq.get_mut(seq) {
                *m = (*m).max(*lat);
            }
        }
    }
    for m in max_by_seq.values() {
        if *m > 0 {
            let _ = last_peer.record(*m);
        }
    }
    let lost = expected.saturating_sub(received);
    let connected = counters.connected.load(Ordering::Relaxed);
    let summary = json!({
        "peers": {"requested": args.peers, "connected": connected, "failed": counters.failed.load(Ordering::Relaxed),
                  "failure_reasons": *failures.lock().unwrap(), "connect_seconds": connect_secs},
        "mode": {"data_channel_signaling": args.data_channel_signaling, "ignore_disconnect_websocket": args.ignore_disconnect_websocket,
                 "scenario": format!("{:?}", args.scenario).to_lowercase(), "arrival": format!("{:?}", args.arrival).to_lowercase(),
                 "rate": args.rate, "api_connections": args.api_connections, "channels": args.channels},
        "connect_ms": quantiles(&connect_hist.lock().unwrap(), 1000.0),
        "offer_to_ready_ms": quantiles(&ready_hist.lock().unwrap(), 1000.0),
        "latency_ms": quantiles(&latency, 1000.0),
        "last_peer_latency_ms": quantiles(&last_peer, 1000.0),
        "api_latency_ms": quantiles(&api_latency.lock().unwrap(), 1000.0),
        "pushes": {"accepted": counters.pushes_ok.load(Ordering::Relaxed), "failed": counters.pushes_failed.load(Ordering::Relaxed),
                   "seconds": push_secs, "per_second": counters.pushes_ok.load(Ordering::Relaxed) as f64 / push_secs},
        "deliveries": {"expected": expected, "received": received, "lost": lost, "duplicated": duplicated, "out_of_order": out_of_order,
                       "websocket": by_ws, "datachannel": by_dc, "per_second": received as f64 / push_secs},
        "server": server_pid.map(|pid| json!({
            "pid": pid,
            "rss_kb_before": before.map(|b| b.0),
            "rss_kb_connected": connected_rss.map(|b| b.0),
            "rss_kb_per_peer": match (before, connected_rss) { (Some(b), Some(c)) if connected > 0 => Some((c.0 as f64 - b.0 as f64) / connected as f64), _ => None },
            "rss_kb_settled": pushing.map(|p| p.0),
            "rss_kb_per_peer_settled": match (before, pushing) { (Some(b), Some(c)) if connected > 0 => Some((c.0 as f64 - b.0 as f64) / connected as f64), _ => None },
            "cpu_seconds": match (before, after) { (Some(b), Some(a)) => Some(a.1 - b.1), _ => None },
            "cpu_seconds_pushing": match (pushing, after) { (Some(b), Some(a)) => Some(a.1 - b.1), _ => None },
            "cpu_us_per_delivery": match (pushing, after) { (Some(b), Some(a)) if received > 0 => Some((a.1 - b.1) * 1e6 / received as f64), _ => None },
        })),
    });
    let text = serde_json::to_string_pretty(&summary).expect("serialises");
    match args.json.as_deref() {
        Some("-") => println!("{text}"),
        Some(path) => std::fs::write(path, &text)
            .unwrap_or_else(|e| eprintln!("hato-load: cannot write {path}: {e}")),
        None => {}
    }
    let p99 = if latency.is_empty() {
        0.0
    } else {
        latency.value_at_quantile(0.99) as f64 / 1000.0
    };
    eprintln!(
        "hato-load: {connected}/{} peers connected; {} pushes accepted; deliveries {received}/{expected} (lost {lost}, duplicated {duplicated}, out of order {out_of_order}; websocket {by_ws}, datachannel {by_dc}); latency p50 {:.2} ms p99 {p99:.2} ms",
        args.peers,
        counters.pushes_ok.load(Ordering::Relaxed),
        if latency.is_empty() { 0.0 } else { latency.value_at_quantile(0.5) as f64 / 1000.0 },
    );
    let mut missed = Vec::new();
    if let Some(max) = args.max_p99_ms {
        if p99 > max {
            missed.push(format!("p99 {p99:.2} ms > {max} ms"));
        }
    }
    if let Some(max) = args.max_lost {
        if lost > max {
            missed.push(format!("lost {lost} > {max}"));
        }
    }
    if let Some(min) = args.min_connect_success {
        let got = connected as f64 / args.peers as f64;
        if got < min {
            missed.push(format!("connect success {got:.3} < {min}"));
        }
    }
    if !missed.is_empty() {
        eprintln!("hato-load: thresholds missed: {}", missed.join("; "));
        std::process::exit(1);
    }
    let _ = std::io::stderr().flush();
    std::process::exit(0);
}

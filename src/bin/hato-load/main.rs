//! hato-load: loads a Sora-compatible push server (hato, or Sora itself)
//! with virtual WebRTC peers and pushes through its HTTP API, and reports
//! connect times, delivery latency, loss and server cost.
//!
//! Every run is bounded: a duration cap, a peer cap, loopback targets unless
//! told otherwise.

mod report;

use bytes::Bytes;

/// mimalloc instead of glibc's malloc: every delivery allocates and frees
/// a few small buffers on the engine threads, where glibc's malloc/free
/// were a large share of the profile, and the load client shares the machine with
/// the server it measures. (The server keeps glibc's malloc: with
/// `malloc_trim` it hands a connect storm's memory back to the kernel,
/// which mimalloc did not: most of it stayed resident after the peers left.)
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::{Parser, ValueEnum};
use hato::client::{now_us, Client, ClientEvent, ClientOptions, Stamp, Via};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
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
    /// Signaling URL of the server under test; several, comma-separated
    /// (the nodes of a cluster): peer i connects to URL i mod their number.
    #[arg(long, default_value = "ws://127.0.0.1:5000/signaling")]
    signaling_url: String,
    /// HTTP API URL of the server under test.
    #[arg(long, default_value = "http://127.0.0.1:3000/")]
    api_url: String,
    /// Virtual peers to connect (at most 100000; each holds a TCP socket
    /// while it connects, so the open-files limit must allow for them).
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
    /// Process id of the server, for its RSS and CPU time (same machine
    /// only); several, comma-separated (a cluster's nodes): their sums.
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// Process name of the server, when the pid is not known (e.g. "hato").
    #[arg(long)]
    server_process: Option<String>,
    /// Write the JSON summary here ("-": stdout); it holds the run's time
    /// series and histograms too, so that `--compare` can redraw it.
    #[arg(long)]
    json: Option<String>,
    /// Write a self-contained HTML report with plots here: peers connected
    /// over time, offer → ready, pushes and deliveries per second, delivery
    /// latency per second and its histogram, server CPU and RSS.
    #[arg(long, value_name = "FILE.html")]
    report: Option<String>,
    /// Also write each plot of the report as an SVG file into this folder.
    #[arg(long, value_name = "DIR")]
    plots: Option<String>,
    /// Run nothing: draw the runs of two `--json` files (before, after) over
    /// each other, their figures side by side with the ratio, into
    /// `--report` (and `--plots`).
    #[arg(long, num_args = 2, value_names = ["A.json", "B.json"])]
    compare: Vec<String>,
    /// Fail (exit 1) when the delivery p99 exceeds this many ms.
    #[arg(long)]
    max_p99_ms: Option<f64>,
    /// Fail when more deliveries than this are lost.
    #[arg(long)]
    max_lost: Option<u64>,
    /// Fail when more pushes than this were refused by the API or failed
    /// on the way (a run whose pushes all fail loses nothing it expected).
    #[arg(long)]
    max_push_failures: Option<u64>,
    /// Fail when fewer than this fraction of peers connect (0..1).
    #[arg(long)]
    min_connect_success: Option<f64>,
    /// Allow non-loopback targets (only towards hosts you run). The WebRTC
    /// peers answer from loopback addresses: the server's ICE candidates
    /// must still be reachable on loopback.
    #[arg(long)]
    allow_remote: bool,
    /// Client processes holding the peers (peer i goes to process i mod K);
    /// this process pushes and merges what they saw, so one client process
    /// is not the ceiling of a run.
    #[arg(long, default_value_t = 1)]
    processes: usize,
    /// Churn instead of pushes: CYCLES times, connect --peers peers and
    /// end them in mixed ways (peer i takes ending i mod 5: clean
    /// `disconnect`, WebSocket dropped, vanished after the offer, vanished
    /// after the answer, vanished while connected), wait for the server to
    /// end every session, and report its RSS, open fds, threads and live
    /// tasks (GET /.hato/stats) per cycle. Needs --server-pid or
    /// --server-process.
    #[arg(long, value_name = "CYCLES")]
    churn: Option<usize>,
    /// Internal: this process is worker N of --processes.
    #[arg(long, hide = true)]
    worker_index: Option<usize>,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

/// Per-second latency: 2 significant digits (1 %) is plenty for a p99
/// plotted per second, at a tenth of [`hist`]'s size.
fn hist_coarse() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 2).expect("valid bounds")
}

/// Delivery latency as the recorders saw it, summed per recording thread:
/// one uncontended lock per delivery, and memory by pushes and seconds,
/// not by deliveries. (A histogram per peer, allocated and zeroed by all
/// peers at once on the first push, made that push late by far more than
/// its latency; a list of every delivery, 24 bytes each, cost hato-load
/// more in page faults than in parsing at 400 000 deliveries/s.)
struct Tally {
    latency: Histogram<u64>,
    /// By the unix second the push was sent in.
    by_second: BTreeMap<u64, Histogram<u64>>,
    /// Per push (by seq): the latest first receipt on this thread, µs
    /// (0: none).
    last_by_seq: Vec<u32>,
}

/// Every thread's [`Tally`], for the end of the run.
static TALLIES: Mutex<Vec<Arc<Mutex<Tally>>>> = Mutex::new(Vec::new());

thread_local! {
    static TALLY: Arc<Mutex<Tally>> = {
        let t = Arc::new(Mutex::new(Tally {
            latency: hist(),
            by_second: BTreeMap::new(),
            last_by_seq: Vec::new(),
        }));
        TALLIES.lock().unwrap().push(t.clone());
        t
    };
}

/// Counts a first receipt of push `seq`, sent in unix second `sent_s`.
fn tally(seq: u64, latency_us: u64, sent_s: u64) {
    let latency = latency_us.max(1);
    TALLY.with(|t| {
        let mut t = t.lock().unwrap();
        let _ = t.latency.record(latency);
        let _ = t
            .by_second
            .entry(sent_s)
            .or_insert_with(hist_coarse)
            .record(latency);
        let i = seq as usize;
        if t.last_by_seq.len() <= i {
            t.last_by_seq.resize(i + 1, 0);
        }
        let l = latency.min(u32::MAX as u64) as u32;
        t.last_by_seq[i] = t.last_by_seq[i].max(l);
    });
}

/// What one peer saw; its latencies go to the thread's [`Tally`].
#[derive(Default)]
struct PeerRecord {
    seen: Vec<bool>,
    received: u64,
    duplicated: u64,
    out_of_order: u64,
    /// The highest position seen: the channel's offset (hato), else the
    /// sequence number hato-load gave the push.
    last_position: Option<u64>,
    by_ws: u64,
    by_dc: u64,
}

impl PeerRecord {
    /// `position`: where the push stands in its channel's order — received
    /// below the highest seen is out of order.
    fn record(&mut self, seq: u64, position: u64, sent_us: u64, latency_us: u64, via: Via) {
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
        if self.last_position.is_some_and(|l| position < l) {
            self.out_of_order += 1;
        }
        self.last_position = Some(self.last_position.map_or(position, |l| l.max(position)));
        tally(seq, latency_us, sent_us / 1_000_000);
    }
}

/// A connected peer, as the pusher needs it.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Target {
    connection_id: String,
    channel: usize,
}

#[derive(Default)]
struct Counters {
    connected: AtomicUsize,
    failed: AtomicUsize,
    /// Failed connects by reason.
    failures: Mutex<BTreeMap<String, u64>>,
    /// Connected peers that ended before the run did, by how.
    ended: Mutex<BTreeMap<String, u64>>,
    pushes_ok: AtomicU64,
    pushes_failed: AtomicU64,
    deliveries: AtomicU64,
}

/// A process's counts at a whole unix second, cumulative: the samples of
/// several processes taken at the same second add up.
#[derive(Default, Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Sample {
    /// Unix second.
    t: u64,
    connected: u64,
    failed: BTreeMap<String, u64>,
    pushes: u64,
    push_failures: u64,
    deliveries: u64,
    /// The server's RSS (kB) and CPU seconds, where this process samples it.
    server: Option<(u64, f64)>,
}

impl Sample {
    fn add(&mut self, o: &Sample) {
        self.connected += o.connected;
        for (k, v) in &o.failed {
            *self.failed.entry(k.clone()).or_default() += v;
        }
        self.pushes += o.pushes;
        self.push_failures += o.push_failures;
        self.deliveries += o.deliveries;
        self.server = match (self.server, o.server) {
            (Some(a), Some(b)) => Some((a.0 + b.0, a.1 + b.1)),
            (a, b) => a.or(b),
        };
    }
}

/// Takes a [`Sample`] of `counters` (and of the server's RSS and CPU) at
/// every whole unix second until stopped.
struct Sampler {
    samples: Arc<Mutex<Vec<Sample>>>,
    task: tokio::task::JoinHandle<()>,
    take: Arc<dyn Fn() -> Sample + Send + Sync>,
}

impl Sampler {
    fn start(counters: Arc<Counters>, server: Option<Vec<u32>>) -> Sampler {
        let take: Arc<dyn Fn() -> Sample + Send + Sync> = Arc::new(move || Sample {
            t: (now_us() + 500_000) / 1_000_000,
            connected: counters.connected.load(Ordering::Relaxed) as u64,
            failed: counters.failures.lock().unwrap().clone(),
            pushes: counters.pushes_ok.load(Ordering::Relaxed),
            push_failures: counters.pushes_failed.load(Ordering::Relaxed),
            deliveries: counters.deliveries.load(Ordering::Relaxed),
            server: server.as_deref().and_then(proc_stat),
        });
        let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
        let (s, f) = (samples.clone(), take.clone());
        let task = tokio::spawn(async move {
            loop {
                let now = now_us();
                let next = (now / 1_000_000 + 1) * 1_000_000;
                tokio::time::sleep(Duration::from_micros(next - now)).await;
                let sample = f();
                s.lock().unwrap().push(sample);
            }
        });
        Sampler {
            samples,
            task,
            take,
        }
    }

    /// Stops, with a last sample of the counts as they are now.
    fn stop(self) -> Vec<Sample> {
        self.task.abort();
        let mut samples = std::mem::take(&mut *self.samples.lock().unwrap());
        let last = (self.take)();
        match samples.last_mut() {
            Some(s) if s.t >= last.t => *s = Sample { t: s.t, ..last },
            _ => samples.push(last),
        }
        samples
    }
}

/// The sum of several processes' samples, second by second: a process
/// with no sample at a second counts with its last one before it (or
/// nothing, before its first).
fn merge_samples(processes: &[Vec<Sample>]) -> Vec<Sample> {
    let seconds: std::collections::BTreeSet<u64> =
        processes.iter().flatten().map(|s| s.t).collect();
    let mut at = vec![0usize; processes.len()];
    let mut out = Vec::with_capacity(seconds.len());
    for t in seconds {
        let mut sum = Sample {
            t,
            ..Sample::default()
        };
        for (p, samples) in processes.iter().enumerate() {
            while at[p] + 1 < samples.len() && samples[at[p] + 1].t <= t {
                at[p] += 1;
            }
            if let Some(s) = samples.get(at[p]).filter(|s| s.t <= t) {
                sum.add(&Sample {
                    server: s.server.filter(|_| s.t == t),
                    ..s.clone()
                });
            }
        }
        out.push(sum);
    }
    out
}

/// RSS (kB) and CPU seconds of processes, summed (a cluster's nodes, or
/// hato-load's own workers).
fn proc_stat(pids: &[u32]) -> Option<(u64, f64)> {
    pids.iter().try_fold((0, 0.0), |(rss_sum, cpu_sum), pid| {
        let (rss, _, cpu) = hato::metrics::process_figures_of(&pid.to_string())?;
        Some((rss_sum + rss / 1024, cpu_sum + cpu))
    })
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
    connect_with(args, peer_options(args, i)).await
}

/// Peer i's options: its channel, client_id and signaling mode.
fn peer_options(args: &Args, i: usize) -> ClientOptions {
    let channel = i % args.channels;
    let urls: Vec<&str> = args.signaling_url.split(',').map(str::trim).collect();
    let mut opts = ClientOptions::new(
        urls[i % urls.len()],
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
    // As sora-js-sdk does: the WebSocket goes once it is not needed.
    opts.close_websocket_after_switch = true;
    // Many peers are many clients: to a server on loopback, each connects
    // from an address of its own (127.64.0.1, 127.64.0.2, …), so that the
    // server's per-address limits (--max-handshakes-per-ip) see what they
    // would see from real clients.
    if opts.url.starts_with("ws://127.") {
        let n = i as u32;
        opts.source_ip = Some(std::net::IpAddr::V4(std::net::Ipv4Addr::new(
            127,
            64 + (n / (254 * 256)) as u8,
            ((n / 254) % 256) as u8,
            (n % 254 + 1) as u8,
        )));
    }
    opts
}

/// Connects with `opts` and waits until the peer is in: its own
/// connection.created, and with DataChannel signaling `switched` and the
/// push channel open. Returns the client, connect time and offer → ready.
async fn connect_with(
    args: &Args,
    opts: ClientOptions,
) -> Result<(Client, Duration, Duration), String> {
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

/// A histogram as (value, count) pairs: what a worker hands its parent.
fn buckets(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

fn from_buckets(b: &[(u64, u64)]) -> Histogram<u64> {
    let mut h = hist();
    for (v, n) in b {
        let _ = h.record_n(*v, *n);
    }
    h
}

/// What the peers of one process saw, in a form a worker sends its parent.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct Observed {
    connected: usize,
    failed: usize,
    failure_reasons: BTreeMap<String, u64>,
    /// Connected peers that ended before the run did, by how: each lost
    /// the pushes sent after.
    ended: BTreeMap<String, u64>,
    connect_us: Vec<(u64, u64)>,
    ready_us: Vec<(u64, u64)>,
    latency_us: Vec<(u64, u64)>,
    /// Delivery latency by the unix second the push was sent in.
    latency_by_second: Vec<(u64, Vec<(u64, u64)>)>,
    /// This process's counts, second by second.
    samples: Vec<Sample>,
    /// Per push: the latest first receipt among this process's peers (µs).
    last_by_seq: Vec<(u64, u64)>,
    /// Connected peers per channel.
    per_channel: Vec<u64>,
    received: u64,
    duplicated: u64,
    out_of_order: u64,
    by_ws: u64,
    by_dc: u64,
}

impl Observed {
    fn merge(&mut self, o: Observed) {
        let join = |a: &[(u64, u64)], b: &[(u64, u64)]| {
            let mut h = from_buckets(a);
            let _ = h.add(from_buckets(b));
            buckets(&h)
        };
        self.connected += o.connected;
        self.failed += o.failed;
        for (k, v) in o.failure_reasons {
            *self.failure_reasons.entry(k).or_default() += v;
        }
        for (k, v) in o.ended {
            *self.ended.entry(k).or_default() += v;
        }
        self.connect_us = join(&self.connect_us, &o.connect_us);
        self.ready_us = join(&self.ready_us, &o.ready_us);
        self.latency_us = join(&self.latency_us, &o.latency_us);
        let mut by_second: BTreeMap<u64, Vec<(u64, u64)>> =
            self.latency_by_second.drain(..).collect();
        for (t, b) in o.latency_by_second {
            let e = by_second.entry(t).or_default();
            *e = join(e, &b);
        }
        self.latency_by_second = by_second.into_iter().collect();
        self.samples = merge_samples(&[std::mem::take(&mut self.samples), o.samples]);
        let mut last: HashMap<u64, u64> = self.last_by_seq.drain(..).collect();
        for (seq, lat) in o.last_by_seq {
            let m = last.entry(seq).or_default();
            *m = (*m).max(lat);
        }
        self.last_by_seq = last.into_iter().collect();
        if self.per_channel.len() < o.per_channel.len() {
            self.per_channel.resize(o.per_channel.len(), 0);
        }
        for (i, n) in o.per_channel.iter().enumerate() {
            self.per_channel[i] += n;
        }
        self.received += o.received;
        self.duplicated += o.duplicated;
        self.out_of_order += o.out_of_order;
        self.by_ws += o.by_ws;
        self.by_dc += o.by_dc;
    }
}

/// Step 1: connects peers `indices` at the hatch rate, at most
/// `--concurrency` at a time.
async fn connect_phase(
    args: &Args,
    indices: Vec<usize>,
    counters: &Arc<Counters>,
    tty: bool,
) -> (Vec<(usize, Client)>, Observed) {
    let connect_hist = Arc::new(Mutex::new(hist()));
    let ready_hist = Arc::new(Mutex::new(hist()));
    let sem = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut joins = Vec::new();
    let t0 = Instant::now();
    for (n, i) in indices.into_iter().enumerate() {
        let at = t0 + Duration::from_secs_f64(i as f64 / args.hatch_rate.max(0.001));
        tokio::time::sleep_until(at.into()).await;
        let permit = sem.clone().acquire_owned().await.expect("semaphore open");
        let (a, c, ch, rh) = (
            args.clone(),
            counters.clone(),
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
                    *c.failures.lock().unwrap().entry(e).or_default() += 1;
                    c.failed.fetch_add(1, Ordering::Relaxed);
                    None
                }
            }
        }));
        if tty && n % 10 == 0 {
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
    let observed = Observed {
        connected: counters.connected.load(Ordering::Relaxed),
        failed: counters.failed.load(Ordering::Relaxed),
        failure_reasons: counters.failures.lock().unwrap().clone(),
        connect_us: buckets(&connect_hist.lock().unwrap()),
        ready_us: buckets(&ready_hist.lock().unwrap()),
        ..Observed::default()
    };
    (clients, observed)
}

/// Step 2: every peer records what it receives, in a task of its own.
fn record_phase(
    args: &Args,
    clients: Vec<(usize, Client)>,
    counters: &Arc<Counters>,
) -> (Vec<Target>, Vec<Arc<Mutex<PeerRecord>>>, Leave) {
    let mut targets = Vec::new();
    let mut records = Vec::new();
    let (leave_tx, leave_rx) = tokio::sync::watch::channel(false);
    let mut recorders = Vec::new();
    for (i, mut client) in clients {
        let record = Arc::new(Mutex::new(PeerRecord::default()));
        targets.push(Target {
            connection_id: client.connection_id.clone(),
            channel: i % args.channels,
        });
        records.push(record.clone());
        // Pushes are counted on the client's own task, with no channel
        // send and task wake per push; the loop below sees the rest (and
        // any push that came before this).
        let sink = {
            let (record, counters) = (record.clone(), counters.clone());
            Arc::new(move |stamp: &Stamp, via, at_us| {
                count_push(&record, &counters, stamp, via, at_us)
            })
        };
        client.on_push(sink);
        let counters = counters.clone();
        let mut leave = leave_rx.clone();
        let on_dc = args.data_channel_signaling;
        // After `switched` with this, the WebSocket's end is expected.
        let ws_may_end = on_dc && args.ignore_disconnect_websocket;
        recorders.push(tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    ev = client.events.recv() => Some(ev),
                    r = leave.wait_for(|l| *l) => {
                        drop(r);
                        None
                    }
                };
                let Some(ev) = ev else {
                    say_goodbye(&mut client, on_dc, Duration::from_secs(2)).await;
                    break;
                };
                let Some(ev) = ev else { break };
                let ended = match ev {
                    ClientEvent::Push {
                        via, at_us, stamp, ..
                    } => {
                        count_push(&record, &counters, &stamp, via, at_us);
                        None
                    }
                    ClientEvent::PeerFailed(why) => Some(format!("peer failed: {why}")),
                    ClientEvent::ServerClose { code, reason } => {
                        Some(format!("closed {code} {reason}"))
                    }
                    ClientEvent::WebSocketClosed { code, reason } if !ws_may_end => {
                        Some(format!("closed {code} {reason}"))
                    }
                    _ => None,
                };
                if let Some(how) = ended {
                    *counters.ended.lock().unwrap().entry(how).or_default() += 1;
                    break;
                }
            }
            drop(client);
        }));
    }
    let leave = Leave {
        tx: leave_tx,
        recorders,
    };
    (targets, records, leave)
}

/// Counts a push a peer received; pushes hato-load did not send (no seq
/// and ts) are not counted.
fn count_push(
    record: &Mutex<PeerRecord>,
    counters: &Counters,
    stamp: &Stamp,
    via: Via,
    at_us: u64,
) {
    let (Some(seq), Some(ts)) = (stamp.seq, stamp.ts) else {
        return;
    };
    let position = stamp.offset.unwrap_or(seq);
    record
        .lock()
        .unwrap()
        .record(seq, position, ts, at_us.saturating_sub(ts), via);
    counters.deliveries.fetch_add(1, Ordering::Relaxed);
}

/// Ends every peer of a run with `disconnect`, as an SDK's `disconnect()`
/// does, so that the server under test is empty for the next run (peers
/// that just vanished would stay in its table until ICE consent fails).
struct Leave {
    tx: tokio::sync::watch::Sender<bool>,
    recorders: Vec<tokio::task::JoinHandle<()>>,
}

impl Leave {
    async fn now(self) {
        self.tx.send_replace(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            for r in self.recorders {
                let _ = r.await;
            }
        })
        .await;
    }
}

/// `disconnect` on `signaling` (or the WebSocket), then a wait (at most
/// `wait`) for the server to close its side.
async fn say_goodbye(c: &mut Client, on_dc: bool, wait: Duration) {
    let bye = r#"{"type":"disconnect","reason":"NO-ERROR"}"#;
    if on_dc {
        c.send_dc("signaling", bye, true);
    } else {
        c.send_ws(bye);
    }
    let _ = c
        .wait_for(wait, |e| {
            matches!(
                e,
                ClientEvent::WebSocketClosed { .. }
                    | ClientEvent::ServerClose { .. }
                    | ClientEvent::PeerFailed(_)
            )
        })
        .await;
}

/// What the pusher did.
struct Pushed {
    /// (seq, channel) of every push the API accepted.
    accepted: Vec<(u64, usize)>,
    /// Pushes the API refused or that failed on the way.
    failed: u64,
    api_latency: Histogram<u64>,
    seconds: f64,
}

/// Step 3: pushes for `--duration` at `--rate` over `--api-connections`.
async fn push_phase(args: &Args, targets: Arc<Vec<Target>>, counters: &Arc<Counters>) -> Pushed {
    let next = Arc::new(AtomicU64::new(0));
    let push_start = Instant::now();
    let end = push_start + Duration::from_secs_f64(args.duration);
    let accepted: Arc<Mutex<Vec<(u64, usize)>>> = Arc::default();
    let api_latency = Arc::new(Mutex::new(hist()));
    let pad = Arc::new("x".repeat(args.payload_bytes));
    let mut workers = Vec::new();
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
                let Some((target, body, channel)) = push_body(&args, &targets, seq, &pad) else {
                    break;
                };
                let req = hyper::Request::post(&args.api_url)
                    .header("host", "hato")
                    .header("x-sora-target", target)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body.to_string())))
                    .expect("valid request");
                let sent = Instant::now();
                if send.ready().await.is_err() {
                    break;
                }
                match send.send_request(req).await {
                    Ok(resp) => {
                        let ok = resp.status() == 200;
                        let _ = resp.into_body().collect().await;
                        let took = sent.elapsed().as_micros().max(1) as u64;
                        let _ = api_latency.lock().unwrap().record(took);
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
    for w in workers {
        let _ = w.await;
    }
    let accepted = accepted.lock().unwrap().clone();
    let api_latency = api_latency.lock().unwrap().clone();
    Pushed {
        accepted,
        failed: counters.pushes_failed.load(Ordering::Relaxed),
        api_latency,
        seconds: push_start.elapsed().as_secs_f64(),
    }
}

/// The target, body and channel of push number `seq`; `None` when there
/// is nobody to push to.
fn push_body(
    args: &Args,
    targets: &[Target],
    seq: u64,
    pad: &str,
) -> Option<(&'static str, Value, usize)> {
    let data = json!({"seq": seq, "ts": now_us(), "pad": pad});
    match args.scenario {
        Scenario::Channel => {
            let ch = (seq as usize) % args.channels;
            let body =
                json!({"channel_id": args.channel.replace("{n}", &ch.to_string()), "data": data});
            Some(("Sora_20160711.PushChannel", body, ch))
        }
        Scenario::Connection => {
            let t = targets.get((seq as usize) % targets.len().max(1))?;
            let body = json!({"channel_id": args.channel.replace("{n}", &t.channel.to_string()),
                              "connection_id": t.connection_id, "data": data});
            Some(("Sora_20160711.PushConnection", body, t.channel))
        }
    }
}

/// Live progress on a terminal, until aborted.
fn progress(counters: Arc<Counters>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let mut h = hist();
            for t in TALLIES.lock().unwrap().iter() {
                let _ = h.add(&t.lock().unwrap().latency);
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
}

/// Step 4: what this process's peers received.
fn observe(
    mut o: Observed,
    args: &Args,
    targets: &[Target],
    records: &[Arc<Mutex<PeerRecord>>],
) -> Observed {
    let mut latency = hist();
    let mut last: Vec<u32> = Vec::new();
    let mut by_second: BTreeMap<u64, Histogram<u64>> = BTreeMap::new();
    o.per_channel = vec![0; args.channels];
    for t in targets {
        o.per_channel[t.channel] += 1;
    }
    for r in records {
        let r = r.lock().unwrap();
        o.received += r.received;
        o.duplicated += r.duplicated;
        o.out_of_order += r.out_of_order;
        o.by_ws += r.by_ws;
        o.by_dc += r.by_dc;
    }
    for t in TALLIES.lock().unwrap().iter() {
        let t = t.lock().unwrap();
        let _ = latency.add(&t.latency);
        for (s, h) in &t.by_second {
            let _ = by_second.entry(*s).or_insert_with(hist_coarse).add(h);
        }
        if last.len() < t.last_by_seq.len() {
            last.resize(t.last_by_seq.len(), 0);
        }
        for (m, l) in last.iter_mut().zip(&t.last_by_seq) {
            *m = (*m).max(*l);
        }
    }
    o.latency_us = buckets(&latency);
    o.latency_by_second = by_second.iter().map(|(t, h)| (*t, buckets(h))).collect();
    o.last_by_seq = last
        .into_iter()
        .enumerate()
        .filter(|(_, l)| *l > 0)
        .map(|(seq, l)| (seq as u64, l as u64))
        .collect();
    o
}

/// The server's RSS and CPU at the moments the report compares, and the
/// CPU of hato-load's own processes while pushing.
#[derive(Default, Clone, Copy)]
struct ServerSamples {
    before: Option<(u64, f64)>,
    connected: Option<(u64, f64)>,
    pushing: Option<(u64, f64)>,
    after: Option<(u64, f64)>,
    client_pushing: Option<(u64, f64)>,
    client_after: Option<(u64, f64)>,
}

/// Unix µs of the moments a run changes phase.
#[derive(Clone, Copy, Default)]
struct Phases {
    start: u64,
    connected: u64,
    pushing: u64,
    pushed: u64,
}

impl Phases {
    fn begin() -> Phases {
        Phases {
            start: now_us(),
            ..Phases::default()
        }
    }
}

/// The run second by second, in seconds from its start: each count per
/// second is over the second that ends at `t`; delivery latency is by the
/// second the push was sent in.
fn series(o: &Observed, phases: Phases) -> Value {
    let start = phases.start / 1_000_000;
    let rel = |t: u64| t as i64 - start as i64;
    let samples = &o.samples;
    let per_second = |f: &dyn Fn(&Sample) -> Option<f64>, scale: f64| -> Vec<Option<f64>> {
        samples
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let before = i.checked_sub(1).map(|j| &samples[j])?;
                let dt = s.t.checked_sub(before.t).filter(|d| *d > 0)? as f64;
                Some((f(s)? - f(before)?) * scale / dt)
            })
            .collect()
    };
    let reasons: std::collections::BTreeSet<&String> =
        samples.iter().flat_map(|s| s.failed.keys()).collect();
    let failed: serde_json::Map<String, Value> = reasons
        .into_iter()
        .map(|r| {
            let counts: Vec<u64> = samples
                .iter()
                .map(|s| s.failed.get(r).copied().unwrap_or(0))
                .collect();
            (r.clone(), json!(counts))
        })
        .collect();
    let latency: Vec<(i64, Histogram<u64>)> = o
        .latency_by_second
        .iter()
        .map(|(t, b)| (rel(*t + 1), from_buckets(b)))
        .collect();
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let at = |us: u64| (us > 0).then(|| (us as f64 - start as f64 * 1e6) / 1e6);
    json!({
        "start_unix": start,
        "t": samples.iter().map(|s| rel(s.t)).collect::<Vec<_>>(),
        "connected": samples.iter().map(|s| s.connected).collect::<Vec<_>>(),
        "failed": failed,
        "pushes_per_second": per_second(&|s| Some(s.pushes as f64), 1.0),
        "push_failures_per_second": per_second(&|s| Some(s.push_failures as f64), 1.0),
        "deliveries_per_second": per_second(&|s| Some(s.deliveries as f64), 1.0),
        "server_cpu_percent": per_second(&|s| s.server.map(|v| v.1), 100.0),
        "server_rss_mb": samples.iter().map(|s| s.server.map(|v| v.0 as f64 / 1024.0)).collect::<Vec<_>>(),
        "latency": {
            "t": latency.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            "p50_ms": latency.iter().map(|(_, h)| ms(h, 0.5)).collect::<Vec<_>>(),
            "p99_ms": latency.iter().map(|(_, h)| ms(h, 0.99)).collect::<Vec<_>>(),
        },
        "phases": {"connected_s": at(phases.connected), "pushing_s": at(phases.pushing), "pushed_s": at(phases.pushed)},
    })
}

/// Step 5: the summary, the one-line verdict and the exit status.
fn report(
    args: &Args,
    o: &Observed,
    pushed: &Pushed,
    connect_secs: f64,
    server_pid: Option<Vec<u32>>,
    s: ServerSamples,
    phases: Phases,
) -> i32 {
    let mut expected = 0u64;
    for (_, channel) in &pushed.accepted {
        expected += match args.scenario {
            Scenario::Channel => o.per_channel.get(*channel).copied().unwrap_or(0),
            Scenario::Connection => 1,
        };
    }
    let accepted: std::collections::HashSet<u64> =
        pushed.accepted.iter().map(|(s, _)| *s).collect();
    let mut last_peer = hist();
    let mut slowest: Vec<(u64, u64)> = Vec::new();
    for (seq, lat) in &o.last_by_seq {
        if accepted.contains(seq) && *lat > 0 {
            let _ = last_peer.record(*lat);
            slowest.push((*lat, *seq));
        }
    }
    // The ten slowest fan-outs and when they left, to tell a steady tail
    // from a stall at one moment of the run.
    slowest.sort_unstable_by(|a, b| b.cmp(a));
    slowest.truncate(10);
    let open = matches!(args.arrival, Arrival::Open) && args.rate > 0.0;
    let slowest: Vec<_> = slowest
        .into_iter()
        .map(|(lat, seq)| {
            json!({"seq": seq, "last_peer_ms": lat as f64 / 1000.0,
                   "sent_s": open.then(|| seq as f64 / args.rate)})
        })
        .collect();
    let latency = from_buckets(&o.latency_us);
    let lost = expected.saturating_sub(o.received);
    let connected = o.connected;
    let ok = pushed.accepted.len() as f64;
    let delta = |a: Option<(u64, f64)>, b: Option<(u64, f64)>| match (a, b) {
        (Some(a), Some(b)) => Some(b.1 - a.1),
        _ => None,
    };
    // CPU seconds between two samples, per delivery received, in µs.
    let per_delivery = |a: Option<(u64, f64)>, b: Option<(u64, f64)>| {
        delta(a, b)
            .filter(|_| o.received > 0)
            .map(|c| c * 1e6 / o.received as f64)
    };
    let per_peer = |b: Option<(u64, f64)>, c: Option<(u64, f64)>| match (b, c) {
        (Some(b), Some(c)) if connected > 0 => Some((c.0 as f64 - b.0 as f64) / connected as f64),
        _ => None,
    };
    let summary = json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "started_unix": phases.start / 1_000_000,
        "peers": {"requested": args.peers, "connected": connected, "failed": o.failed,
                  "failure_reasons": o.failure_reasons, "connect_seconds": connect_secs,
                  "ended_during_run": o.ended,
                  "processes": args.processes.max(1)},
        "mode": {"data_channel_signaling": args.data_channel_signaling, "ignore_disconnect_websocket": args.ignore_disconnect_websocket,
                 "scenario": format!("{:?}", args.scenario).to_lowercase(), "arrival": format!("{:?}", args.arrival).to_lowercase(),
                 "rate": args.rate, "api_connections": args.api_connections, "channels": args.channels},
        "connect_ms": quantiles(&from_buckets(&o.connect_us), 1000.0),
        "offer_to_ready_ms": quantiles(&from_buckets(&o.ready_us), 1000.0),
        "latency_ms": quantiles(&latency, 1000.0),
        "last_peer_latency_ms": quantiles(&last_peer, 1000.0),
        "slowest_pushes": slowest,
        "api_latency_ms": quantiles(&pushed.api_latency, 1000.0),
        "pushes": {"accepted": pushed.accepted.len(), "failed": pushed.failed, "seconds": pushed.seconds, "per_second": ok / pushed.seconds},
        "deliveries": {"expected": expected, "received": o.received, "lost": lost, "duplicated": o.duplicated, "out_of_order": o.out_of_order,
                       "websocket": o.by_ws, "datachannel": o.by_dc, "per_second": o.received as f64 / pushed.seconds},
        "server": server_pid.map(|pids| json!({
            "pid": if pids.len() == 1 { json!(pids[0]) } else { json!(pids) },
            "rss_kb_before": s.before.map(|b| b.0),
            "rss_kb_connected": s.connected.map(|b| b.0),
            "rss_kb_per_peer": per_peer(s.before, s.connected),
            "rss_kb_settled": s.pushing.map(|p| p.0),
            "rss_kb_per_peer_settled": per_peer(s.before, s.pushing),
            "rss_kb_after_pushing": s.after.map(|p| p.0),
            "rss_kb_per_peer_after_pushing": per_peer(s.before, s.after),
            "cpu_seconds": delta(s.before, s.after),
            "cpu_seconds_pushing": delta(s.pushing, s.after),
            "cpu_us_per_delivery": per_delivery(s.pushing, s.after),
        })),
        // hato-load itself (every process of --processes): on a machine it
        // shares with the server, what it costs is CPU the server lacked.
        "client": {
            "cpu_seconds_pushing": delta(s.client_pushing, s.client_after),
            "cpu_us_per_delivery": per_delivery(s.client_pushing, s.client_after),
        },
        "series": series(o, phases),
        "histograms": {"latency_us": o.latency_us, "offer_to_ready_us": o.ready_us, "connect_us": o.connect_us},
    });
    if args.report.is_some() || args.plots.is_some() {
        write_report(
            args.report.as_deref(),
            args.plots.as_deref(),
            &[("this run".into(), summary.clone())],
        );
    }
    let text = serde_json::to_string_pretty(&summary).expect("serialises");
    match args.json.as_deref() {
        Some("-") => println!("{text}"),
        Some(path) => std::fs::write(path, &text)
            .unwrap_or_else(|e| eprintln!("hato-load: cannot write {path}: {e}")),
        None => {}
    }
    let q = |h: &Histogram<u64>, p: f64| {
        if h.is_empty() {
            0.0
        } else {
            h.value_at_quantile(p) as f64 / 1000.0
        }
    };
    let p99 = q(&latency, 0.99);
    eprintln!(
        "hato-load: {connected}/{} peers connected; {} pushes accepted; deliveries {}/{expected} (lost {lost}, duplicated {}, out of order {}; websocket {}, datachannel {}); latency p50 {:.2} ms p99 {p99:.2} ms",
        args.peers, pushed.accepted.len(), o.received, o.duplicated, o.out_of_order, o.by_ws, o.by_dc, q(&latency, 0.5),
    );
    let ended: u64 = o.ended.values().sum();
    if ended > 0 {
        eprintln!(
            "hato-load: {ended} connected peers ended before the run did: {:?}",
            o.ended
        );
    }
    let mut missed = Vec::new();
    if let Some(max) = args.max_p99_ms.filter(|m| p99 > *m) {
        missed.push(format!("p99 {p99:.2} ms > {max} ms"));
    }
    if let Some(max) = args.max_lost.filter(|m| lost > *m) {
        missed.push(format!("lost {lost} > {max}"));
    }
    if let Some(max) = args.max_push_failures.filter(|m| pushed.failed > *m) {
        missed.push(format!("{} pushes failed > {max}", pushed.failed));
    }
    let got = connected as f64 / args.peers as f64;
    if let Some(min) = args.min_connect_success.filter(|m| got < *m) {
        missed.push(format!("connect success {got:.3} < {min}"));
    }
    if missed.is_empty() {
        0
    } else {
        eprintln!("hato-load: thresholds missed: {}", missed.join("; "));
        1
    }
}

/// Writes the report (and the plots) of `runs`, saying where on stderr.
fn write_report(path: Option<&str>, plots: Option<&str>, runs: &[(String, Value)]) -> bool {
    let page = report::render(runs);
    if let Some(path) = path {
        if let Err(e) = std::fs::write(path, &page.html) {
            eprintln!("hato-load: cannot write {path}: {e}");
            return false;
        }
        eprintln!("hato-load: report written to {path}");
    }
    if let Some(dir) = plots {
        let written = std::fs::create_dir_all(dir).and_then(|_| {
            page.plots.iter().try_for_each(|(name, svg)| {
                std::fs::write(std::path::Path::new(dir).join(format!("{name}.svg")), svg)
            })
        });
        if let Err(e) = written {
            eprintln!("hato-load: cannot write the plots into {dir}: {e}");
            return false;
        }
    }
    true
}

/// `--compare A.json B.json`: the two runs' report, nothing run.
fn compare(args: &Args) -> i32 {
    let mut runs = Vec::new();
    for path in &args.compare {
        let read = std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Value>(&b).map_err(|e| e.to_string()));
        match read {
            Ok(v) if v.get("series").is_some() => {
                let name = std::path::Path::new(path)
                    .file_stem()
                    .map_or(path.clone(), |n| n.to_string_lossy().into_owned());
                runs.push((name, v));
            }
            Ok(_) => {
                eprintln!(
                    "hato-load: {path} has no time series: write it with this hato-load's --json"
                );
                return 2;
            }
            Err(e) => {
                eprintln!("hato-load: cannot read {path}: {e}");
                return 2;
            }
        }
    }
    if write_report(args.report.as_deref(), args.plots.as_deref(), &runs) {
        0
    } else {
        1
    }
}

fn check(args: &Args) -> Result<(), &'static str> {
    if !args.compare.is_empty() && args.report.is_none() && args.plots.is_none() {
        return Err("--compare draws a report: give --report FILE.html (and/or --plots DIR)");
    }
    if args.churn.is_some() && (args.report.is_some() || args.plots.is_some()) {
        return Err("--report and --plots are for push runs, not --churn");
    }
    if args.peers == 0 || args.peers > 100_000 {
        return Err("--peers must be 1..=100000");
    }
    if !(args.duration > 0.0 && args.duration <= 600.0) || args.drain > 60.0 || args.settle > 60.0 {
        return Err(
            "--duration must be in (0, 600] s, --drain and --settle at most 60 s: runs are bounded",
        );
    }
    if args.arrival == Arrival::Open && args.rate <= 0.0 {
        return Err("open arrival needs --rate > 0");
    }
    if args.churn.is_some_and(|c| c == 0 || c > 100) {
        return Err("--churn must be 1..=100 cycles");
    }
    if args.churn.is_some() && args.server_pid.is_empty() && args.server_process.is_none() {
        return Err(
            "--churn reports the server's RSS and fds: give --server-pid or --server-process",
        );
    }
    if args.processes == 0 || args.processes > 64 {
        return Err("--processes must be 1..=64");
    }
    if !(args.allow_remote
        || args.signaling_url.split(',').all(is_loopback_url) && is_loopback_url(&args.api_url))
    {
        return Err("targets must be loopback; pass --allow-remote for a host you run");
    }
    Ok(())
}

/// A worker process: connects its share of the peers, tells the parent
/// who they are (`READY` + JSON line), records until the parent writes a
/// line on stdin, then writes what its peers saw (`OBSERVED` + JSON line).
async fn worker(args: Args, index: usize) -> i32 {
    let k = args.processes;
    let counters = Arc::new(Counters::default());
    let sampler = Sampler::start(counters.clone(), None);
    let indices = (0..args.peers).filter(|i| i % k == index).collect();
    let (clients, connected) = connect_phase(&args, indices, &counters, false).await;
    let (targets, records, leave) = record_phase(&args, clients, &counters);
    println!(
        "READY {}",
        serde_json::to_string(&targets).expect("serialises")
    );
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    let _ = tokio::io::AsyncBufReadExt::read_line(
        &mut tokio::io::BufReader::new(tokio::io::stdin()),
        &mut line,
    )
    .await;
    let mut observed = observe(connected, &args, &targets, &records);
    observed.ended = counters.ended.lock().unwrap().clone();
    observed.samples = sampler.stop();
    leave.now().await;
    println!(
        "OBSERVED {}",
        serde_json::to_string(&observed).expect("serialises")
    );
    let _ = std::io::stdout().flush();
    0
}

/// What a run takes at its start: the server's pid and figures, the
/// counters and their sampler, the phase clock.
struct Start {
    server_pid: Option<Vec<u32>>,
    samples: ServerSamples,
    counters: Arc<Counters>,
    sampler: Sampler,
    phases: Phases,
}

impl Start {
    fn now(args: &Args) -> Start {
        let server_pid = server_pid(args);
        let counters = Arc::new(Counters::default());
        Start {
            samples: ServerSamples {
                before: server_pid.as_deref().and_then(proc_stat),
                ..Default::default()
            },
            sampler: Sampler::start(counters.clone(), server_pid.clone()),
            counters,
            server_pid,
            phases: Phases::begin(),
        }
    }
}

/// The parent of `--processes K`: starts K workers of this binary, pushes
/// once they are all connected, and merges what they saw.
async fn parent(args: Args, tty: bool) -> i32 {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let Start {
        server_pid,
        mut samples,
        counters,
        sampler,
        mut phases,
    } = Start::now(&args);
    let exe = std::env::current_exe().expect("own path");
    let own: Vec<String> = std::env::args().skip(1).collect();
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for i in 0..args.processes {
        let mut child = tokio::process::Command::new(&exe)
            .args(&own)
            .args(["--worker-index", &i.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("a worker process starts");
        let stdin = child.stdin.take().expect("piped");
        let lines = tokio::io::BufReader::new(child.stdout.take().expect("piped")).lines();
        workers.push((child, stdin, lines));
    }
    let mut targets = Vec::new();
    for (_, _, lines) in &mut workers {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(t) = line.strip_prefix("READY ") {
                targets.extend(serde_json::from_str::<Vec<Target>>(t).unwrap_or_default());
                break;
            }
        }
    }
    let connect_secs = t0.elapsed().as_secs_f64();
    phases.connected = now_us();
    if tty {
        eprintln!(
            "hato-load: {} peers connected by {} processes",
            targets.len(),
            args.processes
        );
    }
    samples.connected = server_pid.as_deref().and_then(proc_stat);
    let mut own_pids = vec![std::process::id()];
    own_pids.extend(workers.iter().filter_map(|(c, _, _)| c.id()));
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    samples.pushing = server_pid.as_deref().and_then(proc_stat);
    samples.client_pushing = proc_stat(&own_pids);
    phases.pushing = now_us();
    let pushed = push_phase(&args, Arc::new(targets), &counters).await;
    phases.pushed = now_us();
    tokio::time::sleep(Duration::from_secs_f64(args.drain)).await;
    samples.after = server_pid.as_deref().and_then(proc_stat);
    samples.client_after = proc_stat(&own_pids);
    let mut merged = Observed {
        samples: sampler.stop(),
        ..Observed::default()
    };
    for (mut child, mut stdin, mut lines) in workers {
        let _ = stdin.write_all(b"report\n").await;
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(o) = line.strip_prefix("OBSERVED ") {
                if let Ok(o) = serde_json::from_str::<Observed>(o) {
                    merged.merge(o);
                }
                break;
            }
        }
        let _ = child.wait().await;
    }
    report(
        &args,
        &merged,
        &pushed,
        connect_secs,
        server_pid,
        samples,
        phases,
    )
}

/// One process: connect, record, settle, push, drain, report.
async fn single(args: Args, tty: bool) -> i32 {
    let Start {
        server_pid,
        mut samples,
        counters,
        sampler,
        mut phases,
    } = Start::now(&args);
    let t0 = Instant::now();
    let (clients, connected) =
        connect_phase(&args, (0..args.peers).collect(), &counters, tty).await;
    let connect_secs = t0.elapsed().as_secs_f64();
    phases.connected = now_us();
    samples.connected = server_pid.as_deref().and_then(proc_stat);
    let (targets, records, leave) = record_phase(&args, clients, &counters);
    // Every connect sent connection.created to the channel: let that
    // storm pass before measuring pushes.
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    samples.pushing = server_pid.as_deref().and_then(proc_stat);
    samples.client_pushing = proc_stat(&[std::process::id()]);
    let live = tty.then(|| progress(counters.clone()));
    let targets = Arc::new(targets);
    phases.pushing = now_us();
    let pushed = push_phase(&args, targets.clone(), &counters).await;
    phases.pushed = now_us();
    tokio::time::sleep(Duration::from_secs_f64(args.drain)).await;
    if let Some(p) = live {
        p.abort();
        eprintln!();
    }
    samples.after = server_pid.as_deref().and_then(proc_stat);
    samples.client_after = proc_stat(&[std::process::id()]);
    let mut observed = observe(connected, &args, &targets, &records);
    observed.ended = counters.ended.lock().unwrap().clone();
    observed.samples = sampler.stop();
    leave.now().await;
    report(
        &args,
        &observed,
        &pushed,
        connect_secs,
        server_pid,
        samples,
        phases,
    )
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Err(e) = check(&args) {
        eprintln!("hato-load: {e}");
        std::process::exit(2);
    }
    let tty = std::io::stderr().is_terminal();
    // Each peer's WebSocket is a descriptor (until `switched` with
    // --ignore-disconnect-websocket); say so before the run fails on it.
    let fds = hato::limits::raise_fd_limit().unwrap_or(0);
    let per_process = args.peers.div_ceil(args.processes.max(1)) as u64;
    if args.worker_index.is_none() && args.compare.is_empty() && fds < per_process + 256 {
        eprintln!(
            "hato-load: warning: {per_process} peers per process, open files limited to {fds}: raise it (ulimit -Hn; ulimit -n) or use --processes"
        );
    }
    let code = match args.worker_index {
        Some(i) => worker(args, i).await,
        None if !args.compare.is_empty() => compare(&args),
        None if args.churn.is_some() => churn(args, tty).await,
        None if args.processes > 1 => parent(args, tty).await,
        None => single(args, tty).await,
    };
    let _ = std::io::stderr().flush();
    // Exit at once: the peers' tasks and sockets go with the process.
    std::process::exit(code);
}

/// How a churned peer ends; peer i takes `ENDINGS[i % 5]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Connected, then `disconnect` (on `signaling` after the switch).
    Disconnect,
    /// Connected, then the WebSocket drops without a Close frame and the
    /// PeerConnection closes.
    WebSocketDropped,
    /// Gone once the offer is in.
    AfterOffer,
    /// Gone once the answer is sent, before ICE.
    AfterAnswer,
    /// Connected, then gone without a word (ICE consent must notice).
    WhileConnected,
}

const ENDINGS: [Ending; 5] = [
    Ending::Disconnect,
    Ending::WebSocketDropped,
    Ending::AfterOffer,
    Ending::AfterAnswer,
    Ending::WhileConnected,
];

async fn churn_peer(args: &Args, i: usize) -> Result<(), String> {
    let ending = ENDINGS[i % ENDINGS.len()];
    let mut opts = peer_options(args, i);
    opts.abandon = match ending {
        Ending::AfterOffer => Some(hato::client::Abandon::AfterOffer),
        Ending::AfterAnswer => Some(hato::client::Abandon::AfterAnswer),
        _ => None,
    };
    if opts.abandon.is_some() {
        return match Client::connect(&opts).await {
            Err(hato::client::ClientError::Abandoned) => Ok(()),
            Err(e) => Err(e.to_string()),
            Ok(_) => Err("connected although told to abandon".into()),
        };
    }
    let (mut c, _, _) = connect_with(args, opts).await?;
    match ending {
        Ending::Disconnect => {
            say_goodbye(&mut c, args.data_channel_signaling, Duration::from_secs(5)).await
        }
        Ending::WhileConnected => c.vanish(),
        _ => drop(c),
    }
    Ok(())
}

/// What the server holds after a cycle.
#[derive(Debug, Clone, serde::Serialize)]
struct CycleReport {
    cycle: usize,
    peers_ok: usize,
    peers_failed: usize,
    settle_s: f64,
    rss_kb: u64,
    fds: usize,
    threads: usize,
    stats: Value,
}

/// The server under test: --server-pid, or the process --server-process names.
fn server_pid(args: &Args) -> Option<Vec<u32>> {
    if !args.server_pid.is_empty() {
        return Some(args.server_pid.clone());
    }
    args.server_process
        .as_deref()
        .and_then(find_pid)
        .map(|p| vec![p])
}

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

/// `GET /.hato/stats` on the API (hato only; Null elsewhere).
async fn server_stats(api_url: &str) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let authority = api_url
        .split("://")
        .nth(1)
        .unwrap_or(api_url)
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let get = async {
        let mut tcp = tokio::net::TcpStream::connect(&authority).await.ok()?;
        let req =
            format!("GET /.hato/stats HTTP/1.1\r\nhost: {authority}\r\nconnection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.ok()?;
        let mut out = Vec::new();
        tcp.read_to_end(&mut out).await.ok()?;
        let text = String::from_utf8_lossy(&out);
        serde_json::from_str(text.split_once("\r\n\r\n")?.1).ok()
    };
    tokio::time::timeout(Duration::from_secs(5), get)
        .await
        .ok()
        .flatten()
        .unwrap_or(Value::Null)
}

/// `--churn`: cycles of peers coming and going in every way, and what the
/// server holds after each.
async fn churn(args: Args, tty: bool) -> i32 {
    let cycles = args.churn.unwrap_or(1);
    let Some(pid) = server_pid(&args).map(|p| p[0]) else {
        eprintln!("hato-load: server process not found");
        return 2;
    };
    let args = Arc::new(args);
    let mut reports: Vec<CycleReport> = Vec::new();
    for cycle in 1..=cycles {
        let sem = Arc::new(Semaphore::new(args.concurrency.max(1)));
        let t0 = Instant::now();
        let mut joins = Vec::new();
        for i in 0..args.peers {
            let at = t0 + Duration::from_secs_f64(i as f64 / args.hatch_rate.max(0.001));
            tokio::time::sleep_until(at.into()).await;
            let permit = sem.clone().acquire_owned().await.expect("semaphore open");
            let a = args.clone();
            joins.push(tokio::spawn(async move {
                let r = churn_peer(&a, i).await;
                drop(permit);
                r
            }));
        }
        let (mut ok, mut failed) = (0, 0);
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        for j in joins {
            match j.await {
                Ok(Ok(())) => ok += 1,
                Ok(Err(e)) => {
                    failed += 1;
                    *reasons.entry(e).or_default() += 1;
                }
                Err(_) => failed += 1,
            }
        }
        // Until the server has ended every session (vanished DataChannel
        // peers take ICE's failure time), bounded.
        let settle_start = Instant::now();
        let mut stats = server_stats(&args.api_url).await;
        while stats["sessions"].as_u64().unwrap_or(0) > 0
            && settle_start.elapsed() < Duration::from_secs(60)
        {
            tokio::time::sleep(Duration::from_millis(250)).await;
            stats = server_stats(&args.api_url).await;
        }
        let settle_s = settle_start.elapsed().as_secs_f64();
        // What the server frees after its last session (malloc_trim) has
        // happened; a moment more for the shards' own trims.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let stats = server_stats(&args.api_url).await;
        let (rss, fds, _) = hato::metrics::process_figures_of(&pid.to_string()).unwrap_or_default();
        let (rss_kb, threads) = (rss / 1024, threads(pid));
        let report = CycleReport {
            cycle,
            peers_ok: ok,
            peers_failed: failed,
            settle_s,
            rss_kb,
            fds,
            threads,
            stats,
        };
        if tty {
            eprint!("\r");
        }
        println!(
            "cycle {cycle}: {ok} peers ended ({failed} failed{}), server settled in {settle_s:.1} s: RSS {rss_kb} kB, {fds} fds, {threads} threads, {} live tasks, {} sessions, {} live WebRTC peers",
            if reasons.is_empty() { String::new() } else { format!(": {reasons:?}") },
            report.stats["alive_tasks"],
            report.stats["sessions"],
            report.stats["live_peers"],
        );
        reports.push(report);
    }
    let (first, last) = (&reports[0], &reports[reports.len() - 1]);
    let rss_change = (last.rss_kb as f64 / first.rss_kb.max(1) as f64 - 1.0) * 100.0;
    println!(
        "churn: {cycles} cycles of {} peers: RSS {} → {} kB ({rss_change:+.1} %), fds {} → {}, threads {} → {}, live tasks {} → {}",
        args.peers,
        first.rss_kb,
        last.rss_kb,
        first.fds,
        last.fds,
        first.threads,
        last.threads,
        first.stats["alive_tasks"],
        last.stats["alive_tasks"],
    );
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&json!({"churn": reports})).unwrap_or_default();
        if path == "-" {
            println!("{text}");
        } else if let Err(e) = std::fs::write(path, text) {
            eprintln!("hato-load: cannot write {path}: {e}");
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t: u64, connected: u64, server: Option<(u64, f64)>) -> Sample {
        Sample {
            t,
            connected,
            server,
            ..Sample::default()
        }
    }

    /// Workers sample the same whole seconds but start and stop apart: a
    /// second one of them missed counts with its last sample before it,
    /// and the server figures (the parent's) are never carried forward.
    #[test]
    fn samples_of_several_processes_add_up_second_by_second() {
        let parent = vec![at(10, 0, Some((100, 1.0))), at(12, 0, Some((120, 1.5)))];
        let a = vec![at(10, 3, None), at(11, 5, None), at(12, 6, None)];
        let b = vec![at(11, 4, None), at(13, 9, None)];
        let merged = merge_samples(&[parent, a, b]);
        type Row = (u64, u64, Option<(u64, f64)>);
        let got: Vec<Row> = merged
            .iter()
            .map(|s| (s.t, s.connected, s.server))
            .collect();
        assert_eq!(
            got,
            vec![
                (10, 3, Some((100, 1.0))),
                (11, 9, None),
                (12, 10, Some((120, 1.5))),
                (13, 15, None),
            ]
        );
    }
}

//! hato-attack: the attack suite of docs/security.md. `hato-attack suite`
//! runs each attack against a fresh hato while honest DataChannel and
//! WebSocket peers (two `hato-load` processes) receive pushes, and reports
//! what the attacker spent, what hato spent and what the honest peers saw.
//!
//! Everything happens inside a network namespace the suite creates and
//! deletes (it needs root): hato binds its UDP port to every interface
//! (`--rtc-addr 0.0.0.0`), as a real deployment does, and the "third party"
//! the reflection attacks aim at is 198.51.100.7, behind a veth whose other
//! end has no address: what reaches it is counted (the veth's transmit
//! counter) and dropped. Nothing leaves the machine.
//!
//! `hato-attack run ATTACK` is one attacker on its own (the suite starts it
//! as a child, to measure its CPU); it stops when its standard input
//! closes and prints what it sent as JSON.

use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use hato::client::{Client, ClientOptions};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
#[command(
    name = "hato-attack",
    version,
    about = "hato's attack suite: each attack against a real hato while honest peers receive pushes"
)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the attacks (all, or --attacks) each against a fresh hato, with
    /// honest peers beside them, inside a network namespace of its own.
    Suite {
        /// The short form (tests/run): 40 + 40 honest peers for 4 s of
        /// pushes per attack, instead of 200 + 200 for 15 s.
        #[arg(long)]
        short: bool,
        /// Only these attacks (comma-separated); `none` always runs first.
        #[arg(long, value_delimiter = ',')]
        attacks: Vec<String>,
        /// Write every figure as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Internal: already inside the namespace.
        #[arg(long, hide = true)]
        inside: bool,
    },
    /// One attacker, until its standard input closes.
    Run {
        attack: String,
        #[arg(long, default_value = "ws://127.0.0.1:25000/signaling")]
        signaling_url: String,
        #[arg(long, default_value = "127.0.0.1:23000")]
        api_addr: SocketAddr,
        /// hato's UDP ports (one per shard).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "127.0.0.1:25000,127.0.0.1:25001"
        )]
        rtc: Vec<SocketAddr>,
        /// The address the reflection attacks name.
        #[arg(long, default_value = "198.51.100.7")]
        third_party: Ipv4Addr,
        /// The channel the churn and notify-metadata attacks join.
        #[arg(long, default_value = "honest-dc")]
        channel: String,
    },
}

/// What the suite runs, in order, with a line on each.
const ATTACKS: &[(&str, &str)] = &[
    ("none", "no attack: the honest peers' baseline"),
    (
        "candidates",
        "4 peers at a time answer without candidates, never check, and trickle 2 000 candidates naming the third party",
    ),
    (
        "big-connect",
        "100 WebSockets from 100 addresses, each sending 1 MiB `connect`s, reconnecting when cut off",
    ),
    (
        "idle-tcp",
        "1 000 TCP connections from one address that send nothing, renewed as soon as closed",
    ),
    (
        "junk-udp",
        "50 000 STUN Binding requests a second, naming no peer, on hato's UDP ports",
    ),
    (
        "small-max-message-size",
        "4 peers at a time answer with a=max-message-size:100",
    ),
    (
        "slow-api",
        "2 000 API connections from one address, each sending a header line a second",
    ),
    (
        "client-channels",
        "2 WebRTC peers at a time open 50 DataChannels of their own and send 1 000 messages on them",
    ),
    (
        "notify-metadata",
        "8 peers at a time join the honest DataChannel peers' channel with 60 KB of signaling_notify_metadata",
    ),
    (
        "churn",
        "4 WebRTC peers at a time join the honest DataChannel peers' channel and leave as soon as they are in, as fast as they can",
    ),
    (
        "many-addresses",
        "4 peers at a time sign Binding requests with the offer's ICE password from 40 source addresses each",
    ),
    (
        "log-flood",
        "8 peers at a time send a `connect` whose role is 60 000 bytes (echoed in a log line) and then bad messages",
    ),
];

const SIGNALING: &str = "127.0.0.1:25000";
const API: &str = "127.0.0.1:23000";

fn main() {
    let args = Args::parse();
    match args.command {
        Cmd::Suite {
            short,
            attacks,
            json,
            inside,
        } => std::process::exit(if inside {
            suite(short, &attacks, json.as_deref())
        } else {
            in_namespace()
        }),
        Cmd::Run {
            attack,
            signaling_url,
            api_addr,
            rtc,
            third_party,
            channel,
        } => {
            let Some(signaling) = signaling_url
                .strip_prefix("ws://")
                .and_then(|rest| rest.split('/').next())
                .and_then(|authority| authority.parse().ok())
            else {
                eprintln!("hato-attack: --signaling-url must be ws://IP:PORT/…");
                std::process::exit(2);
            };
            let target = Target {
                url: signaling_url,
                signaling,
                api: api_addr,
                rtc,
                third_party,
                channel,
            };
            run(&attack, target)
        }
    }
}

// ---------------------------------------------------------------------------
// The namespace.

/// Creates the namespace, runs this same command inside it, deletes it.
fn in_namespace() -> i32 {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "hato-attack suite: needs root, to create its network namespace (run it with sudo)"
        );
        return 2;
    }
    let ns = format!("hato-attack-{}", std::process::id());
    let ip = |args: &[&str]| {
        let ok = Command::new("ip")
            .args(args)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("hato-attack suite: `ip {}` failed", args.join(" "));
        }
        ok
    };
    let set_up = ip(&["netns", "add", &ns])
        && ip(&["-n", &ns, "link", "set", "lo", "up"])
        // The third party's link: what is sent to 198.51.100.0/24 goes out
        // tp0 (no ARP: straight onto the wire) and tp1, with no address,
        // drops it.
        && ip(&["-n", &ns, "link", "add", "tp0", "type", "veth", "peer", "name", "tp1"])
        && ip(&["-n", &ns, "link", "set", "tp0", "arp", "off"])
        && ip(&["-n", &ns, "addr", "add", "198.51.100.1/24", "dev", "tp0"])
        && ip(&["-n", &ns, "link", "set", "tp0", "up"])
        && ip(&["-n", &ns, "link", "set", "tp1", "up"]);
    let code = if set_up {
        let mut args: Vec<String> = std::env::args().skip(1).collect();
        args.push("--inside".into());
        let exe = std::env::current_exe().expect("own path");
        Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(exe)
            .args(args)
            .status()
            .map_or(1, |s| s.code().unwrap_or(1))
    } else {
        1
    };
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    code
}

// ---------------------------------------------------------------------------
// The suite.

struct Honest {
    peers: usize,
    duration: f64,
    settle: f64,
}

fn suite(short: bool, only: &[String], json_path: Option<&Path>) -> i32 {
    let bin = std::env::current_exe()
        .expect("own path")
        .parent()
        .expect("a directory")
        .to_path_buf();
    for needed in ["hato", "hato-load"] {
        if !bin.join(needed).exists() {
            eprintln!(
                "hato-attack suite: {} is missing (cargo build --release --bins)",
                bin.join(needed).display()
            );
            return 2;
        }
    }
    // Only what hato sends counts on the third party's link: no IPv6
    // neighbour discovery on it.
    let _ = std::fs::write("/proc/sys/net/ipv6/conf/tp0/disable_ipv6", "1");
    // Private scratch space: hato's log and hato-load's summaries.
    let scratch = std::env::temp_dir().join(format!("hato-attack-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("scratch directory");
    let honest = if short {
        Honest {
            peers: 40,
            duration: 4.0,
            settle: 1.0,
        }
    } else {
        Honest {
            peers: 200,
            duration: 15.0,
            settle: 2.0,
        }
    };
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for (name, what) in ATTACKS {
        if *name != "none" && !only.is_empty() && !only.iter().any(|a| a == name) {
            continue;
        }
        eprintln!("hato-attack: {name}: {what}");
        let row = one(&bin, &scratch, name, &honest);
        if let Some(why) = row.get("failed").and_then(Value::as_str) {
            failed.push(format!("{name}: {why}"));
        }
        rows.push(row);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let baseline = |transport: &str| rows[0]["honest"][transport]["p99_ms"].as_f64();
    let (base_dc, base_ws) = (baseline("datachannel"), baseline("websocket"));
    println!("| attack | attacker spent | hato spent | third party got | honest DataChannel peers: connected, lost, p99 (× none) | honest WebSocket peers: connected, lost, p99 (× none) |");
    println!("|---|---|---|---|---|---|");
    for row in &mut rows {
        let cell = |h: &Value, base: Option<f64>| {
            let p99 = h["p99_ms"].as_f64();
            let ratio = match (p99, base) {
                (Some(p), Some(b)) if b > 0.0 => format!(" ({:.2}×)", p / b),
                _ => String::new(),
            };
            format!(
                "{}/{}, {} lost, {}{ratio}",
                h["connected"],
                h["requested"],
                h["lost"].as_u64().unwrap_or(0) + h["pushes_failed"].as_u64().unwrap_or(0),
                p99.map_or("-".into(), |p| format!("{p:.1} ms")),
            )
        };
        let dc = cell(&row["honest"]["datachannel"], base_dc);
        let ws = cell(&row["honest"]["websocket"], base_ws);
        let a = &row["attacker"];
        let h = &row["hato"];
        println!(
            "| {} | {:.2} s CPU; {} | {:.2} s CPU, peak RSS {} MB, {} KB of log | {} datagrams | {dc} | {ws} |",
            row["attack"].as_str().unwrap_or(""),
            a["cpu_seconds"].as_f64().unwrap_or(0.0),
            summary_of(&a["sent"]),
            h["cpu_seconds"].as_f64().unwrap_or(0.0),
            h["peak_rss_kb"].as_u64().unwrap_or(0) / 1024,
            h["log_bytes"].as_u64().unwrap_or(0) / 1024,
            row["third_party_datagrams"],
        );
    }
    let report = json!({"short": short, "attacks": rows});
    if let Some(path) = json_path {
        if let Err(e) = std::fs::write(path, serde_json::to_string_pretty(&report).unwrap()) {
            eprintln!("hato-attack: cannot write {}: {e}", path.display());
        }
    }
    if failed.is_empty() {
        eprintln!("hato-attack: every honest peer connected and lost nothing, under every attack");
        0
    } else {
        for f in &failed {
            eprintln!("hato-attack: FAILED {f}");
        }
        1
    }
}

/// The attacker's counters, as one short cell.
fn summary_of(sent: &Value) -> String {
    let Some(map) = sent.as_object() else {
        return String::new();
    };
    map.iter()
        .filter(|(k, _)| *k != "ends")
        .map(|(k, v)| format!("{v} {}", k.replace('_', " ")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One attack: a fresh hato, the attacker from a second before the honest
/// peers connect until they are done, and the figures.
fn one(bin: &Path, scratch: &Path, attack: &str, honest: &Honest) -> Value {
    let log = scratch.join(format!("{attack}.log"));
    let mut hato = Command::new(bin.join("hato"))
        .args([
            "--signaling-addr",
            SIGNALING,
            "--api-addr",
            API,
            "--rtc-addr",
            "0.0.0.0:25000",
            "--rtc-shards",
            "2",
        ])
        .env("HATO_LOG", "warn")
        .stdout(std::fs::File::create(&log).expect("log file"))
        .stderr(Stdio::null())
        .spawn()
        .expect("hato starts");
    let pid = hato.id();
    let ready = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        std::net::TcpStream::connect(API).is_ok()
    });
    if !ready {
        let _ = hato.kill();
        let _ = hato.wait();
        return json!({"attack": attack, "failed": "hato did not start"});
    }
    let cpu_before = cpu_ticks(pid);
    let tx_before = third_party_count();
    // Reaped by `reap` (wait4, for its CPU time), not by `Child::wait`.
    #[allow(clippy::zombie_processes)]
    let mut attacker = Command::new(std::env::current_exe().expect("own path"))
        .args(["run", attack])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the attacker starts");
    std::thread::sleep(Duration::from_secs(1));
    let load = |transport: &str| {
        let out = scratch.join(format!("{attack}-{transport}.json"));
        let mut cmd = Command::new(bin.join("hato-load"));
        cmd.args([
            "--signaling-url",
            &format!("ws://{SIGNALING}/signaling"),
            "--api-url",
            &format!("http://{API}/"),
            "--peers",
            &honest.peers.to_string(),
            "--channel",
            &format!("honest-{transport}"),
            "--hatch-rate",
            "200",
            "--concurrency",
            "50",
            "--rate",
            "20",
            "--duration",
            &honest.duration.to_string(),
            "--settle",
            &honest.settle.to_string(),
            "--drain",
            "3",
            "--json",
        ])
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if transport == "dc" {
            cmd.args(["--data-channel-signaling", "--ignore-disconnect-websocket"]);
        }
        (cmd.spawn().expect("hato-load starts"), out)
    };
    let (mut dc, dc_out) = load("dc");
    let (mut ws, ws_out) = load("ws");
    let _ = dc.wait();
    let _ = ws.wait();
    // Stop the attacker, take its report and its CPU time.
    drop(attacker.stdin.take());
    let mut report = String::new();
    if let Some(mut out) = attacker.stdout.take() {
        let _ = out.read_to_string(&mut report);
    }
    let attacker_cpu = reap(attacker.id());
    let cpu_after = cpu_ticks(pid);
    let peak_rss_kb = status_kb(pid, "VmHWM:");
    let alive = matches!(hato.try_wait(), Ok(None));
    let third_party = third_party_count().saturating_sub(tx_before);
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = hato.wait();
    let log_bytes = std::fs::metadata(&log).map_or(0, |m| m.len());
    let honest_of = |path: &Path| -> Value {
        let Ok(text) = std::fs::read_to_string(path) else {
            return json!({"error": "no summary"});
        };
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        json!({
            "requested": v["peers"]["requested"],
            "connected": v["peers"]["connected"],
            "failure_reasons": v["peers"]["failure_reasons"],
            "deliveries": v["deliveries"]["received"],
            "lost": v["deliveries"]["lost"],
            "pushes_failed": v["pushes"]["failed"],
            "p50_ms": v["latency_ms"]["p50"],
            "p99_ms": v["latency_ms"]["p99"],
        })
    };
    let dc = honest_of(&dc_out);
    let ws = honest_of(&ws_out);
    let mut why = Vec::new();
    if !alive {
        why.push("hato is gone".to_string());
    }
    for (name, h) in [("DataChannel", &dc), ("WebSocket", &ws)] {
        if h["connected"] != h["requested"] || h["requested"].is_null() {
            why.push(format!(
                "{name} peers: {}/{} connected ({})",
                h["connected"], h["requested"], h["failure_reasons"]
            ));
        }
        if h["lost"].as_u64() != Some(0) || h["pushes_failed"].as_u64() != Some(0) {
            why.push(format!(
                "{name} peers: {} lost, {} pushes failed",
                h["lost"], h["pushes_failed"]
            ));
        }
    }
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut row = json!({
        "attack": attack,
        "attacker": {
            "cpu_seconds": attacker_cpu,
            "sent": serde_json::from_str::<Value>(report.trim()).unwrap_or(Value::Null),
        },
        "hato": {
            "cpu_seconds": cpu_after.saturating_sub(cpu_before) as f64 / hz,
            "peak_rss_kb": peak_rss_kb,
            "log_bytes": log_bytes,
        },
        "third_party_datagrams": third_party,
        "honest": {"datachannel": dc, "websocket": ws},
    });
    if !why.is_empty() {
        row["failed"] = json!(why.join("; "));
    }
    row
}

/// User and system CPU ticks of a process, all its threads.
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

fn status_kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Datagrams sent towards the third party: the transmit counter of its link.
fn third_party_count() -> u64 {
    std::fs::read_to_string("/sys/class/net/tp0/statistics/tx_packets")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits for a child and returns its CPU seconds (user + system).
fn reap(pid: u32) -> f64 {
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid as i32, &mut status, 0, &mut usage) };
    if r < 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

// ---------------------------------------------------------------------------
// The attackers.

#[derive(Clone)]
struct Target {
    url: String,
    /// The address in `url`.
    signaling: SocketAddr,
    api: SocketAddr,
    rtc: Vec<SocketAddr>,
    third_party: Ipv4Addr,
    channel: String,
}

/// What an attacker sent, and how its sessions ended.
#[derive(Default)]
struct Tally {
    counts: Mutex<BTreeMap<&'static str, u64>>,
    ends: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    fn add(&self, what: &'static str, n: u64) {
        *self.counts.lock().unwrap().entry(what).or_default() += n;
    }
    fn end(&self, how: String) {
        *self.ends.lock().unwrap().entry(how).or_default() += 1;
    }
    fn report(&self) -> Value {
        let mut v = json!(*self.counts.lock().unwrap());
        v["ends"] = json!(*self.ends.lock().unwrap());
        v
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

fn run(attack: &str, target: Target) {
    let tally = Arc::new(Tally::default());
    if attack == "junk-udp" {
        let t = tally.clone();
        std::thread::spawn(move || junk_udp(&target, &t));
    } else {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let t = tally.clone();
        let attack = attack.to_owned();
        std::thread::spawn(move || rt.block_on(attack_loop(&attack, target, t)));
    }
    // Until the suite closes our standard input.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    STOP.store(true, Ordering::Relaxed);
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{}", tally.report());
    let _ = out.flush();
    std::process::exit(0);
}

async fn attack_loop(attack: &str, target: Target, tally: Arc<Tally>) {
    let target = Arc::new(target);
    // (tasks, what each does in a loop)
    let tasks: usize = match attack {
        "none" => 0,
        "candidates" | "small-max-message-size" => 4,
        "big-connect" => 100,
        "idle-tcp" => 1000,
        "slow-api" => 2000,
        "client-channels" => 2,
        "notify-metadata" | "log-flood" => 8,
        "churn" | "many-addresses" => 4,
        other => {
            eprintln!("hato-attack: no attack called {other}");
            std::process::exit(2);
        }
    };
    let mut set = tokio::task::JoinSet::new();
    for i in 0..tasks {
        let (target, tally, attack) = (target.clone(), tally.clone(), attack.to_owned());
        set.spawn(async move {
            while !STOP.load(Ordering::Relaxed) {
                let pause = match attack.as_str() {
                    "candidates" => candidates(&target, &tally, i).await,
                    "big-connect" => big_connect(&target, &tally, i).await,
                    "idle-tcp" => idle_tcp(&target, &tally).await,
                    "small-max-message-size" => small_max_message_size(&target, &tally, i).await,
                    "slow-api" => slow_api(&target, &tally).await,
                    "client-channels" => client_channels(&target, &tally, i).await,
                    "notify-metadata" => notify_metadata(&target, &tally, i).await,
                    "log-flood" => log_flood(&target, &tally, i).await,
                    "churn" => churn(&target, &tally, i).await,
                    "many-addresses" => many_addresses(&target, &tally, i).await,
                    _ => unreachable!(),
                };
                tokio::time::sleep(pause).await;
            }
        });
    }
    while set.join_next().await.is_some() {}
    std::future::pending::<()>().await;
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A signaling WebSocket from `source`.
async fn ws_from(target: &Target, source: Ipv4Addr, tally: &Tally) -> Option<Ws> {
    let sock = tokio::net::TcpSocket::new_v4().ok()?;
    sock.bind(SocketAddr::new(source.into(), 0)).ok()?;
    let tcp = sock.connect(target.signaling).await.ok()?;
    tally.add("websockets", 1);
    match tokio_tungstenite::client_async(target.url.as_str(), tcp).await {
        Ok((ws, _)) => Some(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            tally.end(format!("HTTP {}", resp.status().as_u16()));
            None
        }
        Err(_) => {
            tally.end("upgrade failed".into());
            None
        }
    }
}

/// Sends a text message, counting it.
async fn send(ws: &mut Ws, text: String, tally: &Tally) -> bool {
    let n = text.len() as u64;
    let ok = ws.send(Message::text(text)).await.is_ok();
    if ok {
        tally.add("messages", 1);
        tally.add("bytes", n);
    }
    ok
}

/// Reads until the server closes (or 30 s), and tallies how.
async fn end_of(mut ws: Ws, tally: &Tally) {
    let how = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => {
                    return frame.map_or("Close".into(), |f| {
                        let reason: String = f.reason.chars().take(40).collect();
                        format!("Close {} {reason}", u16::from(f.code))
                    })
                }
                Some(Ok(_)) => {}
                _ => return "dropped".to_string(),
            }
        }
    })
    .await
    .unwrap_or_else(|_| "still open after 30 s".into());
    tally.end(how);
}

/// Reads until the offer (or whatever comes instead): its SDP.
async fn offer_of(ws: &mut Ws) -> Option<String> {
    while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).unwrap_or_default();
            if v["type"] == "offer" {
                return v["sdp"].as_str().map(str::to_owned);
            }
        } else if let Message::Close(_) = msg {
            return None;
        }
    }
    None
}

fn attacker_address(block: u8, i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, block, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// An answer that names no candidate and never checks.
fn silent_answer(extra: &str) -> String {
    hato::client::hand_made_answer("attackerpasswordattackerpw", "active", &[extra])
}

async fn answered(
    target: &Target,
    tally: &Tally,
    source: Ipv4Addr,
    channel: &str,
    extra: &str,
) -> Option<(Ws, String)> {
    let mut ws = ws_from(target, source, tally).await?;
    let connect = json!({"type": "connect", "role": "recvonly", "channel_id": channel, "sora_client": "hato-attack"});
    let offer = match send(&mut ws, connect.to_string(), tally).await {
        true => offer_of(&mut ws).await,
        false => None,
    };
    let Some(offer) = offer else {
        end_of(ws, tally).await;
        return None;
    };
    let answer = json!({"type": "answer", "sdp": silent_answer(extra)});
    send(&mut ws, answer.to_string(), tally).await;
    Some((ws, offer))
}

async fn candidates(target: &Target, tally: &Tally, i: usize) -> Duration {
    let Some((mut ws, _)) = answered(
        target,
        tally,
        attacker_address(200, i),
        "attack",
        "a=max-message-size:262144",
    )
    .await
    else {
        return Duration::from_millis(100);
    };
    for k in 0..2000u32 {
        let candidate = json!({"type": "candidate",
            "candidate": format!("candidate:7 1 udp 2122260223 {} {} typ host", target.third_party, 10_000 + k)});
        if !send(&mut ws, candidate.to_string(), tally).await {
            break;
        }
        tally.add("candidates", 1);
    }
    end_of(ws, tally).await;
    Duration::ZERO
}

async fn big_connect(target: &Target, tally: &Tally, i: usize) -> Duration {
    static BIG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let big = BIG.get_or_init(|| {
        let mut m =
            String::from(r#"{"type":"connect","role":"recvonly","channel_id":"big","metadata":["#);
        while m.len() < (1 << 20) - 3 {
            m.push_str("0,");
        }
        m.push_str("0]}");
        m
    });
    let Some(mut ws) = ws_from(target, attacker_address(201, i), tally).await else {
        return Duration::from_millis(100);
    };
    tally.add("connects_of_1_MiB", 1);
    send(&mut ws, big.clone(), tally).await;
    end_of(ws, tally).await;
    Duration::ZERO
}

async fn idle_tcp(target: &Target, tally: &Tally) -> Duration {
    let Ok(sock) = tokio::net::TcpSocket::new_v4() else {
        return Duration::from_millis(100);
    };
    let _ = sock.bind(SocketAddr::new(Ipv4Addr::new(127, 202, 0, 1).into(), 0));
    let Ok(mut tcp) = sock.connect(target.signaling).await else {
        return Duration::from_millis(100);
    };
    tally.add("idle_sockets", 1);
    let mut sink = [0u8; 512];
    while let Ok(1..) = tcp.read(&mut sink).await {}
    Duration::ZERO
}

fn junk_udp(target: &Target, tally: &Tally) {
    const RATE: u64 = 50_000;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("a UDP socket");
    // Binding requests whose USERNAME names no peer.
    let mut packets = Vec::new();
    for i in 0..4096u64 {
        let user = format!("{:016x}:x", i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut attr = vec![0x00, 0x06];
        attr.extend_from_slice(&(user.len() as u16).to_be_bytes());
        attr.extend_from_slice(user.as_bytes());
        while attr.len() % 4 != 0 {
            attr.push(0);
        }
        let mut msg = vec![0x00, 0x01];
        msg.extend_from_slice(&(attr.len() as u16).to_be_bytes());
        msg.extend_from_slice(&0x2112_A442u32.to_be_bytes());
        msg.extend_from_slice(&i.to_be_bytes());
        msg.extend_from_slice(&[0; 4]);
        msg.extend_from_slice(&attr);
        packets.push(msg);
    }
    let start = Instant::now();
    let mut sent = 0u64;
    while !STOP.load(Ordering::Relaxed) {
        let due = start.elapsed().as_micros() as u64 * RATE / 1_000_000;
        while sent < due {
            let p = &packets[(sent % 4096) as usize];
            let to = target.rtc[(sent as usize) % target.rtc.len()];
            if sock.send_to(p, to).is_ok() {
                tally.add("datagrams", 1);
            }
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

async fn small_max_message_size(target: &Target, tally: &Tally, i: usize) -> Duration {
    if let Some((ws, _)) = answered(
        target,
        tally,
        attacker_address(204, i),
        "attack",
        "a=max-message-size:100",
    )
    .await
    {
        end_of(ws, tally).await;
    }
    Duration::from_millis(10)
}

/// Addresses one attacking peer signs Binding requests from.
const SOURCES: usize = 40;

/// A peer (it has the offer, so the password) whose signed Binding
/// requests come from 40 source addresses: each bound address would be a
/// peer-reflexive candidate of its ICE agent, checked and searched on
/// every STUN message. hato binds 32 per peer and drops the rest.
async fn many_addresses(target: &Target, tally: &Tally, i: usize) -> Duration {
    let Some((ws, offer)) = answered(
        target,
        tally,
        attacker_address(208, i),
        "attack",
        "a=max-message-size:262144",
    )
    .await
    else {
        return Duration::from_millis(100);
    };
    let attr = |name: &str| {
        let prefix = format!("a={name}:");
        offer
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .map(str::trim)
    };
    if let (Some(ufrag), Some(pwd)) = (attr("ice-ufrag"), attr("ice-pwd")) {
        let request = hato_datachannel::signed_binding_request(&format!("{ufrag}:attk"), pwd);
        let mut sockets = Vec::with_capacity(SOURCES);
        for k in 0..SOURCES {
            let from = SocketAddr::new(attacker_address(209, i * SOURCES + k).into(), 0);
            let Ok(socket) = tokio::net::UdpSocket::bind(from).await else {
                continue;
            };
            for to in &target.rtc {
                if socket.send_to(&request, to).await.is_ok() {
                    tally.add("signed_requests", 1);
                }
            }
            sockets.push(socket);
        }
        // Bound, the addresses are checked until the session ends (it
        // never connects: hato's checking limit); what came back waits in
        // the sockets' buffers.
        end_of(ws, tally).await;
        let mut buf = [0u8; 1500];
        for socket in &sockets {
            while socket.try_recv(&mut buf).is_ok() {
                tally.add("datagrams_back", 1);
            }
        }
    } else {
        end_of(ws, tally).await;
    }
    Duration::ZERO
}

async fn slow_api(target: &Target, tally: &Tally) -> Duration {
    let Ok(sock) = tokio::net::TcpSocket::new_v4() else {
        return Duration::from_secs(1);
    };
    let _ = sock.bind(SocketAddr::new(Ipv4Addr::new(127, 203, 0, 1).into(), 0));
    let Ok(mut tcp) = sock.connect(target.api).await else {
        return Duration::from_secs(1);
    };
    tally.add("api_connections", 1);
    if tcp
        .write_all(b"POST / HTTP/1.1\r\nhost: hato\r\n")
        .await
        .is_err()
    {
        return Duration::from_secs(1);
    }
    let mut sink = [0u8; 512];
    loop {
        tokio::select! {
            r = tcp.read(&mut sink) => match r {
                Ok(n) if n > 0 => {
                    let answer = String::from_utf8_lossy(&sink[..n]).chars().take(12).collect::<String>();
                    tally.end(answer);
                }
                _ => break,
            },
            () = tokio::time::sleep(Duration::from_secs(1)) => {
                if tcp.write_all(b"x-slow: 1\r\n").await.is_err() {
                    break;
                }
                tally.add("header_lines", 1);
            }
        }
    }
    Duration::from_secs(1)
}

/// A real WebRTC peer (DataChannel signaling, WebSocket kept) joining
/// `channel` from attacker address `i` of `block`.
fn hybrid_peer(target: &Target, channel: &str, block: u8, i: usize) -> ClientOptions {
    let mut opts = ClientOptions::new(&target.url, channel, "recvonly");
    opts.data_channel_signaling = Some(true);
    opts.ignore_disconnect_websocket = Some(false);
    opts.source_ip = Some(attacker_address(block, i).into());
    opts
}

async fn client_channels(target: &Target, tally: &Tally, i: usize) -> Duration {
    let Ok(mut client) = Client::connect(&hybrid_peer(target, "attack-dc", 205, i)).await else {
        tally.end("refused".into());
        return Duration::from_millis(100);
    };
    tally.add("peers", 1);
    if !client.wait_connected(Duration::from_secs(10)).await {
        tally.end("not connected".into());
        client.close_peer();
        return Duration::from_millis(100);
    }
    let payload = "x".repeat(1024);
    for k in 0..50 {
        let label = format!("mine-{k}");
        client.open_channel(&label);
        tally.add("channels_opened", 1);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for m in 0..1000 {
        client.send_dc(&format!("mine-{}", m % 50), &payload, true);
        tally.add("messages", 1);
        if m % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    tally.end("left".into());
    client.close_peer();
    Duration::from_millis(100)
}

async fn churn(target: &Target, tally: &Tally, i: usize) -> Duration {
    let Ok(mut client) = Client::connect(&hybrid_peer(target, &target.channel, 208, i)).await
    else {
        tally.end("refused".into());
        return Duration::from_millis(10);
    };
    if client.wait_connected(Duration::from_secs(10)).await {
        tally.add("joins", 1);
        tally.end("left".into());
    } else {
        tally.end("not connected".into());
    }
    client.send_ws(r#"{"type":"disconnect","reason":"NO-ERROR"}"#);
    client.close_peer();
    Duration::ZERO
}

async fn notify_metadata(target: &Target, tally: &Tally, i: usize) -> Duration {
    let Some(mut ws) = ws_from(target, attacker_address(206, i), tally).await else {
        return Duration::from_millis(100);
    };
    let connect = json!({"type": "connect", "role": "recvonly", "channel_id": target.channel,
        "signaling_notify_metadata": {"pad": "x".repeat(60_000)}});
    send(&mut ws, connect.to_string(), tally).await;
    end_of(ws, tally).await;
    Duration::from_millis(10)
}

async fn log_flood(target: &Target, tally: &Tally, i: usize) -> Duration {
    let Some(mut ws) = ws_from(target, attacker_address(207, i), tally).await else {
        return Duration::from_millis(100);
    };
    let connect = json!({"type": "connect", "role": "x".repeat(60_000), "channel_id": "flood"});
    send(&mut ws, connect.to_string(), tally).await;
    end_of(ws, tally).await;
    // And a session that sends garbage after its offer.
    if let Some((mut ws, _)) = answered(
        target,
        tally,
        attacker_address(207, i + 100),
        "flood",
        "a=max-message-size:262144",
    )
    .await
    {
        for _ in 0..20 {
            if !send(
                &mut ws,
                format!("{{\"type\":\"{}\"}}", "?".repeat(4000)),
                tally,
            )
            .await
            {
                break;
            }
        }
        end_of(ws, tally).await;
    }
    Duration::from_millis(10)
}

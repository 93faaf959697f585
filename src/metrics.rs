//! Prometheus metrics (`--metrics-addr`, off by default): `GET /metrics`
//! in the text exposition format, and `GET /.ok` for load balancers, on a
//! listener of their own. Built with `prometheus-client`, the Prometheus
//! project's Rust client.
//!
//! Events hato already counts elsewhere (the table's, the engine's, the
//! webhooks' atomics) are copied into their metrics at scrape time; what
//! only exists here (connects, disconnects by reason, latencies) is
//! recorded as it happens.

use crate::counters::Group;
use crate::limits::Throttle;
use crate::table::{ROLES, TRANSPORTS};
use crate::Shared;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use tokio::net::TcpListener;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PushLabels {
    pub target: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Transport {
    pub transport: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleTransport {
    pub role: String,
    pub transport: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Target {
    pub target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: String,
}

/// An `event` label (cluster and history events).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Event {
    pub event: String,
}

/// Every metric hato exports.
pub struct Metrics {
    registry: Registry,
    pub connects: Counter,
    pub disconnects: Family<Reason, Counter>,
    /// Connects refused before an offer, by kind (`invalid`, `no_connect`,
    /// `denied`, `webhook_failed`, `bad_override`, `draining`, `internal`).
    pub refused_connects: Family<Reason, Counter>,
    pub pushes: Family<PushLabels, Counter>,
    pub offer_to_connected: Histogram,
    pub offer_to_push_open: Histogram,
    pub api_request: Family<Target, Histogram>,
    pub auth_webhook_seconds: Histogram,
    deliveries: Family<Transport, Counter>,
    drops: Family<Reason, Counter>,
    held: Family<Reason, Counter>,
    paced: Family<Reason, Counter>,
    sctp_events: Family<Event, Counter>,
    notify_waiting: Gauge,
    connections: Family<RoleTransport, Gauge>,
    signaling_connections: Gauge,
    outbox_bytes: Gauge,
    auth_webhook: Family<Outcome, Counter>,
    event_webhook: Family<Outcome, Counter>,
    cluster_events: Family<Event, Counter>,
    history_events: Family<Event, Counter>,
    history_bytes: Gauge,
    history_pushes: Gauge,
    history_channels: Gauge,
    cluster_nodes: Gauge,
    cluster_nats_connected: Gauge,
    resident_memory: Gauge,
    open_fds: Gauge,
    cpu_seconds: Counter<f64, AtomicU64>,
}

fn seconds_buckets() -> impl Iterator<Item = f64> {
    // 1 ms … ~16 s.
    exponential_buckets(0.001, 2.0, 15)
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::default();
        let m = Metrics {
            connects: Counter::default(),
            disconnects: Family::default(),
            refused_connects: Family::default(),
            pushes: Family::default(),
            offer_to_connected: Histogram::new(seconds_buckets()),
            offer_to_push_open: Histogram::new(seconds_buckets()),
            api_request: Family::new_with_constructor(|| Histogram::new(seconds_buckets())),
            auth_webhook_seconds: Histogram::new(seconds_buckets()),
            deliveries: Family::default(),
            drops: Family::default(),
            held: Family::default(),
            paced: Family::default(),
            sctp_events: Family::default(),
            notify_waiting: Gauge::default(),
            connections: Family::default(),
            signaling_connections: Gauge::default(),
            outbox_bytes: Gauge::default(),
            auth_webhook: Family::default(),
            event_webhook: Family::default(),
            cluster_events: Family::default(),
            history_events: Family::default(),
            history_bytes: Gauge::default(),
            history_pushes: Gauge::default(),
            history_channels: Gauge::default(),
            cluster_nodes: Gauge::default(),
            cluster_nats_connected: Gauge::default(),
            resident_memory: Gauge::default(),
            open_fds: Gauge::default(),
            cpu_seconds: Counter::default(),
            registry: Registry::default(),
        };
        r.register(
            "hato_connects",
            "Peers that joined the table (ICE and DTLS up)",
            m.connects.clone(),
        );
        r.register(
            "hato_disconnects",
            "Sessions that ended, by reason",
            m.disconnects.clone(),
        );
        r.register(
            "hato_connects_refused",
            "Connects refused before an offer, by kind",
            m.refused_connects.clone(),
        );
        r.register(
            "hato_pushes",
            "API push calls, by target and outcome (ok, or the error type)",
            m.pushes.clone(),
        );
        r.register_with_unit(
            "hato_offer_to_connected",
            "From the offer sent to ICE and DTLS up",
            Unit::Seconds,
            m.offer_to_connected.clone(),
        );
        r.register_with_unit(
            "hato_offer_to_push_open",
            "From the offer sent to the push DataChannel open",
            Unit::Seconds,
            m.offer_to_push_open.clone(),
        );
        r.register_with_unit(
            "hato_api_request",
            "API request handling time, by x-sora-target",
            Unit::Seconds,
            m.api_request.clone(),
        );
        r.register_with_unit(
            "hato_auth_webhook",
            "Auth webhook call time, answered or not",
            Unit::Seconds,
            m.auth_webhook_seconds.clone(),
        );
        r.register(
            "hato_deliveries",
            "Push deliveries queued, by transport",
            m.deliveries.clone(),
        );
        r.register(
            "hato_drops",
            "Things dropped or refused, by reason",
            m.drops.clone(),
        );
        r.register(
            "hato_datagrams_held",
            "Datagrams the WebRTC engine held until their peer was ready, by what it waited for",
            m.held.clone(),
        );
        r.register(
            "hato_paced",
            "What waited for its turn: `connect`s for their address's (--max-connects-per-ip-per-second), `notify` announcements for their channel's budget (--channel-notify-rate)",
            m.paced.clone(),
        );
        r.register(
            "hato_sctp_events",
            "What the DataChannel engine's SCTP did beyond the ordinary: `resent_on_return`, DATA whose retransmission had backed off resent at once because its peer was heard again after 4 s of silence",
            m.sctp_events.clone(),
        );
        r.register(
            "hato_notify_waiting",
            "notify announcements waiting for their channel's budget now",
            m.notify_waiting.clone(),
        );
        r.register(
            "hato_connections",
            "Connections in the table now, by role and transport",
            m.connections.clone(),
        );
        r.register(
            "hato_signaling_connections",
            "Signaling connections now, handshakes included",
            m.signaling_connections.clone(),
        );
        r.register_with_unit(
            "hato_outbox",
            "Bytes queued in every connection's outbox now",
            Unit::Bytes,
            m.outbox_bytes.clone(),
        );
        r.register(
            "hato_auth_webhook_calls",
            "Auth webhook calls, by outcome",
            m.auth_webhook.clone(),
        );
        r.register(
            "hato_event_webhook_events",
            "Event webhook events: queued, then by outcome",
            m.event_webhook.clone(),
        );
        r.register(
            "hato_cluster_events",
            "Cluster (--cluster-nats-url): messages published to and received from NATS, publish failures, calls answered 503 CLUSTER-UNAVAILABLE, snapshots asked for, nodes lost",
            m.cluster_events.clone(),
        );
        r.register(
            "hato_history_events",
            "Joiners given all they asked to recover (recovered), told of a gap (recovery_gap); pushes dropped early to stay within --history-max-bytes (evicted)",
            m.history_events.clone(),
        );
        r.register_with_unit(
            "hato_history",
            "Bytes every channel's history holds now",
            Unit::Bytes,
            m.history_bytes.clone(),
        );
        r.register(
            "hato_history_pushes",
            "Pushes kept in every channel's history now",
            m.history_pushes.clone(),
        );
        r.register(
            "hato_history_channels",
            "Channels with an order (a log) now",
            m.history_channels.clone(),
        );
        r.register(
            "hato_cluster_nodes",
            "Other nodes of the cluster heard from within the node timeout",
            m.cluster_nodes.clone(),
        );
        r.register(
            "hato_cluster_nats_connected",
            "1 while this node is connected to NATS (cluster mode)",
            m.cluster_nats_connected.clone(),
        );
        r.register_with_unit(
            "process_resident_memory",
            "Resident memory",
            Unit::Bytes,
            m.resident_memory.clone(),
        );
        r.register(
            "process_open_fds",
            "Open file descriptors",
            m.open_fds.clone(),
        );
        r.register_with_unit(
            "process_cpu",
            "User and system CPU time",
            Unit::Seconds,
            m.cpu_seconds.clone(),
        );
        Metrics { registry: r, ..m }
    }
}

impl Metrics {
    /// Copies what is counted elsewhere ([`crate::counters`]), then
    /// encodes everything.
    pub fn render(&self, shared: &Shared) -> String {
        let counters = crate::counters::read(shared);
        for r in &counters.readings {
            let name = r.name.to_owned();
            let counter = match r.group {
                Group::Deliveries => self
                    .deliveries
                    .get_or_create(&Transport { transport: name }),
                Group::Drops => self.drops.get_or_create(&Reason { reason: name }),
                Group::Held => self.held.get_or_create(&Reason { reason: name }),
                Group::Paced => self.paced.get_or_create(&Reason { reason: name }),
                Group::Sctp => self.sctp_events.get_or_create(&Event { event: name }),
                Group::AuthWebhook => self.auth_webhook.get_or_create(&Outcome { outcome: name }),
                Group::EventWebhook => self.event_webhook.get_or_create(&Outcome { outcome: name }),
                Group::Cluster => self.cluster_events.get_or_create(&Event { event: name }),
                Group::History => self.history_events.get_or_create(&Event { event: name }),
            };
            counter.inner().store(r.value, Ordering::Relaxed);
        }
        let h = &shared.history.counts;
        let gauge = |v: &AtomicU64| v.load(Ordering::Relaxed).try_into().unwrap_or(i64::MAX);
        self.history_bytes.set(gauge(&h.bytes));
        self.history_pushes.set(gauge(&h.pushes));
        self.history_channels
            .set(shared.history.channels().try_into().unwrap_or(i64::MAX));
        self.notify_waiting
            .set(shared.table.paced_len().try_into().unwrap_or(i64::MAX));
        let census = shared.table.census();
        for (role, counts) in ROLES.iter().zip(census.by_role_and_transport) {
            for (transport, count) in TRANSPORTS.iter().zip(counts) {
                self.connections
                    .get_or_create(&RoleTransport {
                        role: role.as_str().into(),
                        transport: (*transport).into(),
                    })
                    .set(count as i64);
            }
        }
        self.outbox_bytes.set(census.outbox_bytes as i64);
        self.signaling_connections
            .set(shared.admission.connections() as i64);
        if let Some(c) = &shared.cluster {
            self.cluster_nodes.set(c.live_nodes().len() as i64);
            self.cluster_nats_connected.set(i64::from(c.available()));
        }
        if let Some((rss, fds, cpu)) = process_figures() {
            self.resident_memory.set(rss as i64);
            self.open_fds.set(fds as i64);
            self.cpu_seconds
                .inner()
                .store(cpu.to_bits(), Ordering::Relaxed);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String does not fail");
        out
    }
}

/// RSS in bytes, open fds, CPU seconds of this process (Linux).
fn process_figures() -> Option<(u64, usize, f64)> {
    process_figures_of("self")
}

/// RSS in bytes, open fds and CPU seconds (user + system) of process
/// `pid` ("self" for this one), from /proc. `hato-load` reads the server
/// it measures with it.
pub fn process_figures_of(pid: &str) -> Option<(u64, usize, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((rss_kb * 1024, fds, ticks as f64 / hz))
}

/// Serves `GET /metrics` and `GET /.ok` until the task is aborted.
pub async fn serve(listener: TcpListener, shared: Weak<Shared>) {
    static ACCEPT_ERRORS: Throttle = Throttle::new(std::time::Duration::from_secs(1));
    let places = Arc::new(tokio::sync::Semaphore::new(METRICS_MAX_CONNECTIONS));
    loop {
        let (tcp, _) = crate::limits::accept(&listener, "metrics", &ACCEPT_ERRORS).await;
        // Over the cap: closed at once (a scraper retries at its next
        // interval).
        let Ok(place) = places.clone().try_acquire_owned() else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let shared = shared.upgrade();
                async move { Ok::<_, Infallible>(answer(shared.as_deref(), &req)) }
            });
            // One request per connection, and the whole of it within the
            // limit: a socket that sends nothing, or reads slowly, holds
            // its place no longer.
            let conn = http1::Builder::new()
                .keep_alive(false)
                .serve_connection(TokioIo::new(tcp), service);
            let _ = tokio::time::timeout(METRICS_CONNECTION_TIME, conn).await;
            drop(place);
        });
    }
}

/// Connections the metrics listener serves at once; more are closed.
pub const METRICS_MAX_CONNECTIONS: usize = 64;
/// The time one metrics connection (one request) may take, start to end.
pub const METRICS_CONNECTION_TIME: std::time::Duration = std::time::Duration::from_secs(10);

fn answer(shared: Option<&Shared>, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let Some(shared) = shared else {
        let mut resp = Response::new(Full::new(Bytes::from_static(b"stopped")));
        *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        return resp;
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            let mut resp = Response::new(Full::new(Bytes::from(shared.metrics.render(shared))));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        (&Method::GET, "/.ok") => health(shared),
        _ => {
            let mut resp =
                Response::new(Full::new(Bytes::from_static(b"GET /metrics or GET /.ok\n")));
            *resp.status_mut() = StatusCode::NOT_FOUND;
            resp
        }
    }
}

/// `GET /.ok`, on the API and the metrics listeners: 200
/// `{"status":"ok"}` while serving, 503 `{"status":"draining"}` while
/// draining and `{"status":"shutting-down"}` once shutdown has begun.
pub fn health(shared: &Shared) -> Response<Full<Bytes>> {
    let (status, body) = if *shared.shutdown.borrow() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"status":"shutting-down"}"#,
        )
    } else if shared.draining() {
        (StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"draining"}"#)
    } else {
        (StatusCode::OK, r#"{"status":"ok"}"#)
    };
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// The shared handle the rest of hato records into.
pub type SharedMetrics = Arc<Metrics>;

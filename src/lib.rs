//! hato: a push server that speaks the signaling protocol and the Push API
//! of Shiguredo's WebRTC SFU Sora, so that Sora's SDKs receive pushes from
//! it unmodified.
//!
//! - [`api`]: the HTTP API (`POST /`, `x-sora-target`): parses, answers.
//! - [`history`]: each channel's one order (offsets) and its recent
//!   pushes, for recovery.
//! - [`hub`]: how a push or a disconnect reaches this node's connections:
//!   lookup, size policy, transport per recipient, DataChannel batching,
//!   counting — for the API and for pushes from other nodes alike.
//! - [`session`]: one peer's signaling WebSocket and WebRTC peer.
//! - [`table`]: the shared connection table every lookup goes through, and
//!   the channels' notify budgets.
//! - [`outbox`]: each connection's FIFO queue and the task that sends it,
//!   across the switch to DataChannels.
//! - [`cluster`]: several nodes as one over NATS.
//! - [`webhook`]: the auth and event webhooks.
//! - [`jwt`]: access tokens checked by hato itself.
//! - [`limits`]: admission, per-address limits and pacing.
//! - [`idempotency`]: exactly-once API calls for retrying backends.
//! - [`counters`]: every counter, read under one set of names for
//!   `/metrics`, `GetStatsReport`, `/.hato/stats` and the shutdown log.
//! - [`metrics`]: Prometheus metrics and the health check.
//! - [`logging`]: logs an attacker cannot flood.
//! - [`tls`], [`proxy_protocol`]: what sits in front of the listeners.
//! - [`config`], [`config_file`]: flags, environment, `hato.toml`.
//! - [`client`]: a Sora-protocol client, for tests, `hato-load` and
//!   `hato-attack`.

pub mod api;
pub mod client;
pub mod cluster;
pub mod config;
pub mod config_file;
pub mod counters;
pub mod history;
pub mod hub;
pub mod idempotency;
pub mod jwt;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod outbox;
pub mod proxy_protocol;
pub mod session;
pub mod table;
pub mod tls;
pub mod webhook;

pub use config::Config;

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What every task of the server shares.
pub struct Shared {
    pub config: Config,
    pub table: table::Table,
    /// Each channel's order and kept pushes.
    pub history: history::History,
    /// Keys for access tokens (--auth-jwt-*).
    pub jwt: Option<jwt::Keys>,
    /// The WebRTC engine: every peer's PeerConnection, on one UDP socket
    /// per shard.
    pub engine: hato_datachannel::Engine,
    /// This server's session id, as `session_id` in offers and notifies.
    pub session_id: Arc<str>,
    /// Sessions from WebSocket accept to teardown, for a graceful shutdown.
    pub sessions: std::sync::atomic::AtomicUsize,
    /// The auth webhook, when `--auth-webhook-url` is set.
    pub auth_webhook: Option<webhook::Webhook>,
    /// The event webhooks, when `--event-webhook-url` is set.
    pub event_webhook: Option<webhook::EventWebhook>,
    /// The answers of calls made with an Idempotency-Key.
    pub idempotency: idempotency::Store,
    /// TLS for both listeners, with --tls-cert and --tls-key.
    pub tls: Option<Arc<tls::Tls>>,
    /// Prometheus metrics (served when --metrics-addr is set).
    pub metrics: metrics::Metrics,
    /// Admission of signaling connections (--max-connections & co).
    pub admission: Arc<limits::Admission>,
    /// Admission of API connections (--api-max-connections, and per
    /// address).
    pub api_admission: Arc<limits::Admission>,
    /// Set once, on shutdown; every session watches it.
    pub shutdown: tokio::sync::watch::Sender<bool>,
    /// Set once, on drain: new connects are redirected (or refused), the
    /// connected peers stay until --drain-timeout.
    draining: std::sync::atomic::AtomicBool,
    drain_started: tokio::sync::Notify,
    /// The other nodes, with --cluster-nats-url.
    pub cluster: Option<Arc<cluster::Cluster>>,
}

impl Shared {
    /// Whether this node is draining.
    pub fn draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Drains this node (once): `/.ok` answers 503, a new connect is
    /// redirected to another node (or refused alone), and after
    /// --drain-timeout every session ends with SHUTDOWN. Returns false
    /// when it was draining already.
    pub fn drain(&self) -> bool {
        if self
            .draining
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return false;
        }
        tracing::warn!(
            connections = self.table.len(),
            "draining: new connects go to other nodes; the connected peers stay {} s",
            self.config.drain_timeout
        );
        self.drain_started.notify_one();
        true
    }

    /// Where a new connect goes instead of this node, if anywhere: the
    /// least-loaded other node when this one drains, or when it holds
    /// --redirect-when-above connections and another holds fewer. A
    /// connect that was redirected here already is not sent on again.
    pub fn redirect_for(&self, redirected: bool) -> Option<String> {
        let cluster = self.cluster.as_ref()?;
        if self.draining() {
            return cluster.redirect_target(None);
        }
        let limit = self.config.redirect_when_above;
        let mine = self.table.len();
        if redirected || limit == 0 || mine < limit {
            return None;
        }
        cluster.redirect_target(Some(mine))
    }
}

/// A running server. Dropping it stops accepting (existing sessions end
/// with their sockets).
pub struct Server {
    pub signaling_addr: SocketAddr,
    pub api_addr: SocketAddr,
    /// Where `/metrics` is served, with `--metrics-addr`.
    pub metrics_addr: Option<SocketAddr>,
    pub shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Server {
    /// Binds both listeners and starts serving.
    pub async fn start(config: Config) -> std::io::Result<Server> {
        let signaling = TcpListener::bind(config.signaling_addr).await?;
        let api = TcpListener::bind(config.api_addr).await?;
        let engine = hato_datachannel::Engine::start(config.engine())
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let admission = limits::Admission::new(
            config.max_connections,
            config.max_connections_per_ip,
            config.max_handshakes,
            config.max_handshakes_per_ip,
            config.max_connects_per_ip_per_second,
        );
        // No handshake caps on the API: a total and a per-address count.
        let api_admission = limits::Admission::new(
            config.api_max_connections,
            config.api_max_connections_per_ip,
            0,
            0,
            0,
        );
        let webhook_tls = if config.auth_webhook_url.is_some() || config.event_webhook_url.is_some()
        {
            let client = match (&config.webhook_client_cert, &config.webhook_client_key) {
                (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
                (None, None) => None,
                _ => {
                    return Err(std::io::Error::other(
                        "--webhook-client-cert and --webhook-client-key go together",
                    ))
                }
            };
            Some(
                tls::webhook_client(config.webhook_ca_file.as_deref(), client)
                    .map_err(std::io::Error::other)?,
            )
        } else {
            None
        };
        let jwt = jwt::Keys::load(
            config.auth_jwt_secret.as_deref(),
            &config.auth_jwt_public_key_file,
        )
        .map_err(std::io::Error::other)?;
        let auth_webhook = match &config.auth_webhook_url {
            Some(url) => Some(
                webhook::Webhook::new(
                    "--auth-webhook-url",
                    url,
                    std::time::Duration::from_millis(config.auth_webhook_timeout_ms),
                    config.auth_webhook_max_in_flight,
                    webhook_tls.clone().expect("made for a webhook URL"),
                )
                .map_err(std::io::Error::other)?,
            ),
            None => None,
        };
        let event_webhook = match &config.event_webhook_url {
            Some(url) => Some(
                webhook::EventWebhook::start(
                    url,
                    std::time::Duration::from_millis(config.event_webhook_timeout_ms),
                    config.event_webhook_retries,
                    config.event_webhook_queue,
                    webhook_tls.clone().expect("made for a webhook URL"),
                )
                .map_err(std::io::Error::other)?,
            ),
            None => None,
        };
        let metrics_listener = match config.metrics_addr {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(Arc::new(
                tls::Tls::load(cert.clone(), key.clone()).map_err(std::io::Error::other)?,
            )),
            (None, None) => None,
            _ => {
                return Err(std::io::Error::other(
                    "--tls-cert and --tls-key go together",
                ))
            }
        };
        let broker: Option<Arc<dyn cluster::Broker>> = match &config.cluster_nats_url {
            Some(urls) => Some(Arc::new(
                cluster::nats(urls, &config.node_name())
                    .await
                    .map_err(std::io::Error::other)?,
            )),
            None => None,
        };
        let shared = Arc::new_cyclic(|me| Shared {
            cluster: broker.map(|broker| {
                Arc::new(cluster::Cluster::new(
                    broker,
                    config.node_name(),
                    std::time::Duration::from_millis(config.cluster_node_timeout_ms.max(300)),
                    std::time::Duration::from_millis(config.cluster_request_timeout_ms.max(1)),
                    cluster::Limits::of(&config),
                    me.clone(),
                    // With history, a JetStream stream orders and keeps
                    // every channel's pushes.
                    (config.history_size > 0).then(|| cluster::StreamBounds {
                        per_subject: config.history_size as i64,
                        max_age: std::time::Duration::from_secs(config.history_ttl),
                        max_bytes: config.history_max_bytes as i64,
                    }),
                ))
            }),
            idempotency: idempotency::Store::new(
                std::time::Duration::from_secs(config.idempotency_window),
                config.idempotency_max_keys,
            ),
            tls,
            metrics: metrics::Metrics::default(),
            auth_webhook,
            event_webhook,
            engine,
            table: table::Table::new(config.channel_notify_rate),
            history: history::History::new(history::Settings::of(&config)),
            jwt,
            config,
            admission,
            api_admission,
            session_id: hato_signaling::id::new_id().into(),
            sessions: Default::default(),
            shutdown: tokio::sync::watch::Sender::new(false),
            draining: Default::default(),
            drain_started: Default::default(),
        });
        if let Some(cluster) = &shared.cluster {
            cluster.start();
        }
        let (signaling_addr, api_addr) = (signaling.local_addr()?, api.local_addr()?);
        let mut tasks = vec![
            tokio::spawn(session::serve(signaling, shared.clone())),
            tokio::spawn(api::serve(api, shared.clone())),
            tokio::spawn(release_paced_notify(shared.clone())),
            tokio::spawn(sweep_history(Arc::downgrade(&shared))),
            tokio::spawn(end_drain(Arc::downgrade(&shared))),
        ];
        let metrics_addr = match metrics_listener {
            Some(l) => {
                let addr = l.local_addr()?;
                tasks.push(tokio::spawn(metrics::serve(l, Arc::downgrade(&shared))));
                Some(addr)
            }
            None => None,
        };
        let server = Server {
            signaling_addr,
            api_addr,
            metrics_addr,
            tasks,
            shared,
        };
        Ok(server)
    }

    pub fn signaling_url(&self) -> String {
        let scheme = if self.shared.tls.is_some() {
            "wss"
        } else {
            "ws"
        };
        format!("{scheme}://{}/signaling", self.signaling_addr)
    }

    /// The UDP addresses WebRTC peers reach, one per shard.
    pub fn rtc_addrs(&self) -> &[SocketAddr] {
        self.shared.engine.local_addrs()
    }

    pub fn api_url(&self) -> String {
        let scheme = if self.shared.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}/", self.api_addr)
    }

    pub fn table(&self) -> &table::Table {
        &self.shared.table
    }

    /// Stops accepting, ends every session with reason `SHUTDOWN` (a Close
    /// frame, or a `close` message on `signaling` for DataChannel-only
    /// peers; sessions still before their offer get a Close frame too), and
    /// waits up to `limit` for them to finish.
    /// The API keeps answering meanwhile (`GET /.ok` says 503, so that a
    /// load balancer drains this node), and stops last.
    pub async fn shutdown(&self, limit: std::time::Duration) {
        // The signaling listener first: no new peers.
        self.tasks[0].abort();
        self.shared.shutdown.send_replace(true);
        let until = tokio::time::Instant::now() + limit;
        while self
            .shared
            .sessions
            .load(std::sync::atomic::Ordering::Acquire)
            > 0
            && tokio::time::Instant::now() < until
        {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        if let Some(cluster) = &self.shared.cluster {
            cluster.goodbye().await;
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        // The cluster's tasks hold the NATS client: without them the
        // others stop hearing this node and drop it.
        if let Some(cluster) = &self.shared.cluster {
            cluster.stop();
        }
    }
}

/// Once the node drains: after --drain-timeout, ends every session.
async fn end_drain(shared: std::sync::Weak<Shared>) {
    let Some(started) = shared.upgrade() else {
        return;
    };
    started.drain_started.notified().await;
    let timeout = std::time::Duration::from_secs(started.config.drain_timeout);
    drop(started);
    tokio::time::sleep(timeout).await;
    if let Some(shared) = shared.upgrade() {
        tracing::warn!(
            connections = shared.table.len(),
            "drain timeout: ending every session with SHUTDOWN"
        );
        shared.shutdown.send_replace(true);
    }
}

/// Once a second: drops the pushes past --history-ttl, and forgets the
/// channels that keep nothing and have no connection here.
async fn sweep_history(shared: std::sync::Weak<Shared>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.history.sweep(std::time::Instant::now(), |channel| {
            shared.table.counts(channel).all > 0
        });
    }
}

/// Sends the `notify` announcements that waited for their channel's
/// budget, as it refills (see `--channel-notify-rate`).
async fn release_paced_notify(shared: Arc<Shared>) {
    let table = &shared.table;
    loop {
        let wake = table.paced_wake.notified();
        let (due, next) = table.release_paced(std::time::Instant::now());
        for announce in due {
            announce.send();
        }
        match next {
            // Not more often than every 10 ms.
            Some(t) => {
                let soonest = std::time::Instant::now() + std::time::Duration::from_millis(10);
                tokio::time::sleep_until(t.max(soonest).into()).await
            }
            None => wake.await,
        }
    }
}

//! Server settings: command-line flags, each with an environment variable.
//! Defaults serve on loopback and work with every Sora SDK unchanged.

use clap::Parser;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// The `a=max-message-size` hato offers: the largest DataChannel message a
/// client may send it. Clients only send small signaling messages; RFC
/// 8841's default of 64 KiB keeps the SCTP state the webrtc crate sizes
/// from it small (1 MiB made each peer's RSS several times larger).
pub const DATA_CHANNEL_RECEIVE_LIMIT: usize = 262_144;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "hato",
    version,
    about = "A push server speaking Sora's signaling and Push API"
)]
pub struct Config {
    /// A TOML file with any of these settings (keys: the flag names with
    /// `_` for `-`). Flags and environment variables win over it.
    #[arg(help_heading = "Configuration file", long, env = "HATO_CONFIG")]
    pub config: Option<std::path::PathBuf>,

    /// Print the effective configuration as TOML and exit.
    #[arg(help_heading = "Configuration file", long)]
    pub print_config: bool,

    /// Where the signaling WebSocket listens (path /signaling).
    #[arg(
        help_heading = "Listeners",
        long,
        env = "HATO_SIGNALING_ADDR",
        default_value = "127.0.0.1:5000"
    )]
    pub signaling_addr: SocketAddr,

    /// Where the HTTP API listens (POST / with x-sora-target).
    #[arg(
        help_heading = "Listeners",
        long,
        env = "HATO_API_ADDR",
        default_value = "127.0.0.1:3000"
    )]
    pub api_addr: SocketAddr,

    /// Where Prometheus metrics are served (GET /metrics, and GET /.ok),
    /// on a listener of their own. Unset: no metrics listener.
    #[arg(help_heading = "Listeners", long, env = "HATO_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// PEM certificate chain: serve wss:// and https:// (with --tls-key)
    /// on the signaling and API listeners. Read again on SIGHUP.
    #[arg(help_heading = "TLS", long, env = "HATO_TLS_CERT")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(help_heading = "TLS", long, env = "HATO_TLS_KEY")]
    pub tls_key: Option<std::path::PathBuf>,

    /// Require `Authorization: Bearer TOKEN` on every API call (401
    /// otherwise). Unset: no token (keep the API on loopback or a private
    /// network).
    #[arg(
        help_heading = "HTTP API",
        long,
        env = "HATO_API_TOKEN",
        hide_env_values = true
    )]
    pub api_token: Option<String>,

    /// Origin allowed to call the API from a browser (Sora's api_cors_origin).
    /// Unset: no CORS headers, preflights refused.
    #[arg(help_heading = "HTTP API", long, env = "HATO_API_CORS_ORIGIN")]
    pub api_cors_origin: Option<String>,

    /// Turn off the demo page (GET /demo on the API), which is served
    /// by default while the API listens on loopback.
    #[arg(help_heading = "HTTP API", long, env = "HATO_DISABLE_DEMO")]
    pub disable_demo: bool,

    /// Largest API request body, in bytes; larger gets 413.
    #[arg(help_heading = "HTTP API", long, env = "HATO_API_BODY_LIMIT", default_value_t = 1 << 20)]
    pub api_body_limit: usize,

    /// How long an Idempotency-Key is remembered, in seconds: a repeat of
    /// the same call within it gets the first answer and delivers nothing.
    #[arg(
        help_heading = "HTTP API",
        long,
        env = "HATO_IDEMPOTENCY_WINDOW",
        default_value_t = 60
    )]
    pub idempotency_window: u64,

    /// Idempotency-Keys remembered at most; a new one beyond is refused
    /// with 503 until old ones expire.
    #[arg(
        help_heading = "HTTP API",
        long,
        env = "HATO_IDEMPOTENCY_MAX_KEYS",
        default_value_t = 100_000
    )]
    pub idempotency_max_keys: usize,

    /// The UDP address WebRTC (ICE, DTLS, SCTP) binds: HOST:PORT, or HOST
    /// alone for port 5000. Shard k binds PORT+k, so open PORT up to
    /// PORT+rtc-shards-1 (UDP) in a firewall; every peer of a shard shares
    /// its one socket. Port 0: an ephemeral port per shard. 0.0.0.0 binds
    /// every interface and advertises each non-loopback address.
    #[arg(help_heading = "WebRTC", long, env = "HATO_RTC_ADDR", default_value = "127.0.0.1:5000", value_parser = parse_rtc_addr)]
    pub rtc_addr: SocketAddr,

    /// WebRTC shards: threads that each own one UDP socket and the peers
    /// placed on it. Default: one per core.
    #[arg(help_heading = "WebRTC", long, env = "HATO_RTC_SHARDS", default_value_t = hato_datachannel::default_shards())]
    pub rtc_shards: usize,

    /// Address(es) put in the offer's candidates instead of the bound one,
    /// like Sora's public IP setting (NAT 1:1, containers). Repeatable.
    #[arg(
        help_heading = "WebRTC",
        long = "public-ip",
        env = "HATO_PUBLIC_IP",
        value_delimiter = ','
    )]
    pub public_ips: Vec<IpAddr>,

    /// DataChannel signaling for peers whose connect does not say
    /// (Sora's default_data_channel_signaling).
    #[arg(
        help_heading = "WebRTC",
        long,
        env = "HATO_DATA_CHANNEL_SIGNALING",
        default_value_t = false
    )]
    pub data_channel_signaling: bool,

    /// ignore_disconnect_websocket for DataChannel peers whose connect does not say.
    #[arg(
        help_heading = "WebRTC",
        long,
        env = "HATO_IGNORE_DISCONNECT_WEBSOCKET",
        default_value_t = false
    )]
    pub ignore_disconnect_websocket: bool,

    /// Offer the system DataChannels with compress: true (zlib per message).
    #[arg(
        help_heading = "WebRTC",
        long,
        env = "HATO_DATA_CHANNEL_COMPRESS",
        default_value_t = false
    )]
    pub data_channel_compress: bool,

    /// Largest push sent over a DataChannel, in bytes (also capped by each
    /// peer's a=max-message-size). A larger push gets 413 from the API.
    #[arg(
        help_heading = "WebRTC",
        long,
        env = "HATO_DATA_CHANNEL_MESSAGE_LIMIT",
        default_value_t = 262_144
    )]
    pub data_channel_message_limit: usize,

    /// Remote ICE candidates a peer may give (trickled, and in its
    /// answer); one more ends the session (Close 4490
    /// TOO-MANY-CANDIDATES).
    #[arg(
        help_heading = "WebRTC",
        long,
        env = "HATO_MAX_REMOTE_CANDIDATES",
        default_value_t = 64
    )]
    pub max_remote_candidates: usize,

    /// Never check candidates in private ranges (10/8, 172.16/12,
    /// 192.168/16, 100.64/10, fc00::/7): for deployments whose peers all
    /// come over the internet. Off by default: peers on the same LAN need
    /// them.
    #[arg(
        help_heading = "WebRTC",
        long,
        env = "HATO_REFUSE_PRIVATE_CANDIDATES",
        default_value_t = false
    )]
    pub refuse_private_candidates: bool,

    /// Signaling connections the server holds at most (handshaking or
    /// connected); one more is refused with HTTP 503 before its upgrade.
    /// 0: no limit.
    #[arg(
        help_heading = "Limits",
        long,
        env = "HATO_MAX_CONNECTIONS",
        default_value_t = 50_000
    )]
    pub max_connections: usize,

    /// Signaling connections one IP address may hold; one more gets 503.
    /// 0: no limit (behind a reverse proxy every peer shares its address).
    #[arg(
        help_heading = "Limits",
        long,
        env = "HATO_MAX_CONNECTIONS_PER_IP",
        default_value_t = 0
    )]
    pub max_connections_per_ip: usize,

    /// Signaling connections between TCP accept and connected (ICE and
    /// DTLS up); one more gets 503. 0: no limit.
    #[arg(
        help_heading = "Limits",
        long,
        env = "HATO_MAX_HANDSHAKES",
        default_value_t = 1_000
    )]
    pub max_handshakes: usize,

    /// Handshakes one IP address (an IPv6 /64) may have in flight; one
    /// more gets 503 TOO-MANY-HANDSHAKES. One address can so never hold
    /// more than this share of --max-handshakes. 0: no limit.
    #[arg(
        help_heading = "Limits",
        long,
        env = "HATO_MAX_HANDSHAKES_PER_IP",
        default_value_t = 16
    )]
    pub max_handshakes_per_ip: usize,

    /// Connects one IP address (an IPv6 /64) may start per second, with
    /// five seconds' worth at once: beyond, a `connect` waits for its turn
    /// (each waiting one holds a place under --max-handshakes-per-ip), and
    /// one that would wait over 5 s gets 503 TOO-MANY-CONNECTS. 0: no
    /// limit (behind a reverse proxy without X-Forwarded-For or PROXY,
    /// every peer shares its address).
    #[arg(
        help_heading = "Limits",
        long,
        env = "HATO_MAX_CONNECTS_PER_IP_PER_SECOND",
        default_value_t = 20
    )]
    pub max_connects_per_ip_per_second: u32,

    /// `notify` messages about joins and leaves one channel may carry per
    /// second (one `connection.created` to N members is N messages; one
    /// second's worth may go at once). Beyond, announcements wait in order
    /// and a join whose leave comes before it is announced is announced to
    /// no one. 0: no limit.
    #[arg(
        help_heading = "Limits",
        long,
        env = "HATO_CHANNEL_NOTIFY_RATE",
        default_value_t = 5000
    )]
    pub channel_notify_rate: u32,

    /// Messages a connection may have queued; one more disconnects it
    /// with reason OUTBOX-OVERFLOW.
    #[arg(
        help_heading = "Limits",
        long,
        env = "HATO_OUTBOX_CAPACITY",
        default_value_t = 4096
    )]
    pub outbox_capacity: usize,

    /// Bytes a connection may have queued (pushes and notifies waiting for
    /// its WebSocket); more disconnects it with OUTBOX-OVERFLOW. After the
    /// switch the DataChannel's own 8 MiB bound applies.
    #[arg(help_heading = "Limits", long, env = "HATO_OUTBOX_CAPACITY_BYTES", default_value_t = 8 << 20)]
    pub outbox_capacity_bytes: usize,

    /// Largest message hato accepts from a peer (WebSocket frame, or a
    /// DataChannel message after inflating), in bytes.
    #[arg(help_heading = "Limits", long, env = "HATO_CLIENT_MESSAGE_LIMIT", default_value_t = 1 << 20)]
    pub client_message_limit: usize,

    /// Largest `signaling_notify_metadata` a peer may send in `connect`
    /// (its JSON text, in bytes); larger is refused with Close 4490. Every
    /// peer of the channel receives it in notify.
    #[arg(help_heading = "Limits", long, env = "HATO_NOTIFY_METADATA_LIMIT", default_value_t = 8 * 1024)]
    pub notify_metadata_limit: usize,

    /// Largest `metadata` a peer may send in `connect` (its JSON text, in
    /// bytes); larger is refused with Close 4490. It is kept as sent, for
    /// the auth webhook, and dropped once the offer is out. Before its
    /// `connect` is taken a connection may send this plus
    /// --notify-metadata-limit plus 16 KiB (the upgrade request and the
    /// rest of `connect`), and is closed beyond.
    #[arg(help_heading = "Limits", long, env = "HATO_CONNECT_METADATA_LIMIT", default_value_t = 64 * 1024)]
    pub connect_metadata_limit: usize,

    /// Concurrent HTTP API connections; one more is answered 503 and
    /// closed. 0: no limit.
    #[arg(
        help_heading = "Limits",
        long,
        env = "HATO_API_MAX_CONNECTIONS",
        default_value_t = 1_024
    )]
    pub api_max_connections: usize,

    /// API connections one IP address (an IPv6 /64) may hold; one more is
    /// answered 503 and closed. One client can so never hold every place
    /// of --api-max-connections. 0: no limit.
    #[arg(
        help_heading = "Limits",
        long,
        env = "HATO_API_MAX_CONNECTIONS_PER_IP",
        default_value_t = 256
    )]
    pub api_max_connections_per_ip: usize,

    /// Reverse proxies (comma-separated addresses) whose
    /// `X-Forwarded-For` names the client of a signaling connection: the
    /// per-address limits then count that client, not the proxy. From
    /// anyone else the header is ignored.
    #[arg(
        help_heading = "Proxies in front",
        long,
        env = "HATO_TRUSTED_PROXY",
        value_delimiter = ','
    )]
    pub trusted_proxy: Vec<IpAddr>,

    /// Signaling connections from a --trusted-proxy begin with a PROXY
    /// protocol header (v1 or v2, as HAProxy or nginx's `proxy_protocol`
    /// send it): the client it names is counted, X-Forwarded-For is not
    /// read. A connection from such a proxy without a valid header is
    /// closed; from anyone else a header is not read.
    #[arg(help_heading = "Proxies in front", long, env = "HATO_PROXY_PROTOCOL")]
    pub proxy_protocol: bool,

    /// Time a new signaling connection has to send its first byte,
    /// in ms; then it is closed. An idle socket holds its place only this
    /// long.
    #[arg(
        help_heading = "Timeouts",
        long,
        env = "HATO_FIRST_BYTE_TIMEOUT_MS",
        default_value_t = 2_000
    )]
    pub first_byte_timeout_ms: u64,

    /// Time from WebSocket open to `connect`, in ms.
    #[arg(
        help_heading = "Timeouts",
        long,
        env = "HATO_CONNECT_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub connect_timeout_ms: u64,

    /// Time from `offer` to `answer`, in ms.
    #[arg(
        help_heading = "Timeouts",
        long,
        env = "HATO_ANSWER_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub answer_timeout_ms: u64,

    /// Time from `answer` to connected (and, with DataChannel signaling,
    /// to every channel open), in ms.
    #[arg(
        help_heading = "Timeouts",
        long,
        env = "HATO_ESTABLISH_TIMEOUT_MS",
        default_value_t = 20_000
    )]
    pub establish_timeout_ms: u64,

    /// A connected WebRTC peer from which no datagram arrives for this long
    /// is ended (PEER-FAILED), in ms: ICE consent expiry (RFC 7675's 30 s).
    #[arg(
        help_heading = "Timeouts",
        long,
        env = "HATO_ICE_CONSENT_TIMEOUT_MS",
        default_value_t = 30_000,
        value_parser = clap::value_parser!(u64).range(5_000..)
    )]
    pub ice_consent_timeout_ms: u64,

    /// Interval of the WebSocket `ping` message, in ms.
    #[arg(
        help_heading = "Timeouts",
        long,
        env = "HATO_PING_INTERVAL_MS",
        default_value_t = 5_000
    )]
    pub ping_interval_ms: u64,

    /// A peer that sends no `pong` for this long is disconnected, in ms.
    #[arg(
        help_heading = "Timeouts",
        long,
        env = "HATO_PONG_TIMEOUT_MS",
        default_value_t = 15_000
    )]
    pub pong_timeout_ms: u64,

    /// Time an API client has to send a request's headers once it has
    /// started one, in ms; the connection is then closed.
    #[arg(
        help_heading = "Timeouts",
        long,
        env = "HATO_API_HEADER_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub api_header_timeout_ms: u64,

    /// Time an API client has to send a request's body once its headers
    /// are in, in ms; then 408.
    #[arg(
        help_heading = "Timeouts",
        long,
        env = "HATO_API_BODY_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub api_body_timeout_ms: u64,

    /// A keep-alive API connection with no request for this long is
    /// closed, in ms.
    #[arg(
        help_heading = "Timeouts",
        long,
        env = "HATO_API_IDLE_TIMEOUT_MS",
        default_value_t = 75_000
    )]
    pub api_idle_timeout_ms: u64,

    /// Sora's auth webhook: after `connect`, hato POSTs what it knows of
    /// the peer here and goes on only on `{"allowed": true, …}`
    /// (http:// or https://).
    #[arg(help_heading = "Webhooks", long, env = "HATO_AUTH_WEBHOOK_URL")]
    pub auth_webhook_url: Option<String>,

    /// Time the auth webhook has to answer, in ms; then the connection is
    /// refused (AUTH-WEBHOOK-TIMEOUT).
    #[arg(
        help_heading = "Webhooks",
        long,
        env = "HATO_AUTH_WEBHOOK_TIMEOUT_MS",
        default_value_t = 5_000
    )]
    pub auth_webhook_timeout_ms: u64,

    /// Auth webhook calls in flight at most; more wait (within their
    /// timeout) for a place.
    #[arg(
        help_heading = "Webhooks",
        long,
        env = "HATO_AUTH_WEBHOOK_MAX_IN_FLIGHT",
        default_value_t = 256
    )]
    pub auth_webhook_max_in_flight: usize,

    /// Sora's event webhooks (http:// or https://): connection.created,
    /// connection.destroyed and connection.failed are POSTed here.
    #[arg(help_heading = "Webhooks", long, env = "HATO_EVENT_WEBHOOK_URL")]
    pub event_webhook_url: Option<String>,

    /// Accept connects whose `metadata.access_token` is a JWT signed with
    /// this secret (HS256, at least 32 bytes): checked by hato itself, with
    /// no call to the auth webhook.
    #[arg(help_heading = "Webhooks", long, env = "HATO_AUTH_JWT_SECRET")]
    pub auth_jwt_secret: Option<String>,

    /// Accept connects whose `metadata.access_token` is a JWT signed with
    /// one of the public keys (PEM, RSA or EC, several per file) in these
    /// files (RS256/RS384/RS512, ES256/ES384): give the old and the new key
    /// while rotating. Repeat the flag, or separate files with commas.
    #[arg(
        help_heading = "Webhooks",
        long,
        env = "HATO_AUTH_JWT_PUBLIC_KEY_FILE",
        value_delimiter = ','
    )]
    pub auth_jwt_public_key_file: Vec<std::path::PathBuf>,

    /// A CA certificate file (PEM) trusted for https:// webhooks, beside
    /// the system's trust roots: for a backend with a private CA.
    #[arg(help_heading = "Webhooks", long, env = "HATO_WEBHOOK_CA_FILE")]
    pub webhook_ca_file: Option<std::path::PathBuf>,

    /// A client certificate chain (PEM) hato presents to https://
    /// webhooks that require mutual TLS; with --webhook-client-key.
    #[arg(help_heading = "Webhooks", long, env = "HATO_WEBHOOK_CLIENT_CERT")]
    pub webhook_client_cert: Option<std::path::PathBuf>,

    /// The private key (PEM) of --webhook-client-cert.
    #[arg(help_heading = "Webhooks", long, env = "HATO_WEBHOOK_CLIENT_KEY")]
    pub webhook_client_key: Option<std::path::PathBuf>,

    /// Retries of a failed event webhook call (backoff 0.1 s doubling to
    /// 5 s), after which the event is given up and counted.
    #[arg(
        help_heading = "Webhooks",
        long,
        env = "HATO_EVENT_WEBHOOK_RETRIES",
        default_value_t = 3
    )]
    pub event_webhook_retries: u32,

    /// Time one event webhook call has, in ms.
    #[arg(
        help_heading = "Webhooks",
        long,
        env = "HATO_EVENT_WEBHOOK_TIMEOUT_MS",
        default_value_t = 5_000
    )]
    pub event_webhook_timeout_ms: u64,

    /// Events waiting to be sent at most; one more is dropped and counted.
    #[arg(
        help_heading = "Webhooks",
        long,
        env = "HATO_EVENT_WEBHOOK_QUEUE",
        default_value_t = 10_000
    )]
    pub event_webhook_queue: usize,

    /// This node's name in webhooks, listings and the cluster (Sora's
    /// node_name). Default: the host name. Every node of a cluster needs
    /// its own.
    #[arg(help_heading = "Cluster", long, env = "HATO_NODE_NAME")]
    pub node_name: Option<String>,

    /// Join a cluster of hato nodes through this NATS server
    /// (`nats://host:4222`; several, comma-separated). Pushes, disconnects,
    /// notify counts and listings then cover every node. Off by default:
    /// hato runs alone, without any NATS code on its push path.
    #[arg(help_heading = "Cluster", long, env = "HATO_CLUSTER_NATS_URL")]
    pub cluster_nats_url: Option<String>,

    /// A node not heard from for this long (ms) is taken for dead: its
    /// connections leave every count and listing. Heartbeats go out at a
    /// third of it.
    #[arg(
        help_heading = "Cluster",
        long,
        env = "HATO_CLUSTER_NODE_TIMEOUT_MS",
        default_value_t = 3_000
    )]
    pub cluster_node_timeout_ms: u64,

    /// How long a listing waits for the other nodes' answers (ms); a node
    /// that has not answered by then is named in the log and in the
    /// answer's `x-hato-partial` header.
    #[arg(
        help_heading = "Cluster",
        long,
        env = "HATO_CLUSTER_REQUEST_TIMEOUT_MS",
        default_value_t = 1_000
    )]
    pub cluster_request_timeout_ms: u64,

    /// The signaling URL clients reach this node at (e.g.
    /// wss://hato-1.example.com/signaling): what the other nodes send in a
    /// `redirect` when they drain or are over --redirect-when-above.
    #[arg(help_heading = "Cluster", long, env = "HATO_PUBLIC_SIGNALING_URL")]
    pub public_signaling_url: Option<String>,

    /// Seconds a draining node (SIGUSR1, or Hato_20261201.Drain) keeps its
    /// connected peers before it ends their sessions with SHUTDOWN.
    #[arg(
        help_heading = "Cluster",
        long,
        env = "HATO_DRAIN_TIMEOUT",
        default_value_t = 60
    )]
    pub drain_timeout: u64,

    /// With this many connections or more, a new connect is redirected to
    /// the live node with the fewest (when it has fewer). 0: never.
    #[arg(
        help_heading = "Cluster",
        long,
        env = "HATO_REDIRECT_WHEN_ABOVE",
        default_value_t = 0
    )]
    pub redirect_when_above: usize,

    /// Pushes kept per channel, for peers that reconnect
    /// (`metadata.hato_recover`) and for GetChannelHistory. 0: none kept;
    /// pushes still carry their channel's offset.
    #[arg(
        help_heading = "History",
        long,
        env = "HATO_HISTORY_SIZE",
        default_value_t = 0
    )]
    pub history_size: usize,

    /// Seconds a push stays in its channel's history; 0: until
    /// --history-size pushes it out.
    #[arg(
        help_heading = "History",
        long,
        env = "HATO_HISTORY_TTL",
        default_value_t = 0
    )]
    pub history_ttl: u64,

    /// Bytes every channel's history holds together, at most (each push
    /// counts its message plus 128); past it a channel's oldest pushes go
    /// first.
    #[arg(help_heading = "History", long, env = "HATO_HISTORY_MAX_BYTES", default_value_t = 256 << 20)]
    pub history_max_bytes: usize,

    /// Log lines as text (default) or as JSON objects, one per line, with
    /// timestamp, level, target, fields and, inside a session, its
    /// connection_id, channel_id and client_id (under `span`).
    #[arg(help_heading = "Logging", long, env = "HATO_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Default for Config {
    fn default() -> Self {
        Config::parse_from(["hato"])
    }
}

impl Config {
    /// Everything on ephemeral loopback ports: for tests and the harness.
    pub fn ephemeral() -> Self {
        Config {
            signaling_addr: "127.0.0.1:0".parse().unwrap(),
            api_addr: "127.0.0.1:0".parse().unwrap(),
            rtc_addr: "127.0.0.1:0".parse().unwrap(),
            ..Config::default()
        }
    }

    /// Whether GET /demo is served: on loopback, unless --disable-demo.
    pub fn demo_enabled(&self) -> bool {
        !self.disable_demo && self.api_addr.ip().is_loopback()
    }

    /// `--node-name`, or the host name.
    pub fn node_name(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "hato".into())
        })
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn answer_timeout(&self) -> Duration {
        Duration::from_millis(self.answer_timeout_ms)
    }
    pub fn establish_timeout(&self) -> Duration {
        Duration::from_millis(self.establish_timeout_ms)
    }
    pub fn first_byte_timeout(&self) -> Duration {
        Duration::from_millis(self.first_byte_timeout_ms)
    }
    /// Bytes a signaling connection may send before its `connect` is
    /// taken: the upgrade request and the whole `connect`.
    pub fn before_connect_limit(&self) -> usize {
        self.connect_metadata_limit + self.notify_metadata_limit + 16 * 1024
    }
    pub fn api_header_timeout(&self) -> Duration {
        Duration::from_millis(self.api_header_timeout_ms)
    }
    pub fn api_body_timeout(&self) -> Duration {
        Duration::from_millis(self.api_body_timeout_ms)
    }
    pub fn api_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.api_idle_timeout_ms)
    }
    pub fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.ping_interval_ms)
    }
    pub fn pong_timeout(&self) -> Duration {
        Duration::from_millis(self.pong_timeout_ms)
    }
    pub fn engine(&self) -> hato_datachannel::EngineConfig {
        hato_datachannel::EngineConfig {
            advertise: self.public_ips.clone(),
            shards: self.rtc_shards.max(1),
            max_message_size: DATA_CHANNEL_RECEIVE_LIMIT.min(self.client_message_limit) as u32,
            refuse_private_candidates: self.refuse_private_candidates,
            silence_limit: Duration::from_millis(self.ice_consent_timeout_ms),
            ..hato_datachannel::EngineConfig::server(self.rtc_addr)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The default UDP port of `--rtc-addr` when only a host is given.
pub const DEFAULT_RTC_PORT: u16 = 5000;

fn parse_rtc_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, DEFAULT_RTC_PORT))
        .map_err(|_| format!("{s:?} is neither HOST:PORT nor an IP address"))
}

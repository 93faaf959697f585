//! What the cluster needs of a message broker, and NATS as the one that
//! provides it.

use async_nats::connection::State;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use std::time::Duration;

/// One message as a subscriber receives it.
pub struct Message {
    pub payload: Bytes,
    /// Where an answer goes, for a request.
    pub reply: Option<String>,
    /// For a message the stream republished: where it stands in it.
    pub stream: Option<Stored>,
}

/// A message's place in the stream: its sequence, and the sequence of
/// the message before it on the same subject (0: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub seq: u64,
    pub previous: u64,
}

/// How the stream that keeps every channel's pushes is bounded.
#[derive(Debug, Clone)]
pub struct StreamBounds {
    /// Messages kept per subject (a channel's pushes).
    pub per_subject: i64,
    /// How long a message is kept; zero: until pushed out.
    pub max_age: Duration,
    /// Bytes kept over every subject.
    pub max_bytes: i64,
}

/// Why a publish to the stream did not take.
#[derive(Debug)]
pub enum StreamError {
    /// The subject's last message is not the one expected: someone else
    /// published first.
    Conflict,
    /// The broker or its stream could not be reached.
    Unavailable(String),
}

/// The broker failed to take or give a message.
#[derive(Debug)]
pub struct BrokerError(pub String);

impl std::fmt::Display for BrokerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Subjects, publish and subscribe: fire and forget, in order per
/// publisher and subject. Dropping a subscription ends it.
pub trait Broker: Send + Sync + 'static {
    /// Whether the broker is reachable now.
    fn available(&self) -> bool;
    fn publish(&self, subject: String, payload: Bytes) -> BoxFuture<'_, Result<(), BrokerError>>;
    /// Publishes with a subject for the answers.
    fn request(
        &self,
        subject: String,
        reply: String,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<(), BrokerError>>;
    fn subscribe(
        &self,
        subject: String,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Message>, BrokerError>>;
    /// A subject no one else uses, for answers.
    fn new_inbox(&self) -> String;
    /// Returns once the broker has everything sent before.
    fn flush(&self) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// Makes (or updates) the stream `name` over `subjects`, which
    /// republishes each message it stores on `republish` (`>` mapped).
    fn ensure_stream(
        &self,
        name: &str,
        subjects: &str,
        republish: &str,
        bounds: StreamBounds,
    ) -> BoxFuture<'_, Result<(), BrokerError>>;
    /// Stores `payload` on `subject` if the subject's last message is
    /// `expected` (0: it has none); returns its sequence.
    fn stream_publish(
        &self,
        subject: String,
        expected: u64,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<u64, StreamError>>;
    /// The last message kept on `subject`, with its sequence.
    fn stream_last(
        &self,
        stream: &str,
        subject: String,
    ) -> BoxFuture<'_, Result<Option<(u64, Bytes)>, BrokerError>>;
    /// The first message kept on `subject` at sequence `from` or later.
    fn stream_next(
        &self,
        stream: &str,
        subject: String,
        from: u64,
    ) -> BoxFuture<'_, Result<Option<(u64, Bytes)>, BrokerError>>;
}

fn err(e: impl std::fmt::Display) -> BrokerError {
    BrokerError(e.to_string())
}

/// How many times NATS may have dropped messages on the way to this
/// process (a lost connection, a slow subscription): the channels that
/// take their pushes from the stream then ask it for their tail.
pub static LOSSES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Connects to NATS (`urls` comma-separated). The client connects, and
/// reconnects, in the background: a node starts even when NATS is down.
pub async fn nats(urls: &str, node: &str) -> Result<async_nats::Client, String> {
    let addrs = urls
        .split(',')
        .map(|u| {
            u.trim().parse::<async_nats::ServerAddr>().map_err(|e| {
                let u = crate::config_file::redact_urls(u.trim());
                format!("--cluster-nats-url {u:?}: {e}")
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let name = node.to_owned();
    // async-nats parses credentials in a URL but does not send them:
    // take them from the first URL that has some.
    let mut options = async_nats::ConnectOptions::new();
    if let Some(addr) = addrs.iter().find(|a| a.username().is_some()) {
        let user = addr.username().unwrap_or_default().to_owned();
        options = match addr.password() {
            Some(pass) => options.user_and_password(user, pass.to_owned()),
            None => options.token(user),
        };
    }
    options
        .name(format!("hato {node}"))
        .no_echo()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .ping_interval(Duration::from_secs(5))
        .reconnect_delay_callback(|n| Duration::from_millis((50u64 << n.min(5)).min(1000)))
        .event_callback(move |event| {
            let name = name.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        tracing::info!(node = %name, "cluster: connected to NATS")
                    }
                    async_nats::Event::Disconnected => {
                        LOSSES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!(
                        node = %name,
                        "cluster: NATS connection lost; pushes that need other nodes get 503 until it is back"
                    )
                    }
                    async_nats::Event::SlowConsumer(sid) => {
                        LOSSES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!(node = %name, sid, "cluster: NATS dropped messages for a slow subscription")
                    }
                    other => tracing::warn!(node = %name, "cluster: NATS {other}"),
                }
            }
        })
        .connect(addrs)
        .await
        .map_err(|e| format!("--cluster-nats-url: {e}"))
}

impl Broker for async_nats::Client {
    fn available(&self) -> bool {
        self.connection_state() == State::Connected
    }

    fn publish(&self, subject: String, payload: Bytes) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            async_nats::Client::publish(self, subject, payload)
                .await
                .map_err(err)
        })
    }

    fn request(
        &self,
        subject: String,
        reply: String,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            self.publish_with_reply(subject, reply, payload)
                .await
                .map_err(err)
        })
    }

    fn subscribe(
        &self,
        subject: String,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Message>, BrokerError>> {
        Box::pin(async move {
            let sub = async_nats::Client::subscribe(self, subject)
                .await
                .map_err(err)?;
            Ok(sub
                .map(|m| Message {
                    stream: stored(m.headers.as_ref()),
                    payload: m.payload,
                    reply: m.reply.map(|r| r.to_string()),
                })
                .boxed())
        })
    }

    fn new_inbox(&self) -> String {
        async_nats::Client::new_inbox(self)
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move { async_nats::Client::flush(self).await.map_err(err) })
    }

    fn ensure_stream(
        &self,
        name: &str,
        subjects: &str,
        republish: &str,
        bounds: StreamBounds,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        use async_nats::jetstream::stream;
        let config = stream::Config {
            name: name.to_owned(),
            subjects: vec![subjects.to_owned()],
            max_messages_per_subject: bounds.per_subject,
            max_age: bounds.max_age,
            max_bytes: bounds.max_bytes,
            discard: stream::DiscardPolicy::Old,
            // A short-lived buffer: kept in the NATS server's memory.
            storage: stream::StorageType::Memory,
            allow_direct: true,
            republish: Some(stream::Republish {
                source: subjects.to_owned(),
                destination: republish.to_owned(),
                headers_only: false,
            }),
            ..Default::default()
        };
        Box::pin(async move {
            let js = async_nats::jetstream::new(self.clone());
            match js.get_stream(&config.name).await {
                Ok(_) => js.update_stream(config).await.map(drop).map_err(err),
                Err(_) => js.create_stream(config).await.map(drop).map_err(err),
            }
        })
    }

    fn stream_publish(
        &self,
        subject: String,
        expected: u64,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<u64, StreamError>> {
        use async_nats::jetstream::context::PublishErrorKind;
        Box::pin(async move {
            let js = async_nats::jetstream::new(self.clone());
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                expected.to_string().as_str(),
            );
            let unavailable = |e: async_nats::jetstream::context::PublishError| {
                StreamError::Unavailable(e.to_string())
            };
            let ack = js
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(unavailable)?;
            match ack.await {
                Ok(ack) => Ok(ack.sequence),
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    Err(StreamError::Conflict)
                }
                Err(e) => Err(unavailable(e)),
            }
        })
    }

    fn stream_last(
        &self,
        stream: &str,
        subject: String,
    ) -> BoxFuture<'_, Result<Option<(u64, Bytes)>, BrokerError>> {
        let stream = stream.to_owned();
        Box::pin(async move {
            use async_nats::jetstream::stream::DirectGetErrorKind;
            match direct(self, stream)
                .await?
                .direct_get_last_for_subject(subject)
                .await
            {
                Ok(m) => Ok(Some((m.sequence, m.payload))),
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
                Err(e) => Err(err(e)),
            }
        })
    }

    fn stream_next(
        &self,
        stream: &str,
        subject: String,
        from: u64,
    ) -> BoxFuture<'_, Result<Option<(u64, Bytes)>, BrokerError>> {
        let stream = stream.to_owned();
        Box::pin(async move {
            use async_nats::jetstream::stream::DirectGetErrorKind;
            match direct(self, stream)
                .await?
                .direct_get_next_for_subject(subject, Some(from))
                .await
            {
                Ok(m) => match stored(m.headers.as_ref()) {
                    Some(s) => Ok(Some((s.seq, m.payload.clone()))),
                    None => Err(BrokerError("a stored message without its sequence".into())),
                },
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
                Err(e) => Err(err(e)),
            }
        })
    }
}

/// The stream `name` to read from with direct gets (no request made).
async fn direct(
    client: &async_nats::Client,
    name: String,
) -> Result<async_nats::jetstream::stream::Stream<()>, BrokerError> {
    async_nats::jetstream::new(client.clone())
        .get_stream_no_info(name)
        .await
        .map_err(err)
}

/// A stored message's sequence and its subject's previous one, from the
/// headers the stream adds (`Nats-Sequence`, `Nats-Last-Sequence`).
fn stored(headers: Option<&async_nats::HeaderMap>) -> Option<Stored> {
    let h = headers?;
    use async_nats::header::{NATS_LAST_SEQUENCE, NATS_SEQUENCE};
    let num = |name| h.get(name).and_then(|v| v.as_str().parse::<u64>().ok());
    Some(Stored {
        seq: num(NATS_SEQUENCE)?,
        previous: num(NATS_LAST_SEQUENCE).unwrap_or(0),
    })
}

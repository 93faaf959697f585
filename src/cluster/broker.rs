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
}

fn err(e: impl std::fmt::Display) -> BrokerError {
    BrokerError(e.to_string())
}

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
                    async_nats::Event::Disconnected => tracing::warn!(
                        node = %name,
                        "cluster: NATS connection lost; pushes that need other nodes get 503 until it is back"
                    ),
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
}

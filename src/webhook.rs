//! Sora's auth webhook (docs/protocol.md §7.1): after `connect` and before the
//! offer, hato asks the backend whether this peer may connect, and with
//! which overrides. Calls go over a keep-alive pool, at most
//! `--auth-webhook-max-in-flight` at once; each has its own deadline, so a
//! slow webhook delays only the peers waiting on it.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Semaphore;

/// The largest webhook answer read.
const ANSWER_LIMIT: usize = 1 << 20;

pub use hato_signaling::admit::Verdict;

#[derive(Debug, Default)]
pub struct Counters {
    pub calls: AtomicU64,
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
    pub failures: AtomicU64,
}

/// One webhook URL over a keep-alive pool: the auth webhook asks
/// ([`Webhook::ask`]), the event webhooks post.
pub struct Webhook {
    url: Uri,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
    in_flight: Semaphore,
    pub counters: Counters,
}

impl Webhook {
    /// `url` (given as `flag`) is `http://…` or `https://…`; `tls` is the
    /// client side of the latter (trust roots, client certificate).
    pub fn new(
        flag: &str,
        url: &str,
        timeout: Duration,
        max_in_flight: usize,
        tls: std::sync::Arc<rustls::ClientConfig>,
    ) -> Result<Webhook, String> {
        let shown = crate::config_file::redact_urls(url);
        let url: Uri = url.parse().map_err(|e| format!("{flag} {shown:?}: {e}"))?;
        if !matches!(url.scheme_str(), Some("http" | "https")) || url.host().is_none() {
            return Err(format!(
                "{flag} {shown}: only http:// or https://host[:port]/path is supported"
            ));
        }
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls).clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Webhook {
            url,
            client,
            timeout,
            in_flight: Semaphore::new(max_in_flight.max(1)),
            counters: Counters::default(),
        })
    }

    /// Asks; the whole call (waiting for a place included) is bounded by
    /// the timeout. No usable answer is [`Verdict::Failed`].
    pub async fn ask(&self, body: &str, connection_id: &str) -> Verdict {
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        let verdict = tokio::time::timeout(self.timeout, self.call(body, connection_id))
            .await
            .unwrap_or_else(|_| {
                Verdict::Failed(format!(
                    "AUTH-WEBHOOK-TIMEOUT: no answer within {} ms",
                    self.timeout.as_millis()
                ))
            });
        let counter = match &verdict {
            Verdict::Allowed(_) => &self.counters.allowed,
            Verdict::Denied(_) => &self.counters.denied,
            Verdict::Failed(_) => &self.counters.failures,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        verdict
    }

    async fn call(&self, body: &str, connection_id: &str) -> Verdict {
        let _place = self.in_flight.acquire().await.expect("never closed");
        let mut req = self.request(body);
        if let Ok(id) = HeaderValue::from_str(connection_id) {
            req.headers_mut().insert("sora-connection-id", id);
        }
        let resp = match self.client.request(req).await {
            Ok(resp) => resp,
            Err(e) => {
                return Verdict::Failed(format!(
                    "AUTH-WEBHOOK-ERROR: cannot reach the webhook: {e}"
                ))
            }
        };
        let status = resp.status();
        let bytes = match Limited::new(resp.into_body(), ANSWER_LIMIT).collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) => {
                return Verdict::Failed(format!("AUTH-WEBHOOK-ERROR: reading the answer: {e}"))
            }
        };
        if status != StatusCode::OK {
            return Verdict::Failed(format!(
                "AUTH-WEBHOOK-ERROR: the webhook answered {}",
                status.as_u16()
            ));
        }
        Verdict::from_answer(&bytes)
    }
}

/// Sora's event webhooks (docs/protocol.md §7.2): `connection.created`,
/// `connection.destroyed` and `connection.failed`, POSTed from bounded
/// queues by a few workers. A connection's events always go to the same
/// worker, so they arrive in order; a worker retries a failed call with
/// backoff (`--event-webhook-retries`); a full queue drops the event and
/// counts it. Sessions and pushes never wait on any of it.
pub struct EventWebhook {
    queues: Vec<tokio::sync::mpsc::Sender<String>>,
    pub counters: std::sync::Arc<EventCounters>,
}

#[derive(Debug, Default)]
pub struct EventCounters {
    pub queued: AtomicU64,
    pub sent: AtomicU64,
    /// Calls that failed (each retry counts).
    pub failed_calls: AtomicU64,
    /// Events given up after every retry.
    pub given_up: AtomicU64,
    /// Events dropped because their queue was full.
    pub dropped: AtomicU64,
}

/// Workers, each with its own queue and order.
const EVENT_WORKERS: usize = 4;

impl EventWebhook {
    pub fn start(
        url: &str,
        timeout: Duration,
        retries: u32,
        capacity: usize,
        tls: std::sync::Arc<rustls::ClientConfig>,
    ) -> Result<EventWebhook, String> {
        let poster = std::sync::Arc::new(Webhook::new(
            "--event-webhook-url",
            url,
            timeout,
            EVENT_WORKERS,
            tls,
        )?);
        let counters = std::sync::Arc::new(EventCounters::default());
        let per_worker = capacity.div_ceil(EVENT_WORKERS).max(1);
        let queues = (0..EVENT_WORKERS)
            .map(|_| {
                let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(per_worker);
                let (poster, counters) = (poster.clone(), counters.clone());
                tokio::spawn(async move {
                    while let Some(body) = rx.recv().await {
                        let mut backoff = Duration::from_millis(100);
                        let mut attempt = 0;
                        loop {
                            match tokio::time::timeout(poster.timeout, poster.post(&body)).await {
                                Ok(Ok(())) => {
                                    counters.sent.fetch_add(1, Ordering::Relaxed);
                                    break;
                                }
                                Ok(Err(why)) => {
                                    counters.failed_calls.fetch_add(1, Ordering::Relaxed);
                                    tracing::debug!(%why, attempt, "event webhook call failed");
                                }
                                Err(_) => {
                                    counters.failed_calls.fetch_add(1, Ordering::Relaxed);
                                    tracing::debug!(attempt, "event webhook call timed out");
                                }
                            }
                            if attempt >= retries {
                                counters.given_up.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(
                                    attempts = attempt + 1,
                                    "event webhook: an event is given up after every retry"
                                );
                                break;
                            }
                            attempt += 1;
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                        }
                    }
                });
                tx
            })
            .collect();
        Ok(EventWebhook { queues, counters })
    }

    /// Queues an event of `connection_id` without waiting; a full queue
    /// drops it (counted).
    pub fn send(&self, connection_id: &str, body: String) {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        connection_id.hash(&mut h);
        let queue = &self.queues[h.finish() as usize % self.queues.len()];
        match queue.try_send(body) {
            Ok(()) => {
                self.counters.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Webhook {
    /// A JSON POST of `body` to the webhook.
    fn request(&self, body: &str) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(Bytes::copy_from_slice(body.as_bytes())));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.url.clone();
        req.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        req
    }

    /// POSTs `body`; Ok on a 2xx answer (its body is ignored).
    async fn post(&self, body: &str) -> Result<(), String> {
        let resp = self
            .client
            .request(self.request(body))
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        let _ = Limited::new(resp.into_body(), ANSWER_LIMIT).collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("answered {}", status.as_u16()))
        }
    }
}

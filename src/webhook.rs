//! Sora's auth webhook (protocol.md §7.1): after `connect` and before the
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
use serde_json::{Map, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Semaphore;

/// The largest webhook answer read.
const ANSWER_LIMIT: usize = 1 << 20;

/// What the backend said.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// `{"allowed": true, …}`: the rest of the object are the overrides.
    Allowed(Map<String, Value>),
    /// `{"allowed": false, "reason": …}`.
    Denied(String),
}

/// Why no verdict came: the refusal's reason, as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure(pub String);

#[derive(Debug, Default)]
pub struct Counters {
    pub calls: AtomicU64,
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
    pub failures: AtomicU64,
}

pub struct AuthWebhook {
    url: Uri,
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
    in_flight: Semaphore,
    pub counters: Counters,
}

impl AuthWebhook {
    /// `url` must be `http://…` (TLS for webhooks comes with hato's TLS).
    pub fn new(url: &str, timeout: Duration, max_in_flight: usize) -> Result<AuthWebhook, String> {
        let url: Uri = url
            .parse()
            .map_err(|e| format!("--auth-webhook-url {url:?}: {e}"))?;
        if url.scheme_str() != Some("http") || url.host().is_none() {
            return Err(format!(
                "--auth-webhook-url {url}: only http://host[:port]/path is supported"
            ));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(AuthWebhook {
            url,
            client,
            timeout,
            in_flight: Semaphore::new(max_in_flight.max(1)),
            counters: Counters::default(),
        })
    }

    /// Asks; the whole call (waiting for a place included) is bounded by
    /// the timeout.
    pub async fn ask(&self, body: &str, connection_id: &str) -> Result<Verdict, Failure> {
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        let result = tokio::time::timeout(self.timeout, self.call(body, connection_id))
            .await
            .unwrap_or_else(|_| {
                Err(Failure(format!(
                    "AUTH-WEBHOOK-TIMEOUT: no answer within {} ms",
                    self.timeout.as_millis()
                )))
            });
        let counter = match &result {
            Ok(Verdict::Allowed(_)) => &self.counters.allowed,
            Ok(Verdict::Denied(_)) => &self.counters.denied,
            Err(_) => &self.counters.failures,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        result
    }

    async fn call(&self, body: &str, connection_id: &str) -> Result<Verdict, Failure> {
        let _place = self.in_flight.acquire().await.expect("never closed");
        let mut req = Request::new(Full::new(Bytes::copy_from_slice(body.as_bytes())));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.url.clone();
        let headers = req.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Ok(id) = HeaderValue::from_str(connection_id) {
            headers.insert("sora-connection-id", id);
        }
        let resp =
            self.client.request(req).await.map_err(|e| {
                Failure(format!("AUTH-WEBHOOK-ERROR: cannot reach the webhook: {e}"))
            })?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), ANSWER_LIMIT)
            .collect()
            .await
            .map_err(|e| Failure(format!("AUTH-WEBHOOK-ERROR: reading the answer: {e}")))?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(Failure(format!(
                "AUTH-WEBHOOK-ERROR: the webhook answered {}",
                status.as_u16()
            )));
        }
        verdict(&bytes)
    }
}

/// Reads a 200 answer: an object whose `allowed` is a boolean.
pub fn verdict(bytes: &[u8]) -> Result<Verdict, Failure> {
    let bad = || {
        Failure("AUTH-WEBHOOK-ERROR: the answer is not a JSON object with a boolean allowed".into())
    };
    let Ok(Value::Object(mut map)) = serde_json::from_slice::<Value>(bytes) else {
        return Err(bad());
    };
    match map.remove("allowed") {
        Some(Value::Bool(true)) => Ok(Verdict::Allowed(map)),
        Some(Value::Bool(false)) => Ok(Verdict::Denied(match map.remove("reason") {
            Some(Value::String(r)) if !r.is_empty() => r,
            _ => "AUTH-WEBHOOK-DENIED".into(),
        })),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        assert_eq!(
            verdict(br#"{"allowed":true,"client_id":"x"}"#),
            Ok(Verdict::Allowed(
                serde_json::from_str(r#"{"client_id":"x"}"#).unwrap()
            ))
        );
        assert_eq!(
            verdict(br#"{"allowed":false,"reason":"no"}"#),
            Ok(Verdict::Denied("no".into()))
        );
        assert_eq!(
            verdict(br#"{"allowed":false}"#),
            Ok(Verdict::Denied("AUTH-WEBHOOK-DENIED".into()))
        );
        for garbage in [&br#"{"allowed":"yes"}"#[..], b"[]", b"nope", b"{}"] {
            assert!(verdict(garbage).is_err());
        }
    }
}

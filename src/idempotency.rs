//! Exactly-once for retrying backends: an API call with an
//! `Idempotency-Key` header (the IETF httpapi draft's name) is carried out
//! once; the same key with the same target and body within the window
//! gets the first answer again, marked `idempotent-replayed: true`, and
//! delivers nothing; the same key with another target or body is a 422.
//!
//! Memory is bounded: keys live for `--idempotency-window` seconds and at
//! most `--idempotency-max-keys` are held; a new key beyond that is
//! refused with 503 (forgetting one early would break the promise).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderValue;
use hyper::{Response, StatusCode};
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// The longest key accepted.
pub const MAX_KEY_BYTES: usize = 255;

struct Entry {
    fingerprint: u64,
    status: StatusCode,
    /// Its `x-hato-*` headers (recipients, the push's offset).
    hato_headers: Vec<(hyper::header::HeaderName, HeaderValue)>,
    body: Bytes,
}

pub struct Store {
    window: Duration,
    max_keys: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    /// Keys by age, for expiry.
    order: VecDeque<(Instant, String)>,
}

/// What [`Store::run`] could not do.
pub enum Refusal {
    /// The key was used with another target or body.
    Reused,
    /// The store is full of live keys.
    Full,
}

impl Store {
    pub fn new(window: Duration, max_keys: usize) -> Store {
        Store {
            window,
            max_keys,
            state: Mutex::new(State::default()),
        }
    }

    /// Carries out `call` once per key: the first time, its answer is kept;
    /// a repeat within the window gets that answer again.
    pub async fn run(
        &self,
        key: &str,
        target: &str,
        body: &[u8],
        call: impl std::future::Future<Output = Response<Full<Bytes>>>,
    ) -> Result<Response<Full<Bytes>>, Refusal> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        target.hash(&mut h);
        body.hash(&mut h);
        let fingerprint = h.finish();
        let now = Instant::now();
        // Held across the call: a retry racing the first attempt waits for
        // its answer instead of delivering twice.
        let mut state = self.state.lock().await;
        while let Some((at, _)) = state.order.front() {
            if now.duration_since(*at) < self.window {
                break;
            }
            let (_, old) = state.order.pop_front().expect("front exists");
            state.entries.remove(&old);
        }
        if let Some(e) = state.entries.get(key) {
            if e.fingerprint != fingerprint {
                return Err(Refusal::Reused);
            }
            let mut resp = Response::new(Full::new(e.body.clone()));
            *resp.status_mut() = e.status;
            let headers = resp.headers_mut();
            headers.insert(
                hyper::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            for (name, value) in &e.hato_headers {
                headers.insert(name.clone(), value.clone());
            }
            headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
            return Ok(resp);
        }
        if state.entries.len() >= self.max_keys {
            return Err(Refusal::Full);
        }
        let resp = call.await;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        state.entries.insert(
            key.to_owned(),
            Entry {
                fingerprint,
                status: parts.status,
                hato_headers: parts
                    .headers
                    .iter()
                    .filter(|(name, _)| name.as_str().starts_with("x-hato-"))
                    .map(|(name, value)| (name.clone(), value.clone()))
                    .collect(),
                body: body.clone(),
            },
        );
        state.order.push_back((now, key.to_owned()));
        Ok(Response::from_parts(parts, Full::new(body)))
    }
}

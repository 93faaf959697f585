//! The HTTP API: `POST /` with `x-sora-target` naming the operation, a JSON
//! object in, a JSON object out (docs/protocol.md §6). Every error becomes a
//! response in one place, [`ApiError::into_response`].
//!
//! This file routes a request to its target, parses it and answers; how a
//! push reaches the connections is the [`crate::hub`]'s. Beside it:
//! `listener` (accepting, TLS, the per-connection header and idle clock),
//! `stats` (`GetStatsReport` and `GET /.hato/stats`) and `demo` (`GET
//! /demo`).

mod demo;
mod listener;
mod stats;

pub use listener::serve;

use crate::hub::{self, TooLarge};
use crate::Shared;
use bytes::Bytes;
use hato_signaling::api::{self, Audience, Operation};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::time::Instant;

/// A failed call: status, Sora-style `error_type`, and a readable message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error_type: &'static str,
    message: String,
}

impl ApiError {
    fn bad(error_type: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            error_type,
            message: message.into(),
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let body = json!({"error_type": self.error_type, "message": self.message});
        let mut resp = json_response(self.status, body.to_string());
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert("www-authenticate", HeaderValue::from_static("Bearer"));
        }
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            resp.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("POST, OPTIONS"));
        }
        resp
    }
}

/// 413 for a push larger than hato itself sends over a DataChannel.
impl From<TooLarge> for ApiError {
    fn from(e: TooLarge) -> ApiError {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            error_type: "PUSH-TOO-LARGE",
            message: format!(
                "the push is {} bytes; hato sends at most {} bytes over a DataChannel (--data-channel-message-limit)",
                e.bytes, e.limit
            ),
        }
    }
}

fn json_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let cors = shared.config.api_cors_origin.as_deref();
    // A known target names the metrics; anything else is "other", so that
    // no client can make up label values.
    let (target, operation) = match req
        .headers()
        .get("x-sora-target")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| Some((t, Operation::from_target(t)?)))
    {
        Some((t, op)) => (t.to_owned(), Some(op)),
        None => ("other".to_owned(), None),
    };
    let started = Instant::now();
    let result = route(shared, req).await;
    let metrics = &shared.metrics;
    metrics
        .api_request
        .get_or_create(&crate::metrics::Target {
            target: target.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    if let Some(Operation::Push(_)) = operation {
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.error_type,
        };
        metrics
            .pushes
            .get_or_create(&crate::metrics::PushLabels {
                target,
                outcome: outcome.into(),
            })
            .inc();
    }
    let mut resp = match result {
        Ok(resp) => resp,
        Err(e) => {
            tracing::debug!(status = %e.status, error_type = e.error_type, message = %e.message, "API error");
            e.into_response()
        }
    };
    if let Some(origin) = cors.and_then(|o| HeaderValue::from_str(o).ok()) {
        let h = resp.headers_mut();
        h.insert("access-control-allow-origin", origin);
        h.insert(
            "access-control-allow-methods",
            HeaderValue::from_static("POST, OPTIONS"),
        );
        h.insert(
            "access-control-allow-headers",
            HeaderValue::from_static(
                "Origin, X-Requested-With, Content-Type, Accept, Authorization, Idempotency-Key, x-sora-target",
            ),
        );
        h.insert("access-control-max-age", HeaderValue::from_static("1000"));
        h.insert(
            "access-control-expose-headers",
            HeaderValue::from_static(
                "x-hato-recipients, x-hato-epoch, x-hato-offset, idempotent-replayed",
            ),
        );
    }
    resp
}

async fn route(shared: &Shared, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, ApiError> {
    if req.uri().path() == "/demo" && req.method() == Method::GET && shared.config.demo_enabled() {
        return Ok(demo::demo_page(shared, &req));
    }
    if req.uri().path() == "/.ok" && req.method() == Method::GET {
        // For load balancers: 503 from the moment shutdown begins, so
        // that they drain this node while its sessions end.
        return Ok(crate::metrics::health(shared));
    }
    if let Some(token) = &shared.config.api_token {
        let preflight = req.method() == Method::OPTIONS && shared.config.api_cors_origin.is_some();
        if !preflight && !bearer_matches(&req, token) {
            return Err(ApiError {
                status: StatusCode::UNAUTHORIZED,
                error_type: "UNAUTHORIZED",
                message: "this API needs Authorization: Bearer <token> (--api-token)".into(),
            });
        }
    }
    if req.uri().path() == "/.hato/stats" && req.method() == Method::GET {
        return Ok(json_response(StatusCode::OK, stats::runtime_stats(shared)));
    }
    if req.uri().path() != "/" {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            error_type: "NOT-FOUND",
            message: format!(
                "no API at {}; POST to / with x-sora-target",
                req.uri().path()
            ),
        });
    }
    match *req.method() {
        Method::POST => {}
        Method::OPTIONS if shared.config.api_cors_origin.is_some() => {
            let mut resp = Response::new(Full::new(Bytes::new()));
            *resp.status_mut() = StatusCode::NO_CONTENT;
            return Ok(resp);
        }
        _ => {
            return Err(ApiError {
                status: StatusCode::METHOD_NOT_ALLOWED,
                error_type: "METHOD-NOT-ALLOWED",
                message: format!("{} is not allowed; use POST", req.method()),
            })
        }
    }
    // Header names are case-insensitive in hyper's map.
    let target = match req.headers().get("x-sora-target").map(|v| v.to_str()) {
        None => {
            return Err(ApiError::bad(
                "MISSING-TARGET",
                "the x-sora-target header is missing",
            ))
        }
        Some(Err(_)) => return Err(ApiError::bad("UNKNOWN-TARGET", "x-sora-target is not text")),
        Some(Ok(t)) => t.to_owned(),
    };
    let operation = Operation::from_target(&target).ok_or_else(|| {
        ApiError::bad(
            "UNKNOWN-TARGET",
            format!("unknown x-sora-target {target:?}"),
        )
    })?;
    let key = match req.headers().get("idempotency-key").map(|v| v.to_str()) {
        None => None,
        Some(Ok(k)) if !k.is_empty() && k.len() <= crate::idempotency::MAX_KEY_BYTES => {
            Some(k.to_owned())
        }
        Some(_) => {
            return Err(ApiError::bad(
                "INVALID-IDEMPOTENCY-KEY",
                format!(
                    "Idempotency-Key must be 1 to {} bytes of text",
                    crate::idempotency::MAX_KEY_BYTES
                ),
            ))
        }
    };
    let bytes = read_body(shared, req).await?;
    if let Operation::List(_) = operation {
        // Nothing to repeat safely or not: a listing is not idempotent-keyed.
        return list(shared, operation, &bytes).await;
    }
    let Some(key) = key else {
        return apply(shared, operation, &bytes).await;
    };
    let once = async {
        apply(shared, operation, &bytes)
            .await
            .unwrap_or_else(ApiError::into_response)
    };
    shared
        .idempotency
        .run(&key, &target, &bytes, once)
        .await
        .map_err(|refusal| match refusal {
            crate::idempotency::Refusal::Reused => ApiError {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                error_type: "IDEMPOTENCY-KEY-REUSED",
                message: "this Idempotency-Key was used with another target or body".into(),
            },
            crate::idempotency::Refusal::Full => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                error_type: "IDEMPOTENCY-STORE-FULL",
                message: "too many live Idempotency-Keys (--idempotency-max-keys); retry later"
                    .into(),
            },
        })
}

/// Carries out a validated target.
async fn apply(
    shared: &Shared,
    operation: Operation,
    bytes: &[u8],
) -> Result<Response<Full<Bytes>>, ApiError> {
    if operation == Operation::Batch {
        return push_batch(shared, bytes).await;
    }
    if operation == Operation::History {
        return history(shared, bytes).await;
    }
    let call = api::parse(operation, bytes).map_err(|e| ApiError::bad(e.error_type, e.message))?;
    match operation {
        Operation::Push(scope) => {
            let stats = &shared.table.stats;
            stats.pushes_by_target[scope as usize].fetch_add(1, Ordering::Relaxed);
            push(shared, &call).await
        }
        Operation::Disconnect(_) => disconnect(shared, &call),
        Operation::List(_) => unreachable!("handled in route"),
        Operation::Batch | Operation::History => unreachable!("handled above"),
        Operation::Drain => {
            let started = shared.drain();
            Ok(json_response(
                StatusCode::OK,
                json!({"draining": true, "started_now": started,
                       "drain_timeout": shared.config.drain_timeout})
                .to_string(),
            ))
        }
        Operation::StatsReport => Ok(json_response(
            StatusCode::OK,
            stats::stats_report(shared).to_string(),
        )),
    }
}

/// `ListConnections` / `ListChannelConnections`: this node's connections
/// and, in a cluster, every other node's (scatter-gather; a node that does
/// not answer within `--cluster-request-timeout-ms` is named in the log and
/// in `x-hato-partial`).
async fn list(
    shared: &Shared,
    operation: Operation,
    bytes: &[u8],
) -> Result<Response<Full<Bytes>>, ApiError> {
    let call = api::parse(operation, bytes).map_err(|e| ApiError::bad(e.error_type, e.message))?;
    let channel = matches!(operation, Operation::List(Some(_))).then_some(call.channel_id.as_str());
    let mut list = hub::local_listing(shared, channel);
    let mut partial = None;
    if let Some(cluster) = &shared.cluster {
        let request = json!({ "channel_id": channel }).to_string();
        let (answers, missing) = cluster
            .gather(
                crate::cluster::LIST.into(),
                request.into(),
                cluster.live_nodes(),
            )
            .await
            .map_err(cluster_unavailable)?;
        for answer in answers.into_values() {
            list.extend(
                answer
                    .items
                    .iter()
                    .filter_map(|raw| serde_json::from_str::<Value>(raw.get()).ok()),
            );
        }
        if !missing.is_empty() {
            tracing::warn!(nodes = ?missing, "listing: no answer from these nodes in time; the answer is partial");
            // Names percent-encoded where a header could not carry them.
            let names: Vec<String> = missing.iter().map(|n| header_safe(n)).collect();
            partial = Some(names.join(","));
        }
    }
    let mut resp = json_response(StatusCode::OK, Value::Array(list).to_string());
    if let Some(v) = partial.and_then(|p| HeaderValue::from_str(&p).ok()) {
        resp.headers_mut().insert("x-hato-partial", v);
    }
    Ok(resp)
}

/// `name` with every byte outside visible ASCII, and `,` and `%`,
/// percent-encoded.
fn header_safe(name: &str) -> String {
    use std::fmt::Write;
    name.bytes().fold(String::new(), |mut out, b| {
        if (0x21..=0x7e).contains(&b) && b != b',' && b != b'%' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
        out
    })
}

/// Whether the request carries `Authorization: Bearer <token>`, compared
/// in time that does not depend on where the first difference is.
fn bearer_matches(req: &Request<Incoming>, token: &str) -> bool {
    let Some(given) = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let (a, b) = (given.trim().as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn too_large(limit: usize) -> ApiError {
    ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        error_type: "REQUEST-TOO-LARGE",
        message: format!("the request body exceeds {limit} bytes"),
    }
}

async fn read_body(shared: &Shared, req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let limit = shared.config.api_body_limit;
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    let timeout = shared.config.api_body_timeout();
    let collected = tokio::time::timeout(timeout, Limited::new(req.into_body(), limit).collect())
        .await
        .map_err(|_| ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            error_type: "REQUEST-TIMEOUT",
            message: format!(
                "the body did not arrive within {} ms (--api-body-timeout-ms)",
                timeout.as_millis()
            ),
        })?;
    Ok(collected
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                too_large(limit)
            } else {
                ApiError::bad("INVALID-BODY", format!("could not read the body: {e}"))
            }
        })?
        .to_bytes())
}

fn cluster_unavailable(e: crate::cluster::Unavailable) -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        error_type: "CLUSTER-UNAVAILABLE",
        message: format!("{}; nothing was delivered, retry later", e.0),
    }
}

/// The cluster, when `call` may address connections on other nodes: any
/// call but one naming a connection of this node.
fn cluster_for<'a>(
    shared: &'a Shared,
    call: &api::Call<'_>,
) -> Option<&'a crate::cluster::Cluster> {
    let cluster = shared.cluster.as_deref()?;
    if let Audience::Connection(id) = &call.audience {
        if !shared
            .table
            .lookup(&call.channel_id, Audience::Connection(id))
            .is_empty()
        {
            return None;
        }
    }
    Some(cluster)
}

/// How `call` crosses to the other nodes.
fn cluster_item<'a>(op: &'a str, call: &'a api::Call<'_>) -> crate::cluster::Item<'a> {
    crate::cluster::Item {
        op,
        to: call.audience.clone(),
        data: call.data,
    }
}

/// `Disconnect*`: each addressed session ends with `DISCONNECTED-API`
/// (§5.3), on every node; the answer echoes the keys that named them, as
/// sent.
fn disconnect(shared: &Shared, call: &api::Call<'_>) -> Result<Response<Full<Bytes>>, ApiError> {
    match cluster_for(shared, call) {
        None => hub::disconnect(shared, &call.channel_id, call.audience.as_ref()),
        Some(cluster) => {
            let mut out = cluster.begin(1).map_err(cluster_unavailable)?;
            hub::disconnect(shared, &call.channel_id, call.audience.as_ref());
            out.send(&call.channel_id, vec![cluster_item("disconnect", call)]);
        }
    }
    Ok(json_response(StatusCode::OK, call.echo.clone()))
}

/// In a cluster whose stream orders the pushes, every push goes through
/// it, whoever it addresses.
fn ordered(shared: &Shared) -> Option<&crate::cluster::Cluster> {
    shared.cluster.as_deref().filter(|c| c.streams.is_some())
}

/// Checks and stores one push in the cluster's stream.
async fn push_ordered(
    shared: &Shared,
    cluster: &crate::cluster::Cluster,
    call: &api::Call<'_>,
) -> Result<hub::Pushed, ApiError> {
    let recipients = hub::check(shared, hub::Push::of(call))?;
    let mut positions = cluster
        .publish_ordered(&call.channel_id, &[cluster_item("push", call)])
        .await
        .map_err(cluster_unavailable)?;
    Ok(hub::Pushed {
        recipients,
        position: positions.pop().expect("one position per item"),
    })
}

async fn push(shared: &Shared, call: &api::Call<'_>) -> Result<Response<Full<Bytes>>, ApiError> {
    let pushed = match cluster_for(shared, call) {
        _ if ordered(shared).is_some() => {
            push_ordered(shared, ordered(shared).expect("checked"), call).await?
        }
        None => hub::deliver(shared, hub::Push::of(call), hub::Origin::Api)?,
        Some(cluster) => {
            let mut out = cluster.begin(1).map_err(cluster_unavailable)?;
            let pushed = hub::deliver_here_and_there(shared, hub::Push::of(call))?;
            out.send(&call.channel_id, vec![cluster_item("push", call)]);
            pushed
        }
    };
    let data_json = call.data.expect("a push call has data").get();
    // The body stays exactly Sora's; how many connections the push was
    // queued to (0: nobody matched) and its place in the channel's order
    // go in headers of hato's own.
    let mut resp = json_response(
        StatusCode::OK,
        format!(r#"{{"data":{data_json},"type":"push"}}"#),
    );
    let headers = resp.headers_mut();
    headers.insert("x-hato-recipients", HeaderValue::from(pushed.recipients));
    headers.insert("x-hato-offset", HeaderValue::from(pushed.position.offset));
    if let Ok(epoch) = HeaderValue::from_str(&pushed.position.epoch) {
        headers.insert("x-hato-epoch", epoch);
    }
    Ok(resp)
}

/// The most bytes of pushes one `GetChannelHistory` answer carries (at
/// least one push); the rest comes with the next `since_offset`.
const MAX_HISTORY_ANSWER_BYTES: usize = 8 << 20;

/// `GetChannelHistory`: the channel's kept pushes after `since_offset`,
/// with their offsets, and where the channel stands. This node's history.
/// The channel's lock is held only to take the pushes (shared, not
/// copied); the answer is written after, with each `data` as sent.
async fn history(shared: &Shared, body: &[u8]) -> Result<Response<Full<Bytes>>, ApiError> {
    use serde_json::value::RawValue;
    let q = api::parse_history(body).map_err(|e| ApiError::bad(e.error_type, e.message))?;
    #[derive(serde::Deserialize)]
    struct Message<'a> {
        #[serde(borrow)]
        data: &'a RawValue,
    }
    #[derive(serde::Serialize)]
    struct Kept<'a> {
        offset: u64,
        to: &'a Audience,
        data: &'a RawValue,
    }
    #[derive(serde::Serialize)]
    struct Answer<'a> {
        channel_id: &'a str,
        epoch: Option<&'a str>,
        offset: u64,
        first_offset: Option<u64>,
        /// Kept pushes after the last one listed remain.
        more: bool,
        pushes: Vec<Kept<'a>>,
    }
    let streamed = match ordered(shared).and_then(|c| c.streams.as_ref()) {
        Some(streams) => Some(
            streams
                .since(
                    &q.channel_id,
                    q.since_offset,
                    q.limit,
                    MAX_HISTORY_ANSWER_BYTES,
                )
                .await
                .map_err(cluster_unavailable)?,
        ),
        None => None,
    };
    let (epoch, offset, first_offset, taken) = match shared.history.existing(&q.channel_id) {
        _ if streamed.is_some() => {
            let s = streamed.expect("checked");
            let mut taken = s.pushes(q.since_offset);
            taken.truncate(q.limit);
            (s.epoch, s.last, s.first, taken)
        }
        None => (None, 0, None, Vec::new()),
        Some(log) => {
            let mut log = log.lock().unwrap();
            let taken: Vec<(u64, Audience, std::sync::Arc<crate::outbox::Encoded>)> = log
                .since(std::time::Instant::now(), q.since_offset, q.limit)
                .into_iter()
                .map(|e| (e.offset, e.audience.clone(), e.message.clone()))
                .collect();
            let position = log.position();
            (
                Some(position.epoch),
                position.offset,
                log.first_kept(),
                taken,
            )
        }
    };
    let mut bytes = 0;
    let mut pushes = Vec::with_capacity(taken.len());
    for (offset, to, message) in &taken {
        if bytes > 0 && bytes + message.len() > MAX_HISTORY_ANSWER_BYTES {
            break;
        }
        let Ok(Message { data }) = serde_json::from_str(message.text()) else {
            continue;
        };
        bytes += message.len();
        pushes.push(Kept {
            offset: *offset,
            to,
            data,
        });
    }
    let answer = Answer {
        channel_id: &q.channel_id,
        epoch: epoch.as_deref(),
        offset,
        first_offset,
        more: pushes.last().is_some_and(|p| p.offset < offset),
        pushes,
    };
    let text = serde_json::to_string(&answer).expect("an answer serialises");
    Ok(json_response(StatusCode::OK, text))
}

/// `PushBatch`: every item validated first (one bad item: 400 naming it,
/// nothing sent), then delivered in order — so each connection receives
/// the batch's pushes in batch order. The answer lists each item's result.
/// In a cluster each channel's items cross as one message, in order.
async fn push_batch(shared: &Shared, body: &[u8]) -> Result<Response<Full<Bytes>>, ApiError> {
    let items = api::parse_batch(body).map_err(|e| ApiError::bad(e.error_type, e.message))?;
    if let Some(cluster) = ordered(shared) {
        let mut outcomes: Vec<Result<hub::Pushed, ApiError>> = Vec::with_capacity(items.len());
        // Checked first, then stored one channel after the other, each
        // channel's items in batch order.
        let mut wires: Vec<(&str, Vec<usize>)> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let call = &item.call;
            let checked = hub::check(shared, hub::Push::of(call)).map_err(ApiError::from);
            if checked.is_ok() {
                let channel = call.channel_id.as_str();
                match wires.iter_mut().find(|(c, _)| *c == channel) {
                    Some((_, at)) => at.push(i),
                    None => wires.push((channel, vec![i])),
                }
            }
            outcomes.push(checked.map(|recipients| hub::Pushed {
                recipients,
                position: crate::history::Position {
                    epoch: "".into(),
                    offset: 0,
                },
            }));
        }
        for (channel, at) in wires {
            let sent: Vec<_> = at
                .iter()
                .map(|&i| cluster_item("push", &items[i].call))
                .collect();
            match cluster.publish_ordered(channel, &sent).await {
                Ok(positions) => {
                    for (&i, position) in at.iter().zip(positions) {
                        if let Ok(p) = &mut outcomes[i] {
                            p.position = position;
                        }
                    }
                }
                Err(e) => {
                    let why = e.0;
                    for &i in &at {
                        outcomes[i] = Err(cluster_unavailable(crate::cluster::Unavailable(why)));
                    }
                }
            }
        }
        return Ok(batch_answer(shared, &items, outcomes));
    }
    let mut channels: Vec<&str> = items.iter().map(|i| i.call.channel_id.as_str()).collect();
    channels.sort_unstable();
    channels.dedup();
    let mut out = match shared.cluster.as_deref() {
        Some(c) => Some(c.begin(channels.len()).map_err(cluster_unavailable)?),
        None => None,
    };
    let mut wires: Vec<(&str, Vec<crate::cluster::Item<'_>>)> = Vec::new();
    let outcomes: Vec<Result<hub::Pushed, ApiError>> = items
        .iter()
        .map(|item| {
            let call = &item.call;
            if out.is_some() {
                let outcome = hub::deliver_here_and_there(shared, hub::Push::of(call))
                    .map_err(ApiError::from);
                if outcome.is_ok() {
                    let channel = call.channel_id.as_str();
                    let at = match wires.iter().position(|(c, _)| *c == channel) {
                        Some(at) => at,
                        None => {
                            wires.push((channel, Vec::new()));
                            wires.len() - 1
                        }
                    };
                    wires[at].1.push(cluster_item("push", call));
                }
                outcome
            } else {
                hub::deliver(shared, hub::Push::of(call), hub::Origin::Api).map_err(ApiError::from)
            }
        })
        .collect();
    if let Some(out) = &mut out {
        for (channel, items) in wires {
            out.send(channel, items);
        }
    }
    Ok(batch_answer(shared, &items, outcomes))
}

/// A `PushBatch` answer: each item's result, counted.
fn batch_answer(
    shared: &Shared,
    items: &[api::BatchItem<'_>],
    outcomes: Vec<Result<hub::Pushed, ApiError>>,
) -> Response<Full<Bytes>> {
    let results: Vec<Value> = items
        .iter()
        .zip(outcomes)
        .map(|(item, outcome)| {
            shared.table.stats.pushes_by_target[item.scope as usize]
                .fetch_add(1, Ordering::Relaxed);
            shared
                .metrics
                .pushes
                .get_or_create(&crate::metrics::PushLabels {
                    target: item.target.into(),
                    outcome: outcome.as_ref().map_or_else(|e| e.error_type, |_| "ok").into(),
                })
                .inc();
            match outcome {
                Ok(p) => json!({"target": item.target, "status": 200, "recipients": p.recipients,
                                "epoch": &*p.position.epoch, "offset": p.position.offset}),
                Err(e) => json!({"target": item.target, "status": e.status.as_u16(),
                                 "error_type": e.error_type, "message": e.message, "recipients": 0}),
            }
        })
        .collect();
    let total: u64 = results
        .iter()
        .filter_map(|r| r["recipients"].as_u64())
        .sum();
    let mut resp = json_response(
        StatusCode::OK,
        json!({"type": "push_batch", "results": results}).to_string(),
    );
    resp.headers_mut()
        .insert("x-hato-recipients", HeaderValue::from(total));
    resp
}

//! The API's TCP listener: a place per connection under
//! `--api-max-connections`, TLS, HTTP/1.1 keep-alive, and a clock per
//! connection that closes it when a request's head is too slow or it
//! idles too long.

use super::handle;
use crate::limits::{self, Refusal, Throttle};
use crate::tls::Stream;
use crate::Shared;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};

/// Serves the API until the task is aborted. Each connection has a place
/// under `--api-max-connections` and a [`Clock`] that closes it when a
/// request's head is slower than `--api-header-timeout-ms` or it idles
/// longer than `--api-idle-timeout-ms`.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    static ACCEPT_ERRORS: Throttle = Throttle::new(Duration::from_secs(1));
    static REFUSALS: Throttle = Throttle::new(Duration::from_secs(1));
    let (cap, per_ip) = (
        shared.config.api_max_connections,
        shared.config.api_max_connections_per_ip,
    );
    let places = shared.api_admission.clone();
    loop {
        let (tcp, addr) = limits::accept(&listener, "API", &ACCEPT_ERRORS).await;
        let accepted = Instant::now();
        let _ = tcp.set_nodelay(true);
        let place = match places.admit(addr.ip()) {
            Ok(place) => place,
            Err(why) => {
                let message = match why {
                    Refusal::PerAddress => format!(
                        "the API serves at most {per_ip} connections from one address (--api-max-connections-per-ip)"
                    ),
                    _ => format!(
                        "the API serves at most {cap} connections (--api-max-connections)"
                    ),
                };
                if let Some(folded) = REFUSALS.hit() {
                    tracing::warn!(%addr, refused_since_last_line = folded, "API connection refused: {message}");
                }
                tokio::spawn(refuse_connection(shared.clone(), tcp, message));
                continue;
            }
        };
        let shared = shared.clone();
        let timeouts = (
            shared.config.api_header_timeout(),
            shared.config.api_idle_timeout(),
        );
        tokio::spawn(async move {
            // The TLS handshake (with --tls-cert) has the header timeout.
            let tcp =
                match tokio::time::timeout(timeouts.0, Stream::accept(shared.tls.as_deref(), tcp))
                    .await
                {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::debug!(%addr, error = %e, "API TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            // The header clock runs from accept: a connection that sends
            // nothing holds its place for the header timeout, not the idle
            // one.
            let clock = Arc::new(Clock::new(Phase::Head(accepted)));
            let service = {
                let clock = clock.clone();
                service_fn(move |req| {
                    let shared = shared.clone();
                    let clock = clock.clone();
                    async move {
                        clock.set(Phase::Busy);
                        let resp = handle(&shared, req).await;
                        clock.set(Phase::Idle(Instant::now()));
                        Ok::<_, Infallible>(resp)
                    }
                })
            };
            let (header_timeout, idle_timeout) = timeouts;
            let io = Timed {
                inner: tcp,
                clock: clock.clone(),
            };
            let conn = http1::Builder::new()
                .keep_alive(true)
                .pipeline_flush(true)
                .serve_connection(TokioIo::new(io), service);
            tokio::pin!(conn);
            loop {
                let deadline = clock.deadline(header_timeout, idle_timeout);
                tokio::select! {
                    _ = &mut conn => break,
                    () = clock.changed.notified() => {}
                    () = async {
                        match deadline {
                            Some(t) => tokio::time::sleep_until(t.into()).await,
                            None => std::future::pending().await,
                        }
                    } => {
                        if clock.deadline(header_timeout, idle_timeout).is_some_and(|t| t <= Instant::now()) {
                            tracing::debug!(%addr, "API connection closed: header or idle timeout");
                            break;
                        }
                    }
                }
            }
            drop(place);
        });
    }
}

/// Answers a connection over `--api-max-connections` with 503 and closes
/// it, reading what the client sent so that the close is not a reset.
async fn refuse_connection(shared: Arc<Shared>, tcp: TcpStream, message: String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = json!({
        "error_type": "TOO-MANY-CONNECTIONS",
        "message": message,
    })
    .to_string();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let Ok(mut tcp) = Stream::accept(shared.tls.as_deref(), tcp).await else {
            return;
        };
        let _ = tcp.write_all(format!("{head}{body}").as_bytes()).await;
        let _ = tcp.shutdown().await;
        let mut sink = [0u8; 4096];
        while let Ok(1..) = tcp.read(&mut sink).await {}
    })
    .await;
}

/// Where one API connection is between requests.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for a request since then.
    Idle(Instant),
    /// The first bytes of a request's head arrived then.
    Head(Instant),
    /// A request is being handled (its body has its own timeout).
    Busy,
}

/// Shared by a connection's socket wrapper, which sees a request begin,
/// and its service, which sees it parsed and answered.
struct Clock {
    phase: std::sync::Mutex<Phase>,
    changed: tokio::sync::Notify,
}

impl Clock {
    fn new(phase: Phase) -> Clock {
        Clock {
            phase: std::sync::Mutex::new(phase),
            changed: tokio::sync::Notify::new(),
        }
    }

    fn set(&self, phase: Phase) {
        *self.phase.lock().unwrap() = phase;
        self.changed.notify_one();
    }

    /// Bytes came in: an idle connection has begun a request.
    fn bytes_in(&self) {
        let mut phase = self.phase.lock().unwrap();
        if let Phase::Idle(_) = *phase {
            *phase = Phase::Head(Instant::now());
            drop(phase);
            self.changed.notify_one();
        }
    }

    fn deadline(&self, header: Duration, idle: Duration) -> Option<Instant> {
        match *self.phase.lock().unwrap() {
            Phase::Idle(since) => Some(since + idle),
            Phase::Head(since) => Some(since + header),
            Phase::Busy => None,
        }
    }
}

/// The API's TCP stream, telling its [`Clock`] when bytes arrive.
struct Timed {
    inner: Stream,
    clock: Arc<Clock>,
}

impl tokio::io::AsyncRead for Timed {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.clock.bytes_in();
        }
        poll
    }
}

impl tokio::io::AsyncWrite for Timed {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

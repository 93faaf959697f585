//! `GET /demo`: the page that shows hato at work from a browser.

use crate::Shared;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response};

/// `GET /demo`: one self-contained page (compiled in) that connects as a
/// WebRTC peer through hato's own signaling and sends pushes through the
/// API of the same origin.
pub(super) fn demo_page(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let addr = shared.config.signaling_addr;
    let host = if addr.ip().is_unspecified() {
        req.headers()
            .get(hyper::header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.rsplit_once(':').map_or(Some(h), |(name, _)| Some(name)))
            .unwrap_or("127.0.0.1")
            .to_owned()
    } else {
        addr.ip().to_string()
    };
    let scheme = if shared.tls.is_some() { "wss" } else { "ws" };
    let url = format!("{scheme}://{host}:{}/signaling", addr.port());
    let page = include_str!("demo.html").replace("__SIGNALING_URL__", &url);
    let mut resp = Response::new(Full::new(Bytes::from(page)));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}

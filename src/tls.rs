//! TLS for the signaling WebSocket (`wss://`) and the API (`https://`):
//! one certificate and key (`--tls-cert`, `--tls-key`, PEM) for both
//! listeners, with rustls. The files are read again on SIGHUP; a
//! connection keeps the certificate it was accepted with, so a reload
//! drops nobody.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// A listener's byte stream: plain TCP, or TLS over it, optionally with
/// a cap on the bytes it may still read ([`Stream::limit_reads`]).
pub struct Stream {
    io: Io,
    read_limit: Option<Arc<ReadLimit>>,
    /// While the cap holds: where the bytes read are in the upgrade
    /// request and the WebSocket frames after it.
    frames: Frames,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Bytes a stream may still read, shared with whoever lifts the cap.
#[derive(Debug)]
pub struct ReadLimit {
    left: AtomicUsize,
    /// The cap as set: a WebSocket frame that announces more is refused
    /// from its header, before the WebSocket library reserves (and, on
    /// every read, zero-fills) room for all of it.
    total: usize,
    /// What the error says when the cap is passed.
    why: &'static str,
}

impl ReadLimit {
    pub fn new(bytes: usize, why: &'static str) -> Arc<ReadLimit> {
        Arc::new(ReadLimit {
            left: AtomicUsize::new(bytes),
            total: bytes,
            why,
        })
    }

    fn lifted(&self) -> bool {
        self.left.load(Ordering::Relaxed) == usize::MAX
    }

    /// No cap from now on.
    pub fn lift(&self) {
        self.left.store(usize::MAX, Ordering::Relaxed);
    }

    /// Counts `n` bytes read; `false` once more were read than allowed.
    fn take(&self, n: usize) -> bool {
        let left = self.left.load(Ordering::Relaxed);
        if left == usize::MAX {
            return true;
        }
        self.left.store(left.saturating_sub(n), Ordering::Relaxed);
        n <= left
    }
}

/// Follows a client's bytes through the HTTP upgrade request and the
/// WebSocket frames after it (RFC 6455 §5.2), to read each frame's
/// announced payload length from its header.
#[derive(Debug, Default)]
struct Frames {
    phase: Phase,
}

#[derive(Debug)]
enum Phase {
    /// In the upgrade request: how much of its closing CRLFCRLF was seen.
    Request(usize),
    /// In a frame header: its bytes so far.
    Header([u8; 14], usize),
    /// In a payload: bytes still to come.
    Payload(u64),
}

impl Default for Phase {
    fn default() -> Phase {
        Phase::Request(0)
    }
}

impl Frames {
    /// Follows `bytes`; `false` as soon as a frame announces a payload
    /// longer than `max`.
    fn follow(&mut self, mut bytes: &[u8], max: u64) -> bool {
        while let Some((&b, rest)) = bytes.split_first() {
            match &mut self.phase {
                Phase::Request(seen) => {
                    *seen = match (b, *seen) {
                        (b'\r', 0 | 2) => *seen + 1,
                        (b'\n', 1 | 3) => *seen + 1,
                        (b'\r', _) => 1,
                        _ => 0,
                    };
                    if *seen == 4 {
                        self.phase = Phase::Header([0; 14], 0);
                    }
                    bytes = rest;
                }
                Phase::Header(head, have) => {
                    head[*have] = b;
                    *have += 1;
                    bytes = rest;
                    if *have < 2 {
                        continue;
                    }
                    let extended = match head[1] & 0x7f {
                        126 => 2,
                        127 => 8,
                        _ => 0,
                    };
                    let mask = if head[1] & 0x80 != 0 { 4 } else { 0 };
                    if *have < 2 + extended + mask {
                        continue;
                    }
                    let len = match extended {
                        2 => u64::from(u16::from_be_bytes([head[2], head[3]])),
                        8 => u64::from_be_bytes(head[2..10].try_into().expect("8 bytes")),
                        _ => u64::from(head[1] & 0x7f),
                    };
                    if len > max {
                        return false;
                    }
                    self.phase = if len == 0 {
                        Phase::Header([0; 14], 0)
                    } else {
                        Phase::Payload(len)
                    };
                }
                Phase::Payload(left) => {
                    let n = (*left).min(bytes.len() as u64);
                    *left -= n;
                    bytes = &bytes[n as usize..];
                    if *left == 0 {
                        self.phase = Phase::Header([0; 14], 0);
                    }
                }
            }
        }
        true
    }
}

pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<ServerConfig>>,
}

impl Tls {
    /// Reads the certificate chain and key; an error says which file and why.
    pub fn load(cert: PathBuf, key: PathBuf) -> Result<Tls, String> {
        let config = build(&cert, &key)?;
        Ok(Tls {
            cert,
            key,
            current: RwLock::new(Arc::new(config)),
        })
    }

    /// Reads the files again; new connections get the new certificate, a
    /// failed read keeps the old one.
    pub fn reload(&self) -> Result<(), String> {
        let config = build(&self.cert, &self.key)?;
        *self.current.write().unwrap() = Arc::new(config);
        Ok(())
    }

    /// The TLS handshake of an accepted connection.
    pub async fn accept(&self, tcp: TcpStream) -> std::io::Result<Stream> {
        let config = self.current.read().unwrap().clone();
        TlsAcceptor::from(config)
            .accept(tcp)
            .await
            .map(|s| Stream::new(Io::Tls(Box::new(s))))
    }
}

/// The TLS client of the webhooks: the system's trust roots plus
/// `ca_file`'s certificates (PEM), and with `client` (certificate chain
/// and key, PEM) a client certificate for mutual TLS.
pub fn webhook_client(
    ca_file: Option<&std::path::Path>,
    client: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A system certificate rustls cannot use is skipped, as browsers do.
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let shown = path.display();
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("--webhook-ca-file {shown}: {e}"))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("--webhook-ca-file {shown}: {e}"))?;
        if certs.is_empty() {
            return Err(format!("--webhook-ca-file {shown}: no certificate in it"));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("--webhook-ca-file {shown}: {e}"))?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .map_err(|e| format!("--webhook-client-cert {}: {e}", cert.display()))?
                .collect::<Result<_, _>>()
                .map_err(|e| format!("--webhook-client-cert {}: {e}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("--webhook-client-key {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("--webhook-client-cert/--webhook-client-key: {e}"))?
        }
    };
    // No ALPN here: the connector sets it from the protocols it enables.
    Ok(Arc::new(config))
}

fn build(cert: &PathBuf, key: &PathBuf) -> Result<ServerConfig, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "--tls-cert {}: no certificate in it",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

impl Stream {
    fn new(io: Io) -> Stream {
        Stream {
            io,
            read_limit: None,
            frames: Frames::default(),
        }
    }

    /// Accepts `tcp` as plain, or with `tls`'s handshake.
    pub async fn accept(tls: Option<&Tls>, tcp: TcpStream) -> std::io::Result<Stream> {
        match tls {
            Some(tls) => tls.accept(tcp).await,
            None => Ok(Stream::new(Io::Plain(tcp))),
        }
    }

    /// Reads beyond `limit` fail (`InvalidData`, saying its `why`) until
    /// it is lifted: what a peer may send before it is trusted with more.
    pub fn limit_reads(&mut self, limit: Arc<ReadLimit>) {
        self.read_limit = Some(limit);
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_read(cx, buf),
        };
        if let (Poll::Ready(Ok(())), Some(limit)) = (&r, &this.read_limit) {
            let read = &buf.filled()[before..];
            let within = limit.lifted()
                || (this.frames.follow(read, limit.total as u64) && limit.take(read.len()));
            if !within {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    limit.why,
                )));
            }
        }
        r
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Frames;

    /// A masked client frame header announcing `len` bytes.
    fn header(len: u64) -> Vec<u8> {
        let mut h = vec![0x81];
        match len {
            0..=125 => h.push(0x80 | len as u8),
            126..=0xffff => {
                h.push(0x80 | 126);
                h.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                h.push(0x80 | 127);
                h.extend_from_slice(&len.to_be_bytes());
            }
        }
        h.extend_from_slice(&[1, 2, 3, 4]);
        h
    }

    #[test]
    fn a_frame_announcing_more_than_the_cap_is_seen_from_its_header() {
        let request = b"GET /signaling HTTP/1.1\r\nhost: x\r\n\r\n";
        // Frames within the cap, in pieces of every size, then one over.
        let mut bytes = request.to_vec();
        for len in [0u64, 5, 125, 126, 300, 70_000] {
            bytes.extend(header(len));
            bytes.extend(std::iter::repeat_n(b'\r', len as usize));
        }
        for piece in [1, 2, 3, 7, 1000, bytes.len()] {
            let mut f = Frames::default();
            assert!(
                bytes.chunks(piece).all(|c| f.follow(c, 90_000)),
                "piece {piece}"
            );
            let over = header(90_001);
            assert!(
                !over.chunks(piece).all(|c| f.follow(c, 90_000)),
                "piece {piece}"
            );
        }
        // A 64-bit length (1 MiB) right after the request.
        let mut f = Frames::default();
        assert!(f.follow(request, 90_000));
        assert!(!f.follow(&header(1 << 20), 90_000));
        // Before the request's end, nothing is a frame.
        let mut f = Frames::default();
        assert!(f.follow(b"GET / HTTP/1.1\r\nx: \x81\xff\xff\xff\xff", 10));
    }
}

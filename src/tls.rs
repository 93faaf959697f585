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
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Bytes a stream may still read, shared with whoever lifts the cap.
#[derive(Debug)]
pub struct ReadLimit {
    left: AtomicUsize,
    /// What the error says when the cap is passed.
    why: &'static str,
}

impl ReadLimit {
    pub fn new(bytes: usize, why: &'static str) -> Arc<ReadLimit> {
        Arc::new(ReadLimit {
            left: AtomicUsize::new(bytes),
            why,
        })
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
            if !limit.take(buf.filled().len() - before) {
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

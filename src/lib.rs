//! hato: a push server that speaks the signaling protocol and the Push API
//! of Shiguredo's WebRTC SFU Sora, so that Sora's SDKs receive pushes from
//! it unmodified.
//!
//! - [`api`]: the HTTP API (`POST /`, `x-sora-target`).
//! - [`session`]: one peer's signaling WebSocket and WebRTC peer.
//! - [`table`]: the shared connection table every lookup goes through.
//! - [`outbox`]: each connection's FIFO queue and transport choice.
//! - [`client`]: a Sora-protocol client, for tests and `hato-load`.

pub mod api;
pub mod client;
pub mod config;
pub mod outbox;
pub mod session;
pub mod table;

pub use config::Config;

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What every task of the server shares.
pub struct Shared {
    pub config: Config,
    pub table: table::Table,
    /// This server's session id, as `session_id` in offers and notifies.
    pub session_id: Arc<str>,
}

/// A running server. Dropping it stops accepting (existing sessions end
/// with their sockets).
pub struct Server {
    pub signaling_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Server {
    /// Binds both listeners and starts serving.
    pub async fn start(config: Config) -> std::io::Result<Server> {
        let signaling = TcpListener::bind(config.signaling_addr).await?;
        let api = TcpListener::bind(config.api_addr).await?;
        let shared = Arc::new(Shared {
            config,
            table: table::Table::default(),
            session_id: hato_signaling::id::new_id().into(),
        });
        let server = Server {
            signaling_addr: signaling.local_addr()?,
            api_addr: api.local_addr()?,
            tasks: vec![
                tokio::spawn(session::serve(signaling, shared.clone())),
                tokio::spawn(api::serve(api, shared.clone())),
            ],
            shared,
        };
        Ok(server)
    }

    pub fn signaling_url(&self) -> String {
        format!("ws://{}/signaling", self.signaling_addr)
    }

    pub fn api_url(&self) -> String {
        format!("http://{}/", self.api_addr)
    }

    pub fn table(&self) -> &table::Table {
        &self.shared.table
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

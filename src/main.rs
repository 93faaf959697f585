use clap::Parser;
use hato::{Config, Server};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("HATO_LOG")
                .unwrap_or_else(|_| EnvFilter::new("hato=info,warn")),
        )
        .init();
    let config = Config::parse();
    let server = match Server::start(config).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("hato: cannot listen: {e}");
            std::process::exit(1);
        }
    };
    tracing::info!(
        signaling = %server.signaling_url(),
        api = %server.api_url(),
        "hato is serving"
    );
    // Ctrl-C or SIGTERM (what service managers send).
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!(
        connections = server.table().len(),
        "shutting down: ending every session with SHUTDOWN"
    );
    server.shutdown(std::time::Duration::from_secs(5)).await;
}

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
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("shutting down");
}

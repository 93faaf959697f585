use hato::Server;

#[tokio::main]
async fn main() {
    hato_datachannel::fix_mmap_threshold();
    let (config, matches) = match hato::config_file::load(std::env::args_os().collect()) {
        Ok(loaded) => loaded,
        Err(e) => e.exit(),
    };
    if config.print_config {
        print!("{}", hato::config_file::to_toml(&matches));
        return;
    }
    let flood_guard = hato::logging::init(config.log_format);
    tokio::spawn(flood_guard.summarise());
    if let Some(fds) = hato::limits::raise_fd_limit() {
        tracing::info!(open_files_limit = fds, "file descriptors");
    }
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
    // SIGHUP reads the TLS certificate and key again; connections keep
    // the certificate they were accepted with.
    let tls = server.shared.tls.clone();
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .expect("SIGHUP handler");
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match &tls {
                Some(tls) => match tls.reload() {
                    Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                    Err(e) => {
                        tracing::warn!(error = %e, "SIGHUP: TLS reload failed; the old certificate stays")
                    }
                },
                None => tracing::info!("SIGHUP: no TLS certificate to reload"),
            }
        }
    });
    // SIGUSR1 drains the node (docs/cluster.md, "Draining a node").
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        .expect("SIGUSR1 handler");
    let drained = server.shared.clone();
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            if !drained.drain() {
                tracing::info!("SIGUSR1: already draining");
            }
        }
    });
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
    tracing::info!(
        "totals since start: {}",
        hato::counters::read(&server.shared).nonzero_line()
    );
}

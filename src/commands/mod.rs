//! The commands of the binary: `serve` (the default), and the one-shot `cleanup` and `warm`,
//! each building only what it uses.

mod cleanup;
mod warm;

use std::process::ExitCode;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Cli, Command, Config};
use crate::http::AppState;

/// Runs the command the command line asked for.
pub async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        None => serve(cli.config).await.map(|()| ExitCode::SUCCESS),
        Some(Command::Serve(config)) => serve(config).await.map(|()| ExitCode::SUCCESS),
        Some(Command::Cleanup(args)) => cleanup::command(args).await,
        Some(Command::Warm(args)) => warm::command(args).await,
    }
}

/// The `serve` command: bind, run, stop on SIGINT or SIGTERM.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    // Each connection and each file served takes a descriptor: use all the system allows.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %e, "cannot raise the open-files limit");
    }
    let addr = config.listen_addr();
    let state = AppState::new(config)?;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (CRATERE_LISTEN / CRATERE_PORT)"))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        public = %state.hosts.primary_url(),
        upstream = %state.config.upstream.upstream_sparse,
        "cratere is serving; cargo registry = \"sparse+{}/index/\"",
        state.hosts.primary_url()
    );
    let store = &state.core.crates;
    if store.is_remote() {
        match store.check().await {
            Ok(()) => {
                tracing::info!(store = %store.describe(), "crate files are kept in the bucket")
            }
            Err(e) => tracing::warn!(
                error = %e,
                "the bucket does not answer (yet): downloads go to upstream and /ready says 503 until it does"
            ),
        }
    }
    if let Some(git) = &state.git {
        tracing::info!(
            upstream = %state.config.git.upstream_git,
            schedule = %git.schedule(),
            "git index: cargo registry = \"{}/crates.io-index\" once the first sync completes",
            state.hosts.primary_url()
        );
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(signal_handler(shutdown.clone()));
    crate::server::run(listener, state, shutdown).await
}

async fn signal_handler(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    token.cancel();
}

//! The `cratere` binary: parse the configuration, set up logging, hand over to [`cratere::app`].

use std::io::IsTerminal;
use std::process::ExitCode;

use cratere::config::Cli;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse_or_exit();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    match cratere::app::serve(cli.into_config()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

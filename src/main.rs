//! The `cratere` binary: parse the configuration, set up logging, hand over to [`cratere::app`].

use std::process::ExitCode;

use cratere::config::{Cli, Command};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse_or_exit();
    // The one-shot commands print their own report; their log only says what went wrong.
    let (format, default_filter) = match &cli.command {
        None => (cli.config.log_format, "info"),
        Some(Command::Serve(c)) => (c.log_format, "info"),
        Some(Command::Cleanup(a)) => (a.config.log_format, "warn"),
        Some(Command::Warm(a)) => (a.config.log_format, "warn"),
    };
    cratere::telemetry::init(format, default_filter);
    match cratere::app::dispatch(cli).await {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

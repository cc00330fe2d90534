//! The `cratere` binary: parse the configuration, set up logging, hand over to [`cratere::commands`].

use std::process::ExitCode;

use cratere::config::{Cli, Command};

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run());
    // Blocking work still running now is only walks of the cache (its size, the adoption of an
    // untracked cache) that nobody waits for: do not let them hold up the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

async fn run() -> ExitCode {
    let cli = Cli::parse_or_exit();
    // The one-shot commands print their own report; their log only says what went wrong.
    let (format, default_filter) = match &cli.command {
        None => (cli.config.log_format, "info"),
        Some(Command::Serve(c)) => (c.log_format, "info"),
        Some(Command::Cleanup(a)) => (a.config.log_format, "warn"),
        Some(Command::Warm(a)) => (a.config.log_format, "warn"),
    };
    cratere::telemetry::init(format, default_filter);
    match cratere::commands::dispatch(cli).await {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

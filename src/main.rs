//! The `cratere` binary: parse the configuration, set up logging, hand over to [`cratere::app`].

use std::process::ExitCode;

use cratere::config::Cli;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Cli::parse_or_exit().into_config();
    cratere::telemetry::init(config.log_format);
    match cratere::app::serve(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

//! Running the git CLI in tests, isolated from the user's and the system's configuration.

use std::path::Path;
use std::process::Output;

/// Runs git with no user or system configuration.
pub async fn git_output(dir: &Path, args: &[&str]) -> Output {
    tokio::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_AUTHOR_NAME", "Upstream")
        .env("GIT_AUTHOR_EMAIL", "upstream@example.com")
        .env("GIT_COMMITTER_NAME", "Upstream")
        .env("GIT_COMMITTER_EMAIL", "upstream@example.com")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap()
}

/// Runs git, which must succeed; returns its trimmed stdout.
pub async fn git(dir: &Path, args: &[&str]) -> String {
    let out = git_output(dir, args).await;
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

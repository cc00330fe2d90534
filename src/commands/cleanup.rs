//! `cratere cleanup [--dry-run]`: one pass of [`Cleanup`](crate::cleanup::Cleanup) now, with
//! the stores and nothing else, printing every file it removes and a summary.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::cleanup::{FileKind, Outcome, Pass, Reason};
use crate::clock::SystemClock;
use crate::config::CleanupArgs;
use crate::core::Lifecycle;
use crate::storage::s3::Conditional;

/// `cratere cleanup [--dry-run]`: one pass now, printing every file it removes and a summary.
pub async fn command(args: CleanupArgs) -> anyhow::Result<ExitCode> {
    let config = args.config;
    let crates_root = config.storage.cache.clone();
    if config.storage.kind == crate::config::StorageKind::Fs && !crates_root.is_dir() {
        anyhow::bail!(
            "CRATERE_CACHE={}: no such directory (nothing cached there)",
            crates_root.display()
        );
    }
    let Lifecycle {
        usage,
        cleanup,
        crates,
        ..
    } = Lifecycle::open(&config, Arc::new(SystemClock))?;
    if !args.dry_run
        && let Some(Conditional::Ignored(what)) = crates.probe_conditional_writes().await
        && !config.storage.cleanup_leader
    {
        eprintln!(
            "the bucket does not honour conditional writes ({what}), so it cannot hold the \
             fleet-wide cleanup lease, and two cleanups could race; refusing. Run cleanups on \
             one replica only, with CRATERE_CLEANUP_LEADER=true (there, and for this command)."
        );
        return Ok(ExitCode::FAILURE);
    }
    if !args.dry_run {
        usage
            .adopt_untracked()
            .with_context(|| format!("CRATERE_CACHE={}", crates_root.display()))?;
    }
    let pass = match cleanup
        .run_once(args.dry_run, &CancellationToken::new())
        .await?
    {
        Outcome::Done(pass) => pass,
        Outcome::Busy => {
            eprintln!("another cleanup is running on this cache; nothing was done");
            return Ok(ExitCode::FAILURE);
        }
    };
    print!("{}", report(&pass, usage.now(), args.dry_run));
    let r = &pass.report;
    if r.crates_skipped {
        eprintln!(
            "another cleanup is running on the bucket (another replica holds its lease): crate \
             files were not examined; only the local index cache was cleaned"
        );
        return Ok(ExitCode::FAILURE);
    }
    if r.errors > 0 {
        eprintln!("{} files could not be removed (see the log)", r.errors);
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// What the command prints: one line per file removed (or that a dry run would remove),
/// then a summary.
fn report(pass: &Pass, now: SystemTime, dry_run: bool) -> String {
    let verb = if dry_run { "would remove" } else { "removed" };
    let mut out = String::new();
    for r in &pass.removed {
        let unused_for = now.duration_since(r.last_use).unwrap_or_default();
        let why = match r.reason {
            Reason::Unused => format!("unused for {}", age(unused_for)),
            Reason::OverSize => format!("last used {} ago, over the size cap", age(unused_for)),
        };
        let kind = match r.kind {
            FileKind::Crate => "crate",
            FileKind::Index => "index",
        };
        let _ = writeln!(
            out,
            "{verb} {kind} {}  {}  {why}",
            r.rel,
            bytesize::ByteSize(r.bytes)
        );
    }
    let r = &pass.report;
    let _ = writeln!(
        out,
        "cleanup{}: {verb} {} crate files ({}) and {} index files ({}) in {:.2} s; \
         {} crate files ({}) {}",
        if dry_run { " (dry run)" } else { "" },
        r.crate_files_removed,
        bytesize::ByteSize(r.crate_bytes_removed),
        r.index_files_removed,
        bytesize::ByteSize(r.index_bytes_removed),
        r.duration.as_secs_f64(),
        r.crate_files_kept,
        bytesize::ByteSize(r.crate_bytes_kept),
        if dry_run { "would remain" } else { "remain" },
    );
    if r.skipped_in_use > 0 {
        let _ = writeln!(
            out,
            "{} files kept: used during the cleanup",
            r.skipped_in_use
        );
    }
    out
}

/// A short human age: seconds, hours or days.
fn age(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 86_400.0 {
        format!("{:.1} days", s / 86_400.0)
    } else if s >= 3_600.0 {
        format!("{:.1} hours", s / 3_600.0)
    } else {
        format!("{s:.0} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::days;

    #[test]
    fn ages_read_well() {
        assert_eq!(age(Duration::from_secs(20)), "20 s");
        assert_eq!(age(Duration::from_secs(5400)), "1.5 hours");
        assert_eq!(age(days(95.0)), "95.0 days");
    }
}

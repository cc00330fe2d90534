//! `cratere warm`: reads the lockfiles, warms the cache through [`crate::warm`] with the
//! [`Core`] (no server, no git mirror, no search), prints progress (a bar on a terminal, one
//! line per package otherwise) and a summary. Fails when any package failed.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;

use crate::clock::SystemClock;
use crate::config::WarmArgs;
use crate::core::Core;
use crate::names::CrateKey;
use crate::warm::{Lockfile, parse_lockfile, warm};

/// `cratere warm`: reads the lockfiles, warms, prints progress (a bar on a terminal, one line
/// per package otherwise) and a summary. Fails when any package failed.
pub async fn command(args: WarmArgs) -> anyhow::Result<ExitCode> {
    let mut packages = Vec::new();
    let mut seen = HashSet::new();
    let mut other_sources = 0;
    for path in &args.lockfiles {
        let lock = read_lockfile(path)?;
        other_sources += lock.other_sources;
        for p in lock.packages {
            if seen.insert(CrateKey::new(&p.name, &p.version)) {
                packages.push(p);
            }
        }
    }
    println!(
        "warming {} crates.io packages from {} lockfile(s){}",
        packages.len(),
        args.lockfiles.len(),
        if other_sources > 0 {
            format!(" ({other_sources} packages from other sources skipped)")
        } else {
            String::new()
        }
    );
    let core = Core::open(&args.config, Arc::new(SystemClock))?;
    let bar = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(packages.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} {elapsed_precise} {wide_msg}",
            )
            .expect("valid template"),
        );
        Some(bar)
    } else {
        None
    };
    let report = warm(&core, packages, args.jobs, |p, res| {
        let line = match res {
            Ok(w) if w.fetched => format!("fetched {p} ({})", bytesize::ByteSize(w.bytes)),
            Ok(_) => format!("cached  {p}"),
            Err(e) => format!("FAILED  {p}: {e}"),
        };
        match &bar {
            Some(bar) => {
                if res.is_err() {
                    bar.println(&line);
                }
                bar.set_message(p.to_string());
                bar.inc(1);
            }
            None => println!("{line}"),
        }
    })
    .await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    println!(
        "warm: {} fetched ({}), {} already cached, {} failed; {} of crate files for these lockfiles in {}",
        report.fetched,
        bytesize::ByteSize(report.bytes_fetched),
        report.already_cached,
        report.failed.len(),
        bytesize::ByteSize(report.bytes_total),
        core.crates.describe(),
    );
    if report.failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        for (p, e) in &report.failed {
            eprintln!("failed: {p}: {e}");
        }
        Ok(ExitCode::FAILURE)
    }
}

fn read_lockfile(path: &PathBuf) -> anyhow::Result<Lockfile> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_lockfile(&text).with_context(|| format!("{}", path.display()))
}

//! The sync job: fetch upstream, build one commit per host with that host's `config.json` on
//! top of upstream's head, publish every host's ref in one ref transaction, prune after a
//! history rewrite.
//!
//! Steps of [`GitIndex::sync`] (one at a time: an in-process mutex plus a lock file, so two
//! processes sharing `$CRATERE_INDEX` do not interleave either):
//! 1. `git fetch <upstream> +HEAD:refs/cratere/upstream` (forced: crates.io squashes).
//! 2. For each host: `hash-object` its config.json, `mktree` upstream's root tree with that
//!    blob as `config.json`, `commit-tree` with upstream's head as parent. Author, committer
//!    and dates are fixed (dates = upstream head's), so an unchanged upstream gives the very
//!    same commit and the refs do not move.
//! 3. One `git update-ref --stdin` transaction: each host's master ← its new commit, each
//!    host's hidden `previous` ← the commit it served before; namespaces of hosts no longer
//!    configured are deleted. A ref update is a lock file renamed into place, so a client
//!    reads either the old or the new commit, never a mix.
//! 4. Cleanup. After a squash the old history is still reachable from the `previous` refs
//!    (clients that saw the old advertisement may still be fetching it), so the sync that sees
//!    the rewrite only leaves a marker; the next sync, once `previous` has moved on, runs
//!    `git repack -a -d` (drops every unreachable object from the packs) and
//!    `git prune --expire=now` (loose ones). Otherwise `git gc --auto`, after one
//!    `git repack -a -d` if no pack has a reachability bitmap yet (the first fetch).
//!
//! A rewrite is detected against the upstream commit the hosts *serve* (their master's
//! parent), not against the last fetched head, and it is recorded (`cratere-prune-next`)
//! before anything is published. So a sync killed anywhere after its fetch still leads to
//! the prune: the next sync either sees the rewrite again (nothing was published) or finds
//! the record and leaves the marker itself.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Context;
use chrono::Utc;
use tokio::sync::watch;

use super::process::{Output, config_env, run, run_ok};
use super::{GitIndex, HostView, SyncRecord, SyncReport, SyncStatus};
use crate::storage::fs::LockFile;

/// Upstream's head as last fetched.
pub const UPSTREAM_REF: &str = "refs/cratere/upstream";

/// Present (in the repository) when upstream rewrote its history and the next sync must prune.
const PRUNE_MARKER: &str = "cratere-prune-pending";
/// Present while a sync that saw a rewrite has not yet left [`PRUNE_MARKER`]: written before
/// publishing, so a sync killed in between still leads to the prune.
const PRUNE_NEXT: &str = "cratere-prune-next";

/// Configuration of every sync-side git command (see [`config_env`]).
const SYNC_CONFIG: &[(&str, &str)] = &[
    // No background `git maintenance` after fetch: cleanup is step 4, under the sync lock.
    ("maintenance.auto", "false"),
    ("gc.autoDetach", "false"),
    // Reflogs would keep squashed history reachable.
    ("core.logAllRefUpdates", "false"),
    // An http(s) upstream slower than 1 KB/s for a minute is given up (retried on schedule)
    // rather than holding the sync lock forever.
    ("http.lowSpeedLimit", "1000"),
    ("http.lowSpeedTime", "60"),
    // Bitmaps make the counting phase of a full clone of a 1 GB+ repository near instant.
    ("repack.writeBitmaps", "true"),
];

/// Author and committer of the config.json commits.
const COMMITTER: (&str, &str) = ("Cratere", "cratere@localhost");

/// Sets `running = false` however the sync ends (including its future being dropped).
struct Running<'a>(&'a watch::Sender<SyncStatus>);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|s| s.running = false);
    }
}

impl GitIndex {
    /// One sync. Waits for a sync already running to finish first. Dropping the future
    /// kills the git process it is running.
    pub async fn sync(&self) -> anyhow::Result<SyncReport> {
        let mut one_at_a_time = self.sync_lock.lock().await;
        let started = Utc::now();
        let t0 = Instant::now();
        self.status.send_modify(|s| s.running = true);
        let _running = Running(&self.status);
        let res = self.sync_locked(&mut one_at_a_time).await;
        let record = SyncRecord {
            started,
            duration: t0.elapsed(),
            result: res.as_ref().map(Clone::clone).map_err(|e| format!("{e:#}")),
        };
        match &res {
            Ok(r) => tracing::info!(
                upstream_head = %r.upstream_head,
                changed = r.changed,
                history_rewritten = r.history_rewritten,
                pruned = r.pruned,
                files_changed = r.files_changed,
                duration_ms = record.duration.as_millis() as u64,
                "git index synced"
            ),
            Err(e) => tracing::warn!(
                upstream = %self.upstream,
                error = format!("{e:#}"),
                "git index sync failed; serving the last good state, retrying on schedule"
            ),
        }
        self.status.send_modify(|s| {
            s.attempts += 1;
            if res.is_ok() {
                s.ready = true;
                s.last_success = Some(record.clone());
            } else {
                s.failures += 1;
            }
            s.last = Some(record);
        });
        res
    }

    /// The sync, under this process's lock (holding the lock file, once opened).
    async fn sync_locked(&self, lock_file: &mut Option<LockFile>) -> anyhow::Result<SyncReport> {
        tokio::fs::create_dir_all(&self.root)
            .await
            .with_context(|| format!("creating {}", self.root.display()))?;
        // Across processes: an exclusive lock on `$CRATERE_INDEX/git/sync.lock`. Then ref lock
        // files left by a git process killed mid-update can go (only syncs write refs).
        if lock_file.is_none() {
            *lock_file = Some(LockFile::open(&self.root.join("sync.lock"))?);
        }
        let lock_file = lock_file.as_ref().expect("opened");
        let Some(_held) = lock_file.try_lock()? else {
            anyhow::bail!(
                "another process is syncing the git index in {}",
                lock_file.path().display()
            );
        };
        let repo = self.repo.clone();
        tokio::task::spawn_blocking(move || remove_stale_lock_files(&repo)).await?;
        self.init_repo().await?;
        if !self.status.borrow().ready && self.serves_current_config().await? {
            tracing::info!("serving the git index mirror found on disk until the sync completes");
            self.status.send_modify(|s| s.ready = true);
        }
        let prune_pending = tokio::fs::try_exists(self.repo.join(PRUNE_MARKER)).await?;
        let rewrite_recorded = tokio::fs::try_exists(self.repo.join(PRUNE_NEXT)).await?;

        let (old_head, head) = self.fetch_upstream().await?;
        let history_rewritten = match &old_head {
            Some(old) if *old != head => !self.is_ancestor(old, &head).await?,
            _ => false,
        };
        if history_rewritten {
            tracing::info!(old = ?old_head, new = %head, "upstream rewrote its history");
            tokio::fs::write(self.repo.join(PRUNE_NEXT), format!("{old_head:?}\n")).await?;
        }

        let mut commits = Vec::with_capacity(self.hosts.len());
        for host in &self.hosts {
            commits.push(self.host_commit(host, &head).await?);
        }
        let changed = self.publish(&commits).await?;
        let files_changed = match &old_head {
            Some(old) if *old != head && !history_rewritten => {
                self.report_changes(old, &head).await
            }
            _ => 0,
        };

        let pruned = self.maintain(prune_pending).await?;
        if history_rewritten || rewrite_recorded {
            tokio::fs::write(self.repo.join(PRUNE_MARKER), format!("{old_head:?}\n")).await?;
            tokio::fs::remove_file(self.repo.join(PRUNE_NEXT)).await?;
        }
        Ok(SyncReport {
            upstream_head: head,
            changed,
            history_rewritten,
            pruned,
            files_changed,
        })
    }

    /// Hands the index files that differ between two upstream commits to the
    /// [`GitIndex::on_files_changed`] hook. Returns how many there were.
    async fn report_changes(&self, old: &str, new: &str) -> usize {
        let out = self
            .git(
                ["diff", "--name-only", "-z", "--no-renames", old, new],
                None,
            )
            .await;
        let files: Vec<String> = match out {
            Ok(o) => o
                .stdout
                .split(|&b| b == 0)
                .filter_map(|p| std::str::from_utf8(p).ok())
                .filter(|p| !p.is_empty() && *p != "config.json" && !p.starts_with('.'))
                .map(str::to_owned)
                .collect(),
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "cannot list the files a sync changed"
                );
                return 0;
            }
        };
        let n = files.len();
        if let Some(hook) = self.on_files_changed.get() {
            hook(files);
        }
        n
    }

    /// Fetches upstream's head (forced: upstream squashes). Returns the upstream commit
    /// served before (under the hosts' config.json commits; before anything was published,
    /// the last one fetched) and the new head.
    async fn fetch_upstream(&self) -> anyhow::Result<(Option<String>, String)> {
        // The upstream commit served now (under the hosts' config.json commits); before
        // anything was published, the last one fetched.
        let served = match self.hosts.first() {
            Some(h) => self.rev_parse(&format!("{}^", h.master_ref())).await?,
            None => None,
        };
        let old_head = match served {
            Some(s) => Some(s),
            None => self.rev_parse(UPSTREAM_REF).await?,
        };
        self.git(
            [
                "fetch",
                "--quiet",
                "--no-tags",
                "--no-write-fetch-head",
                "--",
                self.upstream.as_str(),
                &format!("+HEAD:{UPSTREAM_REF}"),
            ],
            None,
        )
        .await
        .with_context(|| format!("fetching CRATERE_UPSTREAM_GIT={}", self.upstream))?;
        let head = self
            .rev_parse(UPSTREAM_REF)
            .await?
            .context("upstream has no HEAD")?;
        Ok((old_head, head))
    }

    /// After a publish: the prune a squash asked for, else the bitmap repack (once) and
    /// `gc --auto`. Returns whether it pruned.
    async fn maintain(&self, prune_pending: bool) -> anyhow::Result<bool> {
        if prune_pending {
            self.prune().await?;
            tokio::fs::remove_file(self.repo.join(PRUNE_MARKER)).await?;
            Ok(true)
        } else {
            if !self.has_bitmap().await? {
                // Once, after the first fetch: one pack with a reachability bitmap, so a
                // client's full clone does not walk the whole history (minutes on crates.io's
                // index) before the first byte.
                tracing::info!("repacking the mirror with a bitmap index");
                self.git(["repack", "-a", "-d", "-q"], None).await?;
            }
            self.git(["gc", "--auto", "--quiet"], None).await?;
            Ok(false)
        }
    }

    async fn init_repo(&self) -> anyhow::Result<()> {
        if tokio::fs::try_exists(self.repo.join("HEAD")).await? {
            return Ok(());
        }
        tracing::info!(repo = %self.repo.display(), "creating the git index mirror");
        run_ok(
            &self.root,
            [
                "init".as_ref(),
                "--bare".as_ref(),
                "--quiet".as_ref(),
                self.repo.as_os_str(),
            ],
            &config_env(SYNC_CONFIG),
            None,
        )
        .await?;
        Ok(())
    }

    /// Whether the repository already serves every host its current config.json (a restart
    /// with a mirror on disk), so clients need not wait for the first fetch.
    async fn serves_current_config(&self) -> anyhow::Result<bool> {
        for host in &self.hosts {
            let blob = self
                .git_status(
                    [
                        "cat-file".to_string(),
                        "blob".into(),
                        format!("{}:config.json", host.master_ref()),
                    ],
                    None,
                )
                .await?;
            if !blob.status.success() || blob.stdout != host.config_json.as_bytes() {
                return Ok(false);
            }
            let head = self
                .git_status(["symbolic-ref".to_string(), host.head_ref()], None)
                .await?;
            if !head.status.success() || head.stdout_trimmed() != host.master_ref() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The host's commit: upstream's root tree with the host's config.json, on top of `head`.
    async fn host_commit(&self, host: &HostView, head: &str) -> anyhow::Result<String> {
        let blob = self
            .git(
                ["hash-object", "-w", "--stdin"],
                Some(host.config_json.as_bytes()),
            )
            .await?
            .stdout_trimmed();
        let tree = self.git(["ls-tree", "-z", head], None).await?.stdout;
        let mut entries: Vec<&[u8]> = tree
            .split(|&b| b == 0)
            .filter(|e| !e.is_empty() && !e.ends_with(b"\tconfig.json"))
            .collect();
        let config_entry = format!("100644 blob {blob}\tconfig.json");
        entries.push(config_entry.as_bytes());
        let mut input = entries.join(&0u8);
        input.push(0);
        let tree = self
            .git(["mktree", "-z"], Some(&input))
            .await?
            .stdout_trimmed();
        let date = format!(
            "{} +0000",
            self.git(["show", "-s", "--format=%ct", head], None)
                .await?
                .stdout_trimmed()
        );
        let envs = [
            ("GIT_AUTHOR_NAME", COMMITTER.0),
            ("GIT_AUTHOR_EMAIL", COMMITTER.1),
            ("GIT_AUTHOR_DATE", &date),
            ("GIT_COMMITTER_NAME", COMMITTER.0),
            ("GIT_COMMITTER_EMAIL", COMMITTER.1),
            ("GIT_COMMITTER_DATE", &date),
        ];
        let mut env = self.env();
        env.extend(envs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let message = format!("Point config.json at {}\n", host.base_url);
        let out = run_ok(
            &self.root,
            [
                "commit-tree",
                "--no-gpg-sign",
                &tree,
                "-p",
                head,
                "-m",
                &message,
            ],
            &env,
            None,
        )
        .await?;
        Ok(out.stdout_trimmed())
    }

    /// Moves every host's master to its new commit (and `previous` to what it served until
    /// now) in one transaction; deletes namespaces of hosts no longer configured; makes sure
    /// each host's HEAD points at its master. Returns whether any master moved.
    async fn publish(&self, commits: &[String]) -> anyhow::Result<bool> {
        let listing = self
            .git(
                [
                    "for-each-ref",
                    "--format=%(refname)%00%(objectname)%00%(symref)",
                    "refs/namespaces/",
                ],
                None,
            )
            .await?;
        let mut current: HashMap<String, (String, String)> = HashMap::new();
        for line in String::from_utf8_lossy(&listing.stdout).lines() {
            let mut f = line.split('\0');
            if let (Some(r), Some(o), Some(s)) = (f.next(), f.next(), f.next()) {
                current.insert(r.to_string(), (o.to_string(), s.to_string()));
            }
        }
        let mut tx = String::new();
        let mut changed = false;
        for (host, new) in self.hosts.iter().zip(commits) {
            let master = host.master_ref();
            match current.get(&master).map(|(o, _)| o) {
                Some(cur) if cur == new => {}
                Some(cur) => {
                    tx.push_str(&format!("update {master} {new} {cur}\n"));
                    changed = true;
                }
                None => {
                    tx.push_str(&format!("create {master} {new}\n"));
                    changed = true;
                }
            }
            // What was served until now stays fetchable by its id for one more period.
            if let Some((cur, _)) = current.get(&master)
                && current.get(&host.previous_ref()).map(|(o, _)| o) != Some(cur)
            {
                tx.push_str(&format!("update {} {cur}\n", host.previous_ref()));
            }
        }
        let configured: Vec<String> = self
            .hosts
            .iter()
            .map(|h| format!("refs/namespaces/{}/", h.namespace))
            .collect();
        for refname in current.keys() {
            if !configured.iter().any(|p| refname.starts_with(p)) {
                tx.push_str(&format!("delete {refname}\n"));
            }
        }
        if !tx.is_empty() {
            // An explicit transaction: input cut short (this process killed while writing it)
            // aborts it, where plain `--stdin` would commit the updates read so far.
            let tx = format!("start\n{tx}prepare\ncommit\n");
            self.git(["update-ref", "--no-deref", "--stdin"], Some(tx.as_bytes()))
                .await
                .context("publishing the hosts' refs")?;
        }
        for host in &self.hosts {
            let master = host.master_ref();
            if current.get(&host.head_ref()).map(|(_, s)| s) != Some(&master) {
                self.git(["symbolic-ref", &host.head_ref(), &master], None)
                    .await?;
            }
        }
        Ok(changed)
    }

    /// Drops every object no ref reaches: packed ones by rewriting the packs, loose ones by
    /// `git prune`.
    async fn prune(&self) -> anyhow::Result<()> {
        tracing::info!("pruning history upstream rewrote");
        self.git(["repack", "-a", "-d", "-q"], None).await?;
        self.git(["prune", "--expire=now"], None).await?;
        Ok(())
    }

    async fn has_bitmap(&self) -> anyhow::Result<bool> {
        let mut dir = tokio::fs::read_dir(self.repo.join("objects/pack")).await?;
        while let Some(e) = dir.next_entry().await? {
            if e.path().extension().is_some_and(|x| x == "bitmap") {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn rev_parse(&self, rev: &str) -> anyhow::Result<Option<String>> {
        let out = self
            .git_status(
                [
                    "rev-parse",
                    "--verify",
                    "--quiet",
                    &format!("{rev}^{{commit}}"),
                ],
                None,
            )
            .await?;
        Ok(out.status.success().then(|| out.stdout_trimmed()))
    }

    async fn is_ancestor(&self, old: &str, new: &str) -> anyhow::Result<bool> {
        let out = self
            .git_status(["merge-base", "--is-ancestor", old, new], None)
            .await?;
        match out.status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            // The old head may be gone (e.g. pruned by hand): treat as a rewrite.
            _ => Ok(false),
        }
    }

    /// Environment of sync-side git commands.
    fn env(&self) -> Vec<(String, String)> {
        let mut env = config_env(SYNC_CONFIG);
        env.push(("GIT_DIR".into(), self.repo.to_string_lossy().into_owned()));
        // Never wait for a password on a terminal nobody watches.
        env.push(("GIT_TERMINAL_PROMPT".into(), "0".into()));
        env
    }

    async fn git<I, S>(&self, args: I, input: Option<&[u8]>) -> anyhow::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        run_ok(&self.root, args, &self.env(), input).await
    }

    async fn git_status<I, S>(&self, args: I, input: Option<&[u8]>) -> anyhow::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        run(&self.root, args, &self.env(), input).await
    }
}

/// Removes `*.lock` files in the repository's top directory and under `refs/`.
fn remove_stale_lock_files(repo: &std::path::Path) {
    fn walk(dir: &std::path::Path, recurse: bool) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() && recurse {
                walk(&path, true);
            } else if ft.is_file() && path.extension().is_some_and(|x| x == "lock") {
                tracing::warn!(path = %path.display(), "removing a stale git lock file");
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    walk(repo, false);
    walk(&repo.join("refs"), true);
    // Temporary packs and quarantine directories of a git process killed mid-write (a killed
    // first fetch of crates.io leaves gigabytes). No git process of ours runs on the
    // repository while the sync lock is held, so none of them is in use.
    if let Ok(entries) = std::fs::read_dir(repo.join("objects/pack")) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("tmp_") || name.starts_with(".tmp-") {
                tracing::warn!(path = %e.path().display(), "removing a leftover temporary pack");
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(repo.join("objects")) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("incoming-") {
                tracing::warn!(path = %e.path().display(), "removing a leftover quarantine directory");
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

//! Crash safety: `kill -9` at any moment of a download, a git index sync or a cache cleanup
//! leaves nothing partial that is ever served, and nothing that blocks the next run; leftover
//! temp files are removed at the next start.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::cargo::write;
use common::{FakeUpstream, Fault, Running, Target, client, index_path, wait_until_async};

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_download_leaves_nothing_partial() {
    let up = FakeUpstream::start().await;
    let bytes = up.publish("crashy", "1.0.0", 400_000);
    up.set_fault(Target::Crate, Fault::Gate);
    let dir = tempfile::tempdir().unwrap();
    let envs = [
        ("CRATERE_UPSTREAM_SPARSE", up.url.clone()),
        (
            "CRATERE_CACHE",
            dir.path().join("crates").display().to_string(),
        ),
        (
            "CRATERE_INDEX",
            dir.path().join("index").display().to_string(),
        ),
    ];
    let mut server = common::spawn_server(&envs);
    let mut resp = reqwest::get(format!(
        "http://{}/api/v1/crates/crashy/1.0.0/download",
        server.addr
    ))
    .await
    .unwrap();
    let mut got = resp.chunk().await.unwrap().unwrap().len(); // half the crate is on its way
    let tmp = dir.path().join("crates/.tmp");
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        1,
        "the download's temp file"
    );
    server.kill_hard();
    let final_path = dir.path().join("crates/cr/as/crashy/crashy-1.0.0.crate");
    assert!(!final_path.exists(), "nothing partial in the cache");
    let failed = loop {
        match resp.chunk().await {
            Ok(Some(c)) => got += c.len(),
            Ok(None) => break false,
            Err(_) => break true,
        }
    };
    assert!(
        failed && got < bytes.len(),
        "the client saw the download fail ({failed}, {got})"
    );

    up.release();
    let server = common::spawn_server(&envs);
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "the dead process's temp file is removed at startup"
    );
    let r = reqwest::get(format!(
        "http://{}/api/v1/crates/crashy/1.0.0/download",
        server.addr
    ))
    .await
    .unwrap();
    assert_eq!(r.bytes().await.unwrap(), bytes);
    assert_eq!(std::fs::read(&final_path).unwrap(), bytes);
    let mut server = server;
    server.kill_hard();
}

// ---------------------------------------------------------------------------------------------
// kill -9 during a git index sync

/// The proxy's public URL in these tests (fixed, so every restart serves the same config.json).
const PUBLIC_URL: &str = "http://cratere.test:8000";

use common::git::git;

/// The upstream git index: a plain repository with crates.io's layout.
struct Upstream {
    dir: PathBuf,
    /// Every commit master has pointed at.
    commits: HashSet<String>,
}

impl Upstream {
    async fn create(dir: &Path) -> Upstream {
        std::fs::create_dir_all(dir).unwrap();
        git(dir, &["init", "-q", "-b", "master"]).await;
        let mut up = Upstream {
            dir: dir.to_path_buf(),
            commits: HashSet::new(),
        };
        write(
            &dir.join("config.json"),
            "{\n  \"dl\": \"https://static.crates.io/crates\",\n  \"api\": \"https://crates.io\"\n}\n",
        );
        up.commit("Initial commit").await;
        up
    }

    /// Publishes `count` crates on the fake sparse upstream and writes their index files.
    fn add_crates(&self, up: &FakeUpstream, prefix: &str, count: usize) {
        for i in 0..count {
            let name = format!("{prefix}{i:04}");
            up.publish(&name, "1.0.0", 16);
            write(&self.dir.join(index_path(&name)), &up.index_file(&name));
        }
    }

    async fn commit(&mut self, msg: &str) -> String {
        git(&self.dir, &["add", "-A"]).await;
        git(&self.dir, &["commit", "-q", "-m", msg]).await;
        let head = git(&self.dir, &["rev-parse", "HEAD"]).await;
        self.commits.insert(head.clone());
        head
    }

    /// What crates.io does now and then: master's tree as one parentless commit.
    async fn squash(&mut self) -> String {
        git(&self.dir, &["checkout", "-q", "--orphan", "squashed"]).await;
        git(
            &self.dir,
            &["commit", "-q", "-m", "Collapse index into one commit"],
        )
        .await;
        git(&self.dir, &["branch", "-M", "master"]).await;
        let head = git(&self.dir, &["rev-parse", "HEAD"]).await;
        self.commits.insert(head.clone());
        head
    }
}

/// A git process the server started: pid (also its process group), subcommand (`fetch`,
/// `update-ref`, ...; empty once it has exited), whether it has exited (a zombie).
struct GitChild {
    pid: u32,
    step: String,
    zombie: bool,
}

/// The `git` processes whose parent is `server`, from /proc.
fn git_children(server: u32) -> Vec<GitChild> {
    let mut out = Vec::new();
    let parent = server.to_string();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        if &stat[open + 1..close] != "git" || fields.get(1) != Some(&parent.as_str()) {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let step = cmdline
            .split(|b| *b == 0)
            .nth(1)
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .unwrap_or_default();
        out.push(GitChild {
            pid,
            step,
            zombie: fields[0] == "Z",
        });
    }
    out
}

fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Polls (bounded, no fixed delays) the server's git processes until one running a step of `first` has been
/// seen (skipped when empty) and then one running a step of `then`, ignoring processes in
/// `ignore` (started before the upstream change). With `mid_write` (the mirror), also waits
/// until that step has a new temporary pack in the mirror (a pack being written), unless the
/// step ends first. Then stops the server with SIGSTOP, so it starts nothing more, and returns the step
/// it caught and the process groups of every git process it has at that moment.
fn stop_during(
    server: u32,
    ignore: &HashSet<u32>,
    first: &[&str],
    then: &[&str],
    mid_write: Option<&Path>,
) -> (String, Vec<u32>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen_first = first.is_empty();
    let mut caught: Option<(u32, String)> = None;
    let old_packs = mid_write.map(temp_packs).unwrap_or_default();
    loop {
        let kids = git_children(server);
        let running = |steps: &[&str]| {
            kids.iter()
                .find(|k| !k.zombie && !ignore.contains(&k.pid) && steps.contains(&&*k.step))
                .map(|k| (k.pid, k.step.clone()))
        };
        if !seen_first {
            seen_first = running(first).is_some();
        }
        if seen_first && caught.is_none() {
            caught = running(then);
        }
        let stop = match (&caught, mid_write) {
            (None, _) => None,
            (Some((_, step)), None) => Some(step.clone()),
            (Some((pid, step)), Some(repo)) => {
                if temp_packs(repo).iter().any(|p| !old_packs.contains(p)) {
                    Some(format!("{step}, writing"))
                } else if !kids.iter().any(|k| k.pid == *pid && !k.zombie) {
                    Some(format!("{step}, just after it ended"))
                } else {
                    None
                }
            }
        };
        if let Some(step) = stop {
            signal(server as i32, libc::SIGSTOP);
            let mut groups: Vec<u32> = kids.iter().map(|k| k.pid).collect();
            groups.extend(git_children(server).iter().map(|k| k.pid));
            groups.sort_unstable();
            groups.dedup();
            return (step, groups);
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the server to run git {first:?} then {then:?}"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Temporary packs in the mirror: git writes a pack there first, then renames it.
fn temp_packs(repo: &Path) -> Vec<String> {
    std::fs::read_dir(repo.join("objects/pack"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tmp_") || n.starts_with(".tmp-"))
        .collect()
}

/// Whether any process of one of these groups is alive.
fn any_alive(groups: &[u32]) -> bool {
    groups.iter().any(|g| {
        std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read_to_string(e.path().join("stat")).is_ok_and(|stat| {
                let Some(close) = stat.rfind(')') else {
                    return false;
                };
                let f: Vec<&str> = stat[close + 2..].split(' ').collect();
                f[0] != "Z" && f.get(2) == Some(&g.to_string().as_str())
            })
        })
    })
}

/// Waits (bounded) until the git index answers clones.
async fn wait_git_ready(server: &Running) {
    let url = format!(
        "http://{}/crates.io-index/info/refs?service=git-upload-pack",
        server.addr
    );
    wait_until_async(
        || {
            let url = url.clone();
            async move {
                client()
                    .get(&url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200)
            }
        },
        "the git index to answer 200",
    )
    .await;
}

/// Whether the server logged a successful sync whose line contains all of `words`.
fn logged_sync(server: &Running, words: &[&str]) -> bool {
    server
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("git index synced") && words.iter().all(|w| l.contains(w)))
}

/// Clones the git index through the server into `dest`, or, if `dest` is a clone already,
/// fetches into it and checks out what the server serves now. Then checks the tree: the
/// proxy's config.json on top of exactly one upstream commit, every index file whole and
/// parsable, `git fsck` clean. Returns the upstream commit served.
async fn check_clone(server: &Running, upstream: &Upstream, dest: &Path) -> String {
    let url = format!("http://{}/crates.io-index", server.addr);
    if dest.exists() {
        git(
            dest,
            &["fetch", "-q", &url, "+HEAD:refs/remotes/origin/master"],
        )
        .await;
        git(dest, &["checkout", "-q", "--detach", "origin/master"]).await;
    } else {
        git(
            dest.parent().unwrap(),
            &["clone", "-q", &url, dest.to_str().unwrap()],
        )
        .await;
    }
    assert_eq!(
        std::fs::read_to_string(dest.join("config.json")).unwrap(),
        cratere::git::config_json(PUBLIC_URL),
        "the proxy's config.json"
    );
    let parent = git(dest, &["rev-parse", "HEAD^"]).await;
    assert!(
        upstream.commits.contains(&parent),
        "the clone's commit sits on an upstream commit ({parent})"
    );
    assert_eq!(
        git(dest, &["diff", "--name-only", "HEAD^", "HEAD"]).await,
        "config.json",
        "upstream's tree with only config.json replaced"
    );
    let files = git(dest, &["ls-files"]).await;
    let mut index_files = 0;
    for rel in files.lines().filter(|f| *f != "config.json") {
        let text = std::fs::read_to_string(dest.join(rel)).unwrap();
        assert!(text.ends_with('\n'), "{rel} is whole");
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{rel}: unparsable line {line:?}: {e}"));
            assert_eq!(index_path(v["name"].as_str().unwrap()), rel, "{rel}");
            assert!(v["vers"].is_string() && v["cksum"].is_string(), "{rel}");
        }
        index_files += 1;
    }
    assert!(index_files > 0);
    git(dest, &["fsck", "--no-progress", "--strict"]).await;
    parent
}

/// Files git leaves behind when killed: lock files and temporary packs / objects.
fn git_leftovers(repo: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut dirs = vec![repo.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".lock") || name.starts_with("tmp_") || name.starts_with(".tmp-") {
                out.push(p.strip_prefix(repo).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// How a round changes upstream, where it kills the server, and whether the server's git
/// processes are killed with it (a container or cgroup kill, the OOM killer taking the group)
/// or only the server's pid is (`kill -9`; its git processes then die by their parent-death
/// signal).
struct Round {
    change: Change,
    /// Steps to see first (in the same sync, before `then`).
    first: &'static [&'static str],
    then: &'static [&'static str],
    kill_git_too: bool,
    /// Wait until the step writes a temporary file in the mirror.
    mid_write: bool,
}

enum Change {
    /// A commit adding this many crates.
    Crates(usize),
    Squash,
}

/// The real binary syncs every second from a fixture upstream repository. Each round changes
/// upstream, kills the server at a chosen step of the sync that follows (found by watching
/// its `git` child processes in /proc; the server is frozen with SIGSTOP at that moment so the
/// kill lands exactly there), restarts it at once on the same directories, and checks that a
/// clone is consistent, that the mirror is connected, and that the next upstream commit is
/// served (no stale lock blocks the sync).
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_a_git_sync_leaves_the_mirror_serving() {
    let t0 = Instant::now();
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let up = FakeUpstream::start().await;
    let mut upstream = Upstream::create(&work.join("upstream")).await;
    upstream.add_crates(&up, "base", 20);
    upstream.commit("Add some crates").await;
    let data = work.join("data");
    let envs = [
        ("CRATERE_UPSTREAM_SPARSE", up.url.clone()),
        ("CRATERE_CACHE", data.join("crates").display().to_string()),
        ("CRATERE_INDEX", data.join("index").display().to_string()),
        ("CRATERE_HOST", "cratere.test".into()),
        ("CRATERE_PORT", "8000".into()),
        ("CRATERE_GIT_INDEX", "true".into()),
        ("CRATERE_UPSTREAM_GIT", upstream.dir.display().to_string()),
        ("CRATERE_INDEX_UPDATE_SCHEDULE", "* * * * * *".into()), // every second
        ("CRATERE_CLEANUP_CACHE_SCHEDULE", "off".into()),
    ];
    let mirror = data.join("index/git/crates.io-index.git");

    let mut server = common::spawn_server(&envs);
    wait_git_ready(&server).await;
    check_clone(&server, &upstream, &work.join("clone-first")).await;

    const AFTER_FETCH: &[&str] = &["hash-object", "ls-tree", "mktree", "show", "commit-tree"];
    let rounds = [
        // A big fetch, killed with its git process: a half-written pack.
        Round {
            change: Change::Crates(300),
            first: &[],
            then: &["fetch"],
            kill_git_too: true,
            mid_write: true,
        },
        // Between the fetch and the publication of the refs.
        Round {
            change: Change::Crates(5),
            first: &["fetch"],
            then: AFTER_FETCH,
            kill_git_too: false,
            mid_write: false,
        },
        // The ref transaction, or the cleanup after it, killed with git: lock files left.
        Round {
            change: Change::Crates(5),
            first: &["fetch"],
            then: &["update-ref", "gc"],
            kill_git_too: true,
            mid_write: false,
        },
        // After the fetch of a squashed upstream, before anything is published: the restarted
        // server must still prune the old history.
        Round {
            change: Change::Squash,
            first: &["fetch"],
            then: AFTER_FETCH,
            kill_git_too: false,
            mid_write: false,
        },
        // The repack and prune that follow a squash.
        Round {
            change: Change::Squash,
            first: &[],
            then: &["repack", "prune"],
            kill_git_too: true,
            mid_write: false,
        },
        // A big fetch, only the server killed: its git must not outlive it.
        Round {
            change: Change::Crates(300),
            first: &[],
            then: &["fetch"],
            kill_git_too: false,
            mid_write: false,
        },
    ];
    for (n, round) in rounds.iter().enumerate() {
        // The upstream commit a squash makes unreachable.
        let squashed = match round.change {
            Change::Crates(count) => {
                upstream.add_crates(&up, &format!("r{n}x"), count);
                upstream.commit(&format!("Round {n}")).await;
                None
            }
            Change::Squash => {
                let old = git(&upstream.dir, &["rev-parse", "HEAD"]).await;
                upstream.squash().await;
                Some(old.trim().to_string())
            }
        };
        // Git processes already running saw upstream before the change.
        let pid = server.child.id();
        let ignore: HashSet<u32> = git_children(pid).iter().map(|k| k.pid).collect();
        let (first, then) = (round.first, round.then);
        let mid_write = round.mid_write.then(|| mirror.clone());
        let (step, groups) = tokio::task::spawn_blocking(move || {
            stop_during(pid, &ignore, first, then, mid_write.as_deref())
        })
        .await
        .unwrap();
        if round.kill_git_too {
            for g in &groups {
                signal(-(*g as i32), libc::SIGKILL);
            }
        }
        server.kill_hard();
        // Killed with it, or (the server's pid alone) dying with it by their parent-death
        // signal: no git outlives the server to race the next one's sync.
        common::wait_until(
            || !any_alive(&groups),
            "the server's git processes to be gone",
        )
        .await;
        eprintln!(
            "round {n} ({:.1} s): killed during git {step} (git killed too: {}); left in the \
             mirror: {:?}",
            t0.elapsed().as_secs_f64(),
            round.kill_git_too,
            git_leftovers(&mirror)
        );

        // Restarted at once on the same directories.
        server = common::spawn_server(&envs);
        wait_git_ready(&server).await;
        check_clone(&server, &upstream, &work.join(format!("clone-{n}"))).await;

        // No stale lock blocks the next sync: a new upstream commit is served.
        upstream.add_crates(&up, &format!("probe{n}x"), 1);
        let probe = upstream.commit(&format!("Probe {n}")).await;
        let s = &server;
        common::wait_until(
            || logged_sync(s, &[&format!("upstream_head={probe}")]),
            &format!("round {n}: a sync of upstream commit {probe}"),
        )
        .await;
        let served = check_clone(&server, &upstream, &work.join(format!("clone-{n}"))).await;
        assert_eq!(served, probe, "round {n}: the new commit is served");
        assert!(
            temp_packs(&mirror).is_empty(),
            "round {n}: leftover temporary packs are removed: {:?}",
            temp_packs(&mirror)
        );
        if let Some(old) = squashed {
            // At most two syncs later (one more when the kill came after the fetch).
            let s = &server;
            common::wait_until(
                || logged_sync(s, &["pruned=true"]),
                &format!("round {n}: the interrupted prune is done after the restart"),
            )
            .await;
            let gone = common::git::git_output(&mirror, &["cat-file", "-e", &old]).await;
            assert!(
                !gone.status.success(),
                "round {n}: the squashed-away upstream commit {old} is pruned from the mirror"
            );
        }
        git(&mirror, &["fsck", "--connectivity-only", "--no-progress"]).await;
    }
    server.kill_hard();
    git(&mirror, &["fsck", "--connectivity-only", "--no-progress"]).await;
    eprintln!(
        "left in the mirror at the end: {:?} ({:.1} s)",
        git_leftovers(&mirror),
        t0.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// kill -9 during a cleanup

/// The real binary with only the given `CRATERE_*` variables.
fn cratere(envs: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cratere"));
    for (k, _) in std::env::vars() {
        if k.starts_with("CRATERE_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_LOG", "warn");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd
}

/// Every file under `root` (dot-entries included), relative path → content.
fn all_files(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                dirs.push(p);
            } else {
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

#[test]
fn kill_9_during_a_cleanup_leaves_whole_files_and_no_lock() {
    // 60 crates of 50 versions each: few directories, which are slow to create and remove on
    // some filesystems.
    const NAMES: usize = 60;
    const VERSIONS: usize = 50;
    const FILES: usize = NAMES * VERSIONS;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("crates");
    let envs = [
        ("CRATERE_CACHE", cache.display().to_string()),
        (
            "CRATERE_INDEX",
            dir.path().join("index").display().to_string(),
        ),
        // 8.6 s: every file below is older.
        ("CRATERE_MAX_DAYS_UNUSED", "0.0001".to_string()),
        ("CRATERE_CLEANUP_CACHE_SCHEDULE", "off".to_string()),
        ("CRATERE_GIT_INDEX", "false".to_string()),
        // Never contacted: nothing is requested.
        ("CRATERE_UPSTREAM_SPARSE", "http://127.0.0.1:9/".to_string()),
    ];
    // Crate files last used 30 days ago, one second apart: the cleanup removes them oldest
    // first, file 0 first. Each has its own content and size. (Polling the oldest file below
    // is polling the file count until it drops.)
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::write(
        cache.join(cratere::storage::fs::TRACKED_MARKER),
        "tracked\n",
    )
    .unwrap();
    let start = SystemTime::now() - Duration::from_secs(30 * 86_400);
    let mut crates = BTreeMap::new();
    let mut order = Vec::new();
    for i in 0..FILES {
        let (name, version) = (format!("gone{:02}", i % NAMES), i / NAMES);
        let rel = format!("{}/{name}-1.0.{version}.crate", index_path(&name));
        let content: Vec<u8> = format!("{name} {version} whole content; ")
            .bytes()
            .cycle()
            .take(500 + i % 1500)
            .collect();
        let path = cache.join(&rel);
        write(&path, std::str::from_utf8(&content).unwrap());
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(start + Duration::from_secs(i as u64))
            .unwrap();
        crates.insert(rel.clone(), content);
        order.push(rel);
    }

    let mut cleanup = cratere(&envs)
        .arg("cleanup")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Polls (bounded) until the pass has removed its first file, then kills it.
    let oldest = cache.join(&order[0]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while oldest.exists() {
        if let Some(status) = cleanup.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(cleanup.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("the cleanup ended ({status}) before it removed anything: {err}");
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the cleanup to start removing"
        );
        std::thread::sleep(Duration::from_micros(100));
    }
    cleanup.kill().unwrap(); // SIGKILL
    cleanup.wait().unwrap();

    // Whatever is left is whole; the pass stopped in the middle, oldest files gone first.
    let mut left = all_files(&cache);
    assert!(left.remove(cratere::storage::fs::TRACKED_MARKER).is_some());
    assert!(
        left.remove(cratere::cleanup::LOCK_FILE).is_some(),
        "the lock file stays (an flock, not the file, is the lock)"
    );
    let removed = FILES - left.len();
    eprintln!("killed after {removed} of {FILES} files were removed");
    assert!(
        removed > 0 && removed < FILES,
        "the kill landed mid-pass ({removed} of {FILES} removed)"
    );
    for (rel, content) in &left {
        assert_eq!(
            crates.get(rel),
            Some(content),
            "{rel} is one of ours, whole"
        );
    }
    for (i, rel) in order.iter().enumerate() {
        assert_eq!(
            left.contains_key(rel),
            i >= removed,
            "{rel}: oldest removed first"
        );
    }
    // The flock died with the process.
    let lock = std::fs::File::options()
        .write(true)
        .open(cache.join(cratere::cleanup::LOCK_FILE))
        .unwrap();
    lock.try_lock().expect("nobody holds the cleanup lock");
    drop(lock);

    // The next start finds no temp files; a cleanup next to the running server completes and
    // removes the rest.
    let mut server = common::spawn_server(&envs);
    let tmp: Vec<_> = std::fs::read_dir(cache.join(".tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "no temp files after the start: {tmp:?}");
    let out = cratere(&envs).arg("cleanup").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "second cleanup: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(
        summary.contains(&format!("removed {} crate files", left.len()))
            && summary.contains("; 0 crate files"),
        "{summary}"
    );
    let rest: Vec<String> = all_files(&cache)
        .into_keys()
        .filter(|f| f.ends_with(".crate"))
        .collect();
    assert!(rest.is_empty(), "{} crate files remain", rest.len());
    server.kill_hard();
}

/// A git process blocked on an upstream that never answers would outlive a `kill -9` of the
/// server (nothing else stops it). Its parent-death signal kills it with the server.
#[tokio::test(flavor = "multi_thread")]
async fn git_dies_with_a_killed_server() {
    // An upstream that accepts connections and never answers.
    let hang = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::spawn_server(&[
        (
            "CRATERE_CACHE",
            dir.path().join("crates").display().to_string(),
        ),
        (
            "CRATERE_INDEX",
            dir.path().join("index").display().to_string(),
        ),
        ("CRATERE_UPSTREAM_SPARSE", "http://127.0.0.1:9/".into()),
        (
            "CRATERE_UPSTREAM_GIT",
            format!("http://{}/index.git", hang.local_addr().unwrap()),
        ),
        ("CRATERE_GIT_INDEX", "true".into()),
    ]);
    // The first sync starts at once; its `git fetch` connects and waits.
    let (_conn, _) = tokio::task::spawn_blocking(move || hang.accept().unwrap())
        .await
        .unwrap();
    let pid = server.child.id();
    let fetch: Vec<u32> = git_children(pid)
        .iter()
        .filter(|c| c.step == "fetch" && !c.zombie)
        .map(|c| c.pid)
        .collect();
    assert_eq!(fetch.len(), 1, "one git fetch under the server");
    server.kill_hard();
    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            let close = stat.rfind(')').unwrap();
            !stat[close + 2..].starts_with('Z')
        })
    };
    common::wait_until(|| !alive(fetch[0]), "git fetch to die with the server").await;
}

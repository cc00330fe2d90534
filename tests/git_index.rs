//! The git index: a fixture upstream repository (crates.io layout) built here, mirrored by the
//! proxy and served over smart HTTP to the real cargo (libgit2 and the git CLI) and to the git
//! CLI (protocol v0 and v2); syncs, squashes and pruning, alternate hosts, a clone during a
//! sync, readiness, an unreachable upstream, and what is refused.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::cargo::{assert_ok, dep, package_crates, write};
use common::{FakeUpstream, Proxy, client, index_path, wait_until};
use cratere::config::{AlternateHosts, HostPort};
use cratere::git::{GitIndex, SyncStatus, config_json};

/// Schedule that fires once a year: only the sync at startup runs by itself.
const YEARLY: &str = "0 0 1 1 *";

const UPSTREAM_CONFIG: &str =
    "{\n  \"dl\": \"https://static.crates.io/crates\",\n  \"api\": \"https://crates.io\"\n}\n";

use common::git::{git, git_output};

/// The upstream git index: a plain repository with crates.io's layout.
struct Upstream {
    dir: PathBuf,
}

impl Upstream {
    async fn create(dir: &Path) -> Upstream {
        std::fs::create_dir_all(dir).unwrap();
        git(dir, &["init", "-q", "-b", "master"]).await;
        let up = Upstream {
            dir: dir.to_path_buf(),
        };
        up.put("config.json", UPSTREAM_CONFIG);
        up.commit("Initial commit").await;
        up
    }

    fn put(&self, rel: &str, content: &str) {
        write(&self.dir.join(rel), content);
    }

    /// Writes the index file of each crate as the fake sparse upstream serves it.
    fn put_index(&self, up: &FakeUpstream, names: &[&str]) {
        for name in names {
            self.put(&index_path(name), &up.index_file(name));
        }
    }

    async fn commit(&self, msg: &str) -> String {
        git(&self.dir, &["add", "-A"]).await;
        git(&self.dir, &["commit", "-q", "-m", msg]).await;
        self.head().await
    }

    /// What crates.io does now and then: master's tree as one parentless commit, force-moved
    /// onto master.
    async fn squash(&self) -> String {
        git(&self.dir, &["add", "-A"]).await;
        git(&self.dir, &["checkout", "-q", "--orphan", "squashed"]).await;
        git(
            &self.dir,
            &["commit", "-q", "-m", "Collapse index into one commit"],
        )
        .await;
        git(&self.dir, &["branch", "-M", "master"]).await;
        self.head().await
    }

    async fn head(&self) -> String {
        git(&self.dir, &["rev-parse", "HEAD"]).await
    }
}

async fn git_proxy(
    up: &FakeUpstream,
    data: &Path,
    upstream_git: &str,
    schedule: &str,
    alternates: &[&str],
) -> Proxy {
    let mut c = Proxy::config(&up.url, data);
    c.git.git_index = true;
    c.git.upstream_git = upstream_git.parse().unwrap();
    c.git.index_update_schedule = schedule.parse().unwrap();
    c.public.alternate_hosts = AlternateHosts(
        alternates
            .iter()
            .map(|h| HostPort::parse(h).unwrap())
            .collect(),
    );
    Proxy::start_with(c).await
}

fn mirror(p: &Proxy) -> &GitIndex {
    p.state.git.as_deref().expect("git index on")
}

/// Waits (bounded) for a status the sync job publishes.
async fn wait_status(p: &Proxy, what: &str, cond: impl Fn(&SyncStatus) -> bool) -> SyncStatus {
    let mut rx = mirror(p).subscribe();
    tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|s| cond(s)))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap()
        .clone()
}

/// Waits for the startup sync, which must succeed.
async fn first_sync(p: &Proxy) {
    let s = wait_status(p, "the first sync", |s| s.attempts >= 1 && !s.running).await;
    let last = s.last.unwrap();
    assert!(last.result.is_ok(), "first sync: {:?}", last.result);
}

/// `git clone` of the proxy's index; `config` are extra `-c` settings.
async fn clone(proxy: &Proxy, dest: &Path, config: &[&str]) -> Output {
    let url = format!("{}/crates.io-index", proxy.url);
    let mut args = Vec::new();
    for c in config {
        args.extend(["-c", c]);
    }
    args.extend(["clone", "-q", &url, dest.to_str().unwrap()]);
    git_output(dest.parent().unwrap(), &args).await
}

async fn clone_ok(proxy: &Proxy, dest: &Path, config: &[&str]) {
    let out = clone(proxy, dest, config).await;
    assert!(
        out.status.success(),
        "clone {config:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

/// A CARGO_HOME whose crates.io source is replaced by the proxy's git index.
fn cargo_home(dir: &Path, proxy_url: &str) -> PathBuf {
    write(
        &dir.join("config.toml"),
        &format!(
            "[source.crates-io]\nreplace-with = \"cratere\"\n\n[source.cratere]\n\
             registry = \"{proxy_url}/crates.io-index\"\n\n[net]\nretry = 0\n"
        ),
    );
    dir.to_path_buf()
}

async fn cargo(project: &Path, home: &Path, git_cli: bool, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO"))
        .args(args)
        .current_dir(project)
        .env("CARGO_HOME", home)
        .env("CARGO_TARGET_DIR", project.join("target"))
        .env("CARGO_NET_GIT_FETCH_WITH_CLI", git_cli.to_string())
        .env_remove("CARGO_REGISTRIES_CRATES_IO_PROTOCOL")
        .env("CARGO_HTTP_TIMEOUT", "20")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn cargo_builds_through_the_git_index_with_libgit2_and_the_git_cli_and_follows_a_squash() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let crates = package_crates(&work.join("src-crates"));
    let up = FakeUpstream::start().await;
    for (name, version, bytes) in &crates {
        let deps = if name == "beta" {
            dep("alpha", "^0.1")
        } else {
            "[]".into()
        };
        up.publish_bytes(name, version, bytes.clone(), &deps);
    }
    let upstream = Upstream::create(&work.join("upstream")).await;
    upstream.put_index(&up, &["alpha", "beta", "Mixed_Case"]);
    upstream.commit("Add three crates").await;

    let proxy = git_proxy(
        &up,
        &work.join("data"),
        upstream.dir.to_str().unwrap(),
        YEARLY,
        &[],
    )
    .await;
    first_sync(&proxy).await;

    let mut projects = Vec::new();
    for git_cli in [false, true] {
        let project = work.join(format!("app-cli-{git_cli}"));
        write(
            &project.join("Cargo.toml"),
            "[package]\nname = \"app\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\n\
             [dependencies]\nbeta = \"0.2\"\nMixed_Case = \"1\"\n",
        );
        write(
            &project.join("src/main.rs"),
            "fn main() { println!(\"{}\", beta::two() + Mixed_Case::three()); }\n",
        );
        let home = cargo_home(&work.join(format!("home-cli-{git_cli}")), &proxy.url);
        let out = cargo(&project, &home, git_cli, &["build"]).await;
        assert_ok(
            &out,
            &format!("cargo build, git-fetch-with-cli = {git_cli}"),
        );
        let run = std::process::Command::new(project.join("target/debug/app"))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&run.stdout).trim(), "5");
        let lock = read(&project.join("Cargo.lock"));
        for (name, version, bytes) in &crates {
            assert!(
                lock.contains(&format!("name = \"{name}\"\nversion = \"{version}\"")),
                "{lock}"
            );
            assert!(lock.contains(&common::sha256_hex(bytes)), "{name} checksum");
        }
        projects.push((project, home, git_cli));
    }
    // The git-served config.json sent both cargos' downloads through the proxy's cache.
    for (name, version, _) in &crates {
        assert_eq!(up.crate_hits(name, version), 1, "{name}");
    }
    assert_eq!(
        proxy
            .metric("cratere_cache_requests_total{kind=\"crate\",outcome=\"hit\"}")
            .await,
        3.0
    );

    // A new version upstream, published in a squashed history: both clients follow the forced
    // update.
    up.publish("alpha", "0.1.1", 500);
    upstream.put_index(&up, &["alpha"]);
    upstream.squash().await;
    let report = mirror(&proxy).sync().await.unwrap();
    assert!(report.history_rewritten && report.changed, "{report:?}");
    for (project, home, git_cli) in &projects {
        let out = cargo(project, home, *git_cli, &["update", "-p", "alpha"]).await;
        assert_ok(
            &out,
            &format!("cargo update, git-fetch-with-cli = {git_cli}"),
        );
        let lock = read(&project.join("Cargo.lock"));
        assert!(
            lock.contains("name = \"alpha\"\nversion = \"0.1.1\""),
            "git-fetch-with-cli = {git_cli}: {lock}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_commits_and_squashes_reach_clients_with_config_rewritten_and_history_pruned() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let up = FakeUpstream::start().await;
    up.publish("serde", "1.0.0", 100);
    let upstream = Upstream::create(&work.join("upstream")).await;
    upstream.put_index(&up, &["serde"]);
    let u1 = upstream.commit("Update serde").await;
    let proxy = git_proxy(
        &up,
        &work.join("data"),
        upstream.dir.to_str().unwrap(),
        YEARLY,
        &[],
    )
    .await;
    first_sync(&proxy).await;
    let expected = config_json(&proxy.url);
    let repo = mirror(&proxy).repo_path().to_path_buf();
    // One pack with a reachability bitmap after the first sync (fast full clones).
    let packs: Vec<String> = std::fs::read_dir(repo.join("objects/pack"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(packs.iter().any(|p| p.ends_with(".bitmap")), "{packs:?}");

    // A v2 (git's default) and a v0 client.
    let (c2, c0) = (work.join("clone-v2"), work.join("clone-v0"));
    clone_ok(&proxy, &c2, &[]).await;
    clone_ok(&proxy, &c0, &["protocol.version=0"]).await;
    for c in [&c2, &c0] {
        assert_eq!(read(&c.join("config.json")), expected);
        assert_eq!(read(&c.join("se/rd/serde")), up.index_file("serde"));
        assert_eq!(git(c, &["rev-parse", "HEAD^"]).await, u1);
        assert_eq!(
            git(c, &["diff", "--name-only", "HEAD^", "HEAD"]).await,
            "config.json"
        );
        assert_eq!(
            git(c, &["rev-parse", "--abbrev-ref", "HEAD"]).await,
            "master"
        );
    }

    // An upstream commit.
    up.publish("rand", "0.8.0", 100);
    upstream.put_index(&up, &["rand"]);
    let u2 = upstream.commit("Update rand").await;
    let r = mirror(&proxy).sync().await.unwrap();
    assert!(r.changed && !r.history_rewritten && !r.pruned, "{r:?}");
    assert_eq!(r.upstream_head, u2);
    // Each sync puts a new config.json commit on upstream's new head: for clients it is a
    // forced update (cargo fetches with a forced refspec, as git's default refspec is).
    for c in [&c2, &c0] {
        git(c, &["fetch", "-q"]).await;
        git(c, &["reset", "-q", "--hard", "origin/master"]).await;
        assert_eq!(read(&c.join("ra/nd/rand")), up.index_file("rand"));
        assert_eq!(read(&c.join("config.json")), expected);
        assert_eq!(git(c, &["rev-parse", "HEAD^"]).await, u2);
    }

    // Nothing new upstream: the same commit, no ref moves.
    let before = git(&repo, &["for-each-ref"]).await;
    let r = mirror(&proxy).sync().await.unwrap();
    assert!(!r.changed, "{r:?}");

    // A squash: forced through; the old history is kept one more period for clients that saw
    // the old refs, then pruned.
    let u3 = upstream.squash().await;
    let r = mirror(&proxy).sync().await.unwrap();
    assert!(r.changed && r.history_rewritten && !r.pruned, "{r:?}");
    assert_ne!(before, git(&repo, &["for-each-ref"]).await);
    git(&repo, &["cat-file", "-e", &u2]).await;
    for c in [&c2, &c0] {
        git(c, &["fetch", "-q"]).await;
        git(c, &["reset", "-q", "--hard", "origin/master"]).await;
        assert_eq!(git(c, &["rev-parse", "HEAD^"]).await, u3);
        assert_eq!(git(c, &["rev-list", "--count", "HEAD"]).await, "2");
        assert_eq!(read(&c.join("config.json")), expected);
        assert_eq!(read(&c.join("ra/nd/rand")), up.index_file("rand"));
    }
    let r = mirror(&proxy).sync().await.unwrap();
    assert!(r.pruned && !r.changed, "{r:?}");
    for old in [&u1, &u2] {
        let out = git_output(&repo, &["cat-file", "-e", old]).await;
        assert!(!out.status.success(), "{old} was not pruned");
    }
    // Exactly the reachable objects are left, all in packs.
    let reachable = git(&repo, &["rev-list", "--objects", "--all"]).await;
    let counts = git(&repo, &["count-objects", "-v"]).await;
    let lines: Vec<&str> = counts.lines().collect();
    assert!(lines.contains(&"count: 0"), "{counts}");
    let in_pack = format!("in-pack: {}", reachable.lines().count());
    assert!(lines.contains(&in_pack.as_str()), "{counts}");
    // The clients still fetch fine after the prune.
    git(&c0, &["fetch", "-q"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scheduled_sync_picks_up_an_upstream_commit() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let up = FakeUpstream::start().await;
    let upstream = Upstream::create(&work.join("upstream")).await;
    let proxy = git_proxy(
        &up,
        &work.join("data"),
        upstream.dir.to_str().unwrap(),
        "* * * * * *", // every second
        &[],
    )
    .await;
    first_sync(&proxy).await;
    up.publish("serde", "1.0.0", 100);
    upstream.put_index(&up, &["serde"]);
    let head = upstream.commit("Update serde").await;
    let s = wait_status(&proxy, "a scheduled sync of the new commit", |s| {
        s.last_success
            .as_ref()
            .and_then(|r| r.result.as_ref().ok())
            .is_some_and(|r| r.upstream_head == head)
    })
    .await;
    assert!(s.attempts >= 2);
    let c = work.join("clone");
    clone_ok(&proxy, &c, &[]).await;
    assert_eq!(read(&c.join("se/rd/serde")), up.index_file("serde"));
    assert_eq!(read(&c.join("config.json")), config_json(&proxy.url));

    // The operations view of the same: metrics and the status page.
    assert_eq!(proxy.metric("cratere_git_index_ready").await, 1.0);
    assert_eq!(proxy.metric("cratere_git_sync_last_ok").await, 1.0);
    assert!(proxy.metric("cratere_git_sync_attempts").await >= 2.0);
    assert!(
        proxy
            .metric("cratere_git_sync_last_success_timestamp_seconds")
            .await
            > 1.7e9
    );
    let page = proxy.get("/").await.text().await.unwrap();
    assert!(
        page.contains("serving; last sync") || page.contains("syncing now; last sync"),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn each_host_gets_its_own_config_json_from_one_object_store() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let up = FakeUpstream::start().await;
    up.publish("serde", "1.0.0", 100);
    let upstream = Upstream::create(&work.join("upstream")).await;
    upstream.put_index(&up, &["serde"]);
    upstream.commit("Update serde").await;
    let proxy = git_proxy(
        &up,
        &work.join("data"),
        upstream.dir.to_str().unwrap(),
        YEARLY,
        &["alt.example:9000", "plain.example"],
    )
    .await;
    first_sync(&proxy).await;

    let mut n = 0;
    for (host, base) in [
        (None, proxy.url.clone()),
        (
            Some("alt.example:9000"),
            "http://alt.example:9000".to_string(),
        ),
        (Some("plain.example"), "http://plain.example".to_string()),
        (Some("evil.example"), proxy.url.clone()),
    ] {
        for protocol in ["0", "2"] {
            n += 1;
            let dest = work.join(format!("clone-{n}"));
            let mut config = vec![format!("protocol.version={protocol}")];
            if let Some(h) = host {
                config.push(format!("http.extraHeader=Host: {h}"));
            }
            let config: Vec<&str> = config.iter().map(String::as_str).collect();
            clone_ok(&proxy, &dest, &config).await;
            assert_eq!(
                read(&dest.join("config.json")),
                config_json(&base),
                "Host {host:?}, protocol v{protocol}"
            );
        }
    }

    // HEAD is a symbolic ref to master, for every host.
    let url = format!("{}/crates.io-index", proxy.url);
    let symref = git(work, &["ls-remote", "--symref", &url, "HEAD"]).await;
    assert!(
        symref.starts_with("ref: refs/heads/master\tHEAD"),
        "{symref}"
    );

    // One object store: three hosts cost three commits, three trees and three blobs.
    let repo = mirror(&proxy).repo_path().to_path_buf();
    let masters = git(
        &repo,
        &[
            "for-each-ref",
            "--format=%(refname)",
            "refs/namespaces/*/refs/heads/master",
        ],
    )
    .await;
    assert_eq!(masters.lines().count(), 3, "{masters}");
    let all = git(&repo, &["rev-list", "--objects", "--all"]).await;
    let upstream_only = git(&repo, &["rev-list", "--objects", "refs/cratere/upstream"]).await;
    assert_eq!(
        all.lines().count(),
        upstream_only.lines().count() + 9,
        "{all}"
    );
}

/// pkt-line framing.
/// A proxy with the git index on, one git process slot, and `tweak` applied; synced once.
async fn one_slot_git_proxy(
    up: &FakeUpstream,
    work: &Path,
    upstream: &Upstream,
    tweak: impl FnOnce(&mut cratere::config::GitConfig),
) -> Proxy {
    let mut c = Proxy::config(&up.url, &work.join("data"));
    c.git.git_index = true;
    c.git.upstream_git = upstream.dir.to_str().unwrap().parse().unwrap();
    c.git.index_update_schedule = YEARLY.parse().unwrap();
    c.git.git_max_processes = 1;
    tweak(&mut c.git);
    let proxy = Proxy::start_with(c).await;
    first_sync(&proxy).await;
    proxy
}

type Stalled = (
    tokio::sync::mpsc::Sender<Result<Vec<u8>, std::io::Error>>,
    tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>,
);

/// Starts an upload-pack POST whose body never ends (until the sender is dropped).
async fn stalled_upload_pack(proxy: &Proxy) -> Stalled {
    stalled_upload_pack_on(proxy, client()).await
}

/// [`stalled_upload_pack`] sent by `client`.
async fn stalled_upload_pack_on(proxy: &Proxy, client: reqwest::Client) -> Stalled {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    tx.send(Ok(pkt("want ").into_bytes())).await.unwrap();
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let url = format!("{}/crates.io-index/git-upload-pack", proxy.url);
    let request = tokio::spawn(async move {
        client
            .post(url)
            .header("content-type", "application/x-git-upload-pack-request")
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await
    });
    (tx, request)
}

fn pkt(s: &str) -> String {
    format!("{:04x}{s}", s.len() + 4)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = std::process::Command::new("gzip")
        .arg("-c")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    out.stdout
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clone_during_a_sync_gets_a_consistent_tree() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let up = FakeUpstream::start().await;
    up.publish("serde", "1.0.0", 100);
    let upstream = Upstream::create(&work.join("upstream")).await;
    upstream.put_index(&up, &["serde"]);
    let u1 = upstream.commit("Update serde").await;
    let proxy = git_proxy(
        &up,
        &work.join("data"),
        upstream.dir.to_str().unwrap(),
        YEARLY,
        &[],
    )
    .await;
    first_sync(&proxy).await;
    let expected = config_json(&proxy.url);

    // Protocol v0 over stateless HTTP is two requests: the ref advertisement, then the pack.
    // A sync between them moves master; the want of the advertised commit is still served.
    let adv = client()
        .get(format!(
            "{}/crates.io-index/info/refs?service=git-upload-pack",
            proxy.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(adv.status(), 200);
    assert_eq!(
        adv.headers()["content-type"],
        "application/x-git-upload-pack-advertisement"
    );
    let adv = adv.text().await.unwrap();
    assert!(
        adv.starts_with("001e# service=git-upload-pack\n0000"),
        "{adv}"
    );
    let i = adv.find(" refs/heads/master\n").expect("master advertised");
    let advertised = adv[i - 40..i].to_string();

    up.publish("rand", "0.8.0", 100);
    upstream.put_index(&up, &["rand"]);
    upstream.commit("Update rand").await;
    assert!(mirror(&proxy).sync().await.unwrap().changed);

    // git gzips request bodies over 1 KB; this one is gzipped too.
    let request = format!(
        "{}0000{}",
        pkt(&format!("want {advertised} ofs-delta\n")),
        pkt("done\n")
    );
    let resp = client()
        .post(format!("{}/crates.io-index/git-upload-pack", proxy.url))
        .header("content-type", "application/x-git-upload-pack-request")
        .header("content-encoding", "gzip")
        .body(gzip(request.as_bytes()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "application/x-git-upload-pack-result"
    );
    let body = resp.bytes().await.unwrap();
    assert!(body.starts_with(b"0008NAK\nPACK"), "{:?}", &body[..20]);
    let pack = work.join("old.pack");
    std::fs::write(&pack, &body[8..]).unwrap();
    let store = work.join("store.git");
    git(work, &["init", "-q", "--bare", store.to_str().unwrap()]).await;
    let out = std::process::Command::new("git")
        .args(["index-pack", "--stdin"])
        .current_dir(&store)
        .stdin(std::fs::File::open(&pack).unwrap())
        .output()
        .unwrap();
    assert_ok(&out, "index-pack");
    assert_eq!(
        git(&store, &["show", &format!("{advertised}:config.json")]).await + "\n",
        expected
    );
    assert_eq!(
        git(&store, &["rev-parse", &format!("{advertised}^")]).await,
        u1
    );

    // Real clones (v0 and v2) while syncs keep moving master: every clone completes, and its
    // tree is exactly upstream's commit plus this host's config.json.
    let syncs = async {
        for generation in 0..6 {
            upstream.put("generation", &format!("{generation}\n"));
            upstream.commit(&format!("generation {generation}")).await;
            assert!(mirror(&proxy).sync().await.unwrap().changed);
        }
    };
    let clones = async {
        for n in 0..8 {
            let dest = work.join(format!("during-{n}"));
            let protocol = format!("protocol.version={}", n % 2 * 2);
            clone_ok(&proxy, &dest, &[&protocol]).await;
            assert_eq!(read(&dest.join("config.json")), expected);
            assert_eq!(
                git(&dest, &["diff", "--name-only", "HEAD^", "HEAD"]).await,
                "config.json"
            );
            git(&dest, &["fsck", "--no-progress", "--strict"]).await;
        }
    };
    tokio::join!(syncs, clones);
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_503_with_retry_after_until_the_first_sync_while_sparse_and_downloads_work() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let up = FakeUpstream::start().await;
    let bytes = up.publish("serde", "1.0.0", 1000);
    let later = work.join("upstream-later");
    let proxy = git_proxy(
        &up,
        &work.join("data"),
        later.to_str().unwrap(),
        YEARLY,
        &[],
    )
    .await;
    let s = wait_status(&proxy, "the failed first sync", |s| s.failures >= 1).await;
    assert!(!s.ready);
    assert!(
        s.last
            .unwrap()
            .result
            .unwrap_err()
            .contains("upstream-later")
    );

    for resp in [
        proxy
            .get("/crates.io-index/info/refs?service=git-upload-pack")
            .await,
        client()
            .post(format!("{}/crates.io-index.git/git-upload-pack", proxy.url))
            .header("content-type", "application/x-git-upload-pack-request")
            .body("0000")
            .send()
            .await
            .unwrap(),
    ] {
        assert_eq!(resp.status(), 503);
        let retry: u64 = resp.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((5..=300).contains(&retry), "{retry}");
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain")
        );
        assert!(resp.text().await.unwrap().contains("not ready"));
    }
    let out = clone(&proxy, &work.join("clone"), &[]).await;
    assert!(!out.status.success());

    // The sparse index and downloads do not depend on the git mirror.
    let resp = proxy.get("/index/se/rd/serde").await;
    assert_eq!(resp.status(), 200);
    let resp = proxy.get("/api/v1/crates/serde/1.0.0/download").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap(), bytes);

    // Upstream appears; the next sync makes the index available.
    let upstream = Upstream::create(&later).await;
    upstream.put_index(&up, &["serde"]);
    upstream.commit("Update serde").await;
    mirror(&proxy).sync().await.unwrap();
    assert!(mirror(&proxy).status().ready);
    clone_ok(&proxy, &work.join("clone"), &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_upstream_leaves_the_last_mirror_and_everything_else_serving() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let up = FakeUpstream::start().await;
    let bytes = up.publish("serde", "1.0.0", 1000);
    let upstream = Upstream::create(&work.join("upstream")).await;
    upstream.put_index(&up, &["serde"]);
    upstream.commit("Update serde").await;
    let data = work.join("data");
    let proxy = git_proxy(&up, &data, upstream.dir.to_str().unwrap(), YEARLY, &[]).await;
    first_sync(&proxy).await;

    std::fs::rename(&upstream.dir, work.join("gone")).unwrap();
    let err = mirror(&proxy).sync().await.unwrap_err();
    assert!(
        format!("{err:#}").contains("CRATERE_UPSTREAM_GIT"),
        "{err:#}"
    );
    let s = mirror(&proxy).status();
    assert!(s.ready && s.failures == 1 && s.last_success.is_some());

    clone_ok(&proxy, &work.join("clone"), &[]).await;
    assert_eq!(
        read(&work.join("clone/se/rd/serde")),
        up.index_file("serde")
    );
    assert_eq!(proxy.get("/index/se/rd/serde").await.status(), 200);
    let resp = proxy.get("/api/v1/crates/serde/1.0.0/download").await;
    assert_eq!(resp.bytes().await.unwrap(), bytes);
    drop(proxy);

    // A restart (same public URL) with upstream still unreachable serves the mirror on disk
    // at once.
    let mut config = Proxy::config(&up.url, &work.join("data-3"));
    config.git.git_index = true;
    config.git.upstream_git = work.join("gone").to_str().unwrap().parse().unwrap();
    let hosts = cratere::hosts::PublicHosts::new(&config.public);
    GitIndex::new(&config.git, &config.storage.index, &hosts)
        .sync()
        .await
        .unwrap();
    config.git.upstream_git = upstream.dir.to_str().unwrap().parse().unwrap();
    let restarted = GitIndex::new(&config.git, &config.storage.index, &hosts);
    assert!(!restarted.status().ready);
    restarted.sync().await.unwrap_err();
    assert!(restarted.status().ready);
    // With another public URL, the mirror on disk has the wrong config.json: not ready.
    config.public.port += 1;
    let moved = GitIndex::new(
        &config.git,
        &config.storage.index,
        &cratere::hosts::PublicHosts::new(&config.public),
    );
    moved.sync().await.unwrap_err();
    assert!(!moved.status().ready);

    // An http upstream that refuses connections fails the sync quickly too.
    let proxy = git_proxy(
        &up,
        &work.join("data-2"),
        "http://127.0.0.1:9/index.git",
        YEARLY,
        &[],
    )
    .await;
    let s = wait_status(&proxy, "the failed first sync", |s| s.failures >= 1).await;
    assert!(!s.ready);
    assert_eq!(proxy.get("/index/se/rd/serde").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn only_fetching_over_smart_http_is_served() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let up = FakeUpstream::start().await;
    let upstream = Upstream::create(&work.join("upstream")).await;
    let proxy = git_proxy(
        &up,
        &work.join("data"),
        upstream.dir.to_str().unwrap(),
        YEARLY,
        &[],
    )
    .await;
    first_sync(&proxy).await;

    for (method, path, status) in [
        (
            "GET",
            "/crates.io-index/info/refs?service=git-receive-pack",
            403,
        ),
        ("POST", "/crates.io-index/git-receive-pack", 403),
        ("POST", "/crates.io-index.git/git-receive-pack", 403),
        ("GET", "/crates.io-index/info/refs", 404),
        ("GET", "/crates.io-index/HEAD", 404),
        ("GET", "/crates.io-index/objects/info/packs", 404),
        ("GET", "/crates.io-index.git/config", 404),
    ] {
        let resp = client()
            .request(method.parse().unwrap(), format!("{}{path}", proxy.url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "{method} {path}");
    }

    // `.git` works as well; pushing does not.
    let url = format!("{}/crates.io-index.git", proxy.url);
    let dest = work.join("clone");
    git(work, &["clone", "-q", &url, dest.to_str().unwrap()]).await;
    assert_eq!(read(&dest.join("config.json")), config_json(&proxy.url));
    write(&dest.join("x"), "x");
    git(&dest, &["add", "x"]).await;
    git(&dest, &["commit", "-q", "-m", "x"]).await;
    let out = git_output(&dest, &["push", "-q", "origin", "HEAD:master"]).await;
    assert!(!out.status.success());

    // With the git index off, the routes say so.
    let plain = Proxy::start(&up, &work.join("data-plain")).await;
    let resp = plain
        .get("/crates.io-index/info/refs?service=git-upload-pack")
        .await;
    assert_eq!(resp.status(), 404);
    assert!(resp.text().await.unwrap().contains("CRATERE_GIT_INDEX"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_goes_away_leaves_no_git_process_behind() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let up = FakeUpstream::start().await;
    let upstream = Upstream::create(&work.join("upstream")).await;
    let proxy = git_proxy(
        &up,
        &work.join("data"),
        upstream.dir.to_str().unwrap(),
        YEARLY,
        &[],
    )
    .await;
    first_sync(&proxy).await;

    // A request body that never ends: http-backend waits for the rest of it.
    let (tx, request) = stalled_upload_pack(&proxy).await;
    let git = mirror(&proxy);
    wait_until(|| !git.running_backends().is_empty(), "a running backend").await;
    let pid = git.running_backends()[0];
    assert!(Path::new(&format!("/proc/{pid}")).exists());

    request.abort();
    let _ = request.await;
    wait_until(
        || git.running_backends().is_empty() && !Path::new(&format!("/proc/{pid}")).exists(),
        "the backend to be gone",
    )
    .await;
    drop(tx);
}

#[tokio::test(flavor = "multi_thread")]
async fn hosts_removed_from_the_configuration_lose_their_refs() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let upstream = Upstream::create(&work.join("upstream")).await;
    let mut config = Proxy::config("http://127.0.0.1:9/", &work.join("data"));
    config.git.git_index = true;
    config.git.upstream_git = upstream.dir.to_str().unwrap().parse().unwrap();
    config.public.alternate_hosts = AlternateHosts(vec![
        HostPort::parse("alt.example:9000").unwrap(),
        HostPort::parse("gone.example").unwrap(),
    ]);
    let hosts = cratere::hosts::PublicHosts::new(&config.public);
    let first = GitIndex::new(&config.git, &config.storage.index, &hosts);
    first.sync().await.unwrap();
    let repo = first.repo_path().to_path_buf();
    let refs = git(&repo, &["for-each-ref", "--format=%(refname)"]).await;
    assert!(
        refs.contains("refs/namespaces/gone%2Eexample/HEAD"),
        "{refs}"
    );

    config.public.alternate_hosts.0.pop();
    let second = GitIndex::new(
        &config.git,
        &config.storage.index,
        &cratere::hosts::PublicHosts::new(&config.public),
    );
    assert!(!second.sync().await.unwrap().changed);
    let refs = git(&repo, &["for-each-ref", "--format=%(refname)"]).await;
    assert!(!refs.contains("gone%2Eexample"), "{refs}");
    assert!(
        refs.contains("refs/namespaces/alt%2Eexample%3A9000/refs/heads/master"),
        "{refs}"
    );
    assert_eq!(
        git(
            &repo,
            &["symbolic-ref", "refs/namespaces/alt%2Eexample%3A9000/HEAD"]
        )
        .await,
        "refs/namespaces/alt%2Eexample%3A9000/refs/heads/master"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn git_processes_are_bounded_and_stalled_request_bodies_cut_off() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let up = FakeUpstream::start().await;
    let upstream = Upstream::create(&work.join("upstream")).await;
    let proxy = one_slot_git_proxy(&up, work, &upstream, |g| {
        g.git_body_timeout = Duration::from_secs(1)
    })
    .await;

    // A request body that never ends holds the one process slot...
    let (tx, stalled) = stalled_upload_pack(&proxy).await;
    let git = mirror(&proxy);
    wait_until(|| !git.running_backends().is_empty(), "a running backend").await;
    let refs = "/crates.io-index/info/refs?service=git-upload-pack";
    let r = proxy.get(refs).await;
    assert_eq!(r.status(), 503, "beyond CRATERE_GIT_MAX_PROCESSES");
    assert!(r.headers().contains_key("retry-after"));
    // ...until its body deadline passes: stdin is closed, git exits, the slot is free.
    wait_until(
        || git.running_backends().is_empty(),
        "the stalled backend to exit",
    )
    .await;
    common::wait_until_async(
        || async { proxy.get(refs).await.status() == 200 },
        "the slot to be free",
    )
    .await;
    drop(tx);
    let _ = stalled.await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_a_pack_loses_its_git_processes() {
    use tokio::io::AsyncWriteExt;
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let up = FakeUpstream::start().await;
    let upstream = Upstream::create(&work.join("upstream")).await;
    // 24 MiB that do not compress: a pack far larger than the socket buffers.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let noise: Vec<u8> = (0..24u64 << 20)
        .map(|_| {
            // xorshift64: incompressible enough for zlib.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect();
    std::fs::write(upstream.dir.join("noise.bin"), &noise).unwrap();
    upstream.commit("noise").await;
    let proxy = one_slot_git_proxy(&up, work, &upstream, |g| {
        g.git_send_timeout = Duration::from_secs(1)
    })
    .await;

    let refs = "/crates.io-index/info/refs?service=git-upload-pack";
    let adv = proxy.get(refs).await.text().await.unwrap();
    let at = adv.find(" refs/heads/master").expect("master advertised");
    let want = &adv[at - 40..at];
    let body = format!("{}0000{}", pkt(&format!("want {want}\n")), pkt("done\n"));
    // A clone that never reads its answer.
    let mut idle = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "POST /crates.io-index/git-upload-pack HTTP/1.1\r\nHost: x\r\n\
         Content-Type: application/x-git-upload-pack-request\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    idle.write_all(head.as_bytes()).await.unwrap();
    idle.write_all(body.as_bytes()).await.unwrap();
    let git = mirror(&proxy);
    wait_until(|| !git.running_backends().is_empty(), "a running backend").await;
    let pid = git.running_backends()[0];
    assert_eq!(proxy.get(refs).await.status(), 503, "its slot is taken");
    // Past CRATERE_GIT_SEND_TIMEOUT with the pack unread: git is killed, the slot freed.
    common::wait_until_async(
        || async { proxy.get(refs).await.status() == 200 },
        "the slot of the stalled clone to be freed",
    )
    .await;
    let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false);
    assert!(!alive, "http-backend {pid} was killed");
    drop(idle);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gzip_request_body_is_capped_after_inflation() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let up = FakeUpstream::start().await;
    let upstream = Upstream::create(&work.join("upstream")).await;
    let proxy = one_slot_git_proxy(&up, work, &upstream, |g| g.git_max_body = 1 << 20).await;

    // 64 MiB of flush packets gzip to about 64 KiB: far below the cap before inflation.
    let mut request = pkt("want 0000000000000000000000000000000000000000\n").into_bytes();
    request.resize(64 << 20, b'0');
    let bomb = gzip(&request);
    assert!(bomb.len() < 1 << 20, "{} bytes of gzip", bomb.len());
    let resp = client()
        .post(format!("{}/crates.io-index/git-upload-pack", proxy.url))
        .header("content-type", "application/x-git-upload-pack-request")
        .header("content-encoding", "gzip")
        .body(bomb)
        .send()
        .await
        .unwrap();
    // http-backend has already answered 200; the body is cut at the inflated cap and git
    // exits on a truncated request, sending no pack.
    let body = resp.bytes().await.unwrap_or_default();
    assert!(!body.windows(4).any(|w| w == b"PACK"));
    let git = mirror(&proxy);
    wait_until(|| git.running_backends().is_empty(), "git to exit").await;
    let limited = r#"cratere_git_requests_limited{limit="body_too_large"}"#;
    assert_eq!(proxy.metric(limited).await, 1.0);
    assert_eq!(
        proxy
            .metric(r#"cratere_git_requests_limited{limit="body_too_slow"}"#)
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_http2_connection_cannot_take_every_git_process() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let up = FakeUpstream::start().await;
    let upstream = Upstream::create(&work.join("upstream")).await;
    let proxy = one_slot_git_proxy(&up, work, &upstream, |g| g.git_max_processes = 8).await;

    // One HTTP/2 connection, its streams multiplexed: two stalled upload-packs hold two
    // processes; its third git request is refused, though six process slots are free.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let first = stalled_upload_pack_on(&proxy, h2.clone()).await;
    let second = stalled_upload_pack_on(&proxy, h2.clone()).await;
    let git = mirror(&proxy);
    wait_until(|| git.running_backends().len() == 2, "two running backends").await;
    let refs = format!(
        "{}/crates.io-index/info/refs?service=git-upload-pack",
        proxy.url
    );
    let third = h2.get(&refs).send().await.unwrap();
    assert_eq!(third.version(), reqwest::Version::HTTP_2);
    assert_eq!(third.status(), 503, "{:?}", third.text().await);
    // Non-git requests on the same connection, and git on another connection, go on.
    let health = h2
        .get(format!("{}/health", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(
        proxy
            .get("/crates.io-index/info/refs?service=git-upload-pack")
            .await
            .status(),
        200
    );
    assert_eq!(
        proxy
            .metric(r#"cratere_git_requests_limited{limit="busy"}"#)
            .await,
        1.0
    );
    // When one of its requests ends, the connection may send another.
    drop(first);
    common::wait_until_async(
        || async { h2.get(&refs).send().await.unwrap().status() == 200 },
        "a per-connection slot to be free",
    )
    .await;
    drop(second);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sync_revalidates_the_cached_sparse_files_it_saw_change() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let up = FakeUpstream::start().await;
    up.publish("serde", "1.0.0", 100);
    up.publish("rand", "0.8.0", 100);
    let upstream = Upstream::create(&work.join("upstream")).await;
    upstream.put_index(&up, &["serde", "rand"]);
    upstream.commit("serde and rand").await;
    let proxy = git_proxy(
        &up,
        &work.join("data"),
        upstream.dir.to_str().unwrap(),
        YEARLY,
        &[],
    )
    .await;
    first_sync(&proxy).await;
    // serde's sparse file is cached (fresh for the tests' hour-long TTL); rand's is not.
    let sparse = format!("/index/{}", index_path("serde"));
    assert_eq!(
        proxy.get(&sparse).await.headers()["x-cratere-cache"],
        "miss"
    );

    up.publish("serde", "1.0.1", 100);
    up.publish("rand", "0.8.1", 100);
    upstream.put_index(&up, &["serde", "rand"]);
    upstream.commit("new versions").await;
    let report = mirror(&proxy).sync().await.unwrap();
    assert_eq!(report.files_changed, 2);
    let changed = r#"cratere_index_background_refreshes_changed_total{reason="git_sync"}"#;
    common::wait_until_async(
        || async { proxy.metric(changed).await == 1.0 },
        "serde's sparse file to be revalidated",
    )
    .await;
    let r = proxy.get(&sparse).await;
    assert_eq!(r.headers()["x-cratere-cache"], "hit");
    assert!(
        r.text().await.unwrap().contains("1.0.1"),
        "fresh within its TTL"
    );
    assert_eq!(up.index_hits("serde"), 2);
    assert_eq!(
        up.index_hits("rand"),
        0,
        "files nobody asked for are not fetched"
    );
}

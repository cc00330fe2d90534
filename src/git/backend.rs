//! Git smart HTTP, driven through `git http-backend` (CGI): one process per request, run with
//! the namespace of the host the client used. Protocol v0 (libgit2, cargo's default) and v2
//! (the git CLI's `Git-Protocol: version=2`, passed on as `GIT_PROTOCOL`); gzip request
//! bodies are inflated here, under the body cap. Request bodies stream into the process, its output
//! streams out; dropping the response body (the client went away) kills the process group.
//! The routes at `/crates.io-index` are in [`crate::http`]; nothing here knows the router.

use std::collections::HashSet;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_compression::tokio::bufread::GzipDecoder;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{ChildStdout, Command};
use tokio_util::io::StreamReader;

use super::process::{GitChild, config_env};
use super::{GitError, GitIndex, LimitCounts};

/// Configuration of `git http-backend` and the upload-pack it runs.
const SERVE_CONFIG: &[(&str, &str)] = &[
    ("http.uploadpack", "true"),
    ("http.receivepack", "false"),
    // `refs/cratere/previous` (inside each namespace) is not advertised, but its tip may be
    // asked for: a v0 client that read the advertisement just before a sync moved master.
    ("uploadpack.hideRefs", "refs/cratere"),
    ("uploadpack.allowTipSHA1InWant", "true"),
];

/// Longest CGI header block accepted from http-backend.
const MAX_CGI_HEADER: usize = 16 * 1024;

/// Largest `Git-Protocol` header passed on.
const MAX_GIT_PROTOCOL: usize = 256;

/// The headers of http-backend's answer that are passed on to the client.
const PASSED_HEADERS: [&str; 4] = ["content-type", "cache-control", "expires", "pragma"];

/// The two requests of git smart HTTP that a read-only mirror serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// `GET info/refs?service=git-upload-pack`: the ref advertisement.
    Advertisement,
    /// `POST git-upload-pack`: negotiation and the pack.
    UploadPack,
}

/// One smart-HTTP request, as http-backend needs it.
pub struct CgiRequest<'a> {
    pub service: Service,
    /// The git namespace of the host the client used ([`super::HostView::namespace`]).
    pub namespace: &'a str,
    pub content_type: Option<&'a str>,
    pub content_encoding: Option<&'a str>,
    pub git_protocol: Option<&'a str>,
    /// The request body (upload-pack only).
    pub body: Option<BoxStream<'static, io::Result<Bytes>>>,
}

/// Passed-on headers: a lowercase name from [`PASSED_HEADERS`] and its value.
pub type Headers = Vec<(&'static str, String)>;

/// http-backend's answer: its status, the headers passed on, and its output as it comes.
pub struct CgiResponse {
    pub status: u16,
    pub headers: Headers,
    pub body: BoxStream<'static, io::Result<Bytes>>,
}

/// Removes a backend's pid from the live set when its response ends or is dropped.
struct Tracked {
    live: Arc<Mutex<HashSet<u32>>>,
    pid: Option<u32>,
}

impl GitIndex {
    /// Runs `git http-backend` for one request and streams its answer.
    pub async fn backend(&self, req: CgiRequest<'_>) -> Result<CgiResponse, GitError> {
        let encoding = req.content_encoding.map(str::trim).unwrap_or("");
        if !matches!(encoding, "" | "identity" | "gzip" | "x-gzip") {
            return Err(GitError::BadRequest(format!(
                "unsupported Content-Encoding `{encoding}` (gzip is)"
            )));
        }
        let permit = self.processes.clone().try_acquire_owned().map_err(|_| {
            LimitCounts::hit(&self.limits.busy);
            GitError::Busy {
                retry_after_secs: 5,
            }
        })?;
        let gzip = matches!(encoding, "gzip" | "x-gzip");
        let mut cmd = self.command(&req);
        let mut child = GitChild::spawn(&mut cmd)
            .map_err(|e| GitError::Backend(format!("starting git http-backend: {e}")))?;
        let tracked = Tracked {
            live: self.backends.clone(),
            pid: child.id(),
        };
        if let Some(pid) = tracked.pid {
            self.backends.lock().unwrap().insert(pid);
        }

        let pump = pump_body(req.body, gzip, &mut child, self);
        log_stderr(&mut child);

        let stdout = child.child_mut().stdout.take().expect("piped");
        let mut stdout = BufReader::with_capacity(64 * 1024, stdout);
        let head = read_cgi_header(&mut stdout)
            .await
            .map_err(|e| GitError::Backend(format!("reading git http-backend's headers: {e}")))?;
        let (status, headers) = parse_cgi_header(&head)
            .map_err(|e| GitError::Backend(format!("git http-backend: {e}")))?;

        let reading = Arc::new(ClientReading::new(permit));
        spawn_send_watchdog(&reading, child.id(), self);
        let state = BodyState {
            stdout,
            child,
            reading,
            _tracked: tracked,
            _pump: pump.map(AbortOnDrop),
        };
        Ok(CgiResponse {
            status,
            headers,
            body: output(state),
        })
    }

    /// The `git http-backend` command for one request, in a clean environment.
    fn command(&self, req: &CgiRequest<'_>) -> Command {
        let protocol = req
            .git_protocol
            .map(str::trim)
            .filter(|p| p.len() <= MAX_GIT_PROTOCOL)
            .unwrap_or("");
        let (method, path_info, query) = match req.service {
            Service::Advertisement => ("GET", "info/refs", "service=git-upload-pack"),
            Service::UploadPack => ("POST", "git-upload-pack", ""),
        };

        let mut cmd = Command::new("git");
        cmd.arg("http-backend")
            .current_dir(&self.root)
            // A clean environment: nothing of the server's reaches git but what is set here.
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .envs(config_env(SERVE_CONFIG))
            .env("GIT_PROJECT_ROOT", &self.root)
            .env("GIT_HTTP_EXPORT_ALL", "1")
            .env("GIT_NAMESPACE", req.namespace)
            .env("PATH_INFO", format!("/{}/{path_info}", super::REPO_DIR))
            .env("REQUEST_METHOD", method)
            .env("QUERY_STRING", query)
            .env(
                "CONTENT_TYPE",
                req.content_type.map(str::trim).unwrap_or(""),
            )
            .env("GIT_PROTOCOL", protocol)
            .stdin(if req.body.is_some() {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            })
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        // No HTTP_CONTENT_ENCODING: a gzip body is inflated by `pump_body`, under the cap.
        cmd
    }
}

/// The request body → http-backend's stdin, in its own task (http-backend reads all of it
/// before upload-pack answers); the handle aborts it with the response. A gzip body is
/// inflated here, not by http-backend, so that `max` bounds what git reads after inflation
/// (a few KiB of gzip can inflate to gigabytes). A body that takes longer than `deadline`
/// or is larger than `max` is cut off: stdin closes early, git reports a truncated request
/// and exits, and its process slot is free again.
fn pump_body(
    body: Option<BoxStream<'static, io::Result<Bytes>>>,
    gzip: bool,
    child: &mut GitChild,
    git: &GitIndex,
) -> Option<tokio::task::AbortHandle> {
    let (body, mut stdin) = (body?, child.child_mut().stdin.take()?);
    let (deadline, max, limits) = (git.body_timeout, git.max_body, git.limits.clone());
    let raw = StreamReader::new(body);
    let mut body: Pin<Box<dyn AsyncRead + Send>> = if gzip {
        let mut decoder = GzipDecoder::new(BufReader::new(raw));
        decoder.multiple_members(true);
        Box::pin(decoder)
    } else {
        Box::pin(raw)
    };
    let task = tokio::spawn(async move {
        let copy = async {
            let mut buf = vec![0u8; 64 * 1024];
            let mut sent = 0u64;
            loop {
                // An error: the client's request broke off, or its gzip is corrupt. Either
                // way stdin closes early and git sees a truncated request.
                let n = match body.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => {
                        tracing::info!(error = %e, "git request body ended early");
                        return;
                    }
                };
                sent += n as u64;
                if sent > max {
                    tracing::info!(max, "git request body too large (after inflation); cut off");
                    LimitCounts::hit(&limits.body_too_large);
                    return;
                }
                if stdin.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            let _ = stdin.shutdown().await;
        };
        if tokio::time::timeout(deadline, copy).await.is_err() {
            tracing::info!(?deadline, "git request body too slow; cut off");
            LimitCounts::hit(&limits.body_too_slow);
        }
    });
    Some(task.abort_handle())
}

/// The first 20 lines of http-backend's stderr go to the log.
fn log_stderr(child: &mut GitChild) {
    if let Some(stderr) = child.child_mut().stderr.take() {
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            let mut n = 0;
            while let Ok(Some(line)) = lines.next_line().await {
                n += 1;
                if n <= 20 {
                    tracing::info!(target: "cratere::git::backend", "{line}");
                }
            }
        });
    }
}

/// http-backend's output after its headers, as it comes; at its end the process is reaped.
fn output(state: BodyState) -> BoxStream<'static, io::Result<Bytes>> {
    futures_util::stream::unfold(Some(state), |state| async move {
        let mut st = state?;
        st.reading.polled();
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let read = st.stdout.read_buf(&mut buf).await;
        st.reading.yielded();
        match read {
            Ok(0) => {
                // End of output: reap http-backend (its upload-pack has exited too).
                match tokio::time::timeout(Duration::from_secs(10), st.child.wait()).await {
                    Ok(Ok(s)) if s.success() => {}
                    Ok(Ok(s)) => tracing::info!(status = %s, "git http-backend failed"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "waiting for git http-backend"),
                    Err(_) => tracing::warn!("git http-backend did not exit after its output"),
                }
                None
            }
            Ok(_) => Some((Ok(buf.freeze()), Some(st))),
            Err(e) => Some((Err(e), None)),
        }
    })
    .boxed()
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(pid) = self.pid {
            self.live.lock().unwrap().remove(&pid);
        }
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the response body owns: dropping it (the client went away) kills the process group.
/// Field order matters: the child is killed before its pid leaves the live set.
struct BodyState {
    stdout: BufReader<ChildStdout>,
    child: GitChild,
    _tracked: Tracked,
    /// Whether the client is taking the output; the watchdog kills git if it stops.
    reading: Arc<ClientReading>,
    _pump: Option<AbortOnDrop>,
}

impl Drop for BodyState {
    fn drop(&mut self) {
        self.reading.ended.store(true, Ordering::SeqCst);
        self.reading.release();
    }
}

/// When the response body last handed the client a chunk and was not polled again since
/// (`u64::MAX` while hyper is waiting on it: git is the slow one then, not the client).
struct ClientReading {
    base: tokio::time::Instant,
    since_ms: AtomicU64,
    ended: AtomicBool,
    /// The process slot: freed when the response ends, or when the watchdog kills git.
    permit: Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
}

impl ClientReading {
    fn new(permit: tokio::sync::OwnedSemaphorePermit) -> ClientReading {
        ClientReading {
            base: tokio::time::Instant::now(),
            since_ms: AtomicU64::new(0),
            ended: AtomicBool::new(false),
            permit: Mutex::new(Some(permit)),
        }
    }

    fn release(&self) {
        drop(self.permit.lock().expect("lock poisoned").take());
    }

    fn polled(&self) {
        self.since_ms.store(u64::MAX, Ordering::SeqCst);
    }

    fn yielded(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.since_ms.store(ms, Ordering::SeqCst);
    }

    /// How long the client has left the last chunk untaken.
    fn stalled_for(&self) -> Duration {
        match self.since_ms.load(Ordering::SeqCst) {
            u64::MAX => Duration::ZERO,
            ms => self
                .base
                .elapsed()
                .saturating_sub(Duration::from_millis(ms)),
        }
    }
}

/// Watches a response until it ends: if the client leaves the output unread for `timeout`
/// (a clone whose pack nobody reads keeps pack-objects blocked on a full pipe), git's process
/// group is killed and its slot freed at once.
fn spawn_send_watchdog(reading: &Arc<ClientReading>, pid: Option<u32>, git: &GitIndex) {
    let (reading, timeout, limits) = (reading.clone(), git.send_timeout, git.limits.clone());
    tokio::spawn(async move {
        let tick = (timeout / 4).max(Duration::from_millis(50));
        loop {
            tokio::time::sleep(tick).await;
            if reading.ended.load(Ordering::SeqCst) {
                return;
            }
            if reading.stalled_for() >= timeout {
                tracing::info!(
                    ?timeout,
                    "git client stopped reading; killing its git processes"
                );
                LimitCounts::hit(&limits.client_stopped_reading);
                if let Some(pid) = pid {
                    // SAFETY: kill(2) has no memory-safety preconditions. The group is the
                    // backend's own (it is not reaped while the response holds it).
                    unsafe {
                        libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
                    }
                }
                reading.release();
                return;
            }
        }
    });
}

/// Reads the CGI header block (up to and including the empty line).
async fn read_cgi_header(r: &mut BufReader<ChildStdout>) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    loop {
        let start = head.len();
        let n = r.read_until(b'\n', &mut head).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "output ended inside the headers",
            ));
        }
        let line = &head[start..];
        if line == b"\r\n" || line == b"\n" {
            return Ok(head);
        }
        if head.len() > MAX_CGI_HEADER {
            return Err(std::io::Error::other("headers too long"));
        }
    }
}

/// Parses a CGI header block: `Status: 403 Forbidden` (default 200) and the headers the
/// response passes on ([`PASSED_HEADERS`]).
fn parse_cgi_header(head: &[u8]) -> Result<(u16, Headers), String> {
    let text = std::str::from_utf8(head).map_err(|_| "headers are not UTF-8".to_string())?;
    let mut status = 200;
    let mut headers = Vec::new();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            break;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header line `{line}`"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split_whitespace().next().unwrap_or_default();
            status = code
                .parse::<u16>()
                .ok()
                .filter(|c| (100..=599).contains(c))
                .ok_or_else(|| format!("bad status `{value}`"))?;
            continue;
        }
        if let Some(passed) = PASSED_HEADERS
            .iter()
            .find(|p| p.eq_ignore_ascii_case(name.trim()))
        {
            if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
                return Err(format!("bad value of {passed}"));
            }
            headers.push((*passed, value.to_string()));
        }
    }
    Ok((status, headers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgi_headers() {
        let (s, h) = parse_cgi_header(
            b"Expires: Fri, 01 Jan 1980 00:00:00 GMT\r\nPragma: no-cache\r\n\
              Cache-Control: no-cache, max-age=0, must-revalidate\r\n\
              Content-Type: application/x-git-upload-pack-advertisement\r\n\r\n",
        )
        .unwrap();
        let get =
            |h: &[(&str, String)], n: &str| h.iter().find(|(k, _)| *k == n).map(|(_, v)| v.clone());
        assert_eq!(s, 200);
        assert_eq!(
            get(&h, "content-type").unwrap(),
            "application/x-git-upload-pack-advertisement"
        );
        assert_eq!(get(&h, "pragma").unwrap(), "no-cache");
        let (s, h) =
            parse_cgi_header(b"Status: 403 Forbidden\nContent-Type: text/plain\nX-Other: 1\n\n")
                .unwrap();
        assert_eq!(s, 403);
        assert!(get(&h, "x-other").is_none());
        assert!(parse_cgi_header(b"Status: abc\r\n\r\n").is_err());
        assert!(parse_cgi_header(b"no colon\r\n\r\n").is_err());
    }
}

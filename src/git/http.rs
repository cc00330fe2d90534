//! Git smart HTTP at `/crates.io-index` (and `/crates.io-index.git`): `GET info/refs?service=
//! git-upload-pack` and `POST git-upload-pack`, each answered by one `git http-backend` (CGI)
//! run with the namespace of the host the client used. Protocol v0 (libgit2, cargo's default)
//! and v2 (the git CLI's `Git-Protocol: version=2`, passed on as `GIT_PROTOCOL`); gzip request
//! bodies are inflated by http-backend. Request bodies stream into the process, its output
//! streams to the client; a client that goes away gets the process group killed.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::Response;
use axum::routing::{any, get, post};
use bytes::BytesMut;
use futures_util::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{ChildStdout, Command};

use super::GitIndex;
use super::process::{GitChild, config_env};
use crate::app::AppState;
use crate::error::AppError;
use crate::sparse::requested_host;

/// The two URL prefixes cargo users write (`registry = "http://HOST/crates.io-index"`).
const PREFIXES: [&str; 2] = ["/crates.io-index", "/crates.io-index.git"];

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

pub fn router() -> Router<AppState> {
    let mut r = Router::new();
    for p in PREFIXES {
        r = r
            .route(&format!("{p}/info/refs"), get(info_refs))
            .route(&format!("{p}/git-upload-pack"), post(upload_pack))
            .route(&format!("{p}/{{*rest}}"), any(other));
    }
    r
}

fn git_index(st: &AppState) -> Result<&GitIndex, AppError> {
    let git = st.git.as_deref().ok_or_else(|| {
        AppError::NotFound("the git index is disabled here (CRATERE_GIT_INDEX=false)".into())
    })?;
    if !git.status.borrow().ready {
        return Err(AppError::Unavailable {
            reason: "the git index is not ready: the first sync from upstream has not \
                     completed yet; use the sparse index at /index/ meanwhile"
                .into(),
            retry_after_secs: git.retry_after_secs(),
        });
    }
    Ok(git)
}

async fn info_refs(
    State(st): State<AppState>,
    RawQuery(query): RawQuery,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let service = query.as_deref().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "service")
            .map(|(_, v)| v.into_owned())
    });
    match service.as_deref() {
        Some("git-upload-pack") => {}
        Some("git-receive-pack") => return Err(read_only()),
        _ => {
            return Err(AppError::NotFound(
                "only git smart HTTP is served here (info/refs?service=git-upload-pack)".into(),
            ));
        }
    }
    let git = git_index(&st)?;
    let host = git.host(&st.hosts.base_url_for(requested_host(&uri, &headers)));
    let req = CgiRequest {
        method: Method::GET,
        path_info: "info/refs",
        query: "service=git-upload-pack",
        namespace: &host.namespace,
        headers: &headers,
        body: None,
    };
    git.backend(req).await
}

async fn upload_pack(
    State(st): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, AppError> {
    let git = git_index(&st)?;
    let host = git.host(&st.hosts.base_url_for(requested_host(&uri, &headers)));
    let req = CgiRequest {
        method: Method::POST,
        path_info: "git-upload-pack",
        query: "",
        namespace: &host.namespace,
        headers: &headers,
        body: Some(body),
    };
    git.backend(req).await
}

async fn other(uri: Uri) -> AppError {
    if uri.path().ends_with("/git-receive-pack") {
        read_only()
    } else {
        AppError::NotFound("only git smart HTTP (git-upload-pack) is served here".into())
    }
}

fn read_only() -> AppError {
    AppError::Forbidden("this git index is a read-only mirror: pushing is not allowed".into())
}

struct CgiRequest<'a> {
    method: Method,
    /// Below the repository: `info/refs` or `git-upload-pack`.
    path_info: &'static str,
    query: &'static str,
    namespace: &'a str,
    headers: &'a HeaderMap,
    body: Option<Body>,
}

/// Removes a backend's pid from the live set when its response ends or is dropped.
struct Tracked {
    live: Arc<Mutex<HashSet<u32>>>,
    pid: Option<u32>,
}

impl GitIndex {
    /// Runs `git http-backend` for one request and streams its answer.
    async fn backend(&self, req: CgiRequest<'_>) -> Result<Response, AppError> {
        let header_str = |name: &str| {
            req.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        };
        let encoding = header_str("content-encoding").unwrap_or("");
        if !matches!(encoding, "" | "identity" | "gzip" | "x-gzip") {
            return Err(AppError::BadRequest(format!(
                "unsupported Content-Encoding `{encoding}` (gzip is)"
            )));
        }
        let protocol = header_str("git-protocol")
            .filter(|p| p.len() <= MAX_GIT_PROTOCOL)
            .unwrap_or("");

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
            .env(
                "PATH_INFO",
                format!("/{}/{}", super::REPO_DIR, req.path_info),
            )
            .env("REQUEST_METHOD", req.method.as_str())
            .env("QUERY_STRING", req.query)
            .env("CONTENT_TYPE", header_str("content-type").unwrap_or(""))
            .env("GIT_PROTOCOL", protocol)
            .stdin(if req.body.is_some() {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            })
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if !encoding.is_empty() && encoding != "identity" {
            cmd.env("HTTP_CONTENT_ENCODING", encoding);
        }
        let mut child = GitChild::spawn(&mut cmd)
            .map_err(|e| AppError::Internal(anyhow::anyhow!("starting git http-backend: {e}")))?;
        let tracked = Tracked {
            live: self.backends.clone(),
            pid: child.id(),
        };
        if let Some(pid) = tracked.pid {
            self.backends.lock().unwrap().insert(pid);
        }

        // Request body → stdin, in its own task (http-backend reads all of it before
        // upload-pack answers). Aborted with the response.
        let pump = match (req.body, child.child_mut().stdin.take()) {
            (Some(body), Some(mut stdin)) => Some(tokio::spawn(async move {
                let mut body = body.into_data_stream();
                while let Some(chunk) = body.next().await {
                    let Ok(chunk) = chunk else {
                        // The client's request broke off: close stdin early; git reports a
                        // truncated request.
                        return;
                    };
                    if stdin.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
                let _ = stdin.shutdown().await;
            })),
            _ => None,
        };
        let pump_abort = pump.map(|p| p.abort_handle());

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

        let stdout = child.child_mut().stdout.take().expect("piped");
        let mut stdout = BufReader::with_capacity(64 * 1024, stdout);
        let head = read_cgi_header(&mut stdout).await.map_err(|e| {
            AppError::Internal(anyhow::anyhow!("reading git http-backend's headers: {e}"))
        })?;
        let (status, headers) = parse_cgi_header(&head)
            .map_err(|e| AppError::Internal(anyhow::anyhow!("git http-backend: {e}")))?;

        let state = BodyState {
            stdout,
            child,
            _tracked: tracked,
            _pump: pump_abort.map(AbortOnDrop),
        };
        let stream = futures_util::stream::unfold(Some(state), |state| async move {
            let mut st = state?;
            let mut buf = BytesMut::with_capacity(64 * 1024);
            match st.stdout.read_buf(&mut buf).await {
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
        });
        let mut resp = Response::new(Body::from_stream(stream));
        *resp.status_mut() = status;
        resp.headers_mut().extend(headers);
        Ok(resp)
    }
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
    _pump: Option<AbortOnDrop>,
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
/// response passes on.
fn parse_cgi_header(head: &[u8]) -> Result<(StatusCode, HeaderMap), String> {
    let text = std::str::from_utf8(head).map_err(|_| "headers are not UTF-8".to_string())?;
    let mut status = StatusCode::OK;
    let mut headers = HeaderMap::new();
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
                .and_then(|c| StatusCode::from_u16(c).ok())
                .ok_or_else(|| format!("bad status `{value}`"))?;
            continue;
        }
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("bad header name `{name}`"))?;
        if [
            header::CONTENT_TYPE,
            header::CACHE_CONTROL,
            header::EXPIRES,
            header::PRAGMA,
        ]
        .contains(&name)
        {
            let value = HeaderValue::from_str(value).map_err(|_| format!("bad value of {name}"))?;
            headers.append(name, value);
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
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            h[header::CONTENT_TYPE],
            "application/x-git-upload-pack-advertisement"
        );
        assert_eq!(h[header::PRAGMA], "no-cache");
        let (s, h) =
            parse_cgi_header(b"Status: 403 Forbidden\nContent-Type: text/plain\nX-Other: 1\n\n")
                .unwrap();
        assert_eq!(s, StatusCode::FORBIDDEN);
        assert!(h.get("x-other").is_none());
        assert!(parse_cgi_header(b"Status: abc\r\n\r\n").is_err());
        assert!(parse_cgi_header(b"no colon\r\n\r\n").is_err());
    }
}

//! Configuration: one clap struct, every option a flag and a `CRATERE_*` variable, parsed into
//! typed values at startup. A bad value stops startup with a message that names the variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use url::Url;

use crate::jobs::Schedule;

/// A caching proxy for crates.io: sparse index, git index mirror, crate downloads.
#[derive(Debug, Parser)]
#[command(
    name = "cratere",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Options of `serve` (the default command).
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy server (the default when no subcommand is given).
    Serve(Config),
    /// Run one cache cleanup now with the configured rules (CRATERE_MAX_DAYS_UNUSED,
    /// CRATERE_MAX_CACHE_SIZE) and print what it removes. Safe while a server runs on the same
    /// directories.
    Cleanup(CleanupArgs),
    /// Fetch every crates.io package of the given Cargo.lock files, and their index files,
    /// into the cache, so that the proxy can serve those projects with no upstream at all.
    /// Safe while a server runs on the same directories.
    Warm(WarmArgs),
}

#[derive(Debug, Clone, Args)]
pub struct CleanupArgs {
    /// Print what would be removed, remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Clone, Args)]
pub struct WarmArgs {
    /// Cargo.lock files to warm the cache for.
    #[arg(required = true, value_name = "CARGO_LOCK")]
    pub lockfiles: Vec<PathBuf>,
    /// Most packages fetched at once.
    #[arg(long, default_value = "16", value_parser = parse_nonzero)]
    pub jobs: usize,
    #[command(flatten)]
    pub config: Config,
}

impl Cli {
    /// Parses the command line and environment, exiting with a message naming the offending
    /// variable when a value is invalid.
    pub fn parse_or_exit() -> Cli {
        match Cli::try_parse_from_env() {
            Ok(cli) => cli,
            Err(e) => e.exit(),
        }
    }

    /// Like [`Cli::parse_or_exit`] but returns the error (used by tests).
    pub fn try_parse_from_env() -> Result<Cli, clap::Error> {
        Self::try_parse_args(std::env::args_os())
    }

    pub fn try_parse_args<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let mut cmd = Cli::command();
        let matches = cmd
            .try_get_matches_from_mut(args)
            .map_err(|e| name_the_variable(&cmd, e))?;
        Cli::from_arg_matches(&matches).map_err(|e| name_the_variable(&cmd, e))
    }

    /// The configuration, whichever way and for whichever command it was given.
    pub fn into_config(self) -> Config {
        match self.command {
            Some(Command::Serve(c)) => c,
            Some(Command::Cleanup(a)) => a.config,
            Some(Command::Warm(a)) => a.config,
            None => self.config,
        }
    }
}

/// clap reports a bad value as `invalid value 'x' for '--port <PORT>'`, which does not tell an
/// operator who set `CRATERE_PORT` in a manifest where to look. Prefix the variable's name.
fn name_the_variable(cmd: &clap::Command, err: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let missing = err.kind() == ErrorKind::MissingRequiredArgument;
    if !missing
        && !matches!(
            err.kind(),
            ErrorKind::ValueValidation | ErrorKind::InvalidValue
        )
    {
        return err;
    }
    let arg = match err.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(arg)) => arg.clone(),
        Some(ContextValue::Strings(args)) if !args.is_empty() => args[0].clone(),
        _ => return err,
    };
    let all_args = cmd
        .get_arguments()
        .chain(cmd.get_subcommands().flat_map(|s| s.get_arguments()));
    for a in all_args {
        let (Some(long), Some(env)) = (a.get_long(), a.get_env()) else {
            continue;
        };
        let flag = format!("--{long}");
        if arg == flag
            || arg.starts_with(&format!("{flag} "))
            || arg.starts_with(&format!("{flag}="))
        {
            let env = env.to_string_lossy();
            if missing {
                return cmd.clone().error(
                    ErrorKind::MissingRequiredArgument,
                    format!("missing setting {env} ({flag}), which the other settings require"),
                );
            }
            let detail = err.to_string();
            let detail = detail.trim_start_matches("error: ").trim_end();
            return cmd.clone().error(
                ErrorKind::ValueValidation,
                format!("invalid setting {env} ({flag}): {detail}"),
            );
        }
    }
    err
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

/// Where crate files are stored (`CRATERE_STORAGE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StorageKind {
    /// The local directory `CRATERE_CACHE`.
    Fs,
    /// An S3-compatible object store (`CRATERE_S3_*`), shared by any number of replicas;
    /// `CRATERE_CACHE` then only holds the files being downloaded.
    S3,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colours on a terminal).
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// A `host[:port]` authority, lowercased, as clients put it in `Host`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: Option<u16>,
}

impl HostPort {
    pub fn parse(s: &str) -> Result<HostPort, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty host".into());
        }
        // Parse through a URL so IPv6 literals, IDNA and invalid characters are handled by
        // the url crate rather than by hand.
        let url = Url::parse(&format!("http://{s}/"))
            .map_err(|e| format!("`{s}` is not a valid host[:port]: {e}"))?;
        if url.path() != "/"
            || url.query().is_some()
            || url.fragment().is_some()
            || !url.username().is_empty()
            || url.password().is_some()
        {
            return Err(format!("`{s}` is not a plain host[:port]"));
        }
        let host = url
            .host_str()
            .ok_or_else(|| format!("`{s}` has no host"))?
            .to_ascii_lowercase();
        // url drops an explicit :80 for http; keep whatever port the operator wrote.
        let port = match s.rsplit_once(':') {
            Some((_, p)) if !s.ends_with(']') => Some(
                p.parse::<u16>()
                    .map_err(|_| format!("`{s}` has an invalid port"))?,
            ),
            _ => None,
        };
        Ok(HostPort { host, port })
    }

    /// `host[:port]` with the port left out when it is the scheme's default.
    pub fn authority(&self, scheme: Scheme) -> String {
        match self.port {
            Some(p) if p != scheme.default_port() => format!("{}:{p}", self.host),
            _ => self.host.clone(),
        }
    }
}

fn parse_host(s: &str) -> Result<String, String> {
    let hp = HostPort::parse(s)?;
    if hp.port.is_some() {
        return Err("give the port in CRATERE_PORT, not in the host".into());
    }
    Ok(hp.host)
}

/// `CRATERE_ALTERNATE_HOSTS`: a JSON list of `host[:port]` strings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlternateHosts(pub Vec<HostPort>);

fn parse_alternate_hosts(s: &str) -> Result<AlternateHosts, String> {
    if s.trim().is_empty() {
        return Ok(AlternateHosts::default());
    }
    let list: Vec<String> = serde_json::from_str(s)
        .map_err(|e| format!("expected a JSON list like [\"host1:8000\", \"host2\"]: {e}"))?;
    list.iter()
        .map(|h| HostPort::parse(h))
        .collect::<Result<Vec<_>, _>>()
        .map(AlternateHosts)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("expected a duration like 30s or 5m: {e}"))
}

fn parse_base_url(s: &str) -> Result<Url, String> {
    let mut url = Url::parse(s).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("expected an http:// or https:// URL".into());
    }
    if !url.path().ends_with('/') {
        let p = format!("{}/", url.path());
        url.set_path(&p);
    }
    Ok(url)
}

fn parse_dl_template(s: &str) -> Result<String, String> {
    let probe = s
        .replace("{crate}", "c")
        .replace("{version}", "1.0.0")
        .replace("{prefix}", "p")
        .replace("{lowerprefix}", "p")
        .replace("{sha256-checksum}", "0");
    parse_base_url(&probe)?;
    Ok(s.trim_end_matches('/').to_string())
}

/// `CRATERE_CLEANUP_CACHE_SCHEDULE`: a cron schedule, or `off`.
#[derive(Debug, Clone)]
pub struct CleanupSchedule(pub Option<Schedule>);

fn parse_cleanup_schedule(s: &str) -> Result<CleanupSchedule, String> {
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(CleanupSchedule(None));
    }
    s.parse().map(|s| CleanupSchedule(Some(s)))
}

/// Days as a duration; fractions are allowed (`0.5` is 12 hours).
fn parse_days(s: &str) -> Result<Duration, String> {
    let days: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("expected a number of days like 90 or 0.5, got `{s}`"))?;
    if days.is_nan() || days <= 0.0 {
        return Err("must be more than 0 days".into());
    }
    Duration::try_from_secs_f64(days * 86_400.0).map_err(|_| format!("{days} days is too long"))
}

/// A byte size, 0 allowed.
fn parse_size_or_zero(s: &str) -> Result<u64, String> {
    if s.trim() == "0" {
        return Ok(0);
    }
    parse_size(s)
}

/// A byte size like `50GiB`, `500MB` or `1073741824`.
fn parse_size(s: &str) -> Result<u64, String> {
    let size: bytesize::ByteSize = s
        .trim()
        .parse()
        .map_err(|e| format!("expected a size like 50GiB or 500MB: {e}"))?;
    if size.as_u64() == 0 {
        return Err("must be more than 0 bytes".into());
    }
    Ok(size.as_u64())
}

/// `CRATERE_UPSTREAM_GIT`: what `git fetch` is given. A URL (`https://`, `http://`, `file://`,
/// `ssh://`, `git://`), an scp-like `user@host:path`, or a local path (made absolute at
/// startup, since git runs inside the mirror directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitRemote(String);

impl GitRemote {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for GitRemote {
    type Err = String;

    fn from_str(s: &str) -> Result<GitRemote, String> {
        parse_git_remote(s)
    }
}

impl std::fmt::Display for GitRemote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn parse_git_remote(s: &str) -> Result<GitRemote, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty".into());
    }
    // git would take a leading dash for an option.
    if s.starts_with('-') {
        return Err("must not start with `-`".into());
    }
    if s.contains("://") {
        let url = Url::parse(s).map_err(|e| format!("not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https" | "file" | "ssh" | "git") {
            return Err("expected an http(s)://, file://, ssh:// or git:// URL, or a path".into());
        }
        return Ok(GitRemote(s.to_string()));
    }
    // git's own rule: a colon before the first slash makes it scp-like ssh (`host:path`).
    let before_slash = s.split('/').next().unwrap_or_default();
    if before_slash.contains(':') {
        return Ok(GitRemote(s.to_string()));
    }
    let path = std::path::absolute(s).map_err(|e| format!("cannot make `{s}` absolute: {e}"))?;
    Ok(GitRemote(path.to_string_lossy().into_owned()))
}

/// `CRATERE_S3_ENDPOINT`: an http(s) URL, or empty for AWS.
fn parse_endpoint(s: &str) -> Result<S3Endpoint, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(S3Endpoint(None));
    }
    let url = Url::parse(s).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("expected an http:// or https:// URL (or nothing, for AWS)".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("expected a plain URL without query or fragment".into());
    }
    Ok(S3Endpoint(Some(s.trim_end_matches('/').to_string())))
}

/// `CRATERE_S3_ENDPOINT`; `None` means AWS (the endpoint follows from the region).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Endpoint(pub Option<String>);

/// `CRATERE_S3_PREFIX`: `/`-separated segments of letters, digits, `.`, `-`, `_` (no `.` or
/// `..` segment); stored with a trailing `/`, or empty.
fn parse_prefix(s: &str) -> Result<S3Prefix, String> {
    let s = s.trim().trim_matches('/');
    if s.is_empty() {
        return Ok(S3Prefix::default());
    }
    for seg in s.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." || seg.starts_with('.') {
            return Err(format!(
                "`{s}`: segments must be non-empty and not start with `.`"
            ));
        }
        if !seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(format!(
                "`{seg}`: only letters, digits, `-`, `_` and `.` are allowed"
            ));
        }
    }
    Ok(S3Prefix(format!("{s}/")))
}

/// Key prefix of every object Cratere writes in the bucket: empty or ending in `/`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Prefix(pub String);

impl S3Prefix {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn parse_bucket(s: &str) -> Result<String, String> {
    let s = s.trim();
    let ok = (3..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !ok {
        return Err(format!(
            "`{s}` is not a bucket name (3-63 lowercase letters, digits, `-`, `.`)"
        ));
    }
    Ok(s.to_string())
}

fn parse_schedule(s: &str) -> Result<crate::jobs::Schedule, String> {
    s.parse()
}

fn parse_nonzero(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Every setting, in groups (`#[command(flatten)]`: the flags and variables are the same as
/// one flat list). Each part of the proxy is built from its own group.
#[derive(Debug, Clone, Args)]
pub struct Config {
    #[command(flatten)]
    pub public: PublicConfig,
    #[command(flatten)]
    pub server: ServerConfig,
    #[command(flatten)]
    pub storage: StorageConfig,
    #[command(flatten)]
    pub upstream: UpstreamConfig,
    #[command(flatten)]
    pub sparse: SparseConfig,
    #[command(flatten)]
    pub git: GitConfig,
    #[command(flatten)]
    pub search: SearchConfig,
    #[command(flatten)]
    pub cleanup: CleanupConfig,

    /// Log format: `text` or `json` (filter with RUST_LOG).
    #[arg(
        long,
        env = "CRATERE_LOG_FORMAT",
        value_enum,
        default_value = "text",
        help_heading = "Logging"
    )]
    pub log_format: LogFormat,
}

/// The public URL written into config.json: primary host and alternate hosts.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Public URL")]
pub struct PublicConfig {
    /// Scheme of the public URL written into config.json.
    #[arg(long, env = "CRATERE_SCHEME", value_enum, default_value = "http")]
    pub scheme: Scheme,

    /// Host name of the public URL written into config.json.
    #[arg(long, env = "CRATERE_HOST", default_value = "localhost", value_parser = parse_host)]
    pub host: String,

    /// Port of the public URL written into config.json (and the default port to listen on).
    #[arg(long, env = "CRATERE_PORT", default_value_t = 8000)]
    pub port: u16,

    /// Extra host names, as a JSON list of "host[:port]"; each gets a config.json that points
    /// at itself.
    #[arg(long, env = "CRATERE_ALTERNATE_HOSTS", default_value = "[]",
          value_parser = parse_alternate_hosts)]
    pub alternate_hosts: AlternateHosts,
}

/// Listening, connection limits, timeouts, TLS and shutdown.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Server")]
pub struct ServerConfig {
    /// Socket address to listen on [default: 0.0.0.0:$CRATERE_PORT].
    #[arg(long, env = "CRATERE_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// Largest request head (request line and headers) accepted, in bytes.
    #[arg(long, env = "CRATERE_MAX_HEADER_BYTES", default_value = "16384",
          value_parser = parse_nonzero)]
    pub max_header_bytes: usize,

    /// Most request headers accepted.
    #[arg(long, env = "CRATERE_MAX_HEADERS", default_value = "64", value_parser = parse_nonzero)]
    pub max_headers: usize,

    /// Time a client has to send its request head (slow clients are disconnected).
    #[arg(long, env = "CRATERE_HEADER_READ_TIMEOUT", default_value = "10s",
          value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// How long a connection may stay open without a request in progress (HTTP/1.1
    /// keep-alive and HTTP/2 alike; an HTTP/2 peer answering pings does not count). A new
    /// connection must complete its first request head (or HTTP/2 preface, after any TLS
    /// handshake) within CRATERE_HEADER_READ_TIMEOUT.
    #[arg(long, env = "CRATERE_IDLE_TIMEOUT", default_value = "60s",
          value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Most client connections open at once; beyond it new connections wait in the listen
    /// backlog until one closes [default: derived from the open-file limit, see
    /// docs/RELIABILITY.md].
    #[arg(long, env = "CRATERE_MAX_CONNECTIONS", value_parser = parse_nonzero)]
    pub max_connections: Option<usize>,

    /// Longest time to produce a response's headers (504 after that); bodies then stream for
    /// as long as they need.
    #[arg(long, env = "CRATERE_REQUEST_TIMEOUT", default_value = "60s",
          value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// PEM certificate chain: serve HTTPS (ALPN h2 and http/1.1) instead of plain HTTP.
    /// Needs CRATERE_TLS_KEY.
    #[arg(long, env = "CRATERE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of CRATERE_TLS_CERT.
    #[arg(long, env = "CRATERE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// On SIGTERM/SIGINT, how long in-flight requests (downloads) may take to finish before
    /// the process exits anyway.
    #[arg(long, env = "CRATERE_SHUTDOWN_GRACE", default_value = "30s",
          value_parser = parse_duration)]
    pub shutdown_grace: Duration,
}

/// Where cached files live: directories, and crate files on disk or in S3.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Storage")]
pub struct StorageConfig {
    /// Directory of cached crate files.
    #[arg(long, env = "CRATERE_CACHE", default_value = "./data/crates")]
    pub cache: PathBuf,

    /// Directory of index data (cached sparse index files, git mirror).
    #[arg(long, env = "CRATERE_INDEX", default_value = "./data/index")]
    pub index: PathBuf,

    /// Where crate files are kept: `fs` (the directory CRATERE_CACHE) or `s3` (an
    /// S3-compatible bucket shared by several replicas; see CRATERE_S3_*). Index files and the
    /// git mirror always stay in CRATERE_INDEX.
    #[arg(
        id = "storage",
        long = "storage",
        env = "CRATERE_STORAGE",
        value_enum,
        default_value = "fs"
    )]
    pub kind: StorageKind,

    /// S3 bucket of the crate files (required with CRATERE_STORAGE=s3). Credentials come from
    /// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or the other standard AWS sources).
    #[arg(long, env = "CRATERE_S3_BUCKET", value_parser = parse_bucket,
          required_if_eq("storage", "s3"))]
    pub s3_bucket: Option<String>,

    /// S3 endpoint URL, e.g. http://minio:9000 [default: AWS, from the region].
    #[arg(long, env = "CRATERE_S3_ENDPOINT", default_value = "", value_parser = parse_endpoint,
          hide_default_value = true)]
    pub s3_endpoint: S3Endpoint,

    /// S3 region.
    #[arg(long, env = "CRATERE_S3_REGION", default_value = "us-east-1")]
    pub s3_region: String,

    /// Path-style requests (http://endpoint/bucket/key), which MinIO, Garage, Ceph and most
    /// self-hosted stores want; `false` for virtual-hosted style (http://bucket.endpoint/key).
    #[arg(long, env = "CRATERE_S3_PATH_STYLE", default_value = "false",
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub s3_path_style: bool,

    /// Key prefix of everything Cratere writes in the bucket (e.g. `cratere`), so one bucket
    /// can hold other data too [default: none].
    #[arg(long, env = "CRATERE_S3_PREFIX", default_value = "", value_parser = parse_prefix,
          hide_default_value = true)]
    pub s3_prefix: S3Prefix,

    /// With S3 storage: keep up to this many bytes of crate files on the local disk too
    /// (in CRATERE_CACHE, least recently used evicted), so that hits of popular crates are
    /// served without a request to the bucket (e.g. 10GiB) [default: none].
    #[arg(long, env = "CRATERE_S3_LOCAL_CACHE_SIZE", value_name = "SIZE", value_parser = parse_size)]
    pub s3_local_cache_size: Option<u64>,

    /// With S3 storage on a bucket that does not honour conditional writes (found by a probe
    /// at startup and before each cleanup): this replica runs the crate cleanups, without the
    /// fleet-wide lease that such a bucket cannot hold. Set it on exactly one replica. On a
    /// bucket that passes the probe the lease decides and this has no effect.
    #[arg(long, env = "CRATERE_CLEANUP_LEADER", default_value = "false",
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub cleanup_leader: bool,

    /// S3 credentials given by an embedding program (tests) instead of the environment;
    /// not a flag or variable: operators use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
    #[arg(skip)]
    pub s3_credentials: Option<S3Credentials>,
}

/// The upstream sparse index and downloads, and how the proxy treats them.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Upstream")]
pub struct UpstreamConfig {
    /// Upstream sparse index.
    #[arg(long, env = "CRATERE_UPSTREAM_SPARSE", default_value = "https://index.crates.io/",
          value_parser = parse_base_url)]
    pub upstream_sparse: Url,

    /// Upstream download URL template (cargo's `dl` syntax) [default: the `dl` of upstream's
    /// config.json].
    #[arg(long, env = "CRATERE_UPSTREAM_DL", value_parser = parse_dl_template)]
    pub upstream_dl: Option<String>,

    /// Time allowed to connect to upstream.
    #[arg(long, env = "CRATERE_UPSTREAM_CONNECT_TIMEOUT", default_value = "10s",
          value_parser = parse_duration)]
    pub upstream_connect_timeout: Duration,

    /// Longest wait for the next bytes from upstream before the request is abandoned (below
    /// cargo's 30 s low-speed limit, so a client gets an answer before it gives up).
    #[arg(long, env = "CRATERE_UPSTREAM_IDLE_TIMEOUT", default_value = "20s",
          value_parser = parse_duration)]
    pub upstream_idle_timeout: Duration,

    /// Most upstream requests in flight at once.
    #[arg(long, env = "CRATERE_UPSTREAM_CONCURRENCY", default_value = "64",
          value_parser = parse_nonzero)]
    pub upstream_concurrency: usize,

    /// Most crate fetches from upstream in progress or waiting for a slot at once (each
    /// distinct crate file counts once, however many clients wait on it). A miss beyond it
    /// answers 503 with Retry-After, which cargo retries.
    #[arg(long, env = "CRATERE_MAX_DOWNLOADS", default_value = "1024",
          value_parser = parse_nonzero)]
    pub max_downloads: usize,

    /// Consecutive upstream failures (timeouts, refused connections, 5xx) after which
    /// upstream is considered down: requests are then answered from the cache at once, and a
    /// health probe checks upstream until it answers again.
    #[arg(long, env = "CRATERE_UPSTREAM_FAILURE_THRESHOLD", default_value = "3",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub upstream_failure_threshold: u32,

    /// First wait before probing a down upstream (doubles after each failed probe, up to 5 min).
    #[arg(long, env = "CRATERE_UPSTREAM_BACKOFF", default_value = "5s",
          value_parser = parse_duration)]
    pub upstream_backoff: Duration,
}

/// The sparse index cache.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Sparse index")]
pub struct SparseConfig {
    /// How long a cached index file is served before it is revalidated upstream.
    #[arg(long, env = "CRATERE_INDEX_TTL", default_value = "2m", value_parser = parse_duration)]
    pub index_ttl: Duration,

    /// How long past CRATERE_INDEX_TTL a cached index file is still answered at once, while
    /// it is revalidated in the background (stale-while-revalidate); beyond it the client
    /// waits for the revalidation. 0 turns it off.
    #[arg(long, env = "CRATERE_INDEX_MAX_STALE", default_value = "10m",
          value_parser = parse_duration)]
    pub index_max_stale: Duration,

    /// When an index file comes from upstream, fetch the index files of the crates its
    /// newest version depends on too (recursively, at low priority), so that cargo's next
    /// round of requests finds them cached.
    #[arg(long, env = "CRATERE_INDEX_PREFETCH", default_value = "true",
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub index_prefetch: bool,

    /// Memory for the most used index files (0 turns it off), e.g. 32MiB; the disk cache
    /// stays complete.
    #[arg(long, env = "CRATERE_INDEX_MEMORY_CACHE", default_value = "32MiB",
          value_parser = parse_size_or_zero)]
    pub index_memory_cache: u64,
}

/// The git index mirror.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Git index")]
pub struct GitConfig {
    /// Mirror the upstream git index and serve it (config.json rewritten per host) over git
    /// smart HTTP at /crates.io-index.
    #[arg(long, env = "CRATERE_GIT_INDEX", default_value = "true",
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub git_index: bool,

    /// Upstream git index: a URL (https, http, file, ssh, git), `host:path`, or a local path.
    #[arg(long, env = "CRATERE_UPSTREAM_GIT",
          default_value = "https://github.com/rust-lang/crates.io-index.git",
          value_parser = parse_git_remote)]
    pub upstream_git: GitRemote,

    /// When the git index mirror syncs from upstream: cron, 5 fields (min hour dom mon dow) or
    /// 6 with leading seconds, in UTC. The first sync runs at startup.
    #[arg(long, env = "CRATERE_INDEX_UPDATE_SCHEDULE", default_value = "*/5 * * * *",
          value_parser = parse_schedule)]
    pub index_update_schedule: crate::jobs::Schedule,

    /// Most `git http-backend` processes at once (each clone or fetch request runs one, with
    /// its upload-pack and pack-objects); beyond it clients get 503 with Retry-After.
    #[arg(long, env = "CRATERE_GIT_MAX_PROCESSES", default_value = "32",
          value_parser = parse_nonzero)]
    pub git_max_processes: usize,

    /// Longest time a client may take to send a git-upload-pack request body.
    #[arg(long, env = "CRATERE_GIT_BODY_TIMEOUT", default_value = "60s",
          value_parser = parse_duration)]
    pub git_body_timeout: Duration,

    /// Longest time a client may leave the git answer (a pack) unread; then its git processes
    /// are killed and their slot freed.
    #[arg(long, env = "CRATERE_GIT_SEND_TIMEOUT", default_value = "60s",
          value_parser = parse_duration)]
    pub git_send_timeout: Duration,

    /// Largest git-upload-pack request body accepted, as sent (a fetch's negotiation is
    /// kilobytes; a clone of crates.io's index sends well under 1 MiB).
    #[arg(long, env = "CRATERE_GIT_MAX_BODY", default_value = "16MiB", value_parser = parse_size)]
    pub git_max_body: u64,
}

/// `cargo search` through the proxy.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Search")]
pub struct SearchConfig {
    /// Upstream web API, for `cargo search`.
    #[arg(long, env = "CRATERE_UPSTREAM_API", default_value = "https://crates.io",
          value_parser = parse_base_url)]
    pub upstream_api: Url,

    /// Least time between two search requests to the upstream API (crates.io's data-access
    /// policy asks for at most one per second).
    #[arg(long, env = "CRATERE_SEARCH_INTERVAL", default_value = "1s",
          value_parser = parse_duration)]
    pub search_interval: Duration,
}

/// What a cleanup removes, and when the server runs one.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Cache cleanup")]
pub struct CleanupConfig {
    /// When the server cleans the cache: cron, 5 fields (min hour dom mon dow) or 6 with
    /// leading seconds, in UTC; `off` for never (`cratere cleanup` still works).
    #[arg(long, env = "CRATERE_CLEANUP_CACHE_SCHEDULE", default_value = "0 3 * * *",
          value_parser = parse_cleanup_schedule)]
    pub cleanup_cache_schedule: CleanupSchedule,

    /// Crate and index files not used for this many days are removed by a cleanup
    /// (fractions allowed, e.g. 0.5).
    #[arg(long = "max-days-unused", env = "CRATERE_MAX_DAYS_UNUSED", default_value = "90",
          value_name = "DAYS", value_parser = parse_days)]
    pub max_unused: Duration,

    /// Most bytes of crate files to keep: after removing unused files, a cleanup removes the
    /// least recently used ones until the rest fits (e.g. 50GiB, 500MB) [default: no limit].
    #[arg(long, env = "CRATERE_MAX_CACHE_SIZE", value_name = "SIZE", value_parser = parse_size)]
    pub max_cache_size: Option<u64>,
}

/// An access key and its secret (the secret is never printed).
#[derive(Clone, PartialEq, Eq)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3Credentials({}, <secret>)", self.access_key_id)
    }
}

impl Config {
    /// Where to bind: `CRATERE_LISTEN`, or every address on the public port.
    pub fn listen_addr(&self) -> SocketAddr {
        self.server
            .listen
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], self.public.port)))
    }

    /// A config for tests and embedding: defaults plus the given directories.
    pub fn for_dirs(cache: PathBuf, index: PathBuf) -> Config {
        let mut c = Cli::try_parse_args(["cratere"])
            .expect("defaults parse")
            .into_config();
        c.storage.cache = cache;
        c.storage.index = index;
        c
    }
}

impl PublicConfig {
    /// The primary public host.
    pub fn primary_host(&self) -> HostPort {
        HostPort {
            host: self.host.to_ascii_lowercase(),
            port: Some(self.port),
        }
    }
}

/// Where crate files live, resolved once from `CRATERE_STORAGE` and `CRATERE_S3_*`.
#[derive(Debug, Clone)]
pub enum StorageChoice {
    /// The directory `CRATERE_CACHE`.
    Fs,
    S3(S3Settings),
}

/// The bucket of `CRATERE_STORAGE=s3`.
#[derive(Debug, Clone)]
pub struct S3Settings {
    pub bucket: String,
    pub endpoint: S3Endpoint,
    pub region: String,
    pub path_style: bool,
    pub prefix: S3Prefix,
    pub local_cache_size: Option<u64>,
    pub credentials: Option<S3Credentials>,
    /// `CRATERE_CLEANUP_LEADER`.
    pub cleanup_leader: bool,
}

impl StorageConfig {
    /// The storage these settings choose. On the command line clap already refuses
    /// `CRATERE_STORAGE=s3` without a bucket; this names the setting for embedders too.
    pub fn choice(&self) -> Result<StorageChoice, String> {
        match self.kind {
            StorageKind::Fs => Ok(StorageChoice::Fs),
            StorageKind::S3 => Ok(StorageChoice::S3(S3Settings {
                bucket: self
                    .s3_bucket
                    .clone()
                    .ok_or("CRATERE_S3_BUCKET is required with CRATERE_STORAGE=s3")?,
                endpoint: self.s3_endpoint.clone(),
                region: self.s3_region.clone(),
                path_style: self.s3_path_style,
                prefix: self.s3_prefix.clone(),
                local_cache_size: self.s3_local_cache_size,
                credentials: self.s3_credentials.clone(),
                cleanup_leader: self.cleanup_leader,
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut v = vec!["cratere"];
        v.extend_from_slice(args);
        Cli::try_parse_args(v)
            .map(Cli::into_config)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.public.scheme, Scheme::Http);
        assert_eq!(c.public.host, "localhost");
        assert_eq!(c.public.port, 8000);
        assert_eq!(c.listen_addr().to_string(), "0.0.0.0:8000");
        assert_eq!(
            c.upstream.upstream_sparse.as_str(),
            "https://index.crates.io/"
        );
        assert_eq!(c.sparse.index_ttl, Duration::from_secs(120));
        assert_eq!(c.storage.cache, PathBuf::from("./data/crates"));
        assert!(c.public.alternate_hosts.0.is_empty());
        assert!(c.git.git_index);
        assert_eq!(
            c.git.upstream_git.as_str(),
            "https://github.com/rust-lang/crates.io-index.git"
        );
        assert_eq!(c.git.index_update_schedule.to_string(), "*/5 * * * *");
        assert_eq!(
            c.cleanup.cleanup_cache_schedule.0.unwrap().to_string(),
            "0 3 * * *"
        );
        assert_eq!(c.cleanup.max_unused, Duration::from_secs(90 * 86_400));
        assert_eq!(c.cleanup.max_cache_size, None);
    }

    #[test]
    fn lifecycle_settings() {
        let c = parse(&[
            "--cleanup-cache-schedule",
            "*/5 * * * * *",
            "--max-days-unused",
            "0.0002",
            "--max-cache-size",
            "50GiB",
        ])
        .unwrap();
        assert!(c.cleanup.cleanup_cache_schedule.0.is_some());
        assert_eq!(c.cleanup.max_unused.as_millis(), 17_280);
        assert_eq!(c.cleanup.max_cache_size, Some(50 << 30));
        let c = parse(&["--max-cache-size", "500MB", "--max-days-unused", "1.5"]).unwrap();
        assert_eq!(c.cleanup.max_cache_size, Some(500_000_000));
        assert_eq!(c.cleanup.max_unused, Duration::from_secs(36 * 3600));
        let c = parse(&["--cleanup-cache-schedule", "off"]).unwrap();
        assert!(c.cleanup.cleanup_cache_schedule.0.is_none());
    }

    #[test]
    fn subcommands_take_the_same_options() {
        let cli =
            Cli::try_parse_args(["cratere", "cleanup", "--dry-run", "--max-days-unused", "7"])
                .unwrap();
        let Some(Command::Cleanup(a)) = cli.command else {
            panic!("not cleanup")
        };
        assert!(a.dry_run);
        assert_eq!(a.config.cleanup.max_unused, Duration::from_secs(7 * 86_400));
        let cli = Cli::try_parse_args(["cratere", "warm", "a/Cargo.lock", "b.lock", "--jobs", "4"])
            .unwrap();
        let Some(Command::Warm(a)) = cli.command else {
            panic!("not warm")
        };
        assert_eq!(
            a.lockfiles,
            [PathBuf::from("a/Cargo.lock"), "b.lock".into()]
        );
        assert_eq!(a.jobs, 4);
        assert!(Cli::try_parse_args(["cratere", "warm"]).is_err());
    }

    #[test]
    fn serve_subcommand_takes_the_same_options() {
        let c = parse(&["serve", "--port", "9001", "--git-index", "false"]).unwrap();
        assert_eq!(c.public.port, 9001);
        assert!(!c.git.git_index);
        assert_eq!(c.listen_addr().to_string(), "0.0.0.0:9001");
    }

    #[test]
    fn values_are_typed() {
        let c = parse(&[
            "--alternate-hosts",
            r#"["Mirror.Example:8080", "other"]"#,
            "--upstream-sparse",
            "http://127.0.0.1:1234/idx",
            "--index-ttl",
            "90s",
            "--listen",
            "127.0.0.1:0",
        ])
        .unwrap();
        assert_eq!(
            c.public.alternate_hosts.0,
            vec![
                HostPort {
                    host: "mirror.example".into(),
                    port: Some(8080)
                },
                HostPort {
                    host: "other".into(),
                    port: None
                }
            ]
        );
        assert_eq!(
            c.upstream.upstream_sparse.as_str(),
            "http://127.0.0.1:1234/idx/"
        );
        assert_eq!(c.sparse.index_ttl, Duration::from_secs(90));
    }

    #[test]
    fn errors_name_the_variable() {
        for (args, var) in [
            (&["--port", "abc"][..], "CRATERE_PORT"),
            (&["--scheme", "ftp"][..], "CRATERE_SCHEME"),
            (
                &["--alternate-hosts", "host1"][..],
                "CRATERE_ALTERNATE_HOSTS",
            ),
            (
                &["--alternate-hosts", r#"["a/b"]"#][..],
                "CRATERE_ALTERNATE_HOSTS",
            ),
            (&["--index-ttl", "soon"][..], "CRATERE_INDEX_TTL"),
            (
                &["--upstream-sparse", "ftp://x/"][..],
                "CRATERE_UPSTREAM_SPARSE",
            ),
            (&["--host", "a b"][..], "CRATERE_HOST"),
            (&["--git-index", "maybe"][..], "CRATERE_GIT_INDEX"),
            (&["--upstream-git", "ftp://x/y"][..], "CRATERE_UPSTREAM_GIT"),
            (
                &["--upstream-git=-oProxyCommand=x"][..],
                "CRATERE_UPSTREAM_GIT",
            ),
            (&["--upstream-git", ""][..], "CRATERE_UPSTREAM_GIT"),
            (
                &["--index-update-schedule", "every 5 minutes"][..],
                "CRATERE_INDEX_UPDATE_SCHEDULE",
            ),
            (
                &["--index-update-schedule", "61 * * * *"][..],
                "CRATERE_INDEX_UPDATE_SCHEDULE",
            ),
            (&["serve", "--listen", "nowhere"][..], "CRATERE_LISTEN"),
            (
                &["--upstream-concurrency", "0"][..],
                "CRATERE_UPSTREAM_CONCURRENCY",
            ),
            (
                &["--cleanup-cache-schedule", "daily"][..],
                "CRATERE_CLEANUP_CACHE_SCHEDULE",
            ),
            (&["--max-days-unused", "0"][..], "CRATERE_MAX_DAYS_UNUSED"),
            (&["--max-days-unused=-1"][..], "CRATERE_MAX_DAYS_UNUSED"),
            (&["--max-days-unused", "NaN"][..], "CRATERE_MAX_DAYS_UNUSED"),
            (
                &["--max-days-unused", "1e300"][..],
                "CRATERE_MAX_DAYS_UNUSED",
            ),
            (&["--max-cache-size", "lots"][..], "CRATERE_MAX_CACHE_SIZE"),
            (&["--max-cache-size", "0"][..], "CRATERE_MAX_CACHE_SIZE"),
            (
                &["cleanup", "--max-cache-size", "10XB"][..],
                "CRATERE_MAX_CACHE_SIZE",
            ),
            (
                &["warm", "x.lock", "--max-days-unused", "soon"][..],
                "CRATERE_MAX_DAYS_UNUSED",
            ),
            (&["--storage", "s3"][..], "CRATERE_S3_BUCKET"),
            (&["cleanup", "--storage", "s3"][..], "CRATERE_S3_BUCKET"),
            (&["--storage", "gcs"][..], "CRATERE_STORAGE"),
            (
                &["--storage", "s3", "--s3-bucket", "Bad_Bucket"][..],
                "CRATERE_S3_BUCKET",
            ),
            (&["--s3-endpoint", "ftp://x"][..], "CRATERE_S3_ENDPOINT"),
            (&["--s3-prefix", "a/../b"][..], "CRATERE_S3_PREFIX"),
            (&["--s3-prefix", "a b"][..], "CRATERE_S3_PREFIX"),
            (&["--s3-path-style", "maybe"][..], "CRATERE_S3_PATH_STYLE"),
            (
                &["--s3-local-cache-size", "much"][..],
                "CRATERE_S3_LOCAL_CACHE_SIZE",
            ),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.contains(var), "{args:?}: {err}");
        }
    }

    #[test]
    fn storage_settings() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.storage.kind, StorageKind::Fs);
        assert_eq!(c.storage.s3_bucket, None);
        assert_eq!(c.storage.s3_endpoint, S3Endpoint(None));
        assert_eq!(c.storage.s3_region, "us-east-1");
        assert!(!c.storage.s3_path_style);
        assert_eq!(c.storage.s3_prefix.as_str(), "");
        assert_eq!(c.storage.s3_local_cache_size, None);
        let c = parse(&[
            "--storage",
            "s3",
            "--s3-bucket",
            "crates",
            "--s3-endpoint",
            "http://127.0.0.1:9000/",
            "--s3-region",
            "eu-west-3",
            "--s3-path-style",
            "true",
            "--s3-prefix",
            "/cratere/prod/",
            "--s3-local-cache-size",
            "2GiB",
        ])
        .unwrap();
        assert_eq!(c.storage.s3_local_cache_size, Some(2 << 30));
        assert_eq!(c.storage.kind, StorageKind::S3);
        assert_eq!(c.storage.s3_bucket.as_deref(), Some("crates"));
        assert_eq!(
            c.storage.s3_endpoint.0.as_deref(),
            Some("http://127.0.0.1:9000")
        );
        assert_eq!(c.storage.s3_region, "eu-west-3");
        assert!(c.storage.s3_path_style);
        assert_eq!(c.storage.s3_prefix.as_str(), "cratere/prod/");
        let c = parse(&[
            "--storage",
            "s3",
            "--s3-bucket",
            "b.b-1",
            "--s3-endpoint",
            "",
        ])
        .unwrap();
        assert_eq!(c.storage.s3_endpoint, S3Endpoint(None));
    }

    #[test]
    fn git_remotes() {
        let c = parse(&[
            "--upstream-git",
            "file:///srv/index.git",
            "--index-update-schedule",
            "*/10 * * * * *",
        ])
        .unwrap();
        assert_eq!(c.git.upstream_git.as_str(), "file:///srv/index.git");
        assert_eq!(c.git.index_update_schedule.to_string(), "*/10 * * * * *");
        for ok in [
            "https://example.com/index.git",
            "ssh://git@example.com/index.git",
            "git@example.com:index.git",
            "/srv/index.git",
        ] {
            assert_eq!(parse_git_remote(ok).unwrap().as_str(), ok);
        }
        let rel = parse_git_remote("seed/index").unwrap();
        assert!(std::path::Path::new(rel.as_str()).is_absolute(), "{rel}");
        assert!(rel.as_str().ends_with("/seed/index"), "{rel}");
    }

    #[test]
    fn host_ports() {
        let h = HostPort::parse("Example.COM:8000").unwrap();
        assert_eq!(h.authority(Scheme::Http), "example.com:8000");
        let h = HostPort::parse("example.com:80").unwrap();
        assert_eq!(h.port, Some(80));
        assert_eq!(h.authority(Scheme::Http), "example.com");
        assert_eq!(h.authority(Scheme::Https), "example.com:80");
        let h = HostPort::parse("[::1]:8000").unwrap();
        assert_eq!(h.authority(Scheme::Http), "[::1]:8000");
        assert!(HostPort::parse("user@host").is_err());
        assert!(HostPort::parse("host/path").is_err());
        assert!(HostPort::parse("host:99999").is_err());
    }
}

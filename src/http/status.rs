//! The status page at `/`: what this proxy is, how to point cargo at it, and live figures.
//! Server-rendered HTML with inline CSS and an inline SVG chart: no scripts, no external
//! assets, so it works air-gapped.

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, Uri, header};
use axum::response::{Html, IntoResponse};

use super::{AppState, requested_host};
use crate::metrics::{Kind, Metrics, Outcome};

fn esc(s: &str) -> String {
    html_escape::encode_text(s).into_owned()
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

fn ago(unix: i64) -> String {
    if unix == 0 {
        return "never".into();
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let d = (now - unix).max(0) as u64;
    let text = humantime::format_duration(std::time::Duration::from_secs(d)).to_string();
    format!("{text} ago")
}

fn ratio(m: &Metrics, kind: Kind) -> String {
    let hits = m.cache_count(kind, Outcome::Hit)
        + m.cache_count(kind, Outcome::Revalidated)
        + m.cache_count(kind, Outcome::StaleWhileRevalidate);
    let total = hits + m.cache_count(kind, Outcome::Miss) + m.cache_count(kind, Outcome::Stale);
    if total == 0 {
        "no requests yet".into()
    } else {
        format!(
            "{:.1}% ({hits} of {total})",
            hits as f64 * 100.0 / total as f64
        )
    }
}

/// Requests per minute over the last hour as an SVG bar chart (hits darker).
fn chart(traffic: &[(u64, u64)]) -> String {
    let (w, h) = (600.0, 120.0);
    let max = traffic.iter().map(|t| t.0).max().unwrap_or(0).max(1) as f64;
    let bw = w / traffic.len().max(1) as f64;
    let mut svg = format!(
        r#"<svg id="traffic" role="img" aria-label="Requests per minute, last hour" viewBox="0 0 {w} {h}" preserveAspectRatio="none" width="100%" height="{h}" style="background:#f7fafc">"#
    );
    for (i, (n, hits)) in traffic.iter().enumerate() {
        let x = i as f64 * bw;
        let bh = *n as f64 / max * (h - 10.0);
        let hh = *hits as f64 / max * (h - 10.0);
        let _ = write!(
            svg,
            r##"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="#9ec5e8"><title>{n} requests</title></rect><rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{hh:.1}" fill="#2b6cb0"/>"##,
            h - bh,
            bw - 1.0,
            h - hh,
            bw - 1.0
        );
    }
    svg.push_str("</svg>");
    svg
}

/// The upstream row: down (breaker open), failing, ok or not asked yet.
fn upstream_state(down: bool, m: &Metrics) -> String {
    let (ok, err, err_text) = m.upstream_health();
    if down {
        format!(
            r#"<span class="bad">down</span> — serving from the cache, probing; last error {}: {}"#,
            esc(&ago(err)),
            esc(&err_text)
        )
    } else if err > ok {
        format!(
            r#"<span class="bad">failing</span> since {} — {}"#,
            esc(&ago(err)),
            esc(&err_text)
        )
    } else if ok > 0 {
        format!(
            r#"<span class="good">ok</span>, last answer {}"#,
            esc(&ago(ok))
        )
    } else {
        "no upstream request yet".into()
    }
}

/// The git index row.
fn git_state(git: Option<&crate::git::GitIndex>) -> String {
    match git {
        None => "disabled (CRATERE_GIT_INDEX=false)".to_string(),
        Some(g) => {
            let s = g.status();
            let state = if s.running {
                "syncing now"
            } else if s.ready {
                "serving"
            } else {
                "waiting for the first sync"
            };
            let last = match &s.last {
                None => "no sync yet".to_string(),
                Some(r) => {
                    let when = ago(r.started.timestamp());
                    match &r.result {
                        Ok(rep) => format!(
                            "last sync {when} ok in {:.1} s, upstream head {}",
                            r.duration.as_secs_f64(),
                            rep.upstream_head.get(..12).unwrap_or(&rep.upstream_head)
                        ),
                        Err(e) => format!("last sync {when} FAILED: {e}"),
                    }
                }
            };
            format!("{state}; {last}")
        }
    }
}

/// The last-cleanup row.
fn cleanup_state(last: Option<crate::cleanup::CleanupReport>) -> String {
    match last {
        None => "not run yet".to_string(),
        Some(r) => format!(
            "{} — removed {} crate files ({}) and {} index files in {:.1} s",
            ago(r
                .at
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs() as i64),
            r.crate_files_removed,
            human_bytes(r.crate_bytes_removed),
            r.index_files_removed,
            r.duration.as_secs_f64()
        ),
    }
}

/// The page: a few figures, then one HTML template (a single literal, kept whole so the
/// markup reads as a page).
pub async fn page(State(st): State<AppState>, uri: Uri, headers: HeaderMap) -> impl IntoResponse {
    let base = st.hosts.base_url_for(requested_host(&uri, &headers));
    let m = &st.core.metrics;
    let (files, bytes, scanned) = m.cache_size();
    let upstream_state = upstream_state(st.core.upstream.breaker().is_open(), m);
    let size = if scanned {
        format!("{files} crate files, {}", human_bytes(bytes))
    } else {
        "counting…".into()
    };
    let uptime = humantime::format_duration(std::time::Duration::from_secs(
        m.started().elapsed().unwrap_or_default().as_secs(),
    ));
    let git = git_state(st.git.as_deref());
    let cleanup = cleanup_state(st.core.cleanup.last());
    // With S3 storage: whether the bucket can hold the cleanup lease.
    let bucket = st.core.ready_details().map_or(String::new(), |d| {
        format!(
            r#"<tr><th>Bucket cleanup lease</th><td id="bucket-lease">{}</td></tr>
"#,
            esc(&d)
        )
    });
    let traffic = m.traffic();
    let last_hour: u64 = traffic.iter().map(|t| t.0).sum();
    let html = format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="30">
<title>Cratere — crates.io proxy</title>
<style>
body{{font:15px/1.5 system-ui,sans-serif;max-width:860px;margin:2em auto;padding:0 1em;color:#1a202c}}
h1{{margin-bottom:0}} .sub{{color:#4a5568;margin-top:.2em}}
pre{{background:#f7fafc;border:1px solid #e2e8f0;padding:.8em;overflow-x:auto}}
table{{border-collapse:collapse;width:100%}} td,th{{text-align:left;padding:.3em .6em;border-bottom:1px solid #e2e8f0}}
th{{width:40%;font-weight:600}} .good{{color:#2f855a;font-weight:600}} .bad{{color:#c53030;font-weight:600}}
</style></head>
<body>
<h1>Cratere</h1>
<p class="sub">A caching proxy for crates.io at <code id="base-url">{base}</code>: cargo fetches the index and crates
through it; crates are verified against the index checksum and kept on disk, so builds stay fast
and keep working when crates.io is slow or unreachable.</p>

<h2>Use it</h2>
<p>Sparse index (cargo ≥ 1.68) — in <code>~/.cargo/config.toml</code> or a project's <code>.cargo/config.toml</code>:</p>
<pre id="sparse-config">[source.crates-io]
replace-with = "cratere"

[source.cratere]
registry = "sparse+{base}/index/"</pre>
<p>Git index (older cargo, <code>net.git-fetch-with-cli</code> setups):</p>
<pre id="git-config">[source.crates-io]
replace-with = "cratere"

[source.cratere]
registry = "{base}/crates.io-index"</pre>

<h2>Cache</h2>
<table id="stats">
<tr><th>Crate downloads served from cache</th><td id="crate-hit-ratio">{crate_ratio}</td></tr>
<tr><th>Index files served from cache</th><td id="index-hit-ratio">{index_ratio}</td></tr>
<tr><th>Cache size</th><td id="cache-size">{size}</td></tr>
<tr><th>Downloads in progress</th><td>{in_flight}</td></tr>
<tr><th>Served from cache / fetched upstream</th><td>{served} / {fetched}</td></tr>
<tr><th>Upstream</th><td id="upstream">{upstream_state}</td></tr>
<tr><th>Git index</th><td id="git-index">{git}</td></tr>
<tr><th>Last cleanup</th><td id="cleanup">{cleanup}</td></tr>
{bucket}<tr><th>Up for</th><td>{uptime}</td></tr>
</table>

<h2>Traffic, last hour</h2>
<p>{last_hour} requests (light: all requests per minute, dark: cache hits).</p>
{chart}
<p class="sub" style="display:flex;justify-content:space-between;margin-top:0"><span>60 min ago</span><span>now</span></p>
<p class="sub"><a href="/metrics">Prometheus metrics</a> · <a href="/health">health</a> · <a href="/ready">readiness</a></p>
</body></html>
"#,
        base = esc(&base),
        crate_ratio = esc(&ratio(m, Kind::Crate)),
        index_ratio = esc(&ratio(m, Kind::Index)),
        size = esc(&size),
        in_flight = m.downloads_in_flight(),
        served = human_bytes(m.bytes_served_from_cache()),
        fetched = human_bytes(m.bytes_fetched_from_upstream()),
        git = esc(&git),
        cleanup = esc(&cleanup),
        uptime = esc(&uptime.to_string()),
        chart = chart(&traffic),
    );
    ([(header::CACHE_CONTROL, "no-store")], Html(html))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_escaping() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
        assert_eq!(esc("<script>&"), "&lt;script&gt;&amp;");
    }

    #[test]
    fn chart_has_one_bar_pair_per_minute() {
        let svg = chart(&[(0, 0), (10, 5), (4, 4)]);
        assert_eq!(svg.matches("<rect").count(), 6);
        assert!(svg.starts_with("<svg"));
    }
}

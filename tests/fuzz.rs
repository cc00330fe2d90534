//! Property tests over request parsing (run by the suite with a bounded number of cases):
//! arbitrary and hostile path pieces never crash the parsers, never produce an unsafe path,
//! and never make the real router answer 500 or write outside its directories.

mod common;

use cratere::names::{CrateKey, CrateName, IndexPath, Version};
use proptest::prelude::*;
use tower::ServiceExt;

fn is_safe_relative(p: &str) -> bool {
    !p.starts_with('/')
        && p.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.+".contains(&b))
        })
}

/// Path pieces attackers like, mixed with valid ones.
fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("..".to_string()),
        Just("%2e%2e".to_string()),
        Just("%2E%2E%2F".to_string()),
        Just("%252e%252e%252f".to_string()),
        Just("%00".to_string()),
        Just("%2F".to_string()),
        Just("se".to_string()),
        Just("rd".to_string()),
        Just("serde".to_string()),
        Just("1.0.0".to_string()),
        Just("1.0.0+b".to_string()),
        Just("~".to_string()),
        Just("é".to_string()),
        "[a-zA-Z0-9_.%+-]{1,20}",
        "\\PC{1,10}",
        "[a-z]{60,80}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn parsers_never_accept_unsafe_input(s in "\\PC{0,80}") {
        if let Ok(n) = s.parse::<CrateName>() {
            prop_assert!(n.as_str().len() <= 64);
            prop_assert!(is_safe_relative(&n.index_path().as_relative()));
        }
        if let Ok(p) = s.parse::<IndexPath>() {
            prop_assert_eq!(p.as_relative(), s.clone());
            prop_assert!(is_safe_relative(&p.as_relative()));
        }
        if let Ok(v) = s.parse::<Version>() {
            let k = CrateKey::new(&"x".parse().unwrap(), &v);
            prop_assert!(is_safe_relative(&k.as_relative()), "{}", k.as_relative());
        }
    }

    #[test]
    fn index_paths_of_valid_names_round_trip(n in "[a-z][a-z0-9_-]{0,63}") {
        let name: CrateName = n.parse().unwrap();
        let path = name.index_path().as_relative();
        let parsed: IndexPath = path.parse().unwrap();
        prop_assert_eq!(parsed.name().as_str(), n.as_str());
    }
}

#[test]
fn the_router_survives_hostile_paths() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::Proxy::config("http://127.0.0.1:9/", &dir.path().join("data"));
    cfg.upstream.upstream_connect_timeout = std::time::Duration::from_millis(200);
    cfg.search.upstream_api = "http://127.0.0.1:9/".parse().unwrap();
    cfg.search.search_interval = std::time::Duration::from_millis(1);
    let state = rt.block_on(async { cratere::http::AppState::new(cfg).unwrap() });
    let app = cratere::http::router(state);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(256));
    let strategy = (prop::collection::vec(piece(), 1..6), 0..4usize);
    runner
        .run(&strategy, |(pieces, route)| {
            let joined = pieces.join("/");
            let uri = match route {
                0 => format!("/index/{joined}"),
                1 => format!("/api/v1/crates/{}/download", joined),
                2 => format!("/api/v1/crates?q={joined}"),
                _ => format!("/{joined}"),
            };
            let Ok(req) = axum::http::Request::get(&uri).body(axum::body::Body::empty()) else {
                return Ok(()); // not even a valid URI: hyper would have refused it
            };
            let status = rt
                .block_on(app.clone().oneshot(req))
                .unwrap()
                .status()
                .as_u16();
            prop_assert!(
                status < 500 || [502, 503, 504].contains(&status),
                "{uri} → {status}"
            );
            // Nothing appears outside the two data directories.
            let top: Vec<_> = std::fs::read_dir(dir.path().join("data"))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            prop_assert!(top.iter().all(|n| n == "crates" || n == "index"), "{top:?}");
            Ok(())
        })
        .unwrap();
}

//! The container image and Kubernetes manifests, checked by structure (no Docker engine or
//! cluster runs here): every setting is a real variable that the binary accepts, probes hit
//! routes that answer, names line up between resources.

mod common;

use std::collections::BTreeMap;

use yaml_serde::Value;

fn manifest(name: &str) -> Value {
    let path = format!("{}/deploy/k8s/{name}", env!("CARGO_MANIFEST_DIR"));
    yaml_serde::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

/// The resources of a kustomization directory (under deploy/k8s/), by kind.
fn resources(dir: &str) -> BTreeMap<String, Value> {
    let kustomization = manifest(&format!("{dir}kustomization.yaml"));
    let mut kinds = BTreeMap::new();
    for r in kustomization["resources"].as_sequence().unwrap() {
        let m = manifest(&format!("{dir}{}", s(r)));
        kinds.insert(s(&m["kind"]).to_string(), m);
    }
    kinds
}

/// The settings of a ConfigMap, parsed by the binary's own parser.
fn parse_config_map(cm: &Value) -> cratere::config::Config {
    let data = cm["data"].as_mapping().unwrap();
    let mut args = vec!["cratere".to_string(), "serve".to_string()];
    let known = cratere_env_vars();
    for (k, v) in data {
        let (k, v) = (s(k), s(v));
        if k == "RUST_LOG" {
            continue;
        }
        assert!(known.contains_key(k), "{k} is not a cratere setting");
        args.push(format!("--{}={v}", known[k]));
    }
    cratere::config::Cli::try_parse_args(&args)
        .unwrap_or_else(|e| panic!("ConfigMap values do not parse: {e}"))
        .into_config()
}

#[tokio::test]
async fn the_s3_overlay_runs_several_replicas_on_one_bucket() {
    let kinds = resources("s3/");
    assert_eq!(
        kinds.keys().cloned().collect::<Vec<_>>(),
        ["ConfigMap", "Deployment", "Secret", "Service"],
        "no PersistentVolumeClaim: replicas keep only caches locally"
    );
    let (cm, dep, secret, svc) = (
        &kinds["ConfigMap"],
        &kinds["Deployment"],
        &kinds["Secret"],
        &kinds["Service"],
    );
    let config = parse_config_map(cm);
    assert_eq!(config.storage.kind, cratere::config::StorageKind::S3);
    let bucket = config.storage.s3_bucket.clone().expect("a bucket");

    assert!(dep["spec"]["replicas"].as_u64().unwrap() >= 2);
    assert_ne!(s(&dep["spec"]["strategy"]["type"]), "Recreate");
    let spec = &dep["spec"]["template"]["spec"];
    let c = &spec["containers"][0];
    assert_eq!(
        s(&c["envFrom"][0]["configMapRef"]["name"]),
        s(&cm["metadata"]["name"])
    );
    assert_eq!(
        s(&c["envFrom"][1]["secretRef"]["name"]),
        s(&secret["metadata"]["name"])
    );
    // The Secret holds exactly the standard AWS credential variables.
    let keys: Vec<_> = secret["stringData"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| s(k).to_string())
        .collect();
    assert_eq!(keys, ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]);
    // Local data on a per-pod volume covering both directories.
    let mount = s(&c["volumeMounts"][0]["mountPath"]);
    assert_eq!(
        s(&c["volumeMounts"][0]["name"]),
        s(&spec["volumes"][0]["name"])
    );
    assert!(spec["volumes"][0]["emptyDir"].is_mapping());
    assert!(config.storage.cache.starts_with(mount) && config.storage.index.starts_with(mount));
    assert_eq!(
        c["ports"][0]["containerPort"].as_u64().unwrap(),
        config.public.port as u64
    );
    assert!(spec["securityContext"]["runAsNonRoot"].as_bool().unwrap());
    assert!(
        spec["terminationGracePeriodSeconds"].as_u64().unwrap()
            > config.server.shutdown_grace.as_secs()
    );
    assert_eq!(
        svc["spec"]["selector"],
        dep["spec"]["template"]["metadata"]["labels"]
    );
    assert_eq!(
        s(&svc["spec"]["ports"][0]["targetPort"]),
        s(&c["ports"][0]["name"])
    );

    // These settings (bucket, prefix; the endpoint pointed at a local S3 server) serve, and
    // the probes answer 200.
    let s3 = common::s3::S3Server::start_with_bucket(&bucket).await;
    let up = common::FakeUpstream::start().await;
    let bytes = up.publish("probe", "1.0.0", 1000);
    let dir = tempfile::tempdir().unwrap();
    let mut local = common::Proxy::config(&up.url, dir.path());
    s3.configure(&mut local);
    local.storage.s3_prefix = config.storage.s3_prefix.clone();
    local.storage.s3_region = config.storage.s3_region.clone();
    let proxy = common::Proxy::start_with(local).await;
    for probe in ["readinessProbe", "livenessProbe"] {
        let path = s(&c[probe]["httpGet"]["path"]);
        assert_eq!(proxy.get(path).await.status(), 200, "{probe} {path}");
    }
    let r = proxy.get("/api/v1/crates/probe/1.0.0/download").await;
    assert_eq!(r.bytes().await.unwrap(), bytes);
    common::wait_until_async(
        || async {
            let key = format!(
                "{}pr/ob/probe/probe-1.0.0.crate",
                config.storage.s3_prefix.as_str()
            );
            s3.keys().await.contains(&key)
        },
        "the crate under the prefix",
    )
    .await;
}

#[tokio::test]
async fn kubernetes_manifests_fit_together_and_with_the_binary() {
    let kinds = resources("");
    assert_eq!(
        kinds.keys().cloned().collect::<Vec<_>>(),
        [
            "ConfigMap",
            "Deployment",
            "PersistentVolumeClaim",
            "Service"
        ]
    );
    let (cm, dep, pvc, svc) = (
        &kinds["ConfigMap"],
        &kinds["Deployment"],
        &kinds["PersistentVolumeClaim"],
        &kinds["Service"],
    );

    // The ConfigMap holds only variables the binary knows, and they parse.
    let config = parse_config_map(cm);

    // The Deployment uses that ConfigMap and PVC, exposes CRATERE_PORT, probes real routes.
    let spec = &dep["spec"]["template"]["spec"];
    let c = &spec["containers"][0];
    assert_eq!(
        s(&c["envFrom"][0]["configMapRef"]["name"]),
        s(&cm["metadata"]["name"])
    );
    assert_eq!(
        c["ports"][0]["containerPort"].as_u64().unwrap(),
        config.public.port as u64
    );
    assert_eq!(
        s(&spec["volumes"][0]["persistentVolumeClaim"]["claimName"]),
        s(&pvc["metadata"]["name"])
    );
    let mount = s(&c["volumeMounts"][0]["mountPath"]);
    assert!(config.storage.cache.starts_with(mount) && config.storage.index.starts_with(mount));
    assert!(c["resources"]["requests"]["cpu"].as_str().is_some());
    assert!(c["resources"]["requests"]["memory"].as_str().is_some());
    assert!(spec["securityContext"]["runAsNonRoot"].as_bool().unwrap());
    let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > config.server.shutdown_grace.as_secs(),
        "pod grace covers CRATERE_SHUTDOWN_GRACE"
    );
    assert_eq!(
        dep["spec"]["selector"]["matchLabels"],
        dep["spec"]["template"]["metadata"]["labels"]
    );
    assert_eq!(
        svc["spec"]["selector"],
        dep["spec"]["template"]["metadata"]["labels"]
    );
    assert_eq!(
        s(&svc["spec"]["ports"][0]["targetPort"]),
        s(&c["ports"][0]["name"])
    );

    // The probe paths answer 200 on a running proxy.
    let up = common::FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = common::Proxy::start(&up, dir.path()).await;
    for probe in ["readinessProbe", "livenessProbe"] {
        let path = s(&c[probe]["httpGet"]["path"]);
        assert_eq!(proxy.get(path).await.status(), 200, "{probe} {path}");
    }
}

/// `CRATERE_*` variable → long flag, from the clap definition.
fn cratere_env_vars() -> BTreeMap<String, String> {
    use clap::CommandFactory;
    cratere::config::Cli::command()
        .get_arguments()
        .filter_map(|a| {
            Some((
                a.get_env()?.to_string_lossy().to_string(),
                a.get_long()?.to_string(),
            ))
        })
        .collect()
}

#[test]
fn dockerfile_is_multi_stage_non_root_with_volume_port_and_healthcheck() {
    let text =
        std::fs::read_to_string(format!("{}/Dockerfile", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    let from: Vec<_> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(from.len(), 2, "build stage + runtime stage");
    assert!(from[0].contains(" AS build"));
    assert!(text.contains("COPY --from=build"));
    let user = lines.iter().find(|l| l.starts_with("USER ")).expect("USER");
    assert!(!user.contains("root") && !user.ends_with(" 0"), "{user}");
    assert!(lines.contains(&"VOLUME /data"));
    assert!(lines.contains(&"EXPOSE 8000"));
    assert!(lines.iter().any(|l| l.starts_with("HEALTHCHECK ")));
    assert!(text.contains("/health"));
    for pkg in ["ca-certificates", "git", "curl"] {
        assert!(text.contains(pkg), "{pkg} in the runtime image");
    }
    // The image's settings are real variables.
    let known = cratere_env_vars();
    for var in ["CRATERE_CACHE", "CRATERE_INDEX", "CRATERE_PORT"] {
        assert!(known.contains_key(var) && text.contains(&format!("{var}=")));
    }
}

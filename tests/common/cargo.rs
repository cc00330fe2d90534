//! Helpers for tests that run the real `cargo`: crates made with `cargo package`, a fresh
//! `CARGO_HOME` pointed at a sparse index, cargo commands.

use std::path::Path;
use std::process::Command;

use bytes::Bytes;

use super::FakeUpstream;

pub fn write(path: &Path, content: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

/// Packages `alpha 0.1.0`, `beta 0.2.0` (depends on alpha) and `Mixed_Case 1.0.0` with
/// `cargo package`, offline.
pub fn package_crates(root: &Path) -> Vec<(String, String, Bytes)> {
    write(
        &root.join("Cargo.toml"),
        "[workspace]\nmembers = [\"alpha\", \"beta\", \"mixed\"]\nresolver = \"2\"\n",
    );
    let manifest = |name: &str, version: &str, deps: &str| {
        format!(
            "[package]\nname = \"{name}\"\nversion = \"{version}\"\nedition = \"2021\"\n\
             description = \"test crate\"\nlicense = \"MIT\"\n\n[dependencies]\n{deps}"
        )
    };
    write(
        &root.join("alpha/Cargo.toml"),
        &manifest("alpha", "0.1.0", ""),
    );
    write(
        &root.join("alpha/src/lib.rs"),
        "pub fn one() -> u32 { 1 }\n",
    );
    write(
        &root.join("beta/Cargo.toml"),
        &manifest(
            "beta",
            "0.2.0",
            "alpha = { version = \"0.1\", path = \"../alpha\" }\n",
        ),
    );
    write(
        &root.join("beta/src/lib.rs"),
        "pub fn two() -> u32 { alpha::one() + 1 }\n",
    );
    write(
        &root.join("mixed/Cargo.toml"),
        &manifest("Mixed_Case", "1.0.0", ""),
    );
    write(
        &root.join("mixed/src/lib.rs"),
        "pub fn three() -> u32 { 3 }\n",
    );
    let out = Command::new(env!("CARGO"))
        .args([
            "package",
            "--workspace",
            "--no-verify",
            "--allow-dirty",
            "--offline",
        ])
        .current_dir(root)
        .env("CARGO_HOME", root.join("cargo-home"))
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    [
        ("alpha", "0.1.0"),
        ("beta", "0.2.0"),
        ("Mixed_Case", "1.0.0"),
    ]
    .iter()
    .map(|(n, v)| {
        let file = root.join(format!("target/package/{n}-{v}.crate"));
        (
            n.to_string(),
            v.to_string(),
            Bytes::from(std::fs::read(file).unwrap()),
        )
    })
    .collect()
}

pub fn dep(name: &str, req: &str) -> String {
    format!(
        r#"[{{"name": "{name}", "req": "{req}", "features": [], "optional": false, "default_features": true, "target": null, "kind": "normal"}}]"#
    )
}

/// A fresh CARGO_HOME whose crates.io source is replaced by the proxy.
pub fn cargo_home(dir: &Path, proxy_url: &str) -> std::path::PathBuf {
    cargo_home_for_index(dir, &format!("{proxy_url}/index/"))
}

/// A fresh CARGO_HOME whose crates.io source is replaced by the sparse index at `index_url`
/// (ending in `/`).
pub fn cargo_home_for_index(dir: &Path, index_url: &str) -> std::path::PathBuf {
    let home = dir.to_path_buf();
    write(
        &home.join("config.toml"),
        &format!(
            "[source.crates-io]\nreplace-with = \"cratere\"\n\n[source.cratere]\n\
             registry = \"sparse+{index_url}\"\n\n[net]\nretry = 0\n"
        ),
    );
    home
}

pub fn cargo(project: &Path, home: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO"))
        .args(args)
        .current_dir(project)
        .env("CARGO_HOME", home)
        .env("CARGO_TARGET_DIR", project.join("target"))
        .env_remove("CARGO_REGISTRIES_CRATES_IO_PROTOCOL")
        .env("CARGO_HTTP_TIMEOUT", "20")
        .output()
        .unwrap()
}

/// Publishes the crates of [`package_crates`] on the fake upstream (`beta` depends on `alpha`).
pub fn publish_packaged(up: &FakeUpstream, crates: &[(String, String, Bytes)]) {
    for (name, version, bytes) in crates {
        let deps = if name == "beta" {
            dep("alpha", "^0.1")
        } else {
            "[]".into()
        };
        up.publish_bytes(name, version, bytes.clone(), &deps);
    }
}

/// A binary project `app` using `beta` and `Mixed_Case` (and so `alpha`); prints 5.
pub fn write_app_project(project: &Path) {
    write(
        &project.join("Cargo.toml"),
        "[package]\nname = \"app\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\n\
         [dependencies]\nbeta = \"0.2\"\nMixed_Case = \"1\"\n",
    );
    write(
        &project.join("src/main.rs"),
        "fn main() { println!(\"{}\", beta::two() + Mixed_Case::three()); }\n",
    );
}

/// Fails with the command's stderr unless it succeeded.
pub fn assert_ok(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The crates of [`package_crates`] (built under `work/src-crates`) published on a new fake
/// upstream, and the project of [`write_app_project`] at `work/app` that uses them.
pub async fn packaged_app(
    work: &Path,
) -> (
    Vec<(String, String, Bytes)>,
    FakeUpstream,
    std::path::PathBuf,
) {
    let crates = package_crates(&work.join("src-crates"));
    let up = FakeUpstream::start().await;
    publish_packaged(&up, &crates);
    let project = work.join("app");
    write_app_project(&project);
    (crates, up, project)
}

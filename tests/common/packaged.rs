//! Crates made by the real `cargo package` (offline), for tests that run the real cargo.

use std::path::Path;
use std::process::Command;

use bytes::Bytes;

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

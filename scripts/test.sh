#!/usr/bin/env bash
# The whole test suite: installs what a fresh machine lacks, then runs every test.
# Usage: ./scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v git >/dev/null || need_apt+=(git)
command -v curl >/dev/null || need_apt+=(curl)
# The status page test renders the page in headless Chromium.
command -v chromium >/dev/null || need_apt+=(chromium)
# The load test drives the server with wrk.
command -v wrk >/dev/null || need_apt+=(wrk)
if ((${#need_apt[@]})); then
    echo "installing: ${need_apt[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

# tests/s3.rs runs crate storage against a real S3-compatible server, s3s-fs (~2 min to build).
if ! command -v s3s-fs >/dev/null && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs" ]; then
    echo "installing: s3s-fs"
    cargo install s3s-fs@0.14.1 --locked --features binary --root "${CARGO_HOME:-$HOME/.cargo}"
fi
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

exec cargo test --locked --all-targets "$@"

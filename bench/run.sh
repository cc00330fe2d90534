#!/usr/bin/env bash
# Side-by-side benchmarks of Cratere: cached hits against nginx serving the same files, misses
# and real cargo runs against going straight to upstream. Installs nginx, wrk, h2load and openssl if
# missing, builds the release binary, then runs bench/bench.py, which prints a Markdown report.
#
#   ./bench/run.sh                 # everything (about 15 minutes)
#   SECS=5 ROUNDS=1 ./bench/run.sh # a quick look
#   ONLY=hits ./bench/run.sh       # one part: hot, hits, index, miss, cargo, memory, git
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for tool in nginx wrk openssl curl git; do
    command -v "$tool" >/dev/null || need+=("$tool")
done
command -v h2load >/dev/null || need+=(nghttp2-client)
if ((${#need[@]})); then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
cargo build --release --quiet
exec python3 bench/bench.py "$@"

#!/usr/bin/env bash
# Soak run (not in CI): 30 minutes of mixed load with upstream faults on a schedule; reports
# errors, RSS and open descriptors over time and fails on growth. See bench/soak/soak.py.
#
#   ./bench/soak/run.sh                 # 30 minutes
#   SOAK_SECS=120 ./bench/soak/run.sh   # a quick look
set -euo pipefail
cd "$(dirname "$0")/../.."
need=()
for tool in git pgrep; do
    command -v "$tool" >/dev/null || need+=("$tool")
done
if ((${#need[@]})); then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq git procps
fi
cargo build --release --quiet
exec python3 bench/soak/soak.py "$@"

#!/usr/bin/env bash
# Acceptance check against the real upstream (not part of the test suite: it downloads ~200
# crates). Uses this repository's own Cargo.toml/Cargo.lock (~230 packages) as the project.
#  1. fresh `cargo fetch` through the proxy; every cached .crate's sha256 = Cargo.lock checksum
#  2. proxy restarted with upstream unreachable serves the project to an empty CARGO_HOME
#  3. `cargo generate-lockfile` through the proxy = directly against upstream
#  4. config.json for the primary host, an alternate host and a spoofed Host
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
BIN=$PWD/target/release/cratere
WORK=$(mktemp -d)
PORT=${PORT:-18080}
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

mkdir -p "$WORK/project/src"
cp Cargo.toml Cargo.lock "$WORK/project/"
echo 'fn main() {}' > "$WORK/project/src/main.rs"
echo '' > "$WORK/project/src/lib.rs"
mkdir -p "$WORK/project/tests" "$WORK/project/benches"

start() {
    CRATERE_PORT=$PORT CRATERE_LISTEN=127.0.0.1:$PORT CRATERE_CACHE=$WORK/data/crates \
    CRATERE_INDEX=$WORK/data/index CRATERE_GIT_INDEX=false CRATERE_ALTERNATE_HOSTS='["alt.example:9999"]' \
    "$@" "$BIN" >>"$WORK/proxy.log" 2>&1 &
    PID=$!
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && return; sleep 0.1; done
    echo "proxy did not start"; cat "$WORK/proxy.log"; exit 1
}
home() {
    mkdir -p "$1"
    printf '[source.crates-io]\nreplace-with = "cratere"\n[source.cratere]\nregistry = "sparse+http://localhost:%s/index/"\n' "$PORT" > "$1/config.toml"
}

start env
home "$WORK/home1"
t0=$(date +%s.%N)
(cd "$WORK/project" && CARGO_HOME=$WORK/home1 cargo fetch --locked -q)
t1=$(date +%s.%N)
n=$(find "$WORK/data/crates" -name '*.crate' | wc -l)
echo "1. cargo fetch through the proxy: ok, $n crates cached in $(echo "$t1 - $t0" | bc) s"

python3 - "$WORK/project/Cargo.lock" "$WORK/data/crates" <<'PY'
import hashlib, sys, tomllib, pathlib
lock = tomllib.load(open(sys.argv[1], "rb"))
root = pathlib.Path(sys.argv[2])
bad = checked = 0
for p in lock["package"]:
    if "checksum" not in p: continue
    n = p["name"].lower()
    pre = {1: "1", 2: "2", 3: f"3/{n[0]}"}.get(len(n), f"{n[:2]}/{n[2:4]}")
    f = root / pre / n / f"{n}-{p['version']}.crate"
    if not f.exists(): print("missing", f); bad += 1; continue
    if hashlib.sha256(f.read_bytes()).hexdigest() != p["checksum"]: print("BAD", f); bad += 1
    checked += 1
print(f"   sha256 of {checked} cached files = Cargo.lock checksums, {bad} bad")
sys.exit(1 if bad else 0)
PY

kill $PID; wait $PID 2>/dev/null || true
start env CRATERE_UPSTREAM_SPARSE=http://127.0.0.1:9/ CRATERE_INDEX_TTL=0s
home "$WORK/home2"
(cd "$WORK/project" && CARGO_HOME=$WORK/home2 cargo fetch --locked -q)
echo "2. upstream unreachable, empty CARGO_HOME: cargo fetch --locked ok"
kill $PID; wait $PID 2>/dev/null || true

start env
home "$WORK/home3"
cp -r "$WORK/project" "$WORK/direct"
(cd "$WORK/project" && rm Cargo.lock && CARGO_HOME=$WORK/home3 cargo generate-lockfile -q)
mkdir -p "$WORK/home4"
(cd "$WORK/direct" && rm Cargo.lock && CARGO_HOME=$WORK/home4 cargo generate-lockfile -q)
if diff "$WORK/project/Cargo.lock" "$WORK/direct/Cargo.lock" >/dev/null; then
    echo "3. generate-lockfile through the proxy = direct ($(grep -c '^name' "$WORK/direct/Cargo.lock") packages)"
else
    echo "3. generate-lockfile DIFFERS"; diff "$WORK/project/Cargo.lock" "$WORK/direct/Cargo.lock" | head; exit 1
fi

echo "4. config.json:"
for h in "localhost:$PORT" "alt.example:9999" "evil.example"; do
    printf '   Host: %-18s → %s\n' "$h" "$(curl -s -H "Host: $h" "http://127.0.0.1:$PORT/index/config.json")"
done

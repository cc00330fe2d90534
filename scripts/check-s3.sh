#!/usr/bin/env bash
# Acceptance check of S3 storage against the real upstream (not part of the test suite: it
# downloads ~250 crates). Two release-build replicas share one bucket of a local s3s-fs and
# sit behind scripts/round-robin.py, which sends each request to the other replica in turn.
# The project is this repository's own Cargo.toml/Cargo.lock.
#  1. fresh `cargo fetch --locked` through the balancer: each crate stored once in the bucket
#     (objects = packages of Cargo.lock, each fetched upstream once: misses = packages), every
#     object's sha256 = the Cargo.lock checksum, nothing stored on the replicas' disks
#  2. again with an empty CARGO_HOME: every crate a hit, served from the bucket by both
#  3. `cratere cleanup --dry-run` on the bucket lists them all as kept
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
BIN=$PWD/target/release/cratere
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
command -v s3s-fs >/dev/null ||
    cargo install s3s-fs@0.14.1 --locked --features binary --root "${CARGO_HOME:-$HOME/.cargo}"
WORK=$(mktemp -d)
S3PORT=${S3PORT:-18190}
LBPORT=${LBPORT:-18191}
PORTS=(18192 18193)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT

wait_for() {
    for _ in $(seq 200); do curl -sf "$1" >/dev/null 2>&1 && return; sleep 0.1; done
    echo "no answer from $1"; tail -20 "$WORK"/*.log; exit 1
}

mkdir -p "$WORK/s3/crates" "$WORK/project/src" "$WORK/project/tests" "$WORK/project/benches"
s3s-fs --host 127.0.0.1 --port "$S3PORT" --access-key cratere --secret-key cratere-secret \
    "$WORK/s3" >"$WORK/s3.log" 2>&1 &
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$S3PORT") 2>/dev/null && break; sleep 0.1; done

s3env=(CRATERE_STORAGE=s3 CRATERE_S3_BUCKET=crates CRATERE_S3_ENDPOINT="http://127.0.0.1:$S3PORT"
    CRATERE_S3_REGION=us-east-1 CRATERE_S3_PATH_STYLE=true
    AWS_ACCESS_KEY_ID=cratere AWS_SECRET_ACCESS_KEY=cratere-secret)
for n in 0 1; do
    env "${s3env[@]}" CRATERE_HOST=127.0.0.1 CRATERE_PORT="$LBPORT" \
        CRATERE_LISTEN="127.0.0.1:${PORTS[$n]}" CRATERE_CACHE="$WORK/r$n/crates" \
        CRATERE_INDEX="$WORK/r$n/index" CRATERE_GIT_INDEX=false \
        "$BIN" >"$WORK/replica$n.log" 2>&1 &
done
python3 scripts/round-robin.py "127.0.0.1:$LBPORT" "127.0.0.1:${PORTS[0]}" \
    "127.0.0.1:${PORTS[1]}" >"$WORK/rr.log" 2>&1 &
for n in 0 1; do wait_for "http://127.0.0.1:${PORTS[$n]}/ready"; done
wait_for "http://127.0.0.1:$LBPORT/health"

cp Cargo.toml Cargo.lock "$WORK/project/"
echo 'fn main() {}' >"$WORK/project/src/main.rs"
echo '' >"$WORK/project/src/lib.rs"
home() {
    mkdir -p "$1"
    printf '[source.crates-io]\nreplace-with = "cratere"\n[source.cratere]\nregistry = "sparse+http://127.0.0.1:%s/index/"\n' "$LBPORT" >"$1/config.toml"
}
metric() { # replica, series: the value, 0 when absent
    curl -s "http://127.0.0.1:${PORTS[$1]}/metrics" | awk -v s="$2" '$1 == s { print $2; f = 1 } END { if (!f) print 0 }'
}
MISS='cratere_cache_requests_total{kind="crate",outcome="miss"}'
HIT='cratere_cache_requests_total{kind="crate",outcome="hit"}'

home "$WORK/home1"
t0=$(date +%s.%N)
(cd "$WORK/project" && CARGO_HOME=$WORK/home1 cargo fetch --locked -q)
t1=$(date +%s.%N)
dl0=$(grep -c ' /api/v1/crates/' <(grep '^0 ' "$WORK/rr.log") || true)
dl1=$(grep -c ' /api/v1/crates/' <(grep '^1 ' "$WORK/rr.log") || true)
printf '1. cargo fetch through the balancer: ok in %.1f s; downloads served by replica 0: %s, replica 1: %s\n' \
    "$(echo "$t1 - $t0" | bc)" "$dl0" "$dl1"
# The last uploads follow the last responses: wait for them (at most 30 s).
want=$(grep -c '^checksum' "$WORK/project/Cargo.lock")
for _ in $(seq 300); do
    [ "$(find "$WORK/s3/crates" -name '*.crate' -not -path '*/.*' | wc -l)" -ge "$want" ] && break
    sleep 0.1
done
m0=$(metric 0 "$MISS"); m1=$(metric 1 "$MISS")
python3 - "$WORK/project/Cargo.lock" "$WORK/s3/crates" "$m0" "$m1" <<'PY'
import hashlib, pathlib, sys, tomllib
lock = tomllib.load(open(sys.argv[1], "rb"))
bucket = pathlib.Path(sys.argv[2])
misses = int(float(sys.argv[3])) + int(float(sys.argv[4]))
pkgs = [p for p in lock["package"] if "checksum" in p]
objects = [p for p in bucket.rglob("*.crate") if not any(s.startswith(".") for s in p.relative_to(bucket).parts)]
bad = 0
for p in pkgs:
    n = p["name"].lower()
    pre = {1: "1", 2: "2", 3: f"3/{n[0]}"}.get(len(n), f"{n[:2]}/{n[2:4]}")
    f = bucket / pre / n / f"{n}-{p['version']}.crate"
    if not f.exists():
        print("   missing", f); bad += 1
    elif hashlib.sha256(f.read_bytes()).hexdigest() != p["checksum"]:
        print("   BAD", f); bad += 1
print(f"   {len(pkgs)} packages in Cargo.lock, {len(objects)} crate objects in the bucket, "
      f"{misses} upstream fetches (misses) over both replicas; {bad} missing or bad sha256")
sys.exit(1 if bad or len(objects) != len(pkgs) or misses != len(pkgs) else 0)
PY
local_crates=$(find "$WORK/r0/crates" "$WORK/r1/crates" -name '*.crate' | wc -l)
echo "   .crate files on the replicas' own disks: $local_crates"
[ "$local_crates" -eq 0 ]

home "$WORK/home2"
(cd "$WORK/project" && CARGO_HOME=$WORK/home2 cargo fetch --locked -q)
h0=$(metric 0 "$HIT"); h1=$(metric 1 "$HIT")
m0b=$(metric 0 "$MISS"); m1b=$(metric 1 "$MISS")
echo "2. empty CARGO_HOME again: hits from the bucket: replica 0 $h0, replica 1 $h1; new misses: $(echo "$m0b + $m1b - $m0 - $m1" | bc)"
[ "$(echo "$m0b + $m1b - $m0 - $m1" | bc)" = "0" ]

out=$(env "${s3env[@]}" CRATERE_CACHE="$WORK/cmd/crates" CRATERE_INDEX="$WORK/cmd/index" \
    "$BIN" cleanup --dry-run | tail -1)
echo "3. cratere cleanup --dry-run: $out"

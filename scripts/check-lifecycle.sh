#!/usr/bin/env bash
# Acceptance check of the cache lifecycle against the real upstream (not part of the test
# suite: it downloads ~240 crates and takes about two minutes).
#  1. `cratere warm` of this repository's Cargo.lock, then the proxy with upstream unreachable
#     serves `cargo fetch --locked` of that project to an empty CARGO_HOME.
#  2. Size cap: on that cache, after a few crates are used, `cratere cleanup` with a cap of
#     half the cache ends under the cap and keeps the most recently used files.
#  3. Age rule: CRATERE_MAX_DAYS_UNUSED=0.0002 (17 s), cleanup every 5 s: a crate requested
#     every 3 s stays, crates requested once are removed within a minute and come back.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
BIN=$PWD/target/release/cratere
WORK=$(mktemp -d)
PORT=${PORT:-18081}
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
URL=http://127.0.0.1:$PORT
export CRATERE_CACHE=$WORK/data/crates CRATERE_INDEX=$WORK/data/index

start() {
    env CRATERE_PORT=$PORT CRATERE_LISTEN=127.0.0.1:$PORT "$@" "$BIN" >>"$WORK/proxy.log" 2>&1 &
    PID=$!
    for _ in $(seq 100); do curl -sf "$URL/health" >/dev/null && return; sleep 0.1; done
    echo "proxy did not start"; cat "$WORK/proxy.log"; exit 1
}
stop() { kill "$PID"; wait "$PID" 2>/dev/null || true; }
size_of() { find "$1" -path '*/.tmp' -prune -o -name '*.crate' -printf '%s\n' | awk '{s+=$1} END {print s+0}'; }
count_of() { find "$1" -name '*.crate' | wc -l; }

# 1. warm, then serve offline
mkdir -p "$WORK/project/src" "$WORK/project/tests" "$WORK/project/benches"
cp Cargo.toml Cargo.lock "$WORK/project/"
echo 'fn main() {}' > "$WORK/project/src/main.rs"
echo '' > "$WORK/project/src/lib.rs"
t0=$(date +%s.%N)
"$BIN" warm "$WORK/project/Cargo.lock" > "$WORK/warm1.txt"
t1=$(date +%s.%N)
echo "1. warm: $(tail -1 "$WORK/warm1.txt") [$(echo "$t1 - $t0" | bc) s]"
"$BIN" warm "$WORK/project/Cargo.lock" > "$WORK/warm2.txt"
echo "   warm again: $(tail -1 "$WORK/warm2.txt")"
echo "   $(count_of "$CRATERE_CACHE") crate files, $(find "$CRATERE_INDEX/sparse" -path '*/.used' -prune -o -path '*/.tmp' -prune -o -type f -print | grep -vc config.json) index files cached"
start CRATERE_UPSTREAM_SPARSE=http://127.0.0.1:9/
mkdir -p "$WORK/home"
printf '[source.crates-io]\nreplace-with = "cratere"\n[source.cratere]\nregistry = "sparse+%s/index/"\n' "$URL" > "$WORK/home/config.toml"
(cd "$WORK/project" && CARGO_HOME=$WORK/home cargo fetch --locked -q)
hits=$(curl -s "$URL/metrics" | awk -F' ' '/kind="crate",outcome="hit"/ {print $2}')
misses=$(curl -s "$URL/metrics" | awk -F' ' '/kind="crate",outcome="miss"/ {print $2}')
echo "   upstream http://127.0.0.1:9/, empty CARGO_HOME: cargo fetch --locked ok (crate hits ${hits:-0}, misses ${misses:-0})"

# 2. size cap: use 10 crates (through the still-running offline proxy), then cap at half
used="itoa/1.0.19 ryu/1.0.23 cfg-if/1.0.5 fnv/1.0.7 memchr/2.8.3 bitflags/2.13.2 once_cell/1.21.4 lazy_static/1.5.1 serde/1.0.229 tokio/1.54.1"
sleep 1
for c in $used; do curl -sf -o /dev/null "$URL/api/v1/crates/$c/download" || echo "   (no $c in this lockfile)"; done
stop # the flusher writes the uses at shutdown
before=$(size_of "$CRATERE_CACHE"); cap=$((before / 2))
find "$CRATERE_CACHE" -name '*.crate' -printf '%T@ %s %P\n' | sort -n > "$WORK/before.txt"
CRATERE_MAX_CACHE_SIZE=$cap "$BIN" cleanup --dry-run > "$WORK/dry.txt"
[ "$(size_of "$CRATERE_CACHE")" = "$before" ] || { echo "dry run removed files"; exit 1; }
CRATERE_MAX_CACHE_SIZE=$cap "$BIN" cleanup > "$WORK/cleanup.txt"
after=$(size_of "$CRATERE_CACHE")
echo "2. size cap $cap B: $before B ($(wc -l < "$WORK/before.txt") files) -> $after B ($(count_of "$CRATERE_CACHE") files)"
echo "   $(tail -1 "$WORK/dry.txt")"
echo "   $(tail -1 "$WORK/cleanup.txt")"
[ "$after" -le "$cap" ] || { echo "   NOT under the cap"; exit 1; }
python3 - "$WORK/before.txt" "$CRATERE_CACHE" "$used" <<'PY'
import os, sys
rows = [l.split(None, 2) for l in open(sys.argv[1])]
root = sys.argv[2]
kept = [(float(t), p.strip()) for t, s, p in rows if os.path.exists(os.path.join(root, p.strip()))]
gone = [(float(t), p.strip()) for t, s, p in rows if not os.path.exists(os.path.join(root, p.strip()))]
assert gone and kept
assert max(t for t, _ in gone) <= min(t for t, _ in kept), "a removed file was used after a kept one"
names = [c.split("/")[0] for c in sys.argv[3].split()]
missing = [n for n in names if not any(f"/{n}-" in p or p.startswith(f"{n}-") for _, p in kept)]
print(f"   every removed file was used before every kept one; the {len(names)} just-used crates kept: {not missing} {missing or ''}")
sys.exit(1 if missing else 0)
PY

# 3. age rule with the real upstream
rm -rf "$WORK/data"
start CRATERE_MAX_DAYS_UNUSED=0.0002 CRATERE_CLEANUP_CACHE_SCHEDULE='*/5 * * * * *'
dl() { curl -s -o /dev/null -w '%{http_code} %header{x-cratere-cache}' "$URL/api/v1/crates/$1/$2/download"; }
file() { n=$1; case ${#n} in 1) p=1;; 2) p=2;; 3) p=3/${n:0:1};; *) p=${n:0:2}/${n:2:2};; esac; echo "$CRATERE_CACHE/$p/$n/$n-$2.crate"; }
once="ryu 1.0.23 cfg-if 1.0.5 fnv 1.0.7"
echo "3. every 3 s: itoa 1.0.19 ($(dl itoa 1.0.19)); once: ryu, cfg-if, fnv ($(dl ryu 1.0.23), $(dl cfg-if 1.0.5), $(dl fnv 1.0.7))"
t0=$(date +%s)
declare -A gone
itoa_states=""
while [ $(( $(date +%s) - t0 )) -lt 60 ]; do
    itoa_states+="$(dl itoa 1.0.19 | cut -d' ' -f2) "
    set -- $once
    while [ $# -gt 0 ]; do
        if [ -z "${gone[$1]:-}" ] && [ ! -e "$(file "$1" "$2")" ]; then gone[$1]=$(( $(date +%s) - t0 )); fi
        shift 2
    done
    [ -e "$(file itoa 1.0.19)" ] || { echo "   itoa was removed while in use"; exit 1; }
    if [ -z "${cli_done:-}" ] && [ $(( $(date +%s) - t0 )) -ge 30 ]; then
        # The command next to the running server, same directories and settings.
        cli_done=$(CRATERE_MAX_DAYS_UNUSED=0.0002 "$BIN" cleanup 2>&1 | tail -1 || true)
    fi
    sleep 3
done
echo "   after 60 s: itoa present, served as: $(echo "$itoa_states" | tr ' ' '\n' | grep . | sort | uniq -c | xargs)"
for n in ryu cfg-if fnv; do echo "   $n removed after ${gone[$n]:-NEVER} s"; [ -n "${gone[$n]:-}" ] || exit 1; done
echo "   requested again: ryu $(dl ryu 1.0.23), cfg-if $(dl cfg-if 1.0.5); back in the cache: $([ -e "$(file ryu 1.0.23)" ] && echo yes || echo no)"
echo "   cleanups run by the server: $(grep -c 'cleanup finished' "$WORK/proxy.log"); \`cratere cleanup\` beside it at 30 s: $cli_done"
stop

#!/usr/bin/env bash
# Acceptance check of the git index (not part of the test suite: it downloads ~230 index files
# and ~200 crates). The upstream git index is a fixture repository built here from the REAL
# sparse index files of every package in this repository's Cargo.lock (plus a config.json like
# crates.io's); downloads go to the real upstream through the proxy.
#  1. 1 host: cargo fetch (libgit2, cargo's default) through /crates.io-index, fresh CARGO_HOME
#  2. 3 hosts: cargo fetch with net.git-fetch-with-cli = true, fresh CARGO_HOME; an alternate
#     host's clone gets its own config.json
#  3. disk use of the mirror: upstream pack vs 1 host vs 3 hosts
#  4. an upstream commit, then a squash, reach clients within one schedule period (5 s here);
#     after the following period the old history is pruned
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
BIN=$PWD/target/release/cratere
WORK=$(mktemp -d)
PORT=${PORT:-18081}
SCHEDULE='*/5 * * * * *'
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
export GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null
export GIT_AUTHOR_NAME=Upstream GIT_AUTHOR_EMAIL=upstream@example.com
export GIT_COMMITTER_NAME=Upstream GIT_COMMITTER_EMAIL=upstream@example.com

mkdir -p "$WORK/project/src" "$WORK/project/tests" "$WORK/project/benches"
cp Cargo.toml Cargo.lock "$WORK/project/"
echo 'fn main() {}' > "$WORK/project/src/main.rs"
echo '' > "$WORK/project/src/lib.rs"

# The fixture upstream: real index files at cargo's paths.
UP=$WORK/upstream
git init -q -b master "$UP"
printf '{\n  "dl": "https://static.crates.io/crates",\n  "api": "https://crates.io"\n}\n' > "$UP/config.json"
python3 - "$WORK/project/Cargo.lock" > "$WORK/paths" <<'PY'
import sys, tomllib
lock = tomllib.load(open(sys.argv[1], "rb"))
names = sorted({p["name"].lower() for p in lock["package"] if "checksum" in p})
for n in names:
    print({1: "1", 2: "2", 3: f"3/{n[0]}"}.get(len(n), f"{n[:2]}/{n[2:4]}") + "/" + n)
PY
xargs -P 8 -I{} sh -c 'mkdir -p "$(dirname "$0/{}")" && curl -sfS -o "$0/{}" "https://index.crates.io/{}"' "$UP" < "$WORK/paths"
git -C "$UP" add -A && git -C "$UP" commit -q -m "Index files of $(wc -l < "$WORK/paths") crates"
git -C "$UP" gc -q
echo "0. fixture upstream: $(wc -l < "$WORK/paths") real index files, $(du -sh "$UP" --exclude=.git | cut -f1) of files, pack $(git -C "$UP" count-objects -vH | sed -n 's/size-pack: //p')"

start() { # data dir, alternate hosts
    CRATERE_PORT=$PORT CRATERE_LISTEN=127.0.0.1:$PORT CRATERE_CACHE=$WORK/crates \
    CRATERE_INDEX=$1 CRATERE_ALTERNATE_HOSTS=$2 CRATERE_UPSTREAM_GIT=$UP \
    CRATERE_INDEX_UPDATE_SCHEDULE="$SCHEDULE" "$BIN" >>"$WORK/proxy.log" 2>&1 &
    PID=$!
    for _ in $(seq 300); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/crates.io-index/info/refs?service=git-upload-pack")" = 200 ] && return
        sleep 0.1
    done
    echo "proxy did not become ready"; cat "$WORK/proxy.log"; exit 1
}
home() { # dir, git-fetch-with-cli
    mkdir -p "$1"
    printf '[source.crates-io]\nreplace-with = "cratere"\n[source.cratere]\nregistry = "http://localhost:%s/crates.io-index"\n[net]\ngit-fetch-with-cli = %s\n' "$PORT" "$2" > "$1/config.toml"
}
fetch() { # home, label
    rm -rf "$WORK/project/target"
    local t0 t1
    t0=$(date +%s.%N)
    (cd "$WORK/project" && CARGO_HOME=$1 cargo fetch --locked -q)
    t1=$(date +%s.%N)
    echo "   $2: cargo fetch --locked ok in $(echo "$t1 - $t0" | bc) s, $(find "$1/registry/cache" -name '*.crate' | wc -l) crates in CARGO_HOME"
}
# KiB of the whole mirror directory (objects + refs + what `git init` writes), and of objects/.
mirror_du() { echo "$(du -sk "$1/git" | cut -f1) KiB (objects $(du -sk "$1/git/crates.io-index.git/objects" | cut -f1) KiB)"; }

start "$WORK/index1" '[]'
echo "1. one host"
home "$WORK/home1" false
fetch "$WORK/home1" "libgit2 (default git client)"
D1=$(mirror_du "$WORK/index1")
kill $PID; wait $PID 2>/dev/null || true

start "$WORK/index3" '["alt.example:9000", "other.example"]'
echo "2. three hosts"
home "$WORK/home2" true
fetch "$WORK/home2" "git CLI (net.git-fetch-with-cli)"
git -c "http.extraHeader=Host: alt.example:9000" clone -q "http://127.0.0.1:$PORT/crates.io-index" "$WORK/alt"
echo "   Host: alt.example:9000 → config.json $(tr -d ' \n' < "$WORK/alt/config.json")"
git clone -q "http://127.0.0.1:$PORT/crates.io-index" "$WORK/primary"
echo "   Host: 127.0.0.1:$PORT → config.json $(tr -d ' \n' < "$WORK/primary/config.json")"
D3=$(mirror_du "$WORK/index3")
UPK=$(du -sk "$UP/.git/objects" | cut -f1)
echo "3. disk (du -sk): upstream objects ${UPK} KiB; mirror with 1 host ${D1}; with 3 hosts ${D3}"

echo "4. upstream changes (schedule: $SCHEDULE)"
wait_for() { # description, command...
    local what=$1; shift
    for _ in $(seq 150); do "$@" && return; sleep 0.1; done
    echo "   TIMEOUT: $what"; exit 1
}
parent_is() { git -C "$WORK/primary" fetch -q && [ "$(git -C "$WORK/primary" rev-parse origin/master^)" = "$1" ]; }
mkdir -p "$UP/zz/z-"
echo '{"name":"zzz-new","vers":"0.0.1","deps":[],"cksum":"00","features":{},"yanked":false}' > "$UP/zz/z-/zzz-new"
git -C "$UP" add -A && git -C "$UP" commit -q -m "Add zzz-new"
t0=$(date +%s.%N)
wait_for "upstream commit" parent_is "$(git -C "$UP" rev-parse HEAD)"
echo "   commit reached a client after $(echo "$(date +%s.%N) - $t0" | bc) s"
OLD=$(git -C "$UP" rev-parse HEAD)
git -C "$UP" checkout -q --orphan squashed && git -C "$UP" commit -q -m "Collapse index into one commit" && git -C "$UP" branch -M master
t0=$(date +%s.%N)
wait_for "squash" parent_is "$(git -C "$UP" rev-parse HEAD)"
echo "   squash reached a client after $(echo "$(date +%s.%N) - $t0" | bc) s; history length $(git -C "$WORK/primary" rev-list --count origin/master), config.json $(git -C "$WORK/primary" show origin/master:config.json | tr -d ' \n')"
gone() { ! git --git-dir "$WORK/index3/git/crates.io-index.git" cat-file -e "$OLD" 2>/dev/null; }
wait_for "prune" gone
echo "   old history pruned one period later; mirror now $(mirror_du "$WORK/index3")"
kill $PID; wait $PID 2>/dev/null || true
start "$WORK/index3" '["alt.example:9000", "other.example"]'
echo "   restart: ready at once from the mirror on disk"
(cd "$WORK/project" && CARGO_HOME=$WORK/home1 cargo fetch --locked -q)
(cd "$WORK/project" && CARGO_HOME=$WORK/home2 cargo fetch --locked -q)
echo "   after the squash: cargo fetch --locked ok with both clients' existing CARGO_HOMEs"
durations=$(grep -o 'duration_ms=[0-9]*' "$WORK/proxy.log" | cut -d= -f2 | sort -n)
echo "5. $(echo "$durations" | wc -l) syncs, duration min $(echo "$durations" | head -1) ms, median $(echo "$durations" | sed -n "$(( ($(echo "$durations" | wc -l) + 1) / 2 ))p") ms, max $(echo "$durations" | tail -1) ms"

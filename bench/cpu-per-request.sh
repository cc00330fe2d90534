#!/usr/bin/env bash
# CPU time a server spends per request under a wrk load: the sum of user+system time of all
# threads of the given processes, read from /proc before and after the run.
#
#   bench/cpu-per-request.sh URL LUA_SCRIPT PID...   (e.g. Cratere's pid, or nginx's master and workers)
#
# The paths.lua scripts bench/bench.py writes (KEEP=1 keeps its work directory) fit here.
set -euo pipefail
base=$1; lua=$2; shift 2
ticks() {
    local s=0
    for p in "$@"; do
        for t in /proc/"$p"/task/*; do
            read -r -a a < "$t/stat"
            s=$((s + a[13] + a[14]))
        done
    done
    echo "$s"
}
hz=$(getconf CLK_TCK)
before=$(ticks "$@")
out=$(wrk -t2 -c"${CONNS:-64}" -d"${SECS:-5}"s -s "$lua" "$base")
after=$(ticks "$@")
rps=$(echo "$out" | awk '/Requests\/sec/{print $2}')
python3 -c "
r = float('$rps'); cpu = ($after - $before) / $hz
print(f'{r:.0f} req/s, server CPU {cpu:.2f} s in ${SECS:-5} s = {cpu * 1e6 / (r * ${SECS:-5}):.0f} us per request')"

#!/usr/bin/env python3
"""Cratere benchmarks, side by side (run through bench/run.sh).

1. cached .crate downloads: requests/s and MB/s at 1, 64, 256 connections, Cratere vs nginx
   serving the same files as static files;
2. cached sparse index files, likewise;
3. a cache miss: time to first and last byte, through Cratere vs straight from upstream;
4. `cargo fetch` and `cargo generate-lockfile` of bench/project (~550 packages), cold and warm,
   through Cratere (plain HTTP and HTTPS/HTTP2) vs straight from upstream, fresh CARGO_HOME each;
5. memory: RSS idle, under load, after load;
6. a clone of the git index served by Cratere;
7. freshness: cold resolves with and without dependency prefetch (and how many prefetched
   files cargo then used), warm fetches within and after the index TTL (`ONLY=fresh`).
Contenders alternate within each round; the report gives medians and ratios.
"""

import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "cratere"
PROJECT = ROOT / "bench" / "project"
SECS = int(os.environ.get("SECS", "10"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
ONLY = os.environ.get("ONLY", "")
UPSTREAM = "https://index.crates.io/"
W = Path(tempfile.mkdtemp(prefix="cratere-bench-"))
W.chmod(0o755)  # nginx workers read the cache through it
PROCS = []
REPORT = []
# cargo unpacks ~770 MB of sources per `cargo fetch`; on a VM's disk that write time swings by
# several times between runs and drowns what is measured here (the registry traffic). So
# CARGO_HOMEs live in memory (tmpfs) when the machine has one, and go away after each run.
SHM = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else None
HOMES = Path(tempfile.mkdtemp(prefix="cratere-bench-homes-", dir=SHM)) if SHM else W / "homes"


def out(line=""):
    print(line, flush=True)
    REPORT.append(line)


def want(part):
    return not ONLY or part in ONLY.split(",")


def prefix(name):
    n = name.lower()
    return {1: "1", 2: "2", 3: f"3/{n[0]}"}.get(len(n), f"{n[:2]}/{n[2:4]}")


def wait_http(url, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def cratere(name, port, extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRATERE_")}
    env.update(
        CRATERE_LISTEN=f"127.0.0.1:{port}",
        CRATERE_PORT=str(port),
        CRATERE_HOST="127.0.0.1",
        CRATERE_CACHE=str(W / name / "crates"),
        CRATERE_INDEX=str(W / name / "index"),
        CRATERE_GIT_INDEX="false",
        CRATERE_INDEX_TTL="1h",
        CRATERE_CLEANUP_CACHE_SCHEDULE="off",
        RUST_LOG="warn",
    )
    env.update(extra or {})
    log = open(W / f"{name}.log", "a")
    p = subprocess.Popen([str(BIN)], env=env, stdout=log, stderr=log)
    PROCS.append(p)
    scheme = "https" if "CRATERE_TLS_CERT" in env else "http"
    if scheme == "http":
        wait_http(f"http://127.0.0.1:{port}/health")
    else:
        time.sleep(1.0)
    alive(p, f"cratere {name} on port {port}")
    return p


def alive(p, what):
    """Fails unless `p` still runs: a contender that exited (its port taken by a leftover
    server) must not let something else answer in its place."""
    time.sleep(0.3)
    if p.poll() is not None:
        raise SystemExit(f"{what} exited ({p.returncode}); is its port in use?")


def stop(p):
    p.terminate()
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def wrk(base, paths, conns, server_pid):
    """wrk round-robin over `paths` (a Lua script per request, so wrk works harder than on one
    URL: its CPU is reported). Returns req/s, MB/s, server CPU µs per request and generator
    CPU (cores). Fails on any non-2xx answer or socket error."""
    script = W / "paths.lua"
    listing = ",".join(f'"{p}"' for p in paths)
    script.write_text(
        f"local paths = {{{listing}}}\nlocal i = 0\n"
        "request = function() i = i + 1; return wrk.format('GET', paths[(i % #paths) + 1]) end\n"
    )
    threads = min(2, conns)
    stdout, server, gen, wall = loaded(
        ["wrk", f"-t{threads}", f"-c{conns}", f"-d{SECS}s", "--timeout", "10s", "-s", str(script), base],
        server_pid)
    rps = mbps = reqs = 0.0
    for line in stdout.splitlines():
        line = line.strip()
        if " requests in " in line:
            reqs = float(line.split()[0])
        if line.startswith("Requests/sec:"):
            rps = float(line.split()[1])
        if line.startswith("Transfer/sec:"):
            mbps = wrk_bytes(line.split()[1]) / 1e6
        if line.startswith("Socket errors") or line.startswith("Non-2xx"):
            raise SystemExit(f"wrk {base}: {line}\n{stdout}")
    if not reqs:
        raise SystemExit(f"wrk {base}: no requests\n{stdout}")
    return rps, mbps, server * 1e6 / reqs, gen / wall


def timed(cmd, **kw):
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, **kw)
    if r.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stderr.decode(errors='replace')[-3000:]}")
    return time.time() - t


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def cargo_home(path, registry=None, cainfo=None):
    path.mkdir(parents=True, exist_ok=True)
    cfg = ""
    if registry:
        cfg += f'[source.crates-io]\nreplace-with = "cratere"\n[source.cratere]\nregistry = "{registry}"\n'
    if cainfo:
        cfg += f'[http]\ncainfo = "{cainfo}"\n'
    (path / "config.toml").write_text(cfg)
    return path


def packages():
    lock = tomllib.load(open(PROJECT / "Cargo.lock", "rb"))
    return [(p["name"], p["version"], p["checksum"]) for p in lock["package"] if "checksum" in p]


def setup_main():
    """Warm a cache with the bench project, start Cratere on it, mirror the files for nginx."""
    env = dict(os.environ, CRATERE_CACHE=str(W / "main/crates"), CRATERE_INDEX=str(W / "main/index"),
               CRATERE_GIT_INDEX="false")
    t = time.time()
    subprocess.run([str(BIN), "warm", str(PROJECT / "Cargo.lock")], env=env, check=True, capture_output=True)
    out(f"(warmed {len(packages())} packages into the cache in {time.time() - t:.1f} s)")
    static = W / "static"
    (static / "index").mkdir(parents=True)
    os.symlink(W / "main/crates", static / "crates")
    sparse = W / "main/index/sparse"
    for f in sparse.rglob("*"):
        rel = f.relative_to(sparse)
        if f.is_file() and not any(part.startswith(".") for part in rel.parts) and rel.name != "config.json":
            data = f.read_bytes()
            body = data[data.index(b"\n") + 1 :]
            dest = static / "index" / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(body)
    conf = W / "nginx.conf"
    conf.write_text(f"""
daemon off;
user {os.environ.get("USER", "root") if os.getuid() == 0 else "nobody"};
worker_processes 2;
pid {W}/nginx.pid;
error_log {W}/nginx.err;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  keepalive_requests 1000000;
  keepalive_timeout 60;
  default_type application/octet-stream;
  server {{ listen 127.0.0.1:18200; root {static}; }}
  server {{ listen 127.0.0.1:18201 http2; root {static}; }}
}}
""")
    nginx = subprocess.Popen(["nginx", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    PROCS.append(nginx)
    alive(nginx, "nginx on ports 18200, 18201")
    main = cratere("main", 18100)
    time.sleep(1)
    return main, nginx.pid


def compare_hits(main, nginx_pid, title, cratere_paths, nginx_paths):
    out(f"\n### {title}\n")
    out("| connections | Cratere req/s | nginx req/s | ratio | Cratere MB/s | nginx MB/s "
        "| Cratere CPU/req | nginx CPU/req | CPU ratio | wrk CPU (cores), Cratere / nginx |")
    out("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    peak = 0
    for conns in (1, 64, 256):
        res = {"c": [], "n": []}
        for r in range(ROUNDS):
            order = ["c", "n"] if r % 2 == 0 else ["n", "c"]
            for who in order:
                if who == "c":
                    sampler = Sampler(main.pid)
                    res["c"].append(wrk("http://127.0.0.1:18100", cratere_paths, conns, main.pid))
                    peak = max(peak, sampler.stop())
                else:
                    res["n"].append(wrk("http://127.0.0.1:18200", nginx_paths, conns, nginx_pid))
        c = [med([x[i] for x in res["c"]]) for i in range(4)]
        n = [med([x[i] for x in res["n"]]) for i in range(4)]
        out(f"| {conns} | {c[0]:,.0f} | {n[0]:,.0f} | {c[0] / n[0]:.2f}× | {c[1]:,.1f} | {n[1]:,.1f} "
            f"| {c[2]:.0f} µs | {n[2]:.0f} µs | {c[2] / n[2]:.2f}× | {c[3]:.2f} / {n[3]:.2f} |")
    return peak


def h2load(uris, conns, streams, server_pid):
    """h2load round-robin over `uris`: req/s, MB/s, server CPU µs per answer, generator CPU."""
    listing = W / "uris.txt"
    listing.write_text("\n".join(uris) + "\n")
    done, rps, data, server, gen, wall = h2load_run(
        ["-t", "2", "-c", str(conns), "-m", str(streams), "-D", str(SECS)], listing, server_pid)
    return rps, data / wall / 1e6, server * 1e6 / done, gen / wall


def compare_hits_h2(main, nginx_pid, cratere_paths, nginx_paths):
    """Crate hits over HTTP/2 without TLS (prior knowledge): cargo's protocol on a plain-http
    registry (after its h2c upgrade). nginx copies here too: it has no sendfile for HTTP/2."""
    conns, streams = 64, 10
    out(f"\n### Cached .crate downloads over HTTP/2 (h2load, {conns} connections × {streams} streams)\n")
    out("| Cratere req/s | nginx req/s | ratio | Cratere MB/s | nginx MB/s "
        "| Cratere CPU/req | nginx CPU/req | CPU ratio | h2load CPU (cores), Cratere / nginx |")
    out("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    res = {"c": [], "n": []}
    peak = 0
    for r in range(ROUNDS):
        for who in (["c", "n"] if r % 2 == 0 else ["n", "c"]):
            if who == "c":
                sampler = Sampler(main.pid)
                res["c"].append(h2load([f"http://127.0.0.1:18100{p}" for p in cratere_paths], conns, streams, main.pid))
                peak = max(peak, sampler.stop())
            else:
                res["n"].append(h2load([f"http://127.0.0.1:18201{p}" for p in nginx_paths], conns, streams, nginx_pid))
    c = [med([x[i] for x in res["c"]]) for i in range(4)]
    n = [med([x[i] for x in res["n"]]) for i in range(4)]
    out(f"| {c[0]:,.0f} | {n[0]:,.0f} | {c[0] / n[0]:.2f}× | {c[1]:,.1f} | {n[1]:,.1f} "
        f"| {c[2]:.0f} µs | {n[2]:.0f} µs | {c[2] / n[2]:.2f}× | {c[3]:.2f} / {n[3]:.2f} |")
    return peak


def tree(pid):
    """pid and all its descendants (nginx's master and its workers)."""
    kids = {}
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                ppid = int(open(f"/proc/{e}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(e))
    out_, todo = [], [pid]
    while todo:
        p = todo.pop()
        out_.append(p)
        todo += kids.get(p, [])
    return out_


def cpu_secs(pids):
    """utime + stime of the processes (all their threads), in seconds."""
    total = 0
    for p in pids:
        try:
            f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(f[11]) + int(f[12])
    return total / os.sysconf("SC_CLK_TCK")


def loaded(cmd, server_pid):
    """Runs a load generator; returns its stdout, the server's CPU seconds over the run (the
    server and its children), the generator's CPU seconds and the wall time."""
    if not os.path.exists(f"/proc/{server_pid}/stat"):
        raise SystemExit(f"server process {server_pid} is gone")
    pids = tree(server_pid)
    before, t0, mine = cpu_secs(pids), time.monotonic(), os.times()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = p.communicate()
    wall = time.monotonic() - t0
    server = cpu_secs(pids) - before
    # A waited-for child's times are added to ours: the generator's CPU.
    after = os.times()
    gen = (after.children_user - mine.children_user) + (after.children_system - mine.children_system)
    if p.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({p.returncode}): {stderr[-2000:]}")
    return stdout, server, gen, wall


def wrk_bytes(value):
    """wrk's "Transfer" figures ("6.52GB"): binary units, two decimals."""
    for power, unit in ((4, "TB"), (3, "GB"), (2, "MB"), (1, "KB"), (0, "B")):
        if value.endswith(unit):
            return float(value[: -len(unit)]) * 1024**power
    return float(value)


def wrk_hot(url, conns, body_len, server_pid, script=None):
    """wrk on one URL (no per-request script) or, with `script`, a round-robin mix. Fails on
    any non-2xx answer, socket error or short body."""
    cmd = ["wrk", f"-t{min(2, conns)}", f"-c{conns}", f"-d{SECS}s", "--timeout", "10s"]
    if script:
        cmd += ["-s", str(script)]
    stdout, server, gen, wall = loaded(cmd + [url], server_pid)
    reqs = rps = 0.0
    read = ""
    for line in stdout.splitlines():
        line = line.strip()
        if " requests in " in line:
            reqs = float(line.split()[0])
            read = line.rsplit(",", 1)[1].split()[0]
        if line.startswith("Requests/sec:"):
            rps = float(line.split()[1])
        if line.startswith("Non-2xx") or line.startswith("Socket errors"):
            raise SystemExit(f"wrk {url}: {line}\n{stdout}")
    if not reqs:
        raise SystemExit(f"wrk {url}: no requests\n{stdout}")
    if body_len is not None:
        per = wrk_bytes(read) / reqs
        # wrk rounds the total to two decimals of its unit; headers add a few hundred bytes.
        if not body_len * 0.99 <= per <= body_len * 1.01 + 2048:
            raise SystemExit(f"wrk {url}: {per:.0f} bytes per response, want {body_len} + headers")
    return rps, server * 1e6 / reqs, gen / wall


def h2load_run(args, listing, server_pid):
    """One h2load run: (answers, req/s, data bytes) plus the CPU figures of `loaded`. Fails on
    any failed, errored or timed-out request and any non-2xx status."""
    stdout, server, gen, wall = loaded(["h2load", *args, "-i", str(listing)], server_pid)
    done = rps = 0.0
    data = None
    for line in stdout.splitlines():
        if line.startswith("finished in"):
            rps = float(line.split(",")[1].split()[0])
        if line.startswith("requests:"):
            f = dict((v, int(k)) for k, v in (x.strip().split()[:2] for x in line[9:].split(",")))
            done = f["succeeded"]
            if f["failed"] or f["errored"] or f["timeout"]:
                raise SystemExit(f"h2load: {line}")
        if line.startswith("status codes:"):
            codes = [int(x.strip().split()[0]) for x in line[13:].split(",")]
            if codes[1] or codes[2] or codes[3]:
                raise SystemExit(f"h2load: {line}")
        if line.startswith("traffic:"):
            data = int(line.rsplit("(", 1)[1].split(")")[0])
    if not done:
        raise SystemExit(f"h2load: nothing succeeded\n{stdout}")
    return done, rps, data, server, gen, wall


def h2load_hot(urls, conns, streams, body_len, server_pid):
    """h2load (HTTP/2, prior knowledge on plain http): every answer must be 2xx with the
    whole body. A counted run first checks the bytes exactly (a timed run also counts the
    DATA of the answers still in flight when it stops)."""
    listing = W / "uris.txt"
    listing.write_text("\n".join(urls) + "\n")
    par = ["-t", "2", "-c", str(conns), "-m", str(streams)]
    if body_len is not None:
        n = conns * streams * 4
        done, _, data, *_ = h2load_run([*par, "-n", str(n)], listing, server_pid)
        if done != n or data != body_len * n:
            raise SystemExit(f"h2load: {data} data bytes in {done:.0f} answers of {body_len} B")
    done, rps, data, server, gen, wall = h2load_run([*par, "-D", str(SECS)], listing, server_pid)
    if body_len is not None and not body_len * done <= data <= body_len * (done + conns * streams):
        raise SystemExit(f"h2load: {data} data bytes for {done:.0f} answers of {body_len} B")
    return rps, server * 1e6 / done, gen / wall


def same_body(url, want):
    with urllib.request.urlopen(url, timeout=10) as r:
        got = r.read()
    if got != want:
        raise SystemExit(f"{url}: {len(got)} bytes, not the {len(want)} bytes of the file")


def bench_hot(main, nginx_pid, pkgs):
    """One hot URL per case, no per-request script: server CPU per request next to req/s."""
    crates = []
    for name, version, _ in pkgs:
        lower = name.lower()
        rel = f"{prefix(name)}/{lower}/{lower}-{version}.crate"
        f = W / "main/crates" / rel
        if f.exists():
            crates.append((abs(f.stat().st_size - 84_000), f"/api/v1/crates/{name}/{version}/download", f"/crates/{rel}", f))
    _, c_crate, n_crate, crate_file = min(crates)
    idx = []
    for name, _, _ in pkgs:
        rel = f"index/{prefix(name)}/{name.lower()}"
        f = W / "static" / rel
        if f.exists():
            idx.append((abs(f.stat().st_size - 181_000), f"/{rel}", f))
    _, index_path, index_file = min(idx)
    cases = [(".crate", c_crate, n_crate, crate_file.read_bytes()),
             ("index file", index_path, index_path, index_file.read_bytes())]
    for _, cp, np_, body in cases:
        same_body(f"http://127.0.0.1:18100{cp}", body)
        same_body(f"http://127.0.0.1:18200{np_}", body)
    out(f"\n### Hot hits: one URL, server CPU per request ({crate_file.name}, {len(cases[0][3]):,} B; "
        f"{index_path}, {len(cases[1][3]):,} B)\n")
    out("| hit | protocol, load | Cratere req/s | nginx req/s | req/s ratio | Cratere CPU/req | nginx CPU/req | CPU ratio | generator CPU (cores), Cratere / nginx |")
    out("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, cp, np_, body in cases:
        for proto in ("HTTP/1.1", "HTTP/2"):
            res = {"c": [], "n": []}
            for r in range(ROUNDS):
                for who in (["c", "n"] if r % 2 == 0 else ["n", "c"]):
                    pid = main.pid if who == "c" else nginx_pid
                    if proto == "HTTP/1.1":
                        port, path = (18100, cp) if who == "c" else (18200, np_)
                        res[who].append(wrk_hot(f"http://127.0.0.1:{port}{path}", 64, len(body), pid))
                    else:
                        port, path = (18100, cp) if who == "c" else (18201, np_)
                        res[who].append(h2load_hot([f"http://127.0.0.1:{port}{path}"], 64, 10, len(body), pid))
            c = [med([x[i] for x in res["c"]]) for i in range(3)]
            n = [med([x[i] for x in res["n"]]) for i in range(3)]
            load = "wrk -t2 -c64" if proto == "HTTP/1.1" else "h2load -t2 -c64 -m10"
            out(f"| {label} | {proto}, {load} | {c[0]:,.0f} | {n[0]:,.0f} | {c[0] / n[0]:.2f}× | {c[1]:.0f} µs "
                f"| {n[1]:.0f} µs | {c[1] / n[1]:.2f}× | {c[2]:.2f} / {n[2]:.2f} |")
    out(f"\n(medians of {ROUNDS} rounds of {SECS} s; server CPU = utime+stime of the server process and "
        "its children over the run ÷ answers; every answer checked 2xx with the whole body)")


class Sampler:
    def __init__(self, pid):
        self.pid, self.peak, self.done = pid, 0, False
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while not self.done:
            self.peak = max(self.peak, rss_kib(self.pid))
            time.sleep(0.1)

    def stop(self):
        self.done = True
        self.t.join()
        return self.peak


def bench_miss(pkgs):
    out("\n### Cache miss: one .crate, time to first / last byte (s)\n")
    with urllib.request.urlopen(UPSTREAM + "config.json") as r:
        import json
        dl = json.load(r)["dl"]
    # The largest crates of the project show the streaming best.
    sizes = []
    for name, version, _ in pkgs:
        f = W / "main/crates" / prefix(name) / name.lower() / f"{name.lower()}-{version}.crate"
        if f.exists():
            sizes.append((f.stat().st_size, name, version))
    picks = [(n, v) for _, n, v in sorted(sizes, reverse=True)[:6]]
    fmt = "%{time_starttransfer} %{time_total}"
    res = {"c": ([], []), "d": ([], [])}
    for r in range(ROUNDS):
        cold = cratere(f"cold-miss-{r}", 18101 + r)
        port = 18101 + r
        for i, (name, version) in enumerate(picks):
            order = ["c", "d"] if (r + i) % 2 == 0 else ["d", "c"]
            for who in order:
                url = (f"http://127.0.0.1:{port}/api/v1/crates/{name}/{version}/download" if who == "c"
                       else f"{dl}/{name}/{version}/download")
                o = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", fmt + " %{http_code}", url],
                                   capture_output=True, text=True, check=True)
                a, b, code = o.stdout.split()
                a, b = float(a), float(b)
                if code != "200":
                    raise SystemExit(f"{url}: HTTP {code}")
                res[who][0].append(a); res[who][1].append(b)
        stop(cold)
    out("| | first byte | last byte |")
    out("| --- | --- | --- |")
    out(f"| upstream direct | {med(res['d'][0]):.3f} | {med(res['d'][1]):.3f} |")
    out(f"| through Cratere (miss) | {med(res['c'][0]):.3f} | {med(res['c'][1]):.3f} |")
    out(f"| ratio | {med(res['c'][0]) / med(res['d'][0]):.2f}× | {med(res['c'][1]) / med(res['d'][1]):.2f}× |")
    out(f"\n(crates: {', '.join(f'{n} {v}' for n, v in picks)}; medians of {ROUNDS} rounds)")


class CargoRuns:
    """cargo runs on copies of bench/project (one with its lockfile, one resolving afresh), each
    with a fresh CARGO_HOME on the tmpfs (the previous run's removed first)."""

    def __init__(self, name):
        self.name = name
        self.proj = W / f"{name}-proj"
        shutil.copytree(PROJECT, self.proj)
        self.unlocked = W / f"{name}-unlocked"
        shutil.copytree(PROJECT, self.unlocked)
        self.n = 0

    def home(self, registry=None, cainfo=None):
        self.n += 1
        for old in HOMES.glob(f"{self.name}-home*"):
            shutil.rmtree(old, ignore_errors=True)
        return cargo_home(HOMES / f"{self.name}-home{self.n}", registry, cainfo)

    def fetch(self, h):
        return timed(["cargo", "fetch", "--locked"], cwd=self.proj, env=dict(os.environ, CARGO_HOME=str(h)))

    def lock(self, h):
        (self.unlocked / "Cargo.lock").unlink(missing_ok=True)
        return timed(["cargo", "generate-lockfile"], cwd=self.unlocked, env=dict(os.environ, CARGO_HOME=str(h)))


def bench_cargo():
    out("\n### cargo, ~550-package project, fresh CARGO_HOME each run (s)\n")
    cert, key = W / "cert.pem", W / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    rows = {k: [] for k in ["fetch direct", "fetch cold", "fetch warm", "fetch cold https", "fetch warm https",
                            "lock direct", "lock cold", "lock warm", "lock cold https", "lock warm https"]}
    runs = CargoRuns("cargo")
    home, fetch, lock = runs.home, runs.fetch, runs.lock

    for r in range(ROUNDS):
        plain, tls = 18110 + 2 * r, 18111 + 2 * r
        order = ["direct", "plain", "tls"] if r % 2 == 0 else ["tls", "plain", "direct"]
        for who in order:
            if who == "direct":
                rows["fetch direct"].append(fetch(home()))
                rows["lock direct"].append(lock(home()))
            elif who == "plain":
                p = cratere(f"cargo-plain-{r}", plain)
                reg = f"sparse+http://127.0.0.1:{plain}/index/"
                rows["lock cold"].append(lock(home(reg)))  # index only: a cold resolve
                rows["fetch cold"].append(fetch(home(reg)))
                rows["fetch warm"].append(fetch(home(reg)))
                rows["lock warm"].append(lock(home(reg)))
                stop(p)
            else:
                p = cratere(f"cargo-tls-{r}", tls, {"CRATERE_TLS_CERT": str(cert), "CRATERE_TLS_KEY": str(key),
                                                    "CRATERE_SCHEME": "https", "CRATERE_HOST": "localhost"})
                reg = f"sparse+https://localhost:{tls}/index/"
                rows["lock cold https"].append(lock(home(reg, cert)))
                rows["fetch cold https"].append(fetch(home(reg, cert)))
                rows["fetch warm https"].append(fetch(home(reg, cert)))
                rows["lock warm https"].append(lock(home(reg, cert)))
                stop(p)
    out("| command | direct to upstream | Cratere cold | Cratere warm | Cratere cold, HTTPS+h2 | Cratere warm, HTTPS+h2 |")
    out("| --- | --- | --- | --- | --- | --- |")
    for cmd, label in (("fetch", "`cargo fetch --locked`"), ("lock", "`cargo generate-lockfile`")):
        d = med(rows[f"{cmd} direct"])
        cells = [f"{d:.1f}"]
        for k in ("cold", "warm", "cold https", "warm https"):
            v = med(rows[f"{cmd} {k}"])
            cells.append(f"{v:.1f} ({v / d:.2f}×)")
        out(f"| {label} | " + " | ".join(cells) + " |")
    out(f"\n(medians of {ROUNDS} rounds; cold = a new, empty Cratere cache; warm = the same Cratere right after)")


def metric(port, name):
    """A series of Cratere's /metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def bench_fresh():
    """Freshness without waiting: cold resolves with and without dependency prefetch, and warm
    fetches within and after the index TTL (stale-while-revalidate), against going direct."""
    out("\n### Freshness: prefetch and stale-while-revalidate, ~550-package project (s)\n")
    ttl = 20
    rows = {k: [] for k in ["lock direct", "lock cold", "lock cold no-prefetch", "fetch direct",
                            "fetch warm", "fetch warm after TTL"]}
    waste = []
    runs = CargoRuns("fresh")
    home, fetch, lock = runs.home, runs.fetch, runs.lock

    for r in range(ROUNDS):
        port, off = 18210 + 2 * r, 18211 + 2 * r
        order = ["direct", "cratere", "off"] if r % 2 == 0 else ["off", "cratere", "direct"]
        for who in order:
            if who == "direct":
                rows["lock direct"].append(lock(home()))
                rows["fetch direct"].append(fetch(home()))
            elif who == "off":
                p = cratere(f"fresh-off-{r}", off, {"CRATERE_INDEX_PREFETCH": "false"})
                rows["lock cold no-prefetch"].append(lock(home(f"sparse+http://127.0.0.1:{off}/index/")))
                stop(p)
            else:
                p = cratere(f"fresh-{r}", port, {"CRATERE_INDEX_TTL": f"{ttl}s"})
                reg = f"sparse+http://127.0.0.1:{port}/index/"
                rows["lock cold"].append(lock(home(reg)))
                prefetched = metric(port, "cratere_index_prefetched_total")
                used = metric(port, "cratere_index_prefetch_used_total")
                waste.append((prefetched, used))
                fetch(home(reg))  # brings the crates into the cache
                t0 = time.monotonic()
                rows["fetch warm"].append(fetch(home(reg)))
                # Past the TTL of every index file (the last ones were confirmed by the cold
                # fetch before t0), so each is answered stale-while-revalidate.
                time.sleep(max(0.0, ttl + 2 - (time.monotonic() - t0)))
                rows["fetch warm after TTL"].append(fetch(home(reg)))
                stop(p)
    out("| command | direct to upstream | Cratere | Cratere, prefetch off |")
    out("| --- | --- | --- | --- |")
    d = med(rows["lock direct"])
    c, o = med(rows["lock cold"]), med(rows["lock cold no-prefetch"])
    out(f"| cold `cargo generate-lockfile` | {d:.2f} | {c:.2f} ({c / d:.2f}×) | {o:.2f} ({o / d:.2f}×) |")
    d = med(rows["fetch direct"])
    w, a = med(rows["fetch warm"]), med(rows["fetch warm after TTL"])
    out(f"| warm `cargo fetch --locked`, within the TTL | {d:.2f} | {w:.2f} ({w / d:.2f}×) | |")
    out(f"| warm `cargo fetch --locked`, after the TTL ({ttl} s) | {d:.2f} | {a:.2f} ({a / d:.2f}×; {a / w:.2f}× within) | |")
    for i, (p_, u) in enumerate(waste):
        unused = p_ - u
        share = unused / p_ if p_ else 0.0
        out(f"\nRound {i + 1}: prefetched {p_:.0f} index files during the cold resolve, cargo then "
            f"asked for {u:.0f}; unused {unused:.0f} ({share:.0%} of the prefetched).")
    out(f"\n(medians of {ROUNDS} rounds; fresh CARGO_HOME each run; contenders alternated)")


def bench_git(pkgs):
    out("\n### Git index clone\n")
    fixture = W / "fixture-index"
    sparse = W / "main/index/sparse"
    fixture.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "master", str(fixture)], check=True)
    for f in sparse.rglob("*"):
        rel = f.relative_to(sparse)
        if f.is_file() and not any(p.startswith(".") for p in rel.parts) and rel.name != "config.json":
            data = f.read_bytes()
            dest = fixture / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data[data.index(b"\n") + 1 :])
    (fixture / "config.json").write_text('{"dl": "https://static.crates.io/crates", "api": "https://crates.io"}\n')
    g = ["git", "-C", str(fixture), "-c", "user.name=b", "-c", "user.email=b@b"]
    subprocess.run(g + ["add", "-A"], check=True)
    subprocess.run(g + ["commit", "-qm", "index"], check=True)
    p = cratere("git", 18120, {"CRATERE_GIT_INDEX": "true", "CRATERE_UPSTREAM_GIT": str(fixture)})
    wait_http("http://127.0.0.1:18120/crates.io-index/info/refs?service=git-upload-pack")
    via, direct = [], []
    for r in range(ROUNDS):
        for who in (["c", "d"] if r % 2 == 0 else ["d", "c"]):
            dest = W / f"clone-{who}-{r}"
            src = "http://127.0.0.1:18120/crates.io-index" if who == "c" else f"file://{fixture}"
            t = timed(["git", "clone", "-q", "--bare", src, str(dest)])
            (via if who == "c" else direct).append(t)
    stop(p)
    size = sum(f.stat().st_size for f in fixture.rglob("*") if f.is_file() and ".git" not in f.parts)
    out("| | clone time (s) |")
    out("| --- | --- |")
    out(f"| `git clone` through Cratere (smart HTTP) | {med(via):.2f} |")
    out(f"| `git clone file://` of the same repository | {med(direct):.2f} |")
    out(f"\n({len(pkgs)} packages' index files, {size / 1e6:.1f} MB of index text; medians of {ROUNDS} rounds)")


def main():
    if ONLY == "fresh":
        out(f"## Results ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, ROUNDS={ROUNDS})")
        bench_fresh()
        return
    pkgs = packages()
    out(f"## Results ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, SECS={SECS}, ROUNDS={ROUNDS})")
    main_proc, nginx_pid = setup_main()
    idle = rss_kib(main_proc.pid)
    peak = 0
    if want("hot"):
        bench_hot(main_proc, nginx_pid, pkgs)
    if want("hits"):
        crates_c, crates_n = [], []
        for name, version, _ in pkgs:
            lower = name.lower()
            rel = f"{prefix(name)}/{lower}/{lower}-{version}.crate"
            if (W / "main/crates" / rel).exists():
                crates_c.append(f"/api/v1/crates/{name}/{version}/download")
                crates_n.append(f"/crates/{rel}")
        peak = max(peak, compare_hits(main_proc, nginx_pid, f"Cached .crate downloads ({len(crates_c)} files, round-robin)", crates_c, crates_n))
        peak = max(peak, compare_hits_h2(main_proc, nginx_pid, crates_c, crates_n))
    if want("index"):
        idx = sorted({f"/index/{prefix(n)}/{n.lower()}" for n, _, _ in pkgs})
        idx = [p for p in idx if (W / "static" / p.lstrip("/")).exists()]
        peak = max(peak, compare_hits(main_proc, nginx_pid, f"Cached sparse index files ({len(idx)} files, round-robin)", idx, idx))
    after = rss_kib(main_proc.pid)
    if want("memory") or want("hits"):
        out("\n### Memory (RSS of the Cratere serving the benchmarks)\n")
        out("| idle | peak under load (up to 256 connections) | after load |")
        out("| --- | --- | --- |")
        out(f"| {idle / 1024:.1f} MiB | {peak / 1024:.1f} MiB | {after / 1024:.1f} MiB |")
    if want("miss"):
        bench_miss(pkgs)
    if want("cargo"):
        bench_cargo()
    if want("git"):
        bench_git(pkgs)
    if want("fresh"):
        bench_fresh()


try:
    main()
finally:
    for p in PROCS:
        try:
            stop(p)
        except Exception:
            pass
    shutil.rmtree(HOMES, ignore_errors=True)
    if not os.environ.get("KEEP"):
        shutil.rmtree(W, ignore_errors=True)
    (ROOT / "bench" / "last-report.md").write_text("\n".join(REPORT) + "\n")

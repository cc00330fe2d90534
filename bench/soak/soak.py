#!/usr/bin/env python3
"""Soak run of Cratere (through bench/soak/run.sh; not in CI).

The release binary against a local fake upstream (sparse index, downloads, web API, and a git
repository as the git index upstream), for SOAK_SECS (default 1800) of mixed load:

- cached crate downloads and index files (hits), from several client threads;
- misses: every crate gains a version each minute (and loses its oldest, so the working set
  stays the same size), so there are always uncached crates and changed index files (the
  index TTL is short, so files are revalidated all the time);
- `cargo search` requests, and a `git clone` of the git index every 20 s while the upstream
  repository gains a commit every minute (synced each minute);
- hostile clients: connections that send nothing, and half a request head;
- a cache cleanup every minute with a size cap below what the run downloads.

Upstream faults on a schedule, repeating every 60 s: 0–35 s healthy, 35–45 s every answer
`503`, 45–50 s no answer at all (hang), 50–55 s crate bodies cut off half-way, 55–60 s bodies
trickled slowly.

Every 10 s it samples the server's RSS, open descriptors, threads and child processes (git),
and the clients' outcomes. Memory is the anonymous RSS (`RssAnon`): mapped crate files are page
cache, not the process's own memory. A client outcome is an error when it is wrong, not when it is an
honest failure during a fault: any 200 must carry exactly the right bytes (sha256 checked);
from 20 s after a fault window ends (the breaker's probe has brought upstream back by then)
until the next one, every request must succeed. It prints a Markdown report and fails when memory or descriptors grow: the last
quarter's peak RSS and descriptors may exceed the second quarter's by at most 20 %, and after
130 s idle descriptors and child processes must be back to their level before the load.
"""

import hashlib
import http.server
import json
import os
import random
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "target" / "release" / "cratere"
SECS = int(os.environ.get("SOAK_SECS", "1800"))
SAMPLE = 10
IDLE = 130
CRATES = 200
FIRST_VERSIONS = 3
WINDOW = 4
W = Path(tempfile.mkdtemp(prefix="cratere-soak-"))
START = time.monotonic()


def now():
    return time.monotonic() - START


def fault_at(t):
    """The upstream fault in force at t seconds into the run."""
    s = t % 60
    if s < 35:
        return None
    if s < 45:
        return "503"
    if s < 50:
        return "hang"
    if s < 55:
        return "truncate"
    return "trickle"


def quiet_at(t):
    """True 20 s or more after the last fault, and before the next (clients must succeed)."""
    return fault_at(t) is None and (t % 60) >= 20


def prefix(name):
    n = len(name)
    return {1: "1", 2: "2", 3: f"3/{name[0]}"}.get(n, f"{name[:2]}/{name[2:4]}")


NAMES = [f"soak{i:03d}" for i in range(CRATES)]


def versions_of(name, t):
    """Versions listed at t seconds: one more is published each minute and the oldest goes
    (the index keeps WINDOW lines), so the data a client can ask for stays the same size:
    memory that grows over the run is then a leak, not more data."""
    n = FIRST_VERSIONS + int(t // 60)
    return [f"1.0.{v}" for v in range(max(0, n - WINDOW), n)]


_bodies = {}
_lock = threading.Lock()


def crate_body(name, vers):
    key = (name, vers)
    with _lock:
        if key not in _bodies:
            rng = random.Random(f"{name}-{vers}")
            size = rng.randint(2_000, 120_000)
            data = rng.randbytes(size)
            _bodies[key] = (data, hashlib.sha256(data).hexdigest())
        return _bodies[key]


def index_file(name, t):
    lines = []
    for v in versions_of(name, t):
        _, sha = crate_body(name, v)
        lines.append(json.dumps({"name": name, "vers": v, "deps": [], "cksum": sha,
                                 "features": {}, "yanked": False}))
    return ("\n".join(lines) + "\n").encode()


UPSTREAM_HITS = {"ok": 0, "faulted": 0}


class Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def send_body(self, body, ctype="application/octet-stream", fault=None):
        if fault == "503":
            self.send_response(503)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        if fault == "hang":
            time.sleep(15)
            self.close_connection = True
            return
        self.send_response(200)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if fault == "truncate":
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        if fault == "trickle":
            for i in range(0, len(body), 8192):
                self.wfile.write(body[i:i + 8192])
                self.wfile.flush()
                time.sleep(0.05)
            return
        self.wfile.write(body)

    def do_GET(self):
        t = now()
        fault = fault_at(t)
        UPSTREAM_HITS["faulted" if fault else "ok"] += 1
        url = urllib.parse.urlsplit(self.path)
        path = url.path
        try:
            if path == "/config.json":
                port = self.server.server_address[1]
                body = json.dumps({"dl": f"http://127.0.0.1:{port}/dl",
                                   "api": f"http://127.0.0.1:{port}"}).encode()
                # config.json is not faulted: the download template comes from it.
                return self.send_body(body, "application/json")
            if path == "/api/v1/crates":
                q = urllib.parse.parse_qs(url.query).get("q", [""])[0]
                found = [n for n in NAMES if q in n][:10]
                body = json.dumps({"crates": [{"name": n, "max_version": versions_of(n, t)[-1],
                                               "description": "soak"} for n in found],
                                   "meta": {"total": len(found)}}).encode()
                return self.send_body(body, "application/json", fault if fault != "truncate" else None)
            if path.startswith("/dl/"):
                _, _, name, vers, _ = path.split("/")
                if name not in NAMES or vers not in versions_of(name, t):
                    return self.send_404()
                return self.send_body(crate_body(name, vers)[0], fault=fault)
            name = path.rsplit("/", 1)[-1]
            if name in NAMES and path == f"/{prefix(name)}/{name}":
                return self.send_body(index_file(name, t), "text/plain",
                                      fault if fault != "truncate" else None)
            return self.send_404()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def send_404(self):
        self.send_response(404)
        self.send_header("content-length", "0")
        self.end_headers()


class ThreadingServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    request_queue_size = 256


def git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def git_upstream(port):
    repo = W / "upstream-git"
    repo.mkdir()
    git("init", "-q", "-b", "master", cwd=repo)
    git("config", "user.email", "soak@example.com", cwd=repo)
    git("config", "user.name", "soak", cwd=repo)
    (repo / "config.json").write_text(json.dumps({"dl": f"http://127.0.0.1:{port}/dl"}))
    commit_index(repo, 0)
    return repo


def commit_index(repo, t):
    for name in NAMES[:50]:
        p = repo / prefix(name) / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(index_file(name, t))
    git("add", "-A", cwd=repo)
    git("commit", "-q", "--allow-empty", "-m", f"index at {int(t)} s", cwd=repo)


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}
        self.errors = []

    def add(self, kind, outcome):
        with self.lock:
            self.counts[(kind, outcome)] = self.counts.get((kind, outcome), 0) + 1

    def error(self, what):
        with self.lock:
            self.errors.append(f"{now():7.1f} s {what}")

    def snapshot(self):
        with self.lock:
            return dict(self.counts), len(self.errors)


TALLY = Tally()
STOP = threading.Event()


def fetch(url, timeout=40):
    req = urllib.request.Request(url)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


def judge(kind, url, check, started):
    """One request: 200 with right bytes is ok; a wrong 200 is always an error; a failure is
    an error only when the whole request ran in a quiet window."""
    try:
        status, body = fetch(url)
        if not check(body):
            TALLY.add(kind, "wrong")
            TALLY.error(f"{kind}: wrong body for {url}")
            return
        TALLY.add(kind, "ok")
    except urllib.error.HTTPError as e:
        e.read()
        outcome = f"http {e.code}"
        TALLY.add(kind, outcome)
        if quiet_at(started) and quiet_at(now()):
            TALLY.error(f"{kind}: {outcome} in a quiet window for {url}")
    except Exception as e:  # noqa: BLE001 — any transport failure is a result here
        TALLY.add(kind, type(e).__name__)
        if quiet_at(started) and quiet_at(now()):
            TALLY.error(f"{kind}: {e!r} in a quiet window for {url}")


def client(base, seed):
    rng = random.Random(seed)
    while not STOP.is_set():
        t = now()
        name = rng.choice(NAMES)
        vs = versions_of(name, max(0, t - 5))
        roll = rng.random()
        if roll < 0.55:
            # Mostly old versions (hits), sometimes the newest (a miss once a minute).
            vers = vs[-1] if rng.random() < 0.1 else rng.choice(vs[:-1])
            want = crate_body(name, vers)[1]
            judge("crate", f"{base}/api/v1/crates/{name}/{vers}/download",
                  lambda b: hashlib.sha256(b).hexdigest() == want, t)
        elif roll < 0.95:
            judge("index", f"{base}/index/{prefix(name)}/{name}",
                  lambda b: b.startswith(b'{"name": "' + name.encode()) or b.startswith(b'{"name":"' + name.encode()), t)
        else:
            q = name[:6]
            judge("search", f"{base}/api/v1/crates?q={q}&per_page=5",
                  lambda b: b'"crates"' in b, t)


def cloner(base):
    n = 0
    while not STOP.wait(20):
        t = now()
        dest = W / f"clone-{n % 2}"
        shutil.rmtree(dest, ignore_errors=True)
        r = subprocess.run(["git", "clone", "-q", f"{base}/crates.io-index", str(dest)],
                           capture_output=True, timeout=120)
        ok = r.returncode == 0 and (dest / "config.json").exists()
        TALLY.add("git clone", "ok" if ok else "failed")
        if not ok:
            TALLY.error(f"git clone failed: {r.stderr.decode()[-300:]}")
        n += 1


def committer(repo):
    while not STOP.wait(60):
        commit_index(repo, now())


def hostile(port):
    """Connections that send nothing, and half a request head, a few at a time."""
    while not STOP.wait(2):
        socks = []
        for payload in (b"", b"GET /index/config.json HTTP/1.1\r\nHo"):
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                if payload:
                    s.sendall(payload)
                socks.append(s)
            except OSError:
                pass
        time.sleep(1)
        for s in socks:
            s.close()
        TALLY.add("hostile", "ok")


def fd_kinds(pid):
    """Open descriptors by kind: socket, crate file, other file, pipe, ..."""
    kinds = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kind = ("socket" if target.startswith("socket:") else "pipe" if target.startswith("pipe:")
                else "crate file" if target.endswith(".crate") else "anon" if target.startswith("anon_inode")
                else "file")
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def proc_stats(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    # Anonymous memory only: file-backed pages (the hot crate files mapped for sendfile, up
    # to 1,024 of them) are page cache, counted in VmRSS but not the process's to leak.
    rss = next(int(l.split()[1]) for l in status.splitlines() if l.startswith("RssAnon"))
    threads = next(int(l.split()[1]) for l in status.splitlines() if l.startswith("Threads"))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return rss, fds, threads, len(children)


def server_pid(server, wrap):
    """The server's own pid: under SOAK_WRAP, the descendant running the binary."""
    if not wrap:
        return server.pid
    for _ in range(100):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.readlink(f"/proc/{entry}/exe") == str(BIN):
                        return int(entry)
                except OSError:
                    pass
        time.sleep(0.1)
    raise SystemExit(f"soak: no process runs {BIN} under {wrap}")


def metric(base, name):
    try:
        _, body = fetch(f"{base}/metrics", timeout=10)
    except Exception:  # noqa: BLE001
        return None
    for line in body.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def main():
    up = ThreadingServer(("127.0.0.1", 0), Upstream)
    up_port = up.server_address[1]
    threading.Thread(target=up.serve_forever, daemon=True).start()
    repo = git_upstream(up_port)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ,
               CRATERE_HOST="127.0.0.1", CRATERE_PORT=str(port),
               CRATERE_LISTEN=f"127.0.0.1:{port}",
               CRATERE_CACHE=str(W / "data/crates"), CRATERE_INDEX=str(W / "data/index"),
               CRATERE_UPSTREAM_SPARSE=f"http://127.0.0.1:{up_port}/",
               CRATERE_UPSTREAM_API=f"http://127.0.0.1:{up_port}/",
               CRATERE_UPSTREAM_GIT=str(repo),
               CRATERE_INDEX_UPDATE_SCHEDULE="* * * * *",
               CRATERE_INDEX_TTL="5s",
               CRATERE_UPSTREAM_IDLE_TIMEOUT="4s",
               CRATERE_UPSTREAM_BACKOFF="1s",
               CRATERE_HEADER_READ_TIMEOUT="3s",
               CRATERE_LOG_FORMAT="json",
               # The cache lifecycle runs too: a cleanup every minute keeps the cache under
               # 150 MB (about half of what the run downloads), so crates come and go.
               CRATERE_CLEANUP_CACHE_SCHEDULE="* * * * *",
               CRATERE_MAX_CACHE_SIZE="150MB",
               RUST_LOG="warn")
    log = open(W / "cratere.log", "w")
    # SOAK_WRAP runs the server under a tool, e.g. SOAK_WRAP="heaptrack -o /tmp/soak" (the pid
    # sampled is then the tool's child, the server itself).
    wrap = os.environ.get("SOAK_WRAP", "").split()
    server = subprocess.Popen([*wrap, str(BIN)], env=env, stdout=log, stderr=log)
    for _ in range(300):
        try:
            fetch(f"{base}/health", timeout=2)
            break
        except Exception:  # noqa: BLE001
            time.sleep(0.1)
    pid = server_pid(server, wrap)
    baseline = proc_stats(pid)
    print(f"soak: {SECS} s, work dir {W}, cratere pid {pid}; before the load: "
          f"RSS {baseline[0] / 1024:.1f} MiB, {baseline[1]} fds, {baseline[2]} threads", flush=True)

    threads = [threading.Thread(target=client, args=(base, i), daemon=True) for i in range(12)]
    threads += [threading.Thread(target=cloner, args=(base,), daemon=True),
                threading.Thread(target=committer, args=(repo,), daemon=True),
                threading.Thread(target=hostile, args=(port,), daemon=True)]
    for th in threads:
        th.start()

    samples = []
    last_counts = {}
    try:
        while now() < SECS:
            time.sleep(SAMPLE - (now() % SAMPLE))
            rss, fds, nthreads, children = proc_stats(pid)
            counts, nerr = TALLY.snapshot()
            done = sum(v for (k, o), v in counts.items() if k != "hostile")
            ok = sum(v for (k, o), v in counts.items() if o == "ok" and k != "hostile")
            prev_done, prev_ok = last_counts.get("done", 0), last_counts.get("ok", 0)
            last_counts = {"done": done, "ok": ok}
            conns = metric(base, "cratere_connections_open")
            samples.append((now(), rss, fds, nthreads, children, done - prev_done, ok - prev_ok,
                            nerr, fault_at(now()), conns))
            s = samples[-1]
            print(f"{s[0]:7.0f} s  anon rss {s[1] / 1024:6.1f} MiB  fds {s[2]:4d}  threads {s[3]:3d}  "
                  f"children {s[4]:2d}  requests {s[5]:5d} (ok {s[6]:5d})  errors {s[7]}  "
                  f"conns {s[9]}  fault {s[8]}", flush=True)
    finally:
        STOP.set()
        # Idle for longer than hot crate files stay open (30 s) and idle upstream connections
        # stay pooled (60 s idle, reaped by a timer of the same period: up to 120 s), so that
        # what is left open is what leaked.
        time.sleep(IDLE)
        # A scheduled sync may be running git right now: the least of a few looks.
        looks = []
        for _ in range(5):
            looks.append(proc_stats(pid))
            time.sleep(1)
        rss, fds, nthreads, children = min(looks, key=lambda s: (s[3], s[1]))
        kinds = fd_kinds(pid)
        # Which sockets are still open, and to where (for a leak to be told from a pool).
        sockets = subprocess.run(["ss", "-anpH"], capture_output=True, text=True).stdout
        (W / "sockets-after.txt").write_text(
            "".join(l + "\n" for l in sockets.splitlines() if f"pid={pid}," in l))
        os.kill(pid, signal.SIGTERM)
        code = server.wait(timeout=60)
        up.shutdown()
    report(samples, baseline, (rss, fds, nthreads, children, kinds), code)


def report(samples, baseline, end, exit_code):
    counts, nerr = TALLY.snapshot()
    q = max(1, len(samples) // 4)
    second = samples[q:2 * q]
    last = samples[-q:]
    peak2 = max(s[1] for s in second)
    peak4 = max(s[1] for s in last)
    fds2 = max(s[2] for s in second)
    fds4 = max(s[2] for s in last)
    lines = []
    out = lines.append
    out(f"Soak run: {SECS} s, sampled every {SAMPLE} s.")
    out("")
    out("| minute | anonymous RSS MiB (max) | open fds (max) | threads (max) | git children (max) | requests | ok |")
    out("| --- | --- | --- | --- | --- | --- | --- |")
    by_minute = {}
    for s in samples:
        m = int(s[0] // 60)
        b = by_minute.setdefault(m, [0, 0, 0, 0, 0, 0])
        b[0] = max(b[0], s[1]); b[1] = max(b[1], s[2]); b[2] = max(b[2], s[3])
        b[3] = max(b[3], s[4]); b[4] += s[5]; b[5] += s[6]
    for m, b in sorted(by_minute.items()):
        if m % 3 == 0 or m == max(by_minute):
            out(f"| {m} | {b[0] / 1024:.1f} | {b[1]} | {b[2]} | {b[3]} | {b[4]} | {b[5]} |")
    out("")
    out("| client requests | outcome | count |")
    out("| --- | --- | --- |")
    for (k, o), v in sorted(counts.items()):
        out(f"| {k} | {o} | {v} |")
    out("")
    out(f"Before the load: RSS {baseline[0] / 1024:.1f} MiB, {baseline[1]} fds, {baseline[2]} "
        f"threads, {baseline[3]} child processes. After it ({IDLE} s idle, past the 30 s for which "
        f"hot crate files stay open and the up to 120 s idle upstream connections stay pooled): RSS "
        f"{end[0] / 1024:.1f} MiB, {end[1]} fds ({end[4]}), {end[2]} threads, {end[3]} child "
        f"processes. Exit code after SIGTERM: {exit_code}.")
    out(f"Peaks, second quarter vs last quarter: RSS {peak2 / 1024:.1f} vs {peak4 / 1024:.1f} MiB, "
        f"descriptors {fds2} vs {fds4} (under load, hot crate files stay open for sendfile: "
        f"up to 1,024).")
    failures = []
    if nerr:
        failures.append(f"{nerr} client errors (first: {TALLY.errors[:5]})")
    if peak4 > peak2 * 1.2:
        failures.append("RSS grew by more than 20 % between the second and the last quarter")
    if fds4 > fds2 * 1.2 + 16:
        failures.append("descriptors grew by more than 20 % between the second and the last quarter")
    if end[1] > baseline[1] + 8:
        failures.append(f"descriptors did not come back: {end[1]} vs {baseline[1]} before the load")
    if end[3] > baseline[3]:
        failures.append(f"child processes left: {end[3]}")
    if exit_code != 0:
        failures.append(f"exit code {exit_code} after SIGTERM")
    out("")
    out("Result: " + ("PASS" if not failures else "FAIL: " + "; ".join(failures)))
    print("\n".join(lines), flush=True)
    (W / "report.md").write_text("\n".join(lines) + "\n")
    print(f"(report in {W / 'report.md'}, server log in {W / 'cratere.log'})")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

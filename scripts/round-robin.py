#!/usr/bin/env python3
"""A tiny HTTP load balancer for checks: each request goes to the next backend in turn.

Usage: round-robin.py LISTEN_HOST:PORT BACKEND_HOST:PORT [BACKEND_HOST:PORT ...]
Logs one line per request to stdout: `<backend index> <status> <method> <path>`.
Bodies are relayed whole (fine for a check; a real balancer streams).
"""
import http.client
import itertools
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

listen, backends = sys.argv[1], sys.argv[2:]
turn = itertools.cycle(range(len(backends)))
lock = threading.Lock()
HOP = {"connection", "keep-alive", "upgrade", "http2-settings", "transfer-encoding", "te"}


class Relay(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def relay(self):
        with lock:
            i = next(turn)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
        conn = http.client.HTTPConnection(backends[i], timeout=120)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except Exception as e:  # backend down: what a balancer would say
            self.send_error(502, str(e))
            return
        finally:
            conn.close()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in HOP and k.lower() != "content-length":
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        print(i, resp.status, self.command, self.path, flush=True)

    do_GET = do_HEAD = do_POST = relay

    def log_message(self, *args):
        pass


host, port = listen.rsplit(":", 1)
ThreadingHTTPServer((host, int(port)), Relay).serve_forever()

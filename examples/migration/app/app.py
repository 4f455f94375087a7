"""A small HTTP service deployed by Fraisier's example inventories; standard library only.

GET /health returns 200, or 500 while a file named UNHEALTHY sits next to this script (a file
named UNHEALTHY_ONCE makes only the first check fail). GET / describes the running release.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent


def read_revision() -> str:
    try:
        return (HERE / "REVISION").read_text(encoding="utf-8").strip()
    except OSError:
        return "unknown"


class Handler(BaseHTTPRequestHandler):
    server_version = "hello/1"

    def do_GET(self) -> None:
        if self.path == "/health":
            self._health()
        elif self.path == "/":
            body = {
                "service": "hello",
                "release": HERE.name,
                "revision": read_revision(),
                "pid": os.getpid(),
            }
            self._send(200, json.dumps(body) + "\n")
        else:
            self._send(404, "not found\n")

    def _health(self) -> None:
        once = HERE / "UNHEALTHY_ONCE"
        if once.exists():
            once.unlink(missing_ok=True)
            self._send(500, "unhealthy once\n")
        elif (HERE / "UNHEALTHY").exists():
            self._send(500, "unhealthy\n")
        else:
            self._send(200, "ok\n")

    def _send(self, status: int, text: str) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8731)
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()

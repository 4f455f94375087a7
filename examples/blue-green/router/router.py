"""Router of the blue-green recipe: a reverse proxy to the slot whose port is in the live file.

The live file is read on every request, so renaming a new file over it moves the next request to
the other slot while requests in flight finish on the old one.
"""

import argparse
import http.client
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Headers not copied between client and slot: hop-by-hop headers describe one connection,
# and the router sets Content-Length itself while send_response() adds Server and Date.
HOP_BY_HOP = {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"}
SKIPPED_HEADERS = HOP_BY_HOP | {"content-length", "server", "date"}


class Router(BaseHTTPRequestHandler):
    live = ""
    upstream = ""

    def forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in SKIPPED_HEADERS}
        try:
            with open(self.live, encoding="utf-8") as live:
                port = int(live.read())
            upstream = http.client.HTTPConnection(self.upstream, port, timeout=30)
            try:
                upstream.request(self.command, self.path, body, headers)
                reply = upstream.getresponse()
                data = reply.read()
            finally:
                upstream.close()
        except (OSError, ValueError, http.client.HTTPException) as exc:
            self.send_error(502, f"the live slot did not answer: {exc}")
            return
        self.send_response(reply.status, reply.reason)
        for key, value in reply.getheaders():
            if key.lower() not in SKIPPED_HEADERS:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = forward

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bind", required=True, help="address to listen on")
    parser.add_argument("--port", type=int, required=True, help="public port")
    parser.add_argument("--upstream", required=True, help="address of the slots")
    parser.add_argument("--live", required=True, help="file that contains the live slot's port")
    args = parser.parse_args()
    Router.live, Router.upstream = args.live, args.upstream
    ThreadingHTTPServer((args.bind, args.port), Router).serve_forever()


if __name__ == "__main__":
    main()

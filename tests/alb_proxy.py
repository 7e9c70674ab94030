"""A stand-in for an Application Load Balancer's host-based routing, for the ECS parity test.

    python alb_proxy.py --listen 0.0.0.0:80 --route mlflow.example=127.0.0.1:5000 ...

Each request goes to the target whose host name matches the Host header (port ignored, as an
ALB host condition does), with the Host header unchanged, so the server behind it sees what it
would see behind the ALB. Any other host gets the listener's fixed 404. Bodies are buffered
(test-sized), chunked requests are de-chunked.
"""

from __future__ import annotations

import argparse
import http.client
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
}


def make_handler(routes: dict[str, tuple[str, int]]):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _forward(self) -> None:
            body = self._body()
            host = (self.headers.get("Host") or "").split(":")[0].lower()
            if host not in routes:
                message = b"Not found: unknown host"
                self.send_response(404)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(message)))
                self.end_headers()
                self.wfile.write(message)
                return
            target = http.client.HTTPConnection(*routes[host], timeout=300)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            try:
                target.request(self.command, self.path, body=body, headers=headers)
                response = target.getresponse()
                payload = response.read()
            except OSError:
                self.send_response(502)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            finally:
                target.close()
            self.send_response(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() not in HOP_BY_HOP | {"content-length"}:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _forward

        def log_message(self, format, *args):
            pass

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="0.0.0.0:80")
    parser.add_argument("--route", action="append", default=[], metavar="HOST=ADDRESS:PORT")
    args = parser.parse_args()
    routes = {}
    for route in args.route:
        host, _, target = route.partition("=")
        address, _, port = target.rpartition(":")
        routes[host.lower()] = (address, int(port))
    address, _, port = args.listen.rpartition(":")
    ThreadingHTTPServer((address, int(port)), make_handler(routes)).serve_forever()


if __name__ == "__main__":
    main()

"""A real HTTP server on 127.0.0.1 for download tests, with the faults a download must survive.

The stdlib `SimpleHTTPRequestHandler` ignores `Range`, so this serves in-memory files itself.
"""

from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FileServer:
    """Serves `files` (path -> bytes); the other attributes inject faults per path."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut_once: dict[str, int] = {}  # send this many body bytes, then drop the connection (once)
        self.unavailable: set[str] = set()  # answered with 503
        self.corrupt: set[str] = set()  # served with one byte flipped
        self.ignore_range: set[str] = set()  # always answered 200 with the whole file
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header) of every GET
        self._httpd = _Server(("127.0.0.1", 0), _handler(self))
        # A short poll interval makes shutdown (once per test) take milliseconds, not 0.5 s.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.01,), daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}{path}"

    def ranges(self, path: str) -> list[str | None]:
        """The Range header of each request for `path`, in order."""
        return [rng for p, rng in self.requests if p == path]

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # do not wait for idle keep-alive connections at shutdown


def _handler(state: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            rng = self.headers.get("Range")
            state.requests.append((self.path, rng))
            if self.path in state.unavailable:
                return self._empty(503)
            if self.path not in state.files:
                return self._empty(404)
            body = state.files[self.path]
            if self.path in state.corrupt:
                middle = len(body) // 2
                body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
            start, status = 0, 200
            if rng and self.path not in state.ignore_range:
                start = int(re.fullmatch(r"bytes=(\d+)-", rng)[1])
                if start >= len(body):
                    return self._empty(416, {"Content-Range": f"bytes */{len(body)}"})
                status = 206
            chunk = body[start:]
            self.send_response(status)
            self.send_header("Content-Length", str(len(chunk)))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.end_headers()
            cut = state.cut_once.pop(self.path, None)
            if cut is not None:
                self.wfile.write(chunk[:cut])
                self.close_connection = True
                return
            self.wfile.write(chunk)

        def _empty(self, status: int, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

    return Handler

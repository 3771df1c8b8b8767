"""``hmerzoo demo``: a page to draw or drop a formula and read it back as LaTeX.

The stack is Python's own ``http.server`` (a ``ThreadingHTTPServer``) serving one static page and one JSON
endpoint: the demo needs nothing the package does not already install, and the page (plain JavaScript, a canvas
with pointer events, KaTeX vendored under ``static/vendor/katex``) works offline.

Routes:

* ``GET /`` the page; ``GET /static/<file>`` its scripts, styles and fonts.
* ``GET /api/info`` the model and its decode settings.
* ``POST /api/recognize[?k=N]`` the body is an encoded image (PNG, JPEG, ...); the answer is
  :meth:`DemoService.recognize_bytes`'s JSON, or ``{"error": message}`` with status 400 (not an image, empty) or
  413 (too large). An error answers that request only: the server keeps serving.
"""
from __future__ import annotations

import json
import mimetypes
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..errors import HmerzooError
from .service import MAX_UPLOAD_BYTES, DemoService, UploadError

STATIC_DIR = Path(__file__).resolve().parent / "static"
# A body larger than this is not even read (the connection is closed); up to it, it is read and discarded so the
# browser receives the 413 answer instead of a reset connection.
_DRAIN_LIMIT = 4 * MAX_UPLOAD_BYTES

mimetypes.add_type("font/woff2", ".woff2")
mimetypes.add_type("text/javascript", ".js")


class DemoServer(ThreadingHTTPServer):
    daemon_threads = True  # a slow client never keeps the process alive after Ctrl-C

    def __init__(self, address: tuple[str, int], service: DemoService, quiet: bool = False) -> None:
        super().__init__(address, DemoHandler)
        self.service = service
        self.quiet = quiet

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class DemoHandler(BaseHTTPRequestHandler):
    server: DemoServer
    server_version = "hmerzoo-demo"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        if not self.server.quiet:
            super().log_message(format, *args)

    # -- answers -------------------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    # -- routes --------------------------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            return self._static("index.html")
        if path == "/api/info":
            return self._json(HTTPStatus.OK, self.server.service.info())
        if path.startswith("/static/"):
            return self._static(path[len("/static/"):])
        self._error(HTTPStatus.NOT_FOUND, f"no such page: {path}")

    do_HEAD = do_GET

    def _static(self, relative: str) -> None:
        target = (STATIC_DIR / relative).resolve()
        # only files inside static/ (no ../ escapes)
        if STATIC_DIR not in target.parents or not target.is_file():
            return self._error(HTTPStatus.NOT_FOUND, f"no such file: {relative}")
        kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if kind.startswith("text/"):
            kind += "; charset=utf-8"
        self._send(HTTPStatus.OK, target.read_bytes(), kind)

    def do_POST(self) -> None:  # noqa: N802
        parts = urlsplit(self.path)
        if parts.path != "/api/recognize":
            return self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: {parts.path}")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return self._error(HTTPStatus.BAD_REQUEST, "bad Content-Length")
        if length > MAX_UPLOAD_BYTES:
            self._discard(length)
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"the upload is too large ({length / 1e6:.1f} MB; at most "
                               f"{MAX_UPLOAD_BYTES / 1e6:.0f} MB)")
        data = self.rfile.read(length) if length > 0 else b""
        try:
            top_k = int(parse_qs(parts.query).get("k", ["0"])[0]) or None
        except ValueError:
            return self._error(HTTPStatus.BAD_REQUEST, "k must be a whole number")
        try:
            result = self.server.service.recognize_bytes(data, top_k=top_k)
        except UploadError as e:
            return self._error(e.status, str(e))
        except HmerzooError as e:
            return self._error(HTTPStatus.BAD_REQUEST, str(e))
        except Exception as e:  # a bug: answer it and keep serving; the traceback goes to the server's log
            import traceback

            traceback.print_exc()
            return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"unexpected {type(e).__name__}: {e}")
        self._json(HTTPStatus.OK, result)

    def _discard(self, length: int) -> None:
        if length > _DRAIN_LIMIT:
            self.close_connection = True
            return
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 20))
            if not chunk:
                break
            length -= len(chunk)


def make_server(model: Any, host: str = "127.0.0.1", port: int = 7860, decode: dict[str, Any] | None = None,
                name: str = "", quiet: bool = False, attention: Any = None) -> DemoServer:
    """A demo server bound to ``host:port`` (port 0: any free port; see ``.url``), not yet serving."""
    return DemoServer((host, port), DemoService(model, decode, attention=attention, name=name), quiet=quiet)


def run_demo(model_path: str, host: str = "127.0.0.1", port: int = 7860, device: str = "auto",
             decode: dict[str, Any] | None = None) -> int:
    """The ``hmerzoo demo`` command: load the model once, serve until Ctrl-C."""
    from ..attention_maps import attention_strip_png
    from ..builder import load_model
    from ..predict import resolve_device

    try:  # the address first: a port in use fails before the model is loaded
        server = DemoServer((host, port), None)  # type: ignore[arg-type]
    except OSError as e:
        raise HmerzooError(f"cannot serve on {host}:{port} ({e.strerror or e}); try another --port") from None
    try:
        model = load_model(model_path, map_location=resolve_device(device))
        server.service = DemoService(model, decode, attention=attention_strip_png, name=str(model_path))
    except BaseException:
        server.server_close()
        raise
    print(f"hmerzoo demo: {server.url} (Ctrl-C stops it)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0

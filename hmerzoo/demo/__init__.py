"""The demo page (``hmerzoo demo``): draw or drop a formula in a browser, read the LaTeX, offline.

``service`` checks, prepares and decodes one uploaded image; ``server`` serves the page under ``static/`` and the
JSON endpoint with Python's own ``http.server``.
"""
from __future__ import annotations

from .server import DemoServer, make_server, run_demo
from .service import DemoService, UploadError

__all__ = ["DemoServer", "DemoService", "UploadError", "make_server", "run_demo"]

"""A headless Chromium driven over its DevTools protocol, with nothing but the standard library.

Used by test_demo.py's browser tests. The protocol runs over a WebSocket; :class:`WebSocket` is the small part
of RFC 6455 a local client needs (masked text frames out; text, continuation, ping and close frames in).
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """$HMERZOO_CHROMIUM, else the first Chromium on PATH."""
    named = os.environ.get("HMERZOO_CHROMIUM")
    if named:
        return named if Path(named).is_file() else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


class WebSocket:
    def __init__(self, url: str, timeout: float = 60.0) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (f"GET {parts.path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("the browser closed the WebSocket handshake")
            head += chunk
        head, self._buffer = head.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"WebSocket handshake refused: {head[:200]!r}")

    def _read(self, n: int) -> bytes:
        while len(self._buffer) < n:
            chunk = self.sock.recv(max(65536, n - len(self._buffer)))
            if not chunk:
                raise ConnectionError("the browser closed the WebSocket")
            self._buffer += chunk
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out

    def send(self, text: str) -> None:
        payload = text.encode("utf-8")
        n = len(payload)
        header = bytes([0x81])  # FIN + text frame
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)  # a client's frames are masked (RFC 6455 5.3)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if n < 4096 else _mask_fast(payload, mask)
        self.sock.sendall(header + mask + masked)

    def recv(self) -> str:
        message = b""
        while True:
            b0, b1 = self._read(2)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(n)  # the server's frames are not masked
            if opcode == 0x8:
                raise ConnectionError("the browser closed the WebSocket")
            if opcode == 0x9:  # ping: answer pong
                self.sock.sendall(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
                continue
            message += payload
            if b0 & 0x80:
                return message.decode("utf-8")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _mask_fast(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


class Browser:
    """One headless Chromium with one page; :meth:`call` sends a DevTools command to that page."""

    def __init__(self, executable: str, width: int = 1000, height: int = 900) -> None:
        self.profile = tempfile.mkdtemp(prefix="hmerzoo-chromium-")
        args = [executable, "--headless=new", "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
                "--no-first-run", "--no-default-browser-check", "--disable-gpu", "--disable-extensions",
                "--disable-background-networking", "--disable-dev-shm-usage", f"--window-size={width},{height}",
                "--force-device-scale-factor=1", "about:blank"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox (CI runs as root)
        # stderr goes to a file, not a pipe: Chromium keeps logging, and a full pipe would stall it
        self.log = Path(self.profile) / "stderr.log"
        with open(self.log, "wb") as log:
            # TMPDIR: Chromium's own temporary files (its singleton socket) go in the profile, removed on close
            self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log,
                                            env={**os.environ, "TMPDIR": self.profile})
        self._next_id = 0
        self.ws = WebSocket(self._browser_url())
        target = self._command("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self._command("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable")
        self.call("Runtime.enable")

    def _browser_url(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            found = re.search(r"DevTools listening on (ws://\S+)", text)
            if found:
                return found.group(1)
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.close()
        raise RuntimeError("Chromium did not start: " + text[-2000:])

    def _send(self, method: str, params: dict | None, session: str | None) -> int:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        return self._next_id

    def _wait(self, ids: set[int]) -> dict[int, dict]:
        answers: dict[int, dict] = {}
        while ids - answers.keys():
            message = json.loads(self.ws.recv())
            if message.get("id") in ids:
                if "error" in message:
                    raise RuntimeError(f"DevTools error: {message['error']}")
                answers[message["id"]] = message.get("result", {})
        return answers

    def _command(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        i = self._send(method, params, session)
        return self._wait({i})[i]

    def call(self, method: str, params: dict | None = None) -> dict:
        return self._command(method, params, self.session)

    def call_many(self, commands: list[tuple[str, dict]]) -> None:
        """Send every command before reading the answers (pointer events in bulk without a round trip each)."""
        self._wait({self._send(m, p, self.session) for m, p in commands})

    def evaluate(self, expression: str, await_promise: bool = True) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": await_promise})
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 180.0, poll: float = 0.2) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(poll)
        raise TimeoutError(f"the page never made this true within {timeout:.0f} s: {expression}")

    def goto(self, url: str) -> None:
        # a mark on the old document: until it is gone, the new one has not replaced it yet
        self.evaluate("window.__cdpOldDocument = true")
        self.call("Page.navigate", {"url": url})
        self.wait_for("!window.__cdpOldDocument && document.readyState === 'complete'", timeout=60)

    def close(self) -> None:
        try:
            self.ws.close()
        except AttributeError:
            pass
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

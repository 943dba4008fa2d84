"""The local prediction API: HTTP/1.1 on a Unix socket, served by one thread of the agent.

Why a Unix socket: every agent on a host has its own socket file under its state directory,
so two agents never clash over a port; who may call it is decided by the file's permissions
(0660: the agent's user and group), not by a firewall; nothing on the network can reach it;
and any HTTP client speaks it (`curl --unix-socket <sock> http://localhost/health`).

    GET  /health   200 {"status": "serving", "version", "source", "sha256", "task", ...}
                   503 {"status": "no_model"} before a model has been verified
    POST /predict  {"inputs": [...]}: one example, a batch of them, or a batch of flat rows
                   200 {"version", "source", "sha256", "predictions", "probabilities"}
                   400 bad JSON or inputs, 411 no Content-Length, 413 too large, 503 no model

At most MAX_CONCURRENT requests are answered at once (a thread each, ended with the
request; a device is small), each read with a timeout, so a caller that connects and stalls
holds one slot for at most REQUEST_TIMEOUT_S; a body is at most serve_max_request_bytes and
a batch at most serve_max_batch examples.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import stat
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from edge_agent.serving import Serving

MAX_SOCKET_PATH = 100  # bytes; the kernel's limit is 107 (sun_path)
REQUEST_TIMEOUT_S = 5.0  # a caller that stalls longer is dropped
MAX_CONCURRENT = 4  # callers answered at once, each in a short-lived thread
DRAIN_FACTOR = 4  # a body up to this many times too large is read (and dropped) before a 413


def check_socket_path(path: Path) -> None:
    """ValueError (one line) when path cannot be a Unix socket's address."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ValueError(f"the serving socket path {path} is longer than {MAX_SOCKET_PATH} "
                         "bytes: set serve_socket to a shorter one")  # fmt: skip


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, path: str, serving: Serving, max_batch: int, max_bytes: int) -> None:
        self.serving, self.max_batch, self.max_bytes = serving, max_batch, max_bytes
        self._slots = threading.BoundedSemaphore(MAX_CONCURRENT)
        super().__init__(path, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        self._slots.acquire()  # at most MAX_CONCURRENT callers at once; the next one waits
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a caller that hung up or stalled past the timeout: its request is dropped


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_TIMEOUT_S
    server_version = "fedmq-serving"

    def address_string(self) -> str:  # an AF_UNIX peer has no address
        return "local"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass  # callers are local applications: no access log

    def _reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802 - the base's name
        if self.path.split("?")[0] != "/health":
            self._reply(404, {"error": "unknown path: GET /health or POST /predict"})
            return
        health = self.server.serving.health()
        self._reply(200 if health["status"] == "serving" else 503, health)

    def do_POST(self) -> None:  # noqa: N802 - the base's name
        if self.path.split("?")[0] != "/predict":
            self._reply(404, {"error": "unknown path: GET /health or POST /predict"})
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._reply(411, {"error": "a Content-Length header is needed"})
            return
        if int(length) > self.server.max_bytes:
            left = int(length) if int(length) <= DRAIN_FACTOR * self.server.max_bytes else 0
            while left > 0:  # so that the caller reads the answer, not a broken pipe
                got = len(self.rfile.read(min(65536, left)))
                left = left - got if got else 0
            self._reply(413, {"error": f"the body is {length} bytes; at most "
                                       f"{self.server.max_bytes}"})  # fmt: skip
            return
        body = self.rfile.read(int(length))
        try:
            request = json.loads(body, parse_constant=_no_constant)
            if not isinstance(request, dict) or "inputs" not in request:
                raise ValueError('the body must be a JSON object {"inputs": [...]}')
            x = self.server.serving.spec.batch(request["inputs"], max_rows=self.server.max_batch)
        except RecursionError:
            self._reply(400, {"error": "the inputs are nested too deeply"})
            return
        except ValueError as err:  # json.JSONDecodeError is one
            self._reply(400, {"error": str(err)[:300]})
            return
        out = self.server.serving.predict(x)
        if out is None:
            self._reply(503, {"error": "no verified model yet", "status": "no_model"})
            return
        self._reply(200, out)


def _no_constant(name: str) -> Any:
    raise ValueError(f"inputs must be finite numbers, not {name}")


class PredictAPI:
    """The API's socket and thread."""

    def __init__(self, *, serving: Serving, path: Path, max_batch: int,
                 max_request_bytes: int) -> None:  # fmt: skip
        self.serving, self.path = serving, Path(path)
        self.max_batch, self.max_request_bytes = max_batch, max_request_bytes
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind the socket (0660) and serve in a daemon thread. OSError when another process
        serves on it or it cannot be made; a stale socket file is replaced."""
        check_socket_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise OSError(f"{self.path} exists and is not a socket")
            if _answers(self.path):
                raise OSError(f"another process serves on {self.path}")
            self.path.unlink()
        old = os.umask(0o117)  # the socket is created 0660
        try:
            self._server = _Server(str(self.path), self.serving, self.max_batch,
                                   self.max_request_bytes)  # fmt: skip
        finally:
            os.umask(old)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.2},
                                        name="fedmq-serving", daemon=True)  # fmt: skip
        self._thread.start()

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.path.unlink(missing_ok=True)
        self._server = None


def _answers(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()

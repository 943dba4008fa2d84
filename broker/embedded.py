"""An amqtt broker in a child process: the demo's fallback when Mosquitto is not installed.

amqtt speaks MQTT 3.1.1 only and keeps everything in memory: retained messages and
persistent sessions survive client reconnects but not a broker restart. It has no
payload size limit of its own, so 1 MiB publishes pass.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from broker.mosquitto import BrokerStartError, check_port_free, file_tail, free_port, log_reason
from fedmq import processes

CONSOLE_NAME = "embedded.log"
READY_NAME = "embedded.ready"
# amqtt loads plugins by dotted path; this one is built lazily by the module __getattr__ below
OPEN_AUTH_PLUGIN = "broker.embedded.OpenAuthPlugin"
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
# same as `python -m broker.embedded`, without runpy warning that the package already
# imported this module (broker/__init__ re-exports EmbeddedBroker)
_CHILD_ENTRY = "import sys; from broker.embedded import main; main(sys.argv[1:])"


def amqtt_available() -> bool:
    """Return True when amqtt can be imported by this interpreter."""
    return importlib.util.find_spec("amqtt") is not None


def amqtt_config(host: str, port: int) -> dict[str, Any]:
    """Return the amqtt broker config: one TCP listener, every client admitted."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        # no $SYS publisher and no per-packet logging: only the open auth plugin
        "plugins": {OPEN_AUTH_PLUGIN: {}},
    }


@functools.cache
def _open_auth_plugin() -> type:
    from amqtt.plugins.base import BaseAuthPlugin
    from amqtt.session import Session

    class OpenAuthPlugin(BaseAuthPlugin):
        """Admit every client without marking it anonymous.

        amqtt's AnonymousAuthPlugin flags sessions anonymous, and amqtt then drops their
        persistent sessions and offline QoS 1 queues; Mosquitto's allow_anonymous does not.
        """

        async def authenticate(self, *, session: Session) -> bool | None:
            return True

    OpenAuthPlugin.__module__ = __name__
    return OpenAuthPlugin


def __getattr__(name: str) -> Any:
    # importing broker must not require amqtt, so the plugin class exists only on demand
    if name == "OpenAuthPlugin":
        return _open_auth_plugin()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class EmbeddedBroker:
    """An amqtt broker child process with the same surface as MosquittoBroker."""

    kind = "embedded (amqtt)"
    mqtt_version = "3.1.1"

    def __init__(self, *, data_dir: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        if not isinstance(data_dir, (str, os.PathLike)):
            raise ValueError(f"data_dir must be a path, got {data_dir!r}")
        if not isinstance(host, str) or not host or any(c.isspace() for c in host):
            raise ValueError(f"host must be a non-empty address without spaces, got {host!r}")
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be 0 (pick a free one) or 1..65535, got {port!r}")
        self.data_dir = Path(data_dir)
        self._host = host
        self._port = port
        self._proc: processes.Child | None = None

    @property
    def host(self) -> str:
        """Address the listener binds and clients connect to."""
        return self._host

    @property
    def port(self) -> int:
        """TCP port of the listener; fixed after the first start."""
        if self._port == 0:
            raise RuntimeError("the broker has no port yet: call start() first or pass port=")
        return self._port

    @property
    def pid(self) -> int | None:
        """Process id of the running broker, or None."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        """The child's stdout and stderr."""
        return self.data_dir / CONSOLE_NAME

    def log_tail(self, lines: int = 20) -> str:
        """Return the last lines of the broker's output."""
        return file_tail(self.log_path, lines) or "(no log output)"

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        """Launch the amqtt broker and wait until it listens."""
        if self.running:
            raise RuntimeError(f"the embedded broker is already running on {self.host}:{self.port}")
        if not amqtt_available():
            raise RuntimeError(
                "amqtt is not installed: pip install 'fedmq[demo]', or install Mosquitto"
            )
        check_port_free("the embedded broker", self._host, self._port)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._port == 0:
            self._port = free_port(self._host)
        ready = self.data_dir / READY_NAME
        ready.unlink(missing_ok=True)
        # importable from a source checkout too, not only when fedmq is installed
        pythonpath = os.pathsep.join(
            p for p in (str(_PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        self._proc = processes.spawn(
            [sys.executable, "-c", _CHILD_ENTRY, "--host", self._host]
            + ["--port", str(self._port), "--ready-file", str(ready)],
            log_path=self.log_path,
            env={"PYTHONPATH": pythonpath},
            own_group=True,  # a Ctrl-C to the tests does not hit it
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                reason = log_reason(self.log_tail(5))
                raise BrokerStartError(
                    f"the embedded broker exited with {processes.describe_exit(code)} while "
                    f"starting on {self._host}:{self._port}; log tail:\n{self.log_tail()}",
                    summary=f"the embedded broker could not start on {self._host}:{self._port}: "
                    f"{reason}",
                    port_in_use="address already in use" in reason.lower(),
                )
            if ready.exists():
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(
            f"the embedded broker did not start on {self._host}:{self._port} within "
            f"{timeout:g}s; log tail:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Stop with SIGTERM, SIGKILL after timeout."""
        if self._proc is not None:
            processes.stop(self._proc, grace_s=timeout)
            self._proc = None

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would."""
        if self._proc is not None:
            processes.kill(self._proc)
            self._proc = None

    def restart(self, timeout: float = 15.0) -> EmbeddedBroker:
        """Stop if running, then start on the same port (retained state is not kept)."""
        self.stop()
        return self.start(timeout=timeout)

    def __enter__(self) -> EmbeddedBroker:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"EmbeddedBroker({self._host}:{self._port}, {state})"


async def serve(host: str, port: int, ready_file: Path | None = None) -> None:
    """Run an amqtt broker on host:port until SIGTERM or SIGINT."""
    from amqtt.broker import Broker

    broker = Broker(amqtt_config(host, port))
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready_file is not None:
        ready_file.write_text(f"{os.getpid()}\n", "utf-8")
    try:
        await stop.wait()
    finally:
        await broker.shutdown()


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: python -m broker.embedded --host H --port P."""
    parser = argparse.ArgumentParser(description="Run fedmq's embedded amqtt MQTT broker.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--ready-file", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(serve(args.host, args.port, args.ready_file))
    except Exception as err:  # one line for the parent to show, not amqtt's traceback
        print(f"Error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

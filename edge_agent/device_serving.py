"""What the agent does to serve (edge_agent/serving.py): restore the served model at a
start, run the local API (edge_agent/serving_api.py), and offer each new model -- the
fetched ONNX export on an inference-only device, its own export after each held version
on a training device. A model that fails verification is refused with its reason (the
agent's _refuse: a counter and the state topic) and the previous one keeps serving."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from edge_agent.fetch import ModelFetch
from edge_agent.inference import OnnxModel
from edge_agent.serving import Refused, Serving, Spec
from edge_agent.settings import AgentSettings
from edge_agent.state import DeviceStore
from fedmq.tasks import Task


class DeviceServing:
    """One agent's served model and API."""

    def __init__(
        self, *, settings: AgentSettings, task: Task, store: DeviceStore, threads: int,
        x: np.ndarray, log: logging.LoggerAdapter[Any], refuse: Callable[[str, str], None],
    ) -> None:  # fmt: skip
        self.s, self.task, self.store, self.x = settings, task, store, x
        self.log, self.refuse = log, refuse
        spec = Spec(task=task.name, input_shape=task.input_shape, num_classes=task.num_classes)
        root = settings.state_dir / settings.device_id / "serving"
        self.serving = Serving(root=root, spec=spec, threads=threads)
        self.api: Any = None

    @property
    def version(self) -> int:
        return self.serving.version

    @property
    def model(self) -> OnnxModel | None:
        """The served model's session (the federated evaluation of an inference-only device
        runs it rather than loading the export a second time)."""
        current = self.serving.current
        return current.model if current is not None else None

    def start(self, fetch: ModelFetch | None = None, *, trains: bool = False) -> None:
        """Serve what the pointer names (checked again), then open the API. A training
        device exports the version it holds when the pointer names another; on an
        inference-only device, which keeps no weights, the served version is the held one:
        the fetch machine takes its version, digest and epoch, so it is not fetched again
        and an older one replayed is refused. FatalError (exit 5) when the socket cannot be
        served on, or when a training device that serves lacks onnxruntime."""
        if trains and not self.s.serve:
            return  # a training device that serves nothing exports nothing
        if trains:  # the export is torch's; its verification and serving onnxruntime's
            from fedmq.cli_errors import require

            require("onnxruntime")
        try:
            p = self.serving.restore(self._inputs())
            if p is not None:
                self.log.info("serving version %d (%s) from %s", p["version"], p["source"],
                              self.serving.dir.root)  # fmt: skip
                if fetch and not trains and fetch.version < 0 and p["source"] == "global":
                    fetch.version, fetch.sha256, fetch.epoch = p["version"], p["sha256"], p["epoch"]
        except Refused as err:
            self.refuse(err.code, f"the model served before this start: {err.reason}")
        if fetch and trains and fetch.weights is not None:
            try:
                self.on_held(fetch.version)
            except OSError as err:  # the disk: logged, the agent goes on with what it serves
                self.log.error("cannot serve version %d: %s", fetch.version, err)
        if not self.s.serve:
            return
        from edge_agent.serving_api import PredictAPI, check_socket_path
        from fedmq.cli_errors import EXIT_NOT_READY, FatalError

        try:  # a default path too long for a socket: no API, but the agent runs
            check_socket_path(self.s.serving_socket)
        except ValueError as err:
            self.log.warning("no prediction API: %s (fedmq predict still works)", err)
            return
        self.api = PredictAPI(serving=self.serving, path=self.s.serving_socket,
                              max_batch=self.s.serve_max_batch,
                              max_request_bytes=self.s.serve_max_request_bytes)  # fmt: skip
        try:
            self.api.start()
        except OSError as err:
            raise FatalError(f"cannot serve predictions on {self.s.serving_socket}: {err}",
                             exit_code=EXIT_NOT_READY) from err  # fmt: skip
        self.log.info("serving predictions on %s", self.s.serving_socket)

    def stop(self) -> None:
        if self.api is not None:
            self.api.stop()

    def offer(self, data: bytes, *, version: int, source: str, epoch: int = 0) -> bool:
        """Verify and swap in a new model; False (refused with its reason) keeps the old."""
        try:
            served = self.serving.offer(data, version=version, source=source, epoch=epoch,
                                        inputs=self._inputs())  # fmt: skip
        except Refused as err:
            now = self.serving.version
            self.refuse(err.code, f"global version {version} is not served: {err.reason}; "
                        + (f"still serving version {now}" if now >= 0 else "nothing served"))
            return False
        self.log.info("serving version %d (%s, sha256 %s)", version, source, served.sha256[:12])
        return True

    def on_held(self, version: int) -> None:
        """A training device holds a new version: export what it serves with torch, offer it."""
        if version == self.serving.version or not self.s.serve:
            return
        from edge_agent.inference import serving_onnx

        try:
            data, which = serving_onnx(store=self.store, task=self.task)
        except Exception as err:  # the task's model fails to export: torch raises anything
            self.refuse("bad_onnx", f"global version {version} cannot be exported to serve: "
                        f"{type(err).__name__}: {str(err)[:200]}")  # fmt: skip
            return
        self.offer(data, version=version, source=which)

    def _inputs(self) -> np.ndarray | None:
        return self.x[:64] if len(self.x) else None

"""The aggregator's Prometheus metrics: what the service already counts, served over HTTP.

Most series are read from the service's own bookkeeping (the ledger's counters and
verdicts, the model's version and test metrics, the device table, the open round): the
loop takes a snapshot of them at most once a second (`observe`), and a scrape reads the
newest snapshot, so the HTTP thread never touches the loop's dicts. Only timings are
observed as they happen: round durations (open -> close), ack latencies (an update's last
chunk taken -> its ack published, the group commit included) and the journal's appends,
fsyncs and commits.

Every series carries the label `fedmq_job` (not `job`: Prometheus sets `job` to the scrape
job's name). Label values come from code (verdicts, reason codes, counter names, round
outcomes) or from a bounded set (device classes: the fleet file's when it names any, else
the first MAX_CLASSES profile names seen; any other is "other"), so devices cannot grow the
registry without bound. `SERIES` names every series; docs/metrics.md says what each means.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from aggregator.ledger import VERDICTS
from fedmq import __version__

if TYPE_CHECKING:
    from aggregator.service import Aggregator
    from aggregator.settings import AggregatorSettings
    from fedmq.fleetfile import FleetFile

log = logging.getLogger("fedmq.aggregator")

OBSERVE_EVERY_S = 1.0
MAX_CLASSES = 16  # device classes without a fleet file: the first ones seen, then "other"
ROUND_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
JOURNAL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1)  # fmt: skip
JOURNAL_OPS = ("append", "fsync", "commit")

# name -> (type, help); counters without their _total suffix, as Prometheus names families
SERIES: dict[str, tuple[str, str]] = {
    "fedmq_aggregator_info": ("gauge", "The aggregator's configuration (labels), always 1."),
    "fedmq_model_version": ("gauge", "The global model's version."),
    "fedmq_model_accuracy": ("gauge", "The global model's test accuracy (central evaluation)."),
    "fedmq_model_loss": ("gauge", "The global model's test loss (central evaluation)."),
    "fedmq_federated_version": ("gauge", "The newest version devices reported an evaluation "
                                         "of (federated evaluation)."),
    "fedmq_federated_accuracy": ("gauge", "Federated evaluation of that version: accuracy on the "
                                          "union of the devices' held-out data."),
    "fedmq_federated_loss": ("gauge", "Federated evaluation of that version: mean cross-entropy "
                                      "on the union of the devices' held-out data."),
    "fedmq_federated_devices": ("gauge", "Devices whose reports make up that result."),
    "fedmq_federated_examples": ("gauge", "Held-out examples behind that result."),
    "fedmq_federated_accuracy_spread": ("gauge", "The devices' accuracies on that version, by "
                                                 "stat: min, p10, p90, max, std."),
    "fedmq_rounds_closed": ("counter", "Rounds closed with a new version (as in the status)."),
    "fedmq_rounds_abandoned": ("counter", "Rounds abandoned, the version kept."),
    "fedmq_round_id": ("gauge", "The open round's id; 0 while none is open."),
    "fedmq_round_selected": ("gauge", "Devices the open round selected."),
    "fedmq_round_received": ("gauge", "Updates the open round accepted so far."),
    "fedmq_round_target": ("gauge", "Updates that complete the open round."),
    "fedmq_updates": ("counter", "Update verdicts since the aggregator started, by verdict "
                                 "and reason code (rejected only), as in the ledger."),
    "fedmq_bytes_up": ("counter", "Update bytes received (every chunk, refused ones too)."),
    "fedmq_bytes_down": ("counter", "Global model bytes published (each retained message once; "
                                    "the broker sends it to every device that fetches it)."),
    "fedmq_round_bytes_up": ("counter", "Bytes of the updates accepted into ended rounds (the "
                                        "sum of the history's bytes_up)."),
    "fedmq_round_bytes_down": ("counter", "Model bytes the accepted devices reported fetching "
                                          "(the sum of the history's bytes_down)."),
    "fedmq_devices_known": ("gauge", "Devices in the device table."),
    "fedmq_devices_online": ("gauge", "Devices not offline, by class (firmware profile)."),
    "fedmq_trainers_online": ("gauge", "Online devices that train (those a round can select)."),
    "fedmq_downlink_intrusions": ("counter", "Messages on the aggregator's own retained topics "
                                             "it did not publish (foreign) or published earlier "
                                             "(replayed); each is overwritten."),
    "fedmq_service_events": ("counter", "Every counter of the status document, by name."),
    "fedmq_round_duration_seconds": ("histogram", "Rounds from open to close, by outcome."),
    "fedmq_ack_latency_seconds": ("histogram", "From an update's last chunk taken to its ack "
                                               "published (the group commit included)."),
    "fedmq_journal_seconds": ("histogram", "Journal operations: append (a body written), fsync "
                                           "(the bodies synced) and commit (SQLite, synchronous)."),
}  # fmt: skip

_LABEL_VALUE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def metrics_for(s: AggregatorSettings, fleet: FleetFile | None) -> Metrics:
    """The service's metrics; with a fleet file, its device classes are the only ones."""
    classes = {d.device_class for d in fleet.devices.values() if d.device_class} if fleet else ()
    return Metrics(job=s.job, port=s.metrics_port, host=s.metrics_host, classes=classes)


class Metrics:
    """The service's registry, fed by its hooks; served over HTTP once `start`ed with a port.

    With metrics_port 0 every hook returns at once and prometheus_client is not imported."""

    def __init__(self, *, job: str, port: int, host: str = "127.0.0.1",
                 classes: Iterable[str] = ()) -> None:  # fmt: skip
        self.job, self.port, self.host = job, port, host
        self.enabled = port > 0
        self.classes = {c for c in classes if _LABEL_VALUE.fullmatch(c)}
        self.fixed_classes = bool(self.classes)  # a fleet file's: no others are taken in
        self.bytes_down = 0
        self.round_bytes_up = 0
        self.round_bytes_down = 0
        self._observed_at = float("-inf")
        self._families: list[Any] = []
        self._server: Any = None
        self._thread: threading.Thread | None = None
        if not self.enabled:
            return
        # a missing package surfaces as ImportError: the CLI names the extra (exit 5)
        import prometheus_client as pc
        self.registry = pc.CollectorRegistry(auto_describe=False)
        self.registry.register(_Snapshot(self))

        def histogram(name: str, labels: list[str], buckets: tuple[float, ...]) -> Any:
            return pc.Histogram(name, SERIES[name][1], ["fedmq_job", *labels], buckets=buckets,
                                registry=self.registry)  # fmt: skip

        self._round_s = histogram("fedmq_round_duration_seconds", ["outcome"], ROUND_BUCKETS)
        for outcome in ("complete", "quorum", "buffered", "abandoned"):
            self._round_s.labels(job, outcome)  # each from the start: a dashboard shows 0
        self._ack_s = histogram("fedmq_ack_latency_seconds", [], ACK_BUCKETS).labels(job)
        journal = histogram("fedmq_journal_seconds", ["op"], JOURNAL_BUCKETS)
        self._journal_s = {op: journal.labels(job, op) for op in JOURNAL_OPS}

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    # ------------------------------------------------------------ the service's hooks

    def start(self, agg: Aggregator) -> None:
        """Serve the endpoint and time the journal; FatalError (exit 5) when the port is taken."""
        if not self.enabled:
            return
        from prometheus_client import start_http_server

        agg.journal.timed = self.journal_op
        self.observe(agg, force=True)
        try:
            self._server, self._thread = start_http_server(self.port, self.host,
                                                           registry=self.registry)  # fmt: skip
        except OSError as err:  # a port in use: the host is not ready, as for fedmq broker
            from fedmq.cli_errors import EXIT_NOT_READY, FatalError

            raise FatalError(
                f"cannot serve metrics on {self.host}:{self.port} "
                f"(metrics_port): {err.strerror or err}", exit_code=EXIT_NOT_READY,
            ) from None
        log.info("metrics at %s", self.url)

    def stop(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._server, self._thread = None, None

    def observe(self, agg: Aggregator, now: float = 0.0, *, force: bool = False) -> None:
        """Take a snapshot of the service's bookkeeping (at most once a second, unless forced)."""
        if not self.enabled or (not force and now - self._observed_at < OBSERVE_EVERY_S):
            return
        self._observed_at = now
        self._families = list(self._build(agg))

    def round_ended(self, agg: Aggregator, record: dict[str, Any]) -> None:
        """A round ended: its history record, as it was appended."""
        if not self.enabled:
            return
        self._round_s.labels(self.job, str(record["outcome"])).observe(float(record["wall_s"]))
        self.round_bytes_up += int(record.get("bytes_up", 0))
        self.round_bytes_down += int(record.get("bytes_down", 0))
        self.observe(agg, record["closed_at"], force=True)

    def model_published(self, nbytes: int) -> None:
        """A version's retained messages went out."""
        if self.enabled:
            self.bytes_down += nbytes

    def acks_sent(self, delays: list[float]) -> None:
        """Acks went out this long after their updates' last chunks."""
        if self.enabled:
            for d in delays:
                self._ack_s.observe(max(0.0, d))

    def journal_op(self, op: str, seconds: float) -> None:
        """The journal timed one of its operations."""
        self._journal_s[op].observe(seconds)

    # ------------------------------------------------------------ the snapshot

    def _build(self, agg: Aggregator) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        job, s = self.job, agg.s

        def gauge(name: str, value: float, **labels: str) -> Any:
            f = GaugeMetricFamily(name, SERIES[name][1], labels=["fedmq_job", *labels])
            f.add_metric([job, *labels.values()], value)
            return f

        def counter(name: str, value: float) -> Any:
            f = CounterMetricFamily(name, SERIES[name][1], labels=["fedmq_job"])
            f.add_metric([job], value)
            return f

        yield gauge("fedmq_aggregator_info", 1, task=agg.task.name, mode=s.mode, rule=s.rule,
                    codec=s.codec, downlink=s.downlink,
                    downlink_delta=s.downlink_delta, version=__version__)  # fmt: skip
        yield gauge("fedmq_model_version", agg.model.version)
        for key in ("accuracy", "loss"):
            if key in agg.model.metrics:  # only once a version was evaluated
                yield gauge(f"fedmq_model_{key}", float(agg.model.metrics[key]))
        yield from _federated(gauge, job, agg.fedeval.latest())
        counters = dict(agg.ledger.counters)
        yield counter("fedmq_rounds_closed", counters.get("rounds_closed", 0))
        yield counter("fedmq_rounds_abandoned", counters.get("rounds_abandoned", 0))
        r = agg.round
        yield gauge("fedmq_round_id", r.round_id if r is not None else 0)
        yield gauge("fedmq_round_selected", len(r.selected) if r is not None else 0)
        yield gauge("fedmq_round_received", len(r.accepted) if r is not None else 0)
        yield gauge("fedmq_round_target", r.target if r is not None else 0)

        verdicts = CounterMetricFamily("fedmq_updates", SERIES["fedmq_updates"][1],
                                       labels=["fedmq_job", "verdict", "reason"])  # fmt: skip
        seen = dict(agg.ledger.verdicts)
        for v in VERDICTS:  # each from the start (rejections have reasons), so rate() is 0
            if v != "rejected":
                seen.setdefault((v, ""), 0)
        for (verdict, reason), n in sorted(seen.items()):
            verdicts.add_metric([job, verdict, reason], n)
        yield verdicts

        yield counter("fedmq_bytes_up", agg.intake.bytes_received)
        yield counter("fedmq_bytes_down", self.bytes_down)
        yield counter("fedmq_round_bytes_up", self.round_bytes_up)
        yield counter("fedmq_round_bytes_down", self.round_bytes_down)

        states = list(agg.presence.devices.values())
        online = Counter(self.class_of(st.profile) for st in states if st.status != "offline")
        by_class = GaugeMetricFamily("fedmq_devices_online", SERIES["fedmq_devices_online"][1],
                                     labels=["fedmq_job", "class"])  # fmt: skip
        for cls in sorted(self.classes | set(online)):
            by_class.add_metric([job, cls], online.get(cls, 0))
        yield by_class
        yield gauge("fedmq_devices_known", len(states))
        yield gauge(
            "fedmq_trainers_online", sum(1 for st in states if st.status != "offline" and st.trains)
        )

        watch = CounterMetricFamily("fedmq_downlink_intrusions",
                                    SERIES["fedmq_downlink_intrusions"][1],
                                    labels=["fedmq_job", "kind"])  # fmt: skip
        for kind in ("foreign", "replayed"):
            watch.add_metric([job, kind], counters.get(f"{kind}_downlink", 0))
        yield watch
        events = CounterMetricFamily("fedmq_service_events", SERIES["fedmq_service_events"][1],
                                     labels=["fedmq_job", "event"])  # fmt: skip
        for name, n in sorted(counters.items()):
            events.add_metric([job, name], n)
        yield events

    def class_of(self, profile: str) -> str:
        """A device's class as a label value: its profile when it is one of the classes,
        else "other" (a device names its own profile: it must not make series at will)."""
        if not profile:
            return "unknown"
        if (
            profile not in self.classes
            and not self.fixed_classes
            and (len(self.classes) < MAX_CLASSES and _LABEL_VALUE.fullmatch(profile))
        ):
            self.classes.add(profile)
        return profile if profile in self.classes else "other"


def _federated(gauge: Any, job: str, result: dict[str, Any] | None) -> Iterator[Any]:
    """The newest federated evaluation's gauges; none before any device reported."""
    from prometheus_client.core import GaugeMetricFamily

    if result is None:
        return
    for key in ("version", "accuracy", "loss", "devices", "examples"):
        yield gauge(f"fedmq_federated_{key}", float(result[key]))
    name = "fedmq_federated_accuracy_spread"
    spread = GaugeMetricFamily(name, SERIES[name][1], labels=["fedmq_job", "stat"])
    for stat in ("min", "p10", "p90", "max", "std"):
        spread.add_metric([job, stat], float(result[f"accuracy_{stat}"]))
    yield spread


class _Snapshot:
    """The collector a scrape reads: the newest snapshot the loop took."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        yield from self.metrics._families

"""Pick and start a broker: Mosquitto when installed, the embedded amqtt broker otherwise."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from broker.embedded import EmbeddedBroker, amqtt_available
from broker.mosquitto import BrokerSettings, MosquittoBroker, mosquitto_path
from broker.provision import FleetDir

logger = logging.getLogger(__name__)

BROKER_CHOICES = ("auto", "mosquitto", "embedded")
PROGRESS_OPERATOR = "progress"  # operator.<job>.progress: the identity a local run watches as
MOSQUITTO_MISSING = (
    "Mosquitto is not installed: apt-get install mosquitto, or use --broker embedded"
)
AMQTT_MISSING = "amqtt is not installed: pip install 'fedmq[demo]', or install Mosquitto"


def choose_broker(prefer: str = "auto") -> str:
    """Return "mosquitto" or "embedded" for a preference, raising when it cannot be met."""
    if prefer not in BROKER_CHOICES:
        raise ValueError(f"broker must be one of {', '.join(BROKER_CHOICES)}, got {prefer!r}")
    if prefer == "mosquitto":
        if mosquitto_path() is None:
            raise RuntimeError(MOSQUITTO_MISSING)
        return "mosquitto"
    if prefer == "embedded":
        if not amqtt_available():
            raise RuntimeError(AMQTT_MISSING)
        return "embedded"
    if mosquitto_path() is not None:
        return "mosquitto"
    if amqtt_available():
        return "embedded"
    raise RuntimeError(
        "No MQTT broker available: apt-get install mosquitto, or pip install 'fedmq[demo]'"
    )


def start_broker(
    *,
    prefer: str = "auto",
    port: int = 0,
    host: str = "127.0.0.1",
    data_dir: Path,
    message_size_limit: int = 0,
    fleet_dir: Path | None = None,
) -> MosquittoBroker | EmbeddedBroker:
    """Start the preferred broker on port (0 picks a free one) and return it running; with
    fleet_dir, Mosquitto with the fleet's mTLS listener and ACL (the embedded broker cannot
    enforce them and is refused)."""
    kind = choose_broker("mosquitto" if fleet_dir is not None and prefer == "auto" else prefer)
    if kind == "mosquitto":
        settings = BrokerSettings(data_dir=Path(data_dir), host=host, port=port,
                                  message_size_limit=message_size_limit,
                                  fleet_dir=fleet_dir)  # fmt: skip
        return MosquittoBroker(settings=settings).start()
    if fleet_dir is not None:
        raise RuntimeError("the embedded broker cannot enforce a fleet's certificates and ACL: "
                           "install Mosquitto (apt-get install mosquitto)")
    if message_size_limit:
        # amqtt has no size limit option; fedmq's chunking still keeps payloads small
        logger.warning(
            "the embedded broker does not enforce message_size_limit=%d", message_size_limit
        )
    return EmbeddedBroker(data_dir=Path(data_dir), host=host, port=port).start()


def start_fleet_broker(
    run_dir: Path,
    *,
    job: str,
    devices: Sequence[str],
    prefix: str = "fedmq",
    prefer: str = "auto",
    insecure: bool = False,
    message_size_limit: int = 0,
) -> tuple[MosquittoBroker | EmbeddedBroker, FleetDir | None]:
    """A broker for a local fleet (the demo, benchmarks): secured unless insecure, with a
    fleet directory in run_dir/fleet enrolling devices. The embedded broker cannot enforce
    certificates or an ACL; choosing it (no Mosquitto installed) runs without them, and
    returns no fleet directory so that the caller can say so."""
    kind = choose_broker(prefer)
    fleet = None
    if not insecure and kind == "mosquitto":
        fleet = FleetDir.init(Path(run_dir) / "fleet", job=job, prefix=prefix, devices=devices)
        # the caller's own watcher (the demo's progress bar) gets an identity of its own, so
        # `fedmq monitor` on the operator bundle does not take its session over
        fleet.add_operator(PROGRESS_OPERATOR)
    broker = start_broker(prefer=kind, port=0, data_dir=Path(run_dir) / "broker",
                          message_size_limit=message_size_limit,
                          fleet_dir=fleet.root if fleet else None)  # fmt: skip
    return broker, fleet

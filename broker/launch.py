"""Pick and start a broker: Mosquitto when installed, the embedded amqtt broker otherwise."""

from __future__ import annotations

import logging
from pathlib import Path

from broker.embedded import EmbeddedBroker, amqtt_available
from broker.mosquitto import BrokerSettings, MosquittoBroker, mosquitto_path

logger = logging.getLogger(__name__)

BROKER_CHOICES = ("auto", "mosquitto", "embedded")
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
    data_dir: Path,
    message_size_limit: int = 0,
) -> MosquittoBroker | EmbeddedBroker:
    """Start the preferred broker on port (0 picks a free one) and return it running."""
    if choose_broker(prefer) == "mosquitto":
        settings = BrokerSettings(
            data_dir=Path(data_dir), port=port, message_size_limit=message_size_limit
        )
        return MosquittoBroker(settings=settings).start()
    if message_size_limit:
        # amqtt has no size limit option; fedmq's chunking still keeps payloads small
        logger.warning(
            "the embedded broker does not enforce message_size_limit=%d", message_size_limit
        )
    return EmbeddedBroker(data_dir=Path(data_dir), port=port).start()

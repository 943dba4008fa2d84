"""Mosquitto integration and the embedded fallback broker."""

from broker.embedded import EmbeddedBroker, amqtt_available
from broker.launch import choose_broker, start_broker
from broker.mosquitto import (
    BrokerSettings,
    MosquittoBroker,
    free_port,
    mosquitto_path,
    render_config,
)

__all__ = [
    "BrokerSettings",
    "EmbeddedBroker",
    "MosquittoBroker",
    "amqtt_available",
    "choose_broker",
    "free_port",
    "mosquitto_path",
    "render_config",
    "start_broker",
]

"""fedmq: federated learning for fleets of small devices that talk over MQTT."""

__version__ = "0.1.0"

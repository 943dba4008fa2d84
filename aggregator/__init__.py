"""The fedmq aggregator: round policy and aggregation as pure code, an MQTT service shell."""

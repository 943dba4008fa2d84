"""The fedmq device agent: MQTT session shell, local training, ONNX inference, on-disk outbox.

Importing this package never imports torch: a device that only runs inference has none.
"""

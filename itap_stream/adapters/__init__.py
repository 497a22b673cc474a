"""Adapters: MQTT, SQL store, metrics, artifacts, CSV. I/O lives here, never in core/."""

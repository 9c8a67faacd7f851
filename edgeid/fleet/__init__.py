"""The fleet manager: the latest health of every box from MQTT, a dashboard, Prometheus
metrics and optional Home Assistant discovery. A separate program from the box's service; it
imports the telemetry schema to validate what it receives and nothing biometric at all."""

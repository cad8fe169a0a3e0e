"""Telemetry every service shares: tracing (OpenTelemetry, W3C context in NATS headers), Prometheus metrics,
structured logs."""

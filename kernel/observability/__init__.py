"""Logging, the Prometheus metrics endpoint (metrics.py, endpoint.py: imported only when metrics_port is set)."""

from .logs import setup_logging

__all__ = ["setup_logging"]

"""Logging now; metrics, drift and tracing ids as their issues land."""

from .logs import setup_logging

__all__ = ["setup_logging"]

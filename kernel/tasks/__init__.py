"""Durable tasks: persisted records with timestamped transitions, a runner with retries, idempotency keys."""

from .idempotency import IdempotencyStore, request_hash
from .runner import TaskRunner, UntilRestart, WaitingForReview
from .store import FINAL, TaskStore, TaskWatch

__all__ = ["FINAL", "IdempotencyStore", "TaskRunner", "TaskStore", "TaskWatch", "UntilRestart", "WaitingForReview",
           "request_hash"]

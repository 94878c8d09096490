"""The human review queue: escalated decisions, leases for reviewers, resolutions, SLA counts, watches."""

from .queue import CLAIMED, DEFAULT_LEASE_S, MAX_LEASE_S, OPEN, RESOLVED, ReviewQueue
from .reopen import reopen_reviews
from .watch import ReviewWatch

__all__ = ["CLAIMED", "DEFAULT_LEASE_S", "MAX_LEASE_S", "OPEN", "RESOLVED", "ReviewQueue", "ReviewWatch", "reopen_reviews"]

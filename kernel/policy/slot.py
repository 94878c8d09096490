"""The policy a service is running now, replaced atomically, never by a broken file."""

from __future__ import annotations

import threading
from pathlib import Path

from .loader import load_policy, parse_policy
from .policy import Policy


class PolicySlot:
    """Holds the active ``Policy``; ``replace_*`` installs a new one only if it loads cleanly.

    A refused upload raises ``PolicyError`` (INVALID_ARGUMENT, with the file,
    line and reason) and leaves the running policy in place. Readers take
    ``slot.current`` once per batch: the reference swap is atomic, so a batch
    is evaluated entirely by one version.
    """

    __slots__ = ("_current", "_lock", "history")

    def __init__(self, policy: Policy | None = None):
        self._current = policy
        self._lock = threading.Lock()
        self.history: list[tuple[str, str]] = []  # (version, sha256) of every policy installed, oldest first
        if policy is not None:
            self.history.append((policy.version, policy.hash))

    @property
    def current(self) -> Policy | None:
        return self._current

    def replace_text(self, text: str | bytes, source: str = "<upload>") -> Policy:
        return self.install(parse_policy(text, source=source))  # raises before anything changes

    def replace_file(self, path: str | Path) -> Policy:
        return self.install(load_policy(path))

    def install(self, policy: Policy) -> Policy:
        with self._lock:
            self._current = policy
            self.history.append((policy.version, policy.hash))
        return policy

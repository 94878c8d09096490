"""The refusing state's probe thread (kernel/store/refusals.py) against a write refused while a probe commits.

A review, by reading: the probe's write commits (the group commit's ``committed`` hook ends the state), another
write is refused right after (a lock taken elsewhere again: the state begins anew, and since the first probe thread
had not yet ended, a second one started beside it), and then the probe thread ended the state once more on its own
success: health SERVING and new writes let through while the newest write was refused, two probe threads, and
"takes writes again" told twice. The probe here is a real ``WriteRefusals`` probe that stands for one write: it
calls what its commit calls, and the refusal comes where a concurrent write's would.
"""

from __future__ import annotations

import threading

from kernel.store.refusals import WriteRefusals

TIMEOUT_S = 20


def test_a_write_refused_after_a_probe_s_commit_keeps_the_store_refusing():
    told: list[str | None] = []
    second_probe = threading.Event()
    probes = []
    refusals: WriteRefusals

    def probe() -> None:
        probes.append(threading.current_thread().name)
        if len(probes) == 1:
            refusals.passed()  # the probe's write committed (Database._committed) ...
            refusals.refused("a later write: the lock is held again")  # ... and the next write is refused
            return
        second_probe.set()
        raise OSError("still held")  # (the state stays: probed again)

    def listener(cause):
        told.append(cause)
        if cause is None:
            second_probe.set()  # (the state ended: no second probe will come)

    refusals = WriteRefusals(probe, probe_s=0.001)
    refusals.listeners.append(listener)
    try:
        refusals.refused("the lock is held")
        assert second_probe.wait(TIMEOUT_S)
        assert refusals.refusing and refusals.cause == "a later write: the lock is held again"
        assert None not in told, told
        assert told == ["the lock is held", "a later write: the lock is held again"]
        alive = [t for t in threading.enumerate() if t.name == "aios-store-probe"]
        assert len(alive) == 1, alive  # one thread probes
    finally:
        refusals.close()
    assert not [t for t in threading.enumerate() if t.name == "aios-store-probe"]

"""A group whose audit records were taken but not yet durable when its callers' wait for them ended.

The finisher waits ``audit_timeout_s`` (10 s) for a group's records; a stalled disk can take longer. The
records are in the writer's hands then, and are written once the disk lets them (or the log fail-stops). The
group used to fail as a whole, its idempotency keys released at once: a retry with the same key found nothing
stored and decided again (two records for one key, a task-audit repro), and an escalation's review waited for
the next restart to be reopened. Now each caller is answered DEADLINE_EXCEEDED naming its record
(``aios-audit-sequence``), and the rest of the group's completion — reviews, idempotency entries, counts — runs
on a thread of its own once the records are durable, with the keys claimed until then: a retry meanwhile is
ABORTED with a retry hint, and after it gets the decision (``replayed``).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from .._proto.aios.kernel.v1 import kernel_pb2 as kpb
from ..audit.errors import AuditTimeout
from ..errors import quote

if TYPE_CHECKING:
    from .flow import Pending

log = logging.getLogger("aios.decisions")


class RecordNotYetDurable(AuditTimeout):
    """A decision's answer when its record was taken but not durable within the wait (``sequence``: the record's;
    trailers name it, so a client tells it from "nothing was decided")."""


def not_yet_durable(pending: Pending, decision: kpb.Decision, sequence: int, timeout_s: float) -> RecordNotYetDurable:
    key = pending.request.idempotency_key
    then = (f"a retry with the same idempotency_key ({quote(key)}) returns it once it is (ABORTED until then)" if key
            else "a retry without an idempotency_key makes another decision")
    error = RecordNotYetDurable(
        f"decision {quote(decision.request_id)} was made (action {decision.action!r}) and its audit record "
        f"#{sequence} taken, but the log did not confirm it durable within {timeout_s:g} s (a slow disk): it is "
        f"written once the disk lets it; {then}", trailers=(("aios-audit-sequence", str(sequence)),))
    error.sequence = sequence
    return error


def complete_later(engine, group: list[Pending], results: list, decided: list, tickets: list, opening, keying,
                   audit_started: int) -> list:
    """The answers for ``group`` now (``decided``'s as ``RecordNotYetDurable``; other results as they are), its
    completion handed to a thread that waits for ``tickets`` without bound. The group's key claims are taken off
    its pendings (so nothing releases them early) and released there, after its entries are stored."""
    claims = []
    for pending in group:
        if pending.claim is not None:
            claims.append(pending.claim)
            pending.claim = None
    timeout_s = engine.services.audit_timeout_s
    sequences = {id(decision): ticket.sequence for decision, ticket in zip(decided, tickets)}
    answers = []
    for pending, result in zip(group, results):
        sequence = sequences.get(id(result))
        answers.append(result if sequence is None else not_yet_durable(pending, result, sequence, timeout_s))

    def complete() -> None:
        try:
            # The group's own completion, as the finisher would have run it: unbounded waits now (the records
            # are the writer's; it writes them or fail-stops, which raises here).
            services = engine.services
            engine._complete(group, list(results), decided, tickets, opening, audit_started, wait_s=None)
            engine._stored(keying)  # (on a failure it stays: the mark stays below these records until a start)
            log.info("the %d decisions whose records outlasted the %g s wait are durable and complete "
                     "(their reviews and idempotency entries stored)", len(decided), services.audit_timeout_s)
        except Exception:  # the log failed: their keys are free (a start restores what its records hold)
            log.exception("completing %d decisions whose records outlasted the wait failed", len(decided))
        finally:
            for claim in claims:
                engine.claims.release(claim)

    threading.Thread(target=complete, name="decisions-slow-records", daemon=True).start()
    return answers

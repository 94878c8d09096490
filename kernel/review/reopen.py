"""Reopen reviews from the audit log: escalations whose durable record has no review row.

When the audit log is fsynced, the decision engine stores review rows
without an fsync of their own (the record already holds everything a review
needs), and keeps in the same transactions a mark: the audit sequence below
which every escalation's row is stored. SQLite keeps a prefix of its
committed transactions after a crash, so the mark never claims a lost row.
At start, the records from the mark on are read again and each missing
review is opened with its original id, its original creation time (so its
SLA deadline is unchanged) and the decision as recorded. This also covers a
process killed between an escalation's durable record and its review row.
A power cut (not a kill) also takes back SQLite's position counter, whose
positions watches were sent; the start has moved it past every position a
row without an fsync may have had (``RESERVED_THROUGH`` in
kernel/store/sqlite_reviews.py), so a reopened review takes a new one (a
resumed watch gets it again, under the same id).

Reviews of durable tasks are left to the tasks, which run again after a
restart and open their review then; but a task cancelled while its attempt
ran does not run again, so the review of an escalation such an attempt
recorded before the crash is opened here, with its task's id, for the start
to withdraw on the record as the cancel would have (the log otherwise held
an escalation with no word of how it ended: a random-kill audit).

A reopened review's request carries the recorded inputs the request sent, and its ``defaults`` those the pipeline
filled in (as a review stored at the decision has them); its free-text
fields are not there (the record holds only their SHA-256 digests): their
digests are, in ``text_digests``, so the reviewer knows a text was sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from .._proto.aios.kernel.v1 import kernel_pb2 as kpb

log = logging.getLogger("aios.review")

_ESCALATED = (kpb.ESCALATED, kpb.FALLBACK)


def recorded_defaults(record: kpb.AuditRecord) -> dict[str, kpb.Value]:
    """The fields a decision's request left out, with the defaults it was decided with, from its audit record (its
    inputs named in ``defaulted_fields``): a review's ``defaults``."""
    return {name: record.inputs[name] for name in record.defaulted_fields if name in record.inputs}


def reopen_reviews(queue, records: Iterable[kpb.AuditRecord],
                   settings_of: Callable[[str, kpb.Decision], tuple[list[str], float]],
                   cancelled_task: Callable[[str], bool] = lambda task_id: False) -> int:
    """Open the review of every escalated decision in ``records`` that has none; returns how many.

    ``settings_of(pipeline, decision)`` gives the review's actions and SLA seconds; ``cancelled_task(task_id)``:
    whether that task was cancelled (the one kind of task whose record's review is opened here).
    Rows are stored without an fsync each: the caller raises the mark afterwards
    with one durable commit, which covers them.
    """
    reopened = 0
    for record in records:
        decision = record.decision
        if (record.kind != kpb.DECISION or not decision.review_id or decision.outcome not in _ESCALATED
                or (record.task_id and not cancelled_task(record.task_id)) or queue.exists(decision.review_id)):
            continue
        actions, sla_seconds = settings_of(record.pipeline, decision)
        proposed = kpb.Decision()
        proposed.CopyFrom(decision)
        proposed.audit_sequence, proposed.audit_hash = record.sequence, record.hash.hex()
        request = kpb.DecisionRequest(pipeline=record.pipeline, tenant=record.tenant, request_id=record.request_id,
                                      idempotency_key=record.idempotency_key)
        defaults = recorded_defaults(record)
        digests = {}
        for name, value in record.inputs.items():
            if name.startswith("text:"):  # (the record has its digest only: the reviewer is told the text is gone)
                digests[name.removeprefix("text:")] = value.string_value
            elif name not in defaults:  # (the fields sent, as an unlost row has them; a record written since
                # 2026-11-28 holds each as the pipeline took it: a number sent as 800 reads 800.0)
                request.fields[name].CopyFrom(value)
        queue.create_many([(proposed, request, actions, sla_seconds, record.task_id, decision.review_id, 0, defaults,
                            digests)],
                          durable=False, now=record.time_unix_ns or None)
        reopened += 1
    return reopened

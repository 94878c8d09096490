"""Refused calls are audited at most once a minute per RPC, with the count of those in between
(kernel/api/refusal_records.py). A compliance audit (2026-11-27): 200 anonymous refused StreamAudit calls wrote
200 records, so anyone who could reach the port could grow the log without bound."""

from __future__ import annotations

import json

from kernel._proto.aios.kernel.v1 import kernel_pb2 as pb
from kernel.api.refusal_records import WINDOW_NS, RefusalRecords
from kernel.audit import AuditLog


class Clock:
    def __init__(self):
        self.now = 1_000

    def __call__(self) -> int:
        return self.now


def refusals_on(log: AuditLog) -> list[tuple[str, dict]]:
    log.append_and_wait(pb.AuditRecord(kind=pb.CONFIG_CHANGE), 10)  # (a barrier: what was appended is written)
    return [(r.principal, json.loads(r.payload)) for r in log.read(from_sequence=0, kind=pb.PERMISSION_DENIED)]


def test_one_record_a_window_per_rpc_and_the_count_of_the_rest_is_kept(tmp_path):
    clock = Clock()
    with AuditLog.open(tmp_path) as log:
        refusals = RefusalRecords(log, clock=clock)
        for n in range(200):
            refusals.refused("AuditService.StreamAudit", "audit_stream_enabled is false", f"ipv4:10.0.0.1:{n}")
        refusals.refused("Other.Rpc", "no", "ipv4:10.0.0.2:1")  # another RPC: its own window
        clock.now += WINDOW_NS
        refusals.refused("AuditService.StreamAudit", "audit_stream_enabled is false", "ipv4:10.0.0.3:1")
        refusals.refused("AuditService.StreamAudit", "audit_stream_enabled is false", "ipv4:10.0.0.3:2")
        refusals.flush()  # the kernel stops: the window's count is on the log too
        refusals.flush()  # (nothing more to say)
        found = refusals_on(log)
    assert [(peer, d["rpc"], d["refused_since_last_record"]) for peer, d in found] == [
        ("ipv4:10.0.0.1:0", "AuditService.StreamAudit", 0),
        ("ipv4:10.0.0.2:1", "Other.Rpc", 0),
        ("ipv4:10.0.0.3:1", "AuditService.StreamAudit", 199),
        ("kernel", "AuditService.StreamAudit", 1),
    ]
    # Each refusal counted once: a record of its own (a peer's) or in a later record's count (the stop's: "kernel").
    stream = [(peer, d) for peer, d in found if d["rpc"] == "AuditService.StreamAudit"]
    assert sum(peer != "kernel" for peer, _ in stream) + sum(d["refused_since_last_record"] for _, d in stream) == 202

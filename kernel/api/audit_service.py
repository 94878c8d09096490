"""AuditService: stream the log (a record a message, or many: StreamAuditBatches), prove records and growth,
publish the checkpoint key.

Handlers are plain blocking functions (``rpc.py``) over an open ``AuditLog``.
``tree_size``/``new_size`` 0 in a proof request means "the newest signed
checkpoint", so a proof always matches a root the caller can fetch, signed,
with GetCheckpoint. StreamAudit resumes without gap or duplicate: a client
that saw sequence s asks again with ``from_sequence = s + 1``.

Until RBAC exists, StreamAudit is allowed or refused as a whole by the
``audit_stream_enabled`` setting (``allow_stream``); refused calls get
PERMISSION_DENIED naming it.

A StreamAudit that follows the log has no end of its own: once ``draining``
is set (the kernel stopping) it ends within the reader's poll interval with
UNAVAILABLE saying so, rather than holding the drain for its grace period.
A read-back without ``follow`` is ordinary in-flight work and runs to its end;
one that follows counts against the kernel's watch budget (``watch_budget.py``,
``max_watches``) until it ends, and beyond it is refused at once.
"""

from __future__ import annotations

import contextlib
import threading
import time

from .._proto.aios.kernel.v1 import kernel_pb2
from ..audit import AuditLog
from ..errors import InvalidArgument, NotFound, PermissionDenied, shutting_down
from ..limits import MAX_TENANT_CHARS, check_identifier, check_pipeline_filter
from .refusal_records import RefusalRecords
from .watch_budget import UNLIMITED

UNTIL_SETTLE_NS = 1_000_000_000

SERVICE = "AuditService"
_KINDS = set(kernel_pb2.AuditKind.values())


MAX_BATCH_RECORDS = 4096  # StreamAuditBatches' max_records at most (a batch also ends at reader.BATCH_BYTES)
DEFAULT_BATCH_RECORDS = 256
# StreamAuditBatches' messages on their way to grpc.aio's loop (rpc.aio_handler's window): each is up to
# reader.BATCH_BYTES (1 MiB), so a follower that stops reading holds a few MiB, not 64 of them.
BATCH_STREAM_WINDOW = 2


def _stream_audit(log: AuditLog, allow_stream: bool, draining: threading.Event, watches, refusals: RefusalRecords,
                  rpc: str = "StreamAudit", batched: bool = False):
    """StreamAudit, or (``batched``) StreamAuditBatches: the same query, records one or many to a message."""
    def stream_audit(request, ctx):
        if batched:
            if request.max_records > MAX_BATCH_RECORDS:
                raise InvalidArgument(f"max_records: {request.max_records} is above {MAX_BATCH_RECORDS} "
                                      f"(0 = {DEFAULT_BATCH_RECORDS})")
            batch_records, request = request.max_records or DEFAULT_BATCH_RECORDS, request.query
        if not allow_stream:
            # The refusal is itself on the record (refusal_records.py: one a minute, the rest counted).
            refusals.refused(f"AuditService.{rpc}", "audit_stream_enabled is false", ctx.peer)
            raise PermissionDenied(
                f"{rpc} is disabled on this kernel: set audit_stream_enabled = true "
                "(kernel.toml, AIOS_AUDIT_STREAM_ENABLED) to allow it"
            )
        # A tenant no decision can have (too long, a control character such as a newline read with it from a
        # file) matches no record: refused, naming it, as ListTasks refuses it, not an empty or endless stream.
        check_identifier(request.tenant, "tenant", MAX_TENANT_CHARS)
        check_pipeline_filter(request.pipeline)  # (and a pipeline no pipeline can be named)
        if request.kind not in _KINDS:
            raise InvalidArgument(f"kind: {request.kind} is not an AuditKind")
        if request.since_unix_ns < 0 or request.until_unix_ns < 0:
            raise InvalidArgument("since_unix_ns and until_unix_ns must be >= 0 (0 = no bound)")
        if request.since_unix_ns and request.until_unix_ns and request.until_unix_ns <= request.since_unix_ns:
            raise InvalidArgument(
                f"until_unix_ns ({request.until_unix_ns}) must be after since_unix_ns ({request.since_unix_ns})"
            )
        with watches.hold(rpc) if request.follow else contextlib.nullcontext():
            left = threading.Event()
            ctx.on_done(left.set)
            until = request.until_unix_ns
            if request.follow and until:  # no record written after ``until`` can match: the follow ends then
                # (a second later: a record stamped just before ``until`` may become readable a moment after it)
                stop = (lambda: left.is_set() or draining.is_set() or time.time_ns() > until + UNTIL_SETTLE_NS)
            elif request.follow:
                stop = (lambda: left.is_set() or draining.is_set())
            else:
                stop = left
            query = dict(tenant=request.tenant, pipeline=request.pipeline, kind=request.kind,
                         since_unix_ns=request.since_unix_ns, until_unix_ns=request.until_unix_ns,
                         follow=request.follow, stop=stop)
            messages = (log.read_batches(request.from_sequence, max_records=batch_records, **query) if batched
                        else log.read(request.from_sequence, **query))
            try:
                for message in messages:
                    yield message
                    if not ctx.is_active():
                        return
            finally:
                messages.close()
        if request.follow and draining.is_set() and not left.is_set():
            raise shutting_down("resume with from_sequence = the last sequence received + 1")

    if batched:
        stream_audit.stream_window = BATCH_STREAM_WINDOW
    return stream_audit


def _signed_size(log: AuditLog, requested: int, field: str) -> int:
    """The tree size a proof is for: the requested one, or the newest checkpoint's for 0."""
    if requested == 0:
        return log.latest_checkpoint().tree_size
    if requested > log.size:
        raise InvalidArgument(f"{field}: {requested} is beyond the {log.size} records of the log")
    return requested


def _inclusion_proof(log: AuditLog):
    def get_inclusion_proof(request: kernel_pb2.InclusionProofRequest, ctx) -> kernel_pb2.Proof:
        size = _signed_size(log, request.tree_size, "tree_size")
        if request.sequence >= log.size:
            raise NotFound(f"sequence: record {request.sequence} is not in the log ({log.size} records)")
        if request.sequence >= size:
            raise InvalidArgument(
                f"sequence: record {request.sequence} is not in a tree of size {size}"
                + (" (the newest signed checkpoint); pass tree_size, or wait for the next checkpoint"
                   if request.tree_size == 0 else "")
            )
        return kernel_pb2.Proof(
            tree_size=size, hashes=log.inclusion_proof(request.sequence, size), root=log.root(size),
            leaf_index=request.sequence, leaf_hash=log.leaf(request.sequence),
        )

    return get_inclusion_proof


def _consistency_proof(log: AuditLog):
    def get_consistency_proof(request: kernel_pb2.ConsistencyProofRequest, ctx) -> kernel_pb2.Proof:
        new_size = _signed_size(log, request.new_size, "new_size")
        if request.old_size == 0:
            raise InvalidArgument("old_size: must be >= 1 (every tree extends the empty one)")
        if request.old_size > new_size:
            raise InvalidArgument(f"old_size: {request.old_size} is larger than new_size {new_size}")
        return kernel_pb2.Proof(
            tree_size=new_size, hashes=log.consistency_proof(request.old_size, new_size), root=log.root(new_size),
            old_size=request.old_size, old_root=log.root(request.old_size),
        )

    return get_consistency_proof


def _public_key(log: AuditLog):
    def get_public_key(request, ctx) -> kernel_pb2.PublicKey:
        return kernel_pb2.PublicKey(algorithm="Ed25519", key=log.public_key)

    return get_public_key


def _checkpoint(log: AuditLog):
    def get_checkpoint(request, ctx) -> kernel_pb2.Checkpoint:
        return log.latest_checkpoint()

    return get_checkpoint


def audit_handlers(log: AuditLog, allow_stream: bool = True, draining: threading.Event | None = None,
                   watches=None, refusals: RefusalRecords | None = None) -> dict:
    """``(service, method) -> handler`` for ``kernel_services.generic_handlers(implemented=...)``;
    set ``draining`` to end the StreamAudit calls that follow the log; ``watches`` (a ``WatchBudget``,
    shared with the other watch RPCs) caps how many of them are open."""
    draining, watches, refusals = draining or threading.Event(), watches or UNLIMITED, refusals or RefusalRecords(log)
    return {
        (SERVICE, "StreamAudit"): _stream_audit(log, allow_stream, draining, watches, refusals),
        (SERVICE, "StreamAuditBatches"): _stream_audit(log, allow_stream, draining, watches, refusals,
                                                       "StreamAuditBatches", batched=True),
        (SERVICE, "GetInclusionProof"): _inclusion_proof(log),
        (SERVICE, "GetConsistencyProof"): _consistency_proof(log),
        (SERVICE, "GetPublicKey"): _public_key(log),
        (SERVICE, "GetCheckpoint"): _checkpoint(log),
    }

"""Merkle proofs, checked by a small RFC 9162 verifier written here from the RFC's text.

The verifier below shares no code with kernel/audit: MTH, PATH and PROOF are
the RFC's recursive definitions (§2.1.1, §2.1.3.1, §2.1.4.1), and the
verification algorithms are §2.1.3.2 and §2.1.4.2, step by step. Proofs come
from a real log, directly and over a real gRPC server; checkpoint signatures
are checked with `cryptography` over the documented signed text. Every log here
is opened twice: as a kernel runs it (the newest 65,536 leaves in memory, all
of these) and keeping none, so every leaf a proof or root needs is read back
from the segment files (kernel/audit/merkle.py, ``keep_recent``).
"""

from __future__ import annotations

import base64
import hashlib
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz_budget import examples

from kernel._proto.aios.kernel.v1 import kernel_pb2 as pb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc
from kernel.api import kernel_services
from kernel.api.audit_service import audit_handlers
from kernel.audit import AuditLog, merkle


# --------------------------------------------------------------------------- RFC 9162, independently
def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def rfc_leaf(entry: bytes) -> bytes:
    return sha(b"\x00" + entry)


def rfc_k(n: int) -> int:
    """The largest power of two smaller than n."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def rfc_mth(leaves: list[bytes]) -> bytes:
    """MTH over leaf hashes (the leaf hashing already done)."""
    n = len(leaves)
    if n == 0:
        return sha(b"")
    if n == 1:
        return leaves[0]
    k = rfc_k(n)
    return sha(b"\x01" + rfc_mth(leaves[:k]) + rfc_mth(leaves[k:]))


def rfc_path(m: int, leaves: list[bytes]) -> list[bytes]:
    n = len(leaves)
    if n == 1:
        return []
    k = rfc_k(n)
    if m < k:
        return rfc_path(m, leaves[:k]) + [rfc_mth(leaves[k:])]
    return rfc_path(m - k, leaves[k:]) + [rfc_mth(leaves[:k])]


def rfc_subproof(m: int, leaves: list[bytes], b: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if b else [rfc_mth(leaves)]
    k = rfc_k(n)
    if m <= k:
        return rfc_subproof(m, leaves[:k], b) + [rfc_mth(leaves[k:])]
    return rfc_subproof(m - k, leaves[k:], False) + [rfc_mth(leaves[:k])]


def rfc_verify_inclusion(leaf_index: int, tree_size: int, leaf: bytes, path: list[bytes], root: bytes) -> bool:
    """RFC 9162 §2.1.3.2."""
    if leaf_index >= tree_size:
        return False
    fn, sn, r = leaf_index, tree_size - 1, leaf
    for p in path:
        if sn == 0:
            return False
        if fn % 2 == 1 or fn == sn:
            r = sha(b"\x01" + p + r)
            if fn % 2 == 0:
                while not (fn % 2 == 1 or fn == 0):
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = sha(b"\x01" + r + p)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == root


def rfc_verify_consistency(first: int, second: int, first_hash: bytes, second_hash: bytes, path: list[bytes]) -> bool:
    """RFC 9162 §2.1.4.2 (first == second: an empty proof and equal roots)."""
    if first == second:
        return path == [] and first_hash == second_hash
    if not path:
        return False
    if first & (first - 1) == 0:
        path = [first_hash] + path
    fn, sn = first - 1, second - 1
    while fn % 2 == 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn % 2 == 1 or fn == sn:
            fr = sha(b"\x01" + c + fr)
            sr = sha(b"\x01" + c + sr)
            if fn % 2 == 0:
                while not (fn % 2 == 1 or fn == 0):
                    fn, sn = fn >> 1, sn >> 1
        else:
            sr = sha(b"\x01" + sr + c)
        fn, sn = fn >> 1, sn >> 1
    return fr == first_hash and sr == second_hash and sn == 0


def checkpoint_signed(checkpoint: pb.Checkpoint, public_key: bytes) -> bool:
    text = (f"aios-kernel/audit/v1\n{checkpoint.tree_size}\n{base64.b64encode(checkpoint.root_hash).decode()}\n"
            f"{checkpoint.time_unix_ns}\n").encode()
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(checkpoint.signature, text)
    except InvalidSignature:
        return False
    return True


# --------------------------------------------------------------------------- a real log
SIZE = 70


LEAVES_KEPT = {"leaves-in-memory": merkle.KEEP_LEAVES, "leaves-on-disk": 0}


def open_log(folder, kept: str, **options) -> AuditLog:
    """``AuditLog.open`` keeping ``LEAVES_KEPT[kept]`` leaves in memory (read once, at the open)."""
    default = merkle.KEEP_LEAVES
    merkle.KEEP_LEAVES = LEAVES_KEPT[kept]
    try:
        return AuditLog.open(folder, **options)
    finally:
        merkle.KEEP_LEAVES = default


@pytest.fixture(scope="module", params=sorted(LEAVES_KEPT))
def audit_log(tmp_path_factory, request):
    log = open_log(tmp_path_factory.mktemp("audit"), request.param, checkpoint_records=16, checkpoint_ms=60_000)
    for i in range(SIZE):
        log.append_and_wait(pb.AuditRecord(kind=pb.DECISION, request_id=f"r{i}"), 10)
    yield log
    log.close()


@pytest.fixture(scope="module")
def leaves(audit_log) -> list[bytes]:
    """Leaf hashes recomputed from the records' own stored canonical bytes."""
    result = []
    for record in audit_log.read(0):
        copy = pb.AuditRecord()
        copy.CopyFrom(record)
        copy.hash = b""
        assert rfc_leaf(copy.SerializeToString(deterministic=True)) == record.hash
        result.append(record.hash)
    assert len(result) == SIZE
    return result


def test_roots_match_the_rfc_definition(audit_log, leaves):
    for size in range(SIZE + 1):
        assert audit_log.root(size) == rfc_mth(leaves[:size]), size


def test_every_inclusion_proof_verifies(audit_log, leaves):
    for size in range(1, SIZE + 1):
        root = rfc_mth(leaves[:size])
        for index in range(size):
            proof = audit_log.inclusion_proof(index, size)
            assert proof == rfc_path(index, leaves[:size])
            assert rfc_verify_inclusion(index, size, leaves[index], proof, root), (index, size)


def test_every_consistency_proof_verifies(audit_log, leaves):
    for new in range(1, SIZE + 1):
        new_root = rfc_mth(leaves[:new])
        for old in range(1, new + 1):
            proof = audit_log.consistency_proof(old, new)
            assert proof == rfc_subproof(old, leaves[:new], True)
            assert rfc_verify_consistency(old, new, rfc_mth(leaves[:old]), new_root, proof), (old, new)


def test_the_verifier_rejects_wrong_proofs(audit_log, leaves):
    root = rfc_mth(leaves[:SIZE])
    proof = audit_log.inclusion_proof(17, SIZE)
    assert not rfc_verify_inclusion(18, SIZE, leaves[17], proof, root)  # wrong index
    assert not rfc_verify_inclusion(17, SIZE, leaves[18], proof, root)  # wrong leaf
    assert not rfc_verify_inclusion(17, SIZE, leaves[17], proof[:-1], root)  # short
    consistency = audit_log.consistency_proof(20, SIZE)
    assert not rfc_verify_consistency(20, SIZE, rfc_mth(leaves[:21]), root, consistency)
    tampered = list(consistency)
    tampered[0] = bytes(32)
    assert not rfc_verify_consistency(20, SIZE, rfc_mth(leaves[:20]), root, tampered)


@settings(max_examples=examples(60), deadline=None)
@given(st.data())
def test_random_proofs_in_a_larger_log(big_log, data):
    log, big_leaves = big_log
    size = data.draw(st.integers(1, len(big_leaves)))
    index = data.draw(st.integers(0, size - 1))
    old = data.draw(st.integers(1, size))
    root = rfc_mth_cached(big_leaves, size)
    assert rfc_verify_inclusion(index, size, big_leaves[index], log.inclusion_proof(index, size), root)
    assert rfc_verify_consistency(old, size, rfc_mth_cached(big_leaves, old), root, log.consistency_proof(old, size))


_ROOTS: dict[tuple[bytes, int], bytes] = {}


def rfc_mth_cached(leaves: list[bytes], size: int) -> bytes:
    key = (leaves[0], size)  # (each log's first record differs: its time)
    if key not in _ROOTS:
        _ROOTS[key] = rfc_mth(leaves[:size])
    return _ROOTS[key]


@pytest.fixture(scope="module", params=sorted(LEAVES_KEPT))
def big_log(tmp_path_factory, request):
    log = open_log(tmp_path_factory.mktemp("big"), request.param, checkpoint_records=1000)
    for i in range(3000):
        log.append(pb.AuditRecord(kind=pb.DECISION, request_id=f"r{i}"))
    log.append_and_wait(pb.AuditRecord(kind=pb.DECISION), 30)
    big_leaves = [record.hash for record in log.read(0)]
    yield log, big_leaves
    log.close()


# --------------------------------------------------------------------------- over gRPC
@pytest.fixture(scope="module")
def stub(audit_log):
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers(
        kernel_services.generic_handlers(None, None, asynchronous=False, implemented=audit_handlers(audit_log)))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield kernel_pb2_grpc.AuditServiceStub(channel)
    server.stop(grace=1)


def test_signed_checkpoint_and_proofs_over_grpc(stub, leaves):
    key = stub.GetPublicKey(pb.PublicKeyRequest())
    assert key.algorithm == "Ed25519" and len(key.key) == 32
    checkpoint = stub.GetCheckpoint(pb.CheckpointRequest())
    assert checkpoint_signed(checkpoint, key.key)
    assert checkpoint.tree_size == 64  # signed every 16 records; 65..70 not yet
    assert checkpoint.root_hash == rfc_mth(leaves[:64])

    proof = stub.GetInclusionProof(pb.InclusionProofRequest(sequence=41))  # against the newest checkpoint
    assert (proof.tree_size, proof.leaf_index, proof.leaf_hash, proof.root) == (64, 41, leaves[41], checkpoint.root_hash)
    assert rfc_verify_inclusion(41, 64, leaves[41], list(proof.hashes), checkpoint.root_hash)

    proof = stub.GetInclusionProof(pb.InclusionProofRequest(sequence=69, tree_size=SIZE))
    assert rfc_verify_inclusion(69, SIZE, leaves[69], list(proof.hashes), rfc_mth(leaves))

    older = stub.GetConsistencyProof(pb.ConsistencyProofRequest(old_size=16))
    assert (older.old_size, older.tree_size, older.root) == (16, 64, checkpoint.root_hash)
    assert rfc_verify_consistency(16, 64, older.old_root, checkpoint.root_hash, list(older.hashes))
    assert older.old_root == rfc_mth(leaves[:16])


@pytest.mark.parametrize(
    "call,request_,code,fragment",
    [
        ("GetInclusionProof", pb.InclusionProofRequest(sequence=500), grpc.StatusCode.NOT_FOUND, "sequence: record 500"),
        ("GetInclusionProof", pb.InclusionProofRequest(sequence=3, tree_size=999), grpc.StatusCode.INVALID_ARGUMENT,
         "tree_size: 999"),
        ("GetInclusionProof", pb.InclusionProofRequest(sequence=10, tree_size=5), grpc.StatusCode.INVALID_ARGUMENT,
         "sequence: record 10 is not in a tree of size 5"),
        ("GetInclusionProof", pb.InclusionProofRequest(sequence=66), grpc.StatusCode.INVALID_ARGUMENT,
         "newest signed checkpoint"),
        ("GetConsistencyProof", pb.ConsistencyProofRequest(old_size=0), grpc.StatusCode.INVALID_ARGUMENT, "old_size"),
        ("GetConsistencyProof", pb.ConsistencyProofRequest(old_size=30, new_size=20),
         grpc.StatusCode.INVALID_ARGUMENT, "old_size: 30 is larger than new_size 20"),
        ("GetConsistencyProof", pb.ConsistencyProofRequest(old_size=3, new_size=900),
         grpc.StatusCode.INVALID_ARGUMENT, "new_size: 900"),
    ],
)
def test_bad_proof_requests_name_the_field(stub, call, request_, code, fragment):
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub, call)(request_)
    assert info.value.code() == code
    assert fragment in info.value.details()


def test_a_leaf_changed_on_disk_after_the_open_is_refused_not_proven(tmp_path):
    """(Review audit) leaves the tree dropped are read back from the segments for a proof: a record rewritten on
    disk since the open (its frame checksum made to match) must not become a proof; it is checked against the
    subtree hash the tree kept, and refused."""
    import zlib

    from kernel.audit import AuditCorrupt
    from kernel.audit.segments import MAGIC

    log = open_log(tmp_path, "leaves-on-disk", checkpoint_records=16, checkpoint_ms=60_000)
    try:
        for i in range(40):
            log.append_and_wait(pb.AuditRecord(kind=pb.DECISION, request_id=f"r{i}"), 10)
        assert rfc_verify_inclusion(5, 40, log.leaf(5), log.inclusion_proof(5, 40), log.root(40))
        path = sorted(tmp_path.glob("*.seg"))[0]
        data = bytearray(path.read_bytes())
        offset = len(MAGIC)
        for _ in range(5):  # to record 5's frame
            offset += 8 + int.from_bytes(data[offset:offset + 4], "little")
        length = int.from_bytes(data[offset:offset + 4], "little")
        end = offset + 8 + length
        data[end - 32:end] = sha(b"forged")  # a different stored hash, its frame's checksum made to match
        data[offset + 4:offset + 8] = zlib.crc32(bytes(data[offset + 8:end])).to_bytes(4, "little")
        with open(path, "r+b") as file:
            file.seek(offset)
            file.write(data[offset:end])
        with pytest.raises(AuditCorrupt, match="no longer hash to what the log held when it was opened"):
            log.inclusion_proof(5, 40)
    finally:
        log.close()

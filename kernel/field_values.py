"""A decision field's protobuf ``Value`` from a Python value: one conversion for the clients (a request's fields)
and the kernel (the defaults a pipeline filled in, on audit records and reviews).

Its own module, importing neither grpc nor a client: the kernel's review queue and provenance need it, and
``serve`` must choose gRPC's I/O path before anything imports grpc (kernel/grpc_io.py; the review queue
importing it from the Python client imported grpc first, and ``grpc_iomgr`` silently stopped applying).
"""

from __future__ import annotations

import numbers

import numpy as np

from ._proto.aios.kernel.v1 import kernel_pb2 as kpb


def to_value(value) -> kpb.Value:
    """A protobuf Value from a Python (or numpy scalar) bool, int, float or str."""
    if isinstance(value, (bool, np.bool_)):
        return kpb.Value(bool_value=bool(value))
    if isinstance(value, numbers.Integral):
        if not -2**63 <= value < 2**63:  # (protobuf's own error named neither the field nor the limit)
            raise ValueError(f"{int(value)} does not fit a 64-bit integer; a number field takes it as a float "
                             f"({float(value):g})")
        return kpb.Value(int_value=int(value))
    if isinstance(value, numbers.Real):
        return kpb.Value(number_value=float(value))
    if isinstance(value, str):
        return kpb.Value(string_value=value)
    raise TypeError(f"a field value must be bool, int, float or str, got {type(value).__name__}")

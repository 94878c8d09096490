"""A large request refused from its bytes, before protobuf parses it: a ModelInferRequest past the element limits
(``refusal``), a DecisionRequest or StartTaskRequest with more fields than any pipeline declares
(``decision_refusal``, ``task_refusal``: each map entry ~15x its bytes in upb).

The limits on BYTES elements and decoded typed contents (kernel/limits.py) are checked on the parsed request
(kernel/api/tensors.py), but parsing is where much of their memory goes: upb holds a 16-byte view of each
``bytes_contents`` entry (2 bytes on the wire) and 8 bytes of each 1-byte varint of ``int64_contents`` or of a
packed ``shape``, in arrays grown by doubling. A 60 MiB request of either took the kernel ~1.1 GB before it was
refused, four at once ~4.4 GB; an empty input costs ~88 bytes for 2 (``MAX_REQUEST_TENSORS``). So the request deserializer (registration.py: every front end, unary calls and
ModelStreamInfer alike) hands a request larger than ``SCAN_ABOVE`` bytes to ``refusal`` first: a linear walk
over its bytes (kernel/infer_scan.py, compiled in ext/infer_scan.pyx) that counts what its inputs would hold.
Past a limit it becomes INVALID_ARGUMENT naming the input, worded as the check after parsing words it when the
input is otherwise well formed. Smaller requests cost less to parse than to walk and keep their path.
"""

from __future__ import annotations

import math

from .._proto.inference import grpc_service_pb2 as pb
from ..accel import infer_scan
from ..limits import (MAX_BYTES_ELEMENTS, MAX_DECISION_FIELDS, MAX_REQUEST_PARAMETERS, MAX_REQUEST_TENSORS, MAX_SHAPE_DIMS,
                      MAX_TYPED_CONTENTS_BYTES)
from ..models.datatypes import BY_NAME
from .tensors import too_many_strings, too_many_typed

SCAN_ABOVE = 1 << 20  # bytes: at most ~16x this while parsing, and a walk costs more than the parse below it
_FIELDS = {field.number: field.name for field in pb.InferTensorContents.DESCRIPTOR.fields}
_SHOWN_DIMS = 8  # as tensors.py shows a shape of the wrong number of dims


def refusal(data: bytes) -> str | None:
    """Why the serialized ModelInferRequest ``data`` is refused before parsing, or None (also for any request
    of at most ``SCAN_ABOVE`` bytes, which is not walked)."""
    if len(data) <= SCAN_ABOVE:
        return None
    inputs, outputs, raw, parameters = infer_scan.entries(data)
    for count, what in ((inputs, "the request has {:,} inputs"), (outputs, "the request asks for {:,} outputs"),
                        (raw, "raw_input_contents has {:,} entries")):
        if count > MAX_REQUEST_TENSORS:
            return (f"{what.format(count)}; at most {MAX_REQUEST_TENSORS:,} are taken (a model takes each of its "
                    "inputs once and names each output once)")
    if parameters > MAX_REQUEST_PARAMETERS:
        return (f"the request sends {parameters:,} parameters (its own, its inputs' and its outputs' together); at "
                f"most {MAX_REQUEST_PARAMETERS:,} are taken")
    found = infer_scan.scan(data, MAX_BYTES_ELEMENTS, MAX_TYPED_CONTENTS_BYTES, MAX_SHAPE_DIMS)
    if found is None:
        return None
    _index, name, datatype, dims, ndims, counts, strings, typed = found
    name, datatype = name.decode("utf-8", "replace"), datatype.decode("utf-8", "replace")
    if ndims > MAX_SHAPE_DIMS:
        return (f"input '{name}': shape [{', '.join(map(str, dims[:_SHOWN_DIMS]))}, ...] has {ndims:,} dims; no "
                f"model's input has more than {MAX_SHAPE_DIMS}")
    sent = {field: count for field, count in enumerate(counts) if count}
    dt = BY_NAME.get(datatype)
    # The words of the check after parsing when the input's values are where its datatype puts them and as many
    # as its shape says; else what was sent (that check would refuse such an input anyway, for another reason).
    exact = (dt is not None and dt.contents_field is not None and list(sent) in ([], [_number(dt.contents_field)])
             and math.prod(dims) == sum(sent.values()))
    what = (f"shape {dims}" + ("" if dt.name == "BYTES" else f" of {dt.name}") if exact
            else ", ".join(f"contents.{_FIELDS[field]} of {count:,} elements" for field, count in sent.items()))
    if strings > MAX_BYTES_ELEMENTS:
        return too_many_strings(name, what, strings)
    return too_many_typed(name, what, typed)


def _number(field_name: str) -> int:
    return pb.InferTensorContents.DESCRIPTOR.fields_by_name[field_name].number


# DecisionRequest's fields and text_fields; a StartTaskRequest holds its DecisionRequest as field 1.
_FIELDS_NUMBER, _TEXT_FIELDS_NUMBER, _TASK_REQUEST = 5, 6, 1


def decision_refusal(data: bytes, within: int = 0) -> str | None:
    """Why the serialized DecisionRequest ``data`` (``within``: the one in that field of it) is refused before
    parsing, or None (also for any of at most ``SCAN_ABOVE`` bytes)."""
    if len(data) <= SCAN_ABOVE:
        return None
    sent = (infer_scan.field_count(data, _FIELDS_NUMBER, within)
            + infer_scan.field_count(data, _TEXT_FIELDS_NUMBER, within))
    if sent <= MAX_DECISION_FIELDS:
        return None
    where = "request.fields and request.text_fields" if within else "fields and text_fields"
    return (f"{where}: {sent:,} sent; at most {MAX_DECISION_FIELDS:,} are taken (a pipeline declares far "
            "fewer: ListPipelines shows its fields)")


def task_refusal(data: bytes) -> str | None:
    return decision_refusal(data, _TASK_REQUEST)

"""How much of what a caller sends the kernel keeps: the size limits on identifiers and free text, in one place.

Every identifier below is written, as sent, into the permanent audit log, the
SQLite store (reviews, tasks, idempotency entries) and log lines, and is
listed back to every reviewer (``ListReviews``). Unbounded, two Decides with
an 8 MB tenant and request id wrote ~163 MB each and made ``ListReviews``
fail for everyone (its response passed gRPC's 64 MB). A control character
in one could forge a log line or a terminal escape. So each is refused
(INVALID_ARGUMENT naming the field) before any work is done for the request,
when it is longer than its limit or holds a control character (U+0000 to
U+001F, U+007F to U+009F), a line separator or a bidirectional control. The
limits are far above any real value: a tenant is a customer's name or id, a
request id a UUID or a trace id, an idempotency key a UUID or a hash, a
reviewer a login.
"""

from __future__ import annotations

import os
import re
import unicodedata

from .errors import InvalidArgument, quote

MAX_TENANT_CHARS = 128  # DecisionRequest.tenant, ModelInfer's "tenant" parameter
MAX_REQUEST_ID_CHARS = 256  # DecisionRequest.request_id, ModelInferRequest.id
MAX_KEY_CHARS = 256  # DecisionRequest.idempotency_key (kernel/store/idempotency.py)
MAX_REVIEWER_CHARS = 128  # ClaimReview / ResolveReview ``reviewer``
# A review's ``comment``: the reviewer's reason, kept on the resolution's audit record for good (it is part
# of what makes the reviewed decision defensible), so a few paragraphs, not a document. Newlines allowed.
MAX_COMMENT_CHARS = 4096
# Each free-text field of a DecisionRequest (``text_fields``), in UTF-8 bytes: its digest is audited and a
# review shows it to people; a text too long to read is a file, not a field. 60 MB ones held 1.2 GB of
# memory with 8 in flight and made other callers wait a second.
MAX_TEXT_FIELD_BYTES = 1 << 20
MAX_MODEL_NAME_BYTES = 255  # a model name is a folder name in the repository: NAME_MAX
# Tenants the kernel keeps its own entries under (the idempotency store's "__review_resolutions__" holds each
# review's audited resolution, kernel/store/audit_needs.py): a caller's Decide naming that tenant and the key
# "review:<id>" stored its own answer there first, and the reviewer's resolution then answered it and recorded
# nothing (a "recording:<id>" key made the resolution fail for good). So no caller's tenant may begin so.
RESERVED_TENANT_PREFIX = "__"
# ModelInfer: elements whose decoded form costs far more memory than their bytes on the wire, bounded per request
# (all its inputs together) and refused before decoding (kernel/api/tensors.py). A BYTES element is a Python str,
# its slots in a list and an object array, an onnxruntime std::string, and as much again for an output: ~240 bytes
# however short (4 on the wire, empty): one 32 MiB request of 2-byte strings took a kernel from 117 MiB to 1.47 GB,
# 64 MiB of typed bytes_contents ~4.6 GB. A million strings is more than any one text model call needs.
MAX_BYTES_ELEMENTS = 1 << 20
# Typed integer contents are varints, one byte on the wire for a small value and 8 decoded (INT64): typed inputs
# decode to at most what raw_input_contents carry at the default max_message_bytes (64 MiB); 16 MiB of int64_contents
# held 0.9 GB.
MAX_TYPED_CONTENTS_BYTES = 64 << 20
# A shape's dims: numpy (2.x) makes no array of more, so no model's input has more. Checked on a large request's
# bytes before they are parsed (kernel/api/wire_limits.py), with the two limits above: a packed dim is 1 byte on
# the wire and 8 in upb's array, and a 60 MiB request of them or of empty bytes_contents held ~1.1 GB while parsing.
MAX_SHAPE_DIMS = 64
# A ModelInfer request's inputs, requested outputs and raw_input_contents entries, each: an empty one is 2 bytes on
# the wire and a message (~88 bytes, an output ~48) or a view (16) in upb, so 60 MiB of empty inputs took ~2.6 GB
# to parse. A model takes each input once and names each output once: far fewer than this in any real model.
MAX_REQUEST_TENSORS = 1 << 16
# A ModelInfer request's parameters (the request's, its inputs' and its outputs' together): each a map entry in
# upb (~150 bytes for a short key), and they stay held while the request is served: 8 MiB carrying 940,000 keys
# took ~146 MB. Triton's own and a client's custom ones are a handful.
MAX_REQUEST_PARAMETERS = 1 << 12
# A DecisionRequest's fields and text fields together (a StartTask's request's too): each a map entry in upb, ~220
# bytes for 15 on the wire (15 MiB of one-character fields took 220 MB to parse, before the pipeline refused the
# first it does not declare). A pipeline declares tens of fields.
MAX_DECISION_FIELDS = 1 << 12

# C0 and C1 controls (Unicode category Cc): C1's NEL (U+0085) ends a line for str.splitlines and some log viewers,
# and its CSI (U+009B) starts a terminal escape sequence as ESC [ does.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_CONTROL_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")
# Bidirectional embeddings, overrides and isolates: they make text display in another order than it is stored
# ("Trojan Source", CVE-2021-42574), so a reviewer's comment could read one way in a review screen or an audit
# export and say another. The implicit marks (U+200E, U+200F) that right-to-left text may need are allowed.
_BIDI_CONTROLS = re.compile("[\u202a-\u202e\u2066-\u2069]")
# What an identifier must not hold either: line and paragraph separators (a line break to str.splitlines, JSON
# readers in JavaScript and many log viewers) and the bidirectional controls above (a tenant is shown to
# reviewers in `review list`, where "acme\u202e..." reordered the rest of the row).
_BREAKS_OR_BIDI = re.compile("[\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def check_identifier(value: str, field: str, limit: int) -> None:
    """INVALID_ARGUMENT naming ``field`` if ``value`` is longer than ``limit`` characters or holds a control
    character. (Cheap when it passes: a length and ``isprintable``, which is false for every control
    character, so the search runs only for a value with one or with other characters it does not print.)"""
    if len(value) > limit:
        raise InvalidArgument(f"{field} must be at most {limit} characters, got {len(value)}")
    if not value.isprintable():
        found = _CONTROL.search(value)
        if found is not None:
            raise InvalidArgument(f"{field} must not contain control characters; it has {found.group()!r} at "
                                  f"position {found.start()}")
        found = _BREAKS_OR_BIDI.search(value)
        if found is not None:
            raise InvalidArgument(f"{field} must not contain line separators or bidirectional override or isolate "
                                  f"characters; it has {found.group()!r} (U+{ord(found.group()):04X}) at position "
                                  f"{found.start()}")


def is_pipeline_name(name: str) -> bool:
    """Whether a pipeline may be named ``name``: letters, digits, '_' or '-' (``[pipeline].name``)."""
    return bool(name) and name.replace("_", "").replace("-", "").isalnum()


def check_pipeline_filter(value: str, field: str = "pipeline") -> None:
    """A pipeline filter no pipeline can have (a newline read with it from a file, a space) matched nothing: a
    list came back empty and a watch waited for ever in silence. Refused, naming it (empty: any pipeline)."""
    if value and not is_pipeline_name(value):
        raise InvalidArgument(f"{field} {quote(value)} cannot name a pipeline: a pipeline's name is letters, "
                              "digits, '_' or '-' (ListPipelines lists them)")


# Characters a name must not hold although they are not control characters: format characters (Cf: zero-width
# spaces and joiners, bidirectional overrides, soft hyphens), invisible or reordering what is shown, so two
# reviewers would look alike; and line and paragraph separators (Zl, Zp), which break a log line as \n does.
_HIDDEN_CATEGORIES = ("Cf", "Zl", "Zp")


def check_name(value: str, field: str, limit: int) -> None:
    """``check_identifier`` for a person's name that becomes an audit record's principal (a reviewer): also
    refused when blank, when it begins or ends with whitespace (" gus" is not "gus"), or when it holds an
    invisible character (``_HIDDEN_CATEGORIES``), so one person always has exactly one name on the record."""
    check_identifier(value, field, limit)
    if not value.strip():
        raise InvalidArgument(f"{field} must not be blank; send the person's login, e.g. 'alice'")
    if value != value.strip():
        raise InvalidArgument(f"{field} must not begin or end with whitespace, got {quote(value)}; send "
                              f"{quote(value.strip())}")
    if not value.isprintable():  # (every hidden character is also not printable: most names skip the search)
        for position, char in enumerate(value):
            if unicodedata.category(char) in _HIDDEN_CATEGORIES:
                raise InvalidArgument(f"{field} must not contain invisible characters (Unicode format characters "
                                      f"or line separators); it has {char!r} (U+{ord(char):04X}) at position "
                                      f"{position}")


def check_comment(value: str, field: str = "comment", limit: int = MAX_COMMENT_CHARS) -> None:
    """``check_identifier`` for text a person writes: newlines are allowed, other control characters not."""
    if len(value) > limit:
        raise InvalidArgument(f"{field} must be at most {limit} characters, got {len(value)}")
    found = _CONTROL_BUT_NEWLINE.search(value)
    if found is not None:
        raise InvalidArgument(f"{field} must not contain control characters other than newlines; it has "
                              f"{found.group()!r} at position {found.start()}")
    found = _BIDI_CONTROLS.search(value)
    if found is not None:
        raise InvalidArgument(f"{field} must not contain bidirectional override or isolate characters (they show "
                              f"text in another order than it is stored); it has U+{ord(found.group()):04X} at "
                              f"position {found.start()}")


def check_decision_request(request, field: str = "") -> None:
    """Refuse a DecisionRequest whose tenant, request id, idempotency key or a free-text field is over its
    limit (or an identifier with a control character); ``field`` prefixes the field names ("request." for
    StartTask's). Never echoes a text field's content."""
    tenant, request_id, key = request.tenant, request.request_id, request.idempotency_key
    if tenant:
        check_identifier(tenant, field + "tenant", MAX_TENANT_CHARS)
        if tenant.startswith(RESERVED_TENANT_PREFIX):
            raise InvalidArgument(f"{field}tenant must not begin with {RESERVED_TENANT_PREFIX!r} (reserved for the "
                                  f"kernel's own records), got {quote(tenant)}")
    if request_id:
        check_identifier(request_id, field + "request_id", MAX_REQUEST_ID_CHARS)
    if key:  # (a control character in a key went onto audit records and log lines, as in a tenant)
        check_identifier(key, field + "idempotency_key", MAX_KEY_CHARS)
    if request.text_fields:
        check_text_fields(request.text_fields, field + "text_fields")


def check_text_fields(text_fields, field: str = "text_fields") -> None:
    """INVALID_ARGUMENT naming the first text field over ``MAX_TEXT_FIELD_BYTES`` (UTF-8) and the limit."""
    for name, text in text_fields.items():
        chars = len(text)
        if chars * 4 <= MAX_TEXT_FIELD_BYTES:  # (a character is 1 to 4 UTF-8 bytes: most texts need no count)
            continue
        size = chars if chars > MAX_TEXT_FIELD_BYTES else len(text.encode("utf-8"))  # (more chars: more bytes)
        if size > MAX_TEXT_FIELD_BYTES:
            raise InvalidArgument(
                f"{field}[{quote(name)}] is {'at least ' if size == chars else ''}{size} bytes (UTF-8); a text "
                f"field may hold at most {MAX_TEXT_FIELD_BYTES} bytes (MAX_TEXT_FIELD_BYTES, 1 MiB)")


# What an author writes into a pipeline or policy file that every decision then carries: version labels and
# rule ids (one line), descriptions (a few lines). A 500 KB version label went into every Decision and audit
# record (0.5 MB a decision); an invisible character made two versions that read the same.
MAX_LABEL_CHARS = 128
MAX_DESCRIPTION_CHARS = 4096
_LINE_BREAKING = ("Cc", "Zl", "Zp")  # C0/C1 controls and the separators some viewers break lines at


def authored_text_problem(value: str, multiline: bool = False) -> str | None:
    """Why ``value`` (a label when not ``multiline``, else a description) cannot be served, or None.

    Control characters are refused (a newline or escape sequence in a log line or terminal; a description
    may hold newlines and tabs); so are bidirectional embeddings, overrides and isolates (text displayed in
    another order than stored); a one-line label also may not hold any invisible format character (a
    zero-width space made "2026-11-25.1" and "2026-11-25.1\\u200b" two versions that read the same)."""
    limit = MAX_DESCRIPTION_CHARS if multiline else MAX_LABEL_CHARS
    if len(value) > limit:
        return f"is {len(value):,} characters; at most {limit:,} are allowed (it is copied into every decision)"
    for char in value:
        category = unicodedata.category(char)
        if category in _LINE_BREAKING and not (multiline and char in "\n\t"):
            allowed = " (other than newline and tab)" if multiline else ""
            return f"contains the control character {char!r}{allowed}; use printable text"
        if category == "Cf" and (not multiline or _BIDI_CONTROLS.match(char)):
            return (f"contains the invisible format character U+{ord(char):04X}; "
                    + ("use visible text" if not multiline else "direction overrides are not allowed"))
    return None


class FileTooLarge(OSError):
    def __init__(self, path, size: int, limit: int):
        super().__init__(f"{path}: {size:,} bytes, over the limit of {limit:,}")
        self.size, self.limit = size, limit


def read_bounded(path, limit: int) -> bytes:
    """A file's bytes, or ``FileTooLarge`` without reading it when it holds more than ``limit`` (a multi-GB
    file dropped into the pipeline folder took its size twice over in memory before any check)."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            raise FileTooLarge(path, size, limit)
        data = fh.read(limit + 1)  # (a file still growing: what fits, then one byte to tell)
    if len(data) > limit:
        raise FileTooLarge(path, len(data), limit)
    return data

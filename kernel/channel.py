"""The channel every client of the kernel opens (the Python client, the CLI's commands, the Triton-protocol client).

gRPC's default receive limit is 4 MiB, but the kernel answers up to its ``max_message_bytes`` (64 MiB by default):
a page of reviews carrying their free text (up to 16 MiB, README "Limits") failed in every client with
RESOURCE_EXHAUSTED "Received message larger than max" (a client audit). So a kernel channel takes what a
kernel with the default settings may send, and sends as much; ``options`` override it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc

MESSAGE_BYTES = 64 * 1024 * 1024  # the kernel's default max_message_bytes (kernel/config.py)
DEFAULT_OPTIONS = (("grpc.max_receive_message_length", MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MESSAGE_BYTES))


def kernel_channel(address: str, options: Sequence[tuple[str, object]] = (),
                   credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    """A channel to the kernel at ``address`` (``host:port``); TLS with ``credentials`` (a proxy in front of the
    kernel: it serves plain gRPC), else insecure. ``options`` are gRPC channel options, over the defaults."""
    import grpc  # (here: every CLI command imports this module, and only those that call the kernel need grpc)

    given = {key for key, _ in options}
    merged = [*(option for option in DEFAULT_OPTIONS if option[0] not in given), *options]
    if credentials is not None:
        return grpc.secure_channel(address, credentials, options=merged)
    return grpc.insecure_channel(address, options=merged)

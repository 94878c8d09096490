"""An answer whose last check runs where it is handed to gRPC, not where it was made.

A stream handler's answers cross to their sender: on grpc.aio a worker thread makes them and the event loop
sends them, after whatever else the loop had queued (under 5x overload a DecideStream's answers went out
0.05-6.5 ms after deadlines they had been checked against on the worker). A handler yields ``AtSend(make)``
for an answer that depends on the clock; the front end calls ``make()`` just before it sends the result.
"""

from __future__ import annotations

from collections.abc import Callable


class AtSend:
    __slots__ = ("make",)

    def __init__(self, make: Callable[[], object]):
        self.make = make  # () -> the message to send, decided now


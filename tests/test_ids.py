"""kernel/ids.py: random ids cut from a shared block of os.urandom bytes."""

from __future__ import annotations

import os
import threading

from kernel.ids import random_hex


def test_ids_are_hex_of_the_asked_length_and_do_not_repeat_across_blocks_and_threads():
    seen: list[str] = []

    def take() -> None:
        seen.extend(random_hex(8) for _ in range(2000))  # 16,000 bytes: several 4 KiB blocks each

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(s) == 16 and int(s, 16) >= 0 for s in seen)
    assert len(set(seen)) == len(seen) == 8000
    assert len(random_hex(5000)) == 10000  # more than a block at once


def test_a_forked_child_does_not_hand_out_the_parents_next_ids():
    random_hex(8)  # a block is in use
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids and leave at once
        os.write(write, "".join(random_hex(8) for _ in range(4)).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.waitpid(pid, 0)
    os.close(read)
    parent = "".join(random_hex(8) for _ in range(4))
    assert len(child) == 64 and child != parent

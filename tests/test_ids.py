"""kernel.ids: random ids from pooled os.urandom — unique, 64 bits, safe across threads and pool refills."""

import threading

from kernel import ids


def test_ids_are_sixteen_hex_digits_and_unique_across_several_pools():
    made = [ids.random_hex() for _ in range(3 * ids.BATCH + 7)]
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in made)
    assert len(set(made)) == len(made)


def test_threads_making_ids_at_once_never_share_one():
    made: list[list[str]] = [[] for _ in range(8)]

    def make(out):
        for _ in range(ids.BATCH // 2):
            out.append(ids.random_hex())

    threads = [threading.Thread(target=make, args=(out,)) for out in made]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [i for out in made for i in out]
    assert len(every) == 8 * (ids.BATCH // 2)
    assert len(set(every)) == len(every)


def test_a_caller_behind_the_current_pool_takes_fresh_bytes_and_leaves_the_pool_alone(monkeypatch):
    ids.random_hex()  # (the pool of the counter's current epoch exists)
    epoch, digits = ids._pool
    monkeypatch.setattr(ids, "_pool", (epoch + 5, digits))  # as if other threads moved five pools on meanwhile
    made = ids.random_hex()
    assert ids._pool == (epoch + 5, digits)
    assert made not in digits


def test_a_forked_child_makes_ids_of_its_own():
    import os

    import pytest

    if not hasattr(os, "fork"):
        pytest.skip("no fork here")
    ids.random_hex()  # the parent holds a pool
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent, then out without running the test session's teardown
        os.close(read)
        os.write(write, "".join(ids.random_hex() for _ in range(8)).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 1024).decode()
    os.close(read)
    os.waitpid(pid, 0)
    parents = [ids.random_hex() for _ in range(8)]
    assert len(child) == 8 * 16
    assert not {child[i:i + 16] for i in range(0, len(child), 16)} & set(parents)

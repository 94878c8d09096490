"""Long commands say how far they got now and then; short ones stay quiet (kernel/progress.py)."""

from __future__ import annotations

import io

from kernel.progress import COUNT_EVERY, Progress, counted


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_quiet_at_first_then_a_line_every_so_often():
    clock, out = _Clock(), io.StringIO()
    progress = Progress("verify", out=out, first_after_s=5, every_s=10, clock=clock)
    progress("1 of 9 segments")
    clock.now += 4.9
    progress("2 of 9 segments")
    assert out.getvalue() == ""  # a short run prints only its own summary
    clock.now += 0.2
    progress("3 of 9 segments")
    clock.now += 9
    progress("4 of 9 segments")  # (within the interval: nothing)
    clock.now += 1.1
    progress("5 of 9 segments")
    assert out.getvalue() == "verify: 3 of 9 segments ...\nverify: 5 of 9 segments ...\n"


def test_counted_passes_every_item_through_and_counts_them():
    clock, out = _Clock(), io.StringIO()
    progress = Progress("export", out=out, first_after_s=0, every_s=0, clock=clock)
    items = list(range(2 * COUNT_EVERY + 5))
    assert list(counted(items, progress, "records")) == items
    assert out.getvalue() == f"export: {COUNT_EVERY:,} records ...\nexport: {2 * COUNT_EVERY:,} records ...\n"


def test_verify_tells_its_progress_after_each_segment(tmp_path):
    from test_audit_verify import build_log

    from kernel.audit import verify_directory

    build_log(tmp_path / "audit", records=300, segment_bytes=4096)
    told: list[str] = []
    result = verify_directory(tmp_path / "audit", progress=told.append)
    segments = len(list((tmp_path / "audit").glob("*.seg")))
    assert result.ok and segments > 3 and len(told) == segments
    assert told[-1] == f"{segments} of {segments} segments, 300 records checked"

"""Start ``python -m kernel`` with two benchmark-only compatibility shims (kernel/ is not edited).

Found by ``bench/frontends.py`` on 2026-11-25 (kernel commit 715fcfe); both are kernel bugs to
fix in kernel/, after which these shims do nothing:

1. **Sync front end, no client deadline -> INTERNAL.** grpc's *sync* ``context.time_remaining()``
   returns ~9.22e18 s when the client set no deadline (grpc.aio returns ``None``).
   ``kernel.api.inference.deadline_from`` turns that into a deadline ~292 years away, and when a
   handler thread has to wait (``Lane.run_blocking`` -> ``Condition.wait(timeout)``, i.e. at
   concurrency > 1) ``threading`` raises ``OverflowError: timestamp out of range for platform
   time_t``; the call fails with ``internal error (request id ...)``. perf_analyzer sets no
   deadline. Shim: when the kernel turns a ``time_remaining`` above 1e9 s into a deadline, it
   counts as "no deadline" instead (fixed in kernel commit 179804e: the shim no longer fires).
2. **ModelStatistics that perf_analyzer rejects.** ``inference_stats.compute_input`` and
   ``compute_output`` are left at 0 and ``compute_infer.count`` counts batches, so perf_analyzer
   2.60 aborts with ``Server side statistics compute counts must be the same.`` (Triton counts
   these per *request*; ``batch_stats`` are per batch.) Shim: when the three counts differ, set
   all three to ``success.count`` (``ns`` untouched). The statistics RPC is off the hot path.
   (Fixed in kernel commit 179804e: the counts now agree and the shim no longer fires.)

Each shim prints one ``bench.kernel_compat: ... applied`` line to stderr the first time it changes
anything, so the benchmark can record whether it fired. Usage: ``python -m bench.kernel_compat
serve ...`` (same arguments as ``python -m kernel``).
"""

from __future__ import annotations

import sys
import time

NO_DEADLINE_ABOVE_S = 1e9  # a time_remaining beyond ~31 years means "no deadline"
_fired: set[str] = set()


def _note(name: str, detail: str) -> None:
    if name not in _fired:
        _fired.add(name)
        print(f"bench.kernel_compat: {name} applied ({detail})", file=sys.stderr, flush=True)


def install() -> None:
    from kernel.api import converters, inference

    original_deadline_from = inference.deadline_from

    def deadline_from(time_remaining, timeout_us=0):
        deadline = original_deadline_from(time_remaining, timeout_us)
        if (time_remaining is not None and time_remaining > NO_DEADLINE_ABOVE_S
                and deadline - time.monotonic_ns() > NO_DEADLINE_ABOVE_S * 1e9):  # the kernel kept it
            _note("deadline-shim", f"time_remaining={time_remaining:.3g} s treated as no deadline")
            deadline = original_deadline_from(None, timeout_us)
        return deadline

    inference.deadline_from = deadline_from

    original_model_statistics = converters.model_statistics

    def model_statistics(mv):
        out = original_model_statistics(mv)
        infer = out.inference_stats
        counts = (infer.compute_input.count, infer.compute_infer.count, infer.compute_output.count)
        if len(set(counts)) > 1:
            _note("statistics-shim", f"compute counts input/infer/output {counts} set to success.count")
            for duration in (infer.compute_input, infer.compute_infer, infer.compute_output):
                duration.count = infer.success.count
        return out

    converters.model_statistics = model_statistics


def main(argv=None) -> int:
    install()
    from kernel.cli import main as kernel_main

    return kernel_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())

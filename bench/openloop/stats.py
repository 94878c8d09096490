"""Statistics of one run: nearest-rank percentiles, per-stream counts/latencies/goodput/late answers over the
measured window, and the generator's self-checks (saturated core, sends behind schedule)."""

from __future__ import annotations

import numpy as np

from bench.openloop.codes import (CANCELLED, CLIENT_DEADLINE, CODE_NAMES, EXPIRED, INTERNAL, OK, OTHER, PENDING,
                                  REFUSED, UNAVAILABLE)
from bench.openloop.driver import Record, RunData

LAG_WARN_P99_MS = 2.0
LAG_WARN_MAX_MS = 10.0
CLIENT_CPU_WARN = 0.90


def pct(values: np.ndarray, q: float) -> float | None:
    """Nearest-rank percentile (the value below which q % of the samples lie), None without samples."""
    if len(values) == 0:
        return None
    s = np.sort(values)
    rank = max(1, int(np.ceil(q / 100 * len(s))))
    return float(s[rank - 1])


def latency_stats(lat_s: np.ndarray) -> dict:
    ms = lat_s * 1000
    return {"n": int(len(ms)), "p50_ms": pct(ms, 50), "p90_ms": pct(ms, 90), "p99_ms": pct(ms, 99),
            "p999_ms": pct(ms, 99.9), "max_ms": float(ms.max()) if len(ms) else None}


def record_stats(rec: Record, window: tuple[float, float], slo_s: float | None, deadline_s: float | None,
                 deadline_via: str = "timeout") -> dict:
    """Statistics of the requests of ``rec`` scheduled in ``window``."""
    w0, w1 = window
    span = w1 - w0
    m = rec.window(w0, w1)
    code = rec.code[m]
    sched, sent, done = rec.sched[m], rec.sent[m], rec.done[m]
    ok = code == OK
    lat_sched = done - sched  # from the scheduled send time
    lat_sent = done - sent  # from the actual send time
    lag = (sent - sched) * 1000
    out = {
        "stream": rec.stream, "requests": int(m.sum()), "offered_rps": float(m.sum()) / span,
        "codes": {CODE_NAMES[c]: int((code == c).sum()) for c in range(len(CODE_NAMES)) if (code == c).any()},
        "ok": int(ok.sum()), "throughput_rps": float(ok.sum()) / span,
        "latency_ok": latency_stats(lat_sched[ok]),
        "latency_ok_from_send": latency_stats(lat_sent[ok]),
        "refused": int((code == REFUSED).sum()), "expired": int((code == EXPIRED).sum()),
        "client_deadline": int((code == CLIENT_DEADLINE).sum()),
        "cancelled": int((code == CANCELLED).sum()),  # we never cancel: the server's side of a passed gRPC deadline
        "errors": int(np.isin(code, [UNAVAILABLE, INTERNAL, OTHER, PENDING]).sum()),
        "lag_ms": {"p50": pct(lag, 50), "p99": pct(lag, 99), "max": float(lag.max()) if len(lag) else None,
                   "late_over_5ms": int((lag > 5).sum())},
    }
    retry = rec.retry_ms[m][code == REFUSED]
    retry = retry[~np.isnan(retry)]
    if len(retry):
        out["retry_after_ms"] = {"p50": pct(retry, 50), "p90": pct(retry, 90), "max": float(retry.max())}
    if slo_s is not None:
        good = ok & (lat_sched <= slo_s)
        out["slo_ms"] = slo_s * 1000
        out["good"] = int(good.sum())
        out["goodput_rps"] = float(good.sum()) / span
    if deadline_s is not None:
        late = lat_sent[ok] - deadline_s
        out["deadline_ms"] = deadline_s * 1000
        out["deadline_via"] = deadline_via
        # With a gRPC deadline the client's own gRPC fails a call whose answer has not come by then, so an OK
        # "after the deadline" there is only the client's timestamp taken late (a busy loop), not the server.
        out["ok_after_deadline_kind"] = "server" if deadline_via == "timeout" else "client timestamp"
        out["ok_after_deadline"] = int((late > 0).sum())  # from the actual send: the server's side of it
        out["ok_after_deadline_plus_5ms"] = int((late > 0.005).sum())
        out["ok_after_deadline_max_over_ms"] = float(late.max() * 1000) if (late > 0).any() else 0.0
        out["ok_after_deadline_from_sched"] = int((lat_sched[ok] > deadline_s).sum())
    return out


def client_flags(run: RunData, stats: list[dict]) -> list[str]:
    flags = []
    if run.client_cpu > CLIENT_CPU_WARN:
        flags.append(f"client core saturated ({run.client_cpu:.2f} of core 1)")
    lags = [s["lag_ms"] for s in stats if s["requests"]]
    if lags:
        p99 = max(l["p99"] for l in lags)
        mx = max(l["max"] for l in lags)
        if p99 > LAG_WARN_P99_MS or mx > LAG_WARN_MAX_MS:
            flags.append(f"generator behind schedule (lag p99 {p99:.1f} ms, max {mx:.1f} ms)")
    if not run.drained:
        flags.append("some calls never finished (cancelled after the guard timeout)")
    return flags

"""The summary of all runs: the headline ratios (JSON) and the markdown tables printed at the end."""

from __future__ import annotations

import statistics

from bench.openloop.runs import Ctx, stream_stats
from bench.openloop.streams import GUARD_S


def _spread(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _f(s: dict | None, digits: int = 0) -> str:
    if not s:
        return "—"
    f = f"{{:,.{digits}f}}"
    if s["n"] == 1:
        return f.format(s["median"])
    return f"{f.format(s['median'])} ({f.format(s['min'])}–{f.format(s['max'])})"


def summarise(ctx: Ctx, info: dict) -> tuple[dict, str]:
    runs = ctx.runs
    md: list[str] = []
    summary: dict = {}

    def arm_rows(scenario: str, stream: str, arms: list[str], phase: str | None = None) -> list[str]:
        rows = []
        for arm in arms:
            rs = [r for r in runs if r["scenario"] == scenario and r["arm"] == arm
                  and (phase is None or r.get("phase") == phase)]
            ss = [stream_stats(r, stream) for r in rs if any(s["stream"] == stream for s in r["streams"])]
            if not ss:
                continue
            med = lambda key: _spread([s.get(key) for s in ss])  # noqa: E731
            lat = lambda key: _spread([s["latency_ok"][key] for s in ss])  # noqa: E731
            counts = f"{sum(s['latency_ok']['n'] for s in ss):,} OK / {sum(s['requests'] for s in ss):,}"
            refused = sum(s["refused"] for s in ss)
            expired = sum(s["expired"] for s in ss)
            cdl = f"{sum(s['client_deadline'] for s in ss):,} / {sum(s['cancelled'] for s in ss):,}"
            errs = sum(s["errors"] for s in ss)
            late_n = sum(s.get("ok_after_deadline", 0) for s in ss)
            late = (f"{late_n:,}" if not ss[0].get("ok_after_deadline_kind") == "client timestamp"
                    else f"n/a ({late_n:,} client ts)")
            rpb = _spread([r["counters"].get(_model_of(stream), {}).get("rows_per_batch") for r in rs])
            flags = sum(1 for r in rs if r["client_flags"])
            rows.append(f"| {arm} | {len(ss)} | {_f(med('offered_rps'))} | {_f(med('throughput_rps'))} | "
                        f"{_f(med('goodput_rps')) if 'goodput_rps' in ss[0] else '—'} | {_f(lat('p50_ms'), 1)} | "
                        f"{_f(lat('p99_ms'), 1)} | {_f(lat('p999_ms'), 1)} | {_f(lat('max_ms'), 1)} | {counts} | "
                        f"{refused:,} | {expired:,} | {cdl} | {errs:,} | {late} | {_f(rpb, 1)} | "
                        f"{_f(_spread([r['client_cpu'] for r in rs]), 2)} | {flags} |")
        return rows

    header = ("| arm | runs | offered/s | OK/s | goodput/s | p50 ms | p99 ms | p99.9 ms | max ms | OK / sent (all runs) "
              "| refused | expired (kernel) | gRPC deadline passed (client DEADLINE_EXCEEDED / CANCELLED) | errors | OK after deadline | rows/batch "
              "| client cores | runs flagged |\n|---|---:|---|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|---|---|---:|")

    if "bursty" in info:
        b = info["bursty"]
        t = b["trace"]
        md.append("### 1. Bursty goodput (large_mlp)\n")
        md.append(f"Trace: saturation C = {t['capacity_rps']:,.0f}/s (closed loop, {ctx.args.sat_concurrency} in flight); "
                  f"Poisson base {t['base_rps']:,.0f}/s ({ctx.args.base_frac:g}·C), {t['bursts']} bursts of "
                  f"{t['burst_ms']:.0f} ms at {t['burst_rps']:,.0f}/s (~{t['burst_requests_each']:.0f} requests each), "
                  f"{t['requests_in_window']:,} requests in the {ctx.args.seconds:g} s window (mean "
                  f"{t['mean_rps_in_window']:,.0f}/s), seed {t['seed']}; SLO = deadline = {t['slo_ms']:g} ms "
                  f"(sent as {'the gRPC deadline' if ctx.args.bursty_deadline_via == 'grpc' else 'the `timeout` parameter'}). "
                  "Latency from the scheduled send; percentiles of OK answers.\n")
        md.append("Screening (one run each, same trace):\n")
        md.append("| config | goodput/s |\n|---|---:|")
        for arm, g in sorted(b["screen"].items(), key=lambda kv: -kv[1]):
            md.append(f"| {arm} | {g:,.0f} |")
        md.append("")
        md.append(f"Alternating rounds (adaptive vs the {len(b['finalists'])} best static points), median (min–max):\n")
        md.append(header)
        md += arm_rows("bursty", "large", ["adaptive", *b["finalists"]], phase="pairs")
        ad = {r["round"]: stream_stats(r, "large")["goodput_rps"] for r in runs
              if r["scenario"] == "bursty" and r["arm"] == "adaptive" and r.get("phase") == "pairs"}
        ratios = {}
        for arm in b["finalists"]:
            st = {r["round"]: stream_stats(r, "large")["goodput_rps"] for r in runs
                  if r["scenario"] == "bursty" and r["arm"] == arm and r.get("phase") == "pairs"}
            common = sorted(set(ad) & set(st))
            if not common:
                continue
            ma, ms = statistics.median(ad[k] for k in common), statistics.median(st[k] for k in common)
            per = [ad[k] / st[k] for k in common if st[k]]
            ratios[arm] = {"ratio_of_medians": ma / ms if ms else None, "per_round": per,
                           "static_median_goodput": ms, "adaptive_median_goodput": ma}
        best = max(ratios, key=lambda a: ratios[a]["static_median_goodput"]) if ratios else None
        summary["bursty"] = {"ratios": ratios, "best_static": best, "target": 1.3}
        md.append("")
        for arm, r in ratios.items():
            pr = r["per_round"]
            md.append(f"- adaptive / {arm}: **{r['ratio_of_medians']:.2f}×** goodput (per round "
                      f"{min(pr):.2f}–{max(pr):.2f}){' ← best static' if arm == best else ''}")
        md.append("")

    if "overload" in info:
        o = info["overload"]
        md.append("### 2. Overload with deadlines (large_mlp)\n")
        md.append(f"Offered {o['offered_rps']:,.0f}/s Poisson = {o['factor']:g} × the saturation throughput of round 1; "
                  f"deadline {o['deadline_ms']:g} ms on every request, as Triton's `timeout` parameter (gRPC guard "
                  f"+{GUARD_S:g} s) or as the gRPC deadline. Goodput = OK within the deadline of the scheduled send. "
                  "\"OK after deadline\" = OK answers whose latency from the *actual* send exceeded the deadline.\n")
        md.append(header)
        md += arm_rows("overload", "large_mlp-sat[closed]", ["saturation(closed)"])
        md += arm_rows("overload", "large-timeout", ["overload(timeout)"])
        md += arm_rows("overload", "large-grpc", ["overload(grpc)"])
        sat = {r["round"]: stream_stats(r, "large_mlp-sat[closed]")["throughput_rps"] for r in runs
               if r["scenario"] == "overload" and r["arm"] == "saturation(closed)"}
        res = {}
        for via in ("timeout", "grpc"):
            ov = {r["round"]: stream_stats(r, f"large-{via}") for r in runs
                  if r["scenario"] == "overload" and r["arm"] == f"overload({via})"}
            common = sorted(set(sat) & set(ov))
            if not common:
                continue
            g = [ov[k]["goodput_rps"] for k in common]
            per = [ov[k]["goodput_rps"] / sat[k] for k in common if sat[k]]
            n_req = sum(ov[k]["requests"] for k in common)
            res[via] = {
                "goodput_over_saturation": statistics.median(g) / statistics.median(sat[k] for k in common),
                "per_round": per,
                "ok_after_deadline": sum(ov[k]["ok_after_deadline"] for k in common),
                "ok_after_deadline_plus_5ms": sum(ov[k]["ok_after_deadline_plus_5ms"] for k in common),
                "ok_after_deadline_max_over_ms": max(ov[k]["ok_after_deadline_max_over_ms"] for k in common),
                "ok": sum(ov[k]["ok"] for k in common),
                "p99_ok_ms": _spread([ov[k]["latency_ok"]["p99_ms"] for k in common]),
                "refused_share": sum(ov[k]["refused"] for k in common) / n_req if n_req else None,
                "expired_share": sum(ov[k]["expired"] for k in common) / n_req if n_req else None,
                "client_deadline_share": sum(ov[k]["client_deadline"] + ov[k]["cancelled"] for k in common) / n_req
                if n_req else None,
                "error_share": sum(ov[k]["errors"] for k in common) / n_req if n_req else None,
                "ok_share": sum(ov[k]["ok"] for k in common) / n_req if n_req else None,
            }
        summary["overload"] = res
        md.append("")
        md.append("| deadline via | goodput / saturation | per round | OK after deadline (> +5 ms; worst) | p99 of OK ms | "
                  "OK share | refused at admission | expired in queue (kernel) | no answer by the gRPC deadline | errors |")
        md.append("|---|---:|---|---|---|---:|---:|---:|---:|---:|")
        for via, r in res.items():
            pr = r["per_round"]
            late = (f"{r['ok_after_deadline']:,} of {r['ok']:,} ({r['ok_after_deadline_plus_5ms']:,}; "
                    f"{r['ok_after_deadline_max_over_ms']:.1f} ms)")
            if via == "grpc":
                late = f"n/a: gRPC enforces it on the client ({r['ok_after_deadline']:,} late client timestamps)"
            md.append(f"| {via} | **{r['goodput_over_saturation']:.2f}×** | {min(pr):.2f}–{max(pr):.2f} | "
                      f"{late} | {_f(r['p99_ok_ms'], 1)} | "
                      f"{r['ok_share']:.1%} | {r['refused_share']:.1%} | {r['expired_share']:.1%} | "
                      f"{r['client_deadline_share']:.1%} | {r['error_share']:.1%} |")
        md.append("")

    if "priority" in info:
        p = info["priority"]
        md.append("### 3. Priority isolation (tiny_mlp priority 1 next to large_mlp)\n")
        md.append(f"tiny_mlp: Poisson {p['tiny_rps']:g}/s, priority 1, no deadline. Neighbour large_mlp on the same lane: "
                  f"closed loop with {p['neighbour_concurrency']} in flight (priority 2, or 1 as a control), or open loop "
                  f"at {p.get('open_neighbour_rps', 0):,.0f}/s (1 s gRPC deadline, priority 2). Latency of tiny from its "
                  "scheduled send.\n")
        arms = ["solo", "neighbour-p2(closed)", "neighbour-p2(own kernel)", "neighbour-p1(closed)", "neighbour-p2(open)"]
        md.append(header)
        md += arm_rows("priority", "tiny", arms)
        md.append("")
        md.append("Neighbour (large_mlp):\n")
        md.append(header)
        md += arm_rows("priority", "large-p2[closed]", ["neighbour-p2(closed)"])
        md += arm_rows("priority", "large-p2-apart[closed]", ["neighbour-p2(own kernel)"])
        md += arm_rows("priority", "large-p1[closed]", ["neighbour-p1(closed)"])
        md += arm_rows("priority", "large-p2-open", ["neighbour-p2(open)"])
        res = {}
        for arm in arms[1:]:
            for basis, key in (("sched", "latency_ok"), ("send", "latency_ok_from_send")):
                solo = {r["round"]: stream_stats(r, "tiny")[key]["p99_ms"] for r in runs
                        if r["scenario"] == "priority" and r["arm"] == "solo"}
                nb = {r["round"]: stream_stats(r, "tiny")[key]["p99_ms"] for r in runs
                      if r["scenario"] == "priority" and r["arm"] == arm}
                common = sorted(k for k in set(solo) & set(nb) if solo[k] and nb[k] is not None)
                if not common:
                    continue
                entry = {"p99_ratio_of_medians": statistics.median(nb[k] for k in common)
                         / statistics.median(solo[k] for k in common),
                         "per_round": [nb[k] / solo[k] for k in common],
                         "solo_p99_ms": statistics.median(solo[k] for k in common),
                         "neighbour_p99_ms": statistics.median(nb[k] for k in common)}
                if basis == "sched":
                    res[arm] = entry
                else:
                    res.setdefault(arm, {})["from_send"] = entry
        summary["priority"] = {"ratios": res, "target": 1.2}
        md.append("")
        # Inside the kernel (scheduler queue + batch): what the scheduler's priorities control.
        inside = {arm: [r["counters"].get("tiny_mlp", {}).get("kernel_ms_per_request") for r in runs
                        if r["scenario"] == "priority" and r["arm"] == arm] for arm in arms}
        if any(v for values in inside.values() for v in values if v is not None):
            summary["priority"]["tiny_ms_inside_kernel"] = inside
            md.append("- tiny's mean time inside the kernel (scheduler queue + batch, ModelStatistics), per round: "
                      + "; ".join(f"{arm} " + ", ".join(f"{v:.3f}" for v in values if v is not None) + " ms"
                                  for arm, values in inside.items() if any(v is not None for v in values)))
        for arm, r in res.items():
            if "per_round" not in r:
                continue
            pr = r["per_round"]
            line = (f"- tiny p99 with {arm} / solo: **{r['p99_ratio_of_medians']:.2f}×** "
                    f"({r['neighbour_p99_ms']:.2f} vs {r['solo_p99_ms']:.2f} ms; per round {min(pr):.2f}–{max(pr):.2f})")
            fs = r.get("from_send")
            if fs:
                line += (f"; from the actual send {fs['p99_ratio_of_medians']:.2f}× ({fs['neighbour_p99_ms']:.2f} vs "
                         f"{fs['solo_p99_ms']:.2f} ms)")
            md.append(line)
        md.append("")
    details: dict = {}
    for r in runs:
        for e in r.get("error_details", []):
            key = (r["scenario"], e["status"], e["details"])
            details[key] = details.get(key, 0) + e["count"]
    if details:
        md.append("### Non-OK answers by status and message (numbers masked as N; all runs)\n")
        md.append("| scenario | status | details | count |\n|---|---|---|---:|")
        for (scenario, status, text), count in sorted(details.items(), key=lambda kv: (kv[0][0], -kv[1])):
            md.append(f"| {scenario} | {status} | {text.replace('|', '/')} | {count:,} |")
        md.append("")
    return summary, "\n".join(md) + "\n"


def _model_of(stream: str) -> str:
    return "tiny_mlp" if stream.startswith("tiny") else "large_mlp"

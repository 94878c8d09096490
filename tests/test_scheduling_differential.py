"""The Cython core and the Python reference make the same plans on random traces.

Hypothesis generates a trace of model registrations, latency samples, submits
(random rows, priorities, deadlines — some shared —, tenants, shapes) in
bursts, models bounded together (share_bounds), cancels (of items in any state), clock advances and jumps, dispatch
steps, batch starts and completions (some of zero duration); both schedulers replay it and every
observable result must match: admission verdicts and retry hints, batches
(model, items, rows), expiries, wake-up times and stats.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_budget import examples

from kernel.scheduling import implementations
from kernel.scheduling.policy import ModelSchedule
from kernel.scheduling.reference import ReferenceScheduler

IMPLS = implementations()
pytestmark = pytest.mark.skipif(len(IMPLS) < 2, reason="Cython core not built (run `make build`)")


class Model:
    def __init__(self, index: int):
        self.name, self.version, self.index = f"m{index}", "1", index

    def __repr__(self) -> str:
        return self.name


schedules = st.builds(
    ModelSchedule,
    max_batch_size=st.sampled_from([0, 1, 4, 8, 32]),
    instances=st.integers(1, 2),
    weight=st.sampled_from([0.5, 1.0, 3.0]),
    priority_levels=st.integers(1, 4),
    max_queue=st.integers(1, 40),
    max_tenant_queue=st.integers(1, 20),
    max_queue_delay_ns=st.sampled_from([0, 0, 200_000, 2_000_000]),
    preferred_batch_sizes=st.sampled_from([(), (2,), (4, 8)]),
)

# A deadline: none, relative to the submit, or one of a few instants shared by the whole trace (ties in EDF order).
deadlines = st.one_of(st.none(), st.integers(-1_000_000, 20_000_000),
                      st.tuples(st.just("at"), st.sampled_from([1_000_000, 3_000_000, 8_000_000])))
submits = st.tuples(st.just("submit"), st.integers(0, 2), st.sampled_from([1, 1, 1, 2, 3, 5, 8]), st.integers(0, 5),
                    deadlines, st.sampled_from(["", "a", "b"]), st.sampled_from([0, 0, 0, 1, 2]))

ops = st.one_of(
    # Submits come in bursts between dispatches: one submit per dispatch made almost every batch a single
    # request (99% of them), so batching itself was hardly compared.
    st.lists(submits, min_size=1, max_size=8).map(lambda burst: ("burst", burst)),
    st.tuples(st.just("cancel"), st.integers(0, 200), st.booleans()),
    st.tuples(st.just("advance"), st.one_of(st.integers(0, 3_000_000), st.just(10**10))),  # 10 s: a clock jump
    st.tuples(st.just("dispatch"), st.integers(1, 4), st.sampled_from([0, 0, 1, 2])),
    st.tuples(st.just("start"), st.integers(0, 10)),
    st.tuples(st.just("complete"), st.integers(0, 10), st.one_of(st.integers(1_000, 5_000_000), st.just(0))),
    st.tuples(st.just("observe"), st.integers(0, 2), st.integers(1, 32), st.integers(1_000, 5_000_000)),
    st.tuples(st.just("wakeup"), st.integers(0, 3)),
    st.tuples(st.just("share"), st.integers(0, 2), st.integers(0, 2)),  # (a reload's copies: bounded together)
)


def replay(cls, model_schedules, trace) -> list:
    sched = cls()
    models = [Model(i) for i in range(len(model_schedules))]
    for model, schedule in zip(models, model_schedules):
        sched.add_model(model, schedule)
    now = 1_000_000_000
    items = []
    running = []
    log = []
    start = now
    for op in (step for op in trace for step in (op[1] if op[0] == "burst" else [op])):
        kind = op[0]
        if kind == "submit":
            _, m, rows, priority, deadline, tenant, shape = op
            model = models[m % len(models)]
            if deadline is None:
                deadline_ns = 0
            elif isinstance(deadline, tuple):
                deadline_ns = start + deadline[1]
            else:
                deadline_ns = max(1, now + deadline)
            item = cls.item_class(model, rows, ((shape,),), {}, request_id=str(len(items)), priority=priority,
                                  deadline_ns=deadline_ns, tenant=tenant)
            item.enqueued_ns = now
            items.append(item)
            verdict = sched.submit(item, now)
            log.append(("submit", verdict, item.retry_after_ns if verdict else 0))
        elif kind == "cancel" and items:
            item = items[op[1] % len(items)]
            log.append(("cancel", sched.cancel(item, op[2]), item.state))
        elif kind == "advance":
            now += op[1]
        elif kind == "dispatch":
            batches = sched.next_batches(now, op[1], op[2])
            running += batches
            log.append(("dispatch", [(b.model.index, [i.request_id for i in b.items], b.rows) for b in batches]))
            log.append(("expired", [i.request_id for i in sched.pop_expired()]))
        elif kind == "start" and running:  # (the lane's check as the batch starts: Lane._start_locked)
            batch = running[op[1] % len(running)]
            started = sched.start(batch, now)
            log.append(("start", started, [i.request_id for i in batch.items], batch.rows))
            log.append(("expired", [i.request_id for i in sched.pop_expired()]))
            if not started:
                running.remove(batch)
        elif kind == "complete" and running:
            batch = running.pop(op[1] % len(running))
            sched.complete(batch, op[2])
        elif kind == "observe":
            sched.observe(models[op[1] % len(models)], op[2], op[3])
        elif kind == "share" and op[1] % len(models) != op[2] % len(models):
            sched.share_bounds(models[op[1] % len(models)], models[op[2] % len(models)])
        elif kind == "wakeup":
            log.append(("wakeup", sched.next_wakeup(now, op[1])))
            log.append(("expired", [i.request_id for i in sched.pop_expired()]))
    stats = sched.stats()
    log.append(("stats", stats["queued"], [(k.index, v) for k, v in stats["models"].items()]))
    log.append(("load", [sched.load(m) for m in models]))
    log.append(("remove", [[i.request_id for i in sched.remove_model(m)] for m in models]))
    return log


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(schedules, min_size=1, max_size=3), st.lists(ops, min_size=20, max_size=100))
def test_same_plans_on_random_traces(model_schedules, trace):
    reference = replay(ReferenceScheduler, model_schedules, trace)
    for cls in IMPLS[1:]:
        assert replay(cls, model_schedules, trace) == reference


def test_constants_agree():
    from kernel._ext import scheduler as core
    from kernel.scheduling import policy, types

    for name, value in core.CONSTANTS.items():
        source = policy if hasattr(policy, name) else types
        if name == "MAX_PRIORITY_LEVELS":
            continue
        assert getattr(source, name) == value, name

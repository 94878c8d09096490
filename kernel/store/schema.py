"""The SQLite schema, as an append-only list of migrations keyed by ``PRAGMA user_version``.

A fresh file runs every migration; an older one runs those above its
version, each in its own transaction together with the version bump, so a
crash mid-migration leaves the previous version intact. Never edit a
migration that has shipped: add the next one.

Rows keep the full record as protobuf bytes (``body``) plus the few columns
that queries filter on; the records classes derive those columns from the
body on every write, so the two cannot disagree.
"""

from __future__ import annotations

import logging
import sqlite3

from ..errors import FailedPrecondition
from .sqlite_tasks import FINISHED

log = logging.getLogger("aios.store")

_FINISHED_STATES = ", ".join(str(state) for state in FINISHED)
# A review resolved after its SLA deadline (sqlite_reviews._RESOLVED_LATE, for a row named ``row``), and a
# change of its pipeline's count by ``delta`` when ``when`` holds (WHERE is also what lets SQLite parse an
# INSERT ... SELECT with ON CONFLICT).
_LATE = ("{row}.resolved = 1 AND {row}.sla_deadline_unix_ns > 0"
         " AND {row}.resolved_unix_ns > {row}.sla_deadline_unix_ns")
# A task row's state counted by ``delta``.
_TASKS = ("INSERT INTO task_counts (state, tasks) SELECT {row}.state, {delta} WHERE 1"
          " ON CONFLICT (state) DO UPDATE SET tasks = tasks + excluded.tasks")
# A row's part of its pipeline's review_backlog, added (``sign`` "") or taken away ("-").
_BACKLOG = ("INSERT INTO review_backlog (pipeline, unresolved, with_sla) SELECT {row}.pipeline,"
            " {sign}({row}.resolved = 0), {sign}({row}.resolved = 0 AND {row}.sla_deadline_unix_ns > 0) WHERE 1"
            " ON CONFLICT (pipeline) DO UPDATE SET unresolved = unresolved + excluded.unresolved,"
            " with_sla = with_sla + excluded.with_sla")
# _BACKLOG per pipeline and tenant (version 10).
_BACKLOG_BY_TENANT = ("INSERT INTO review_backlog (pipeline, tenant, unresolved, with_sla) SELECT {row}.pipeline,"
                      " {row}.tenant, {sign}({row}.resolved = 0),"
                      " {sign}({row}.resolved = 0 AND {row}.sla_deadline_unix_ns > 0) WHERE 1"
                      " ON CONFLICT (pipeline, tenant) DO UPDATE SET unresolved = unresolved + excluded.unresolved,"
                      " with_sla = with_sla + excluded.with_sla")
_ADD = ("INSERT INTO review_counts (pipeline, resolved_late) SELECT {row}.pipeline, {delta} WHERE {when}"
        " ON CONFLICT (pipeline) DO UPDATE SET resolved_late = resolved_late + excluded.resolved_late")

# (version, what it adds, statements)
MIGRATIONS: list[tuple[int, str, tuple[str, ...]]] = [
    (1, "durable tasks, review queue, idempotency keys", (
        """CREATE TABLE tasks (
            task_id TEXT PRIMARY KEY,
            state INTEGER NOT NULL,            -- kernel_pb2.TaskState
            tenant TEXT NOT NULL,
            idempotency_key TEXT NOT NULL,     -- '' when none
            request_hash TEXT NOT NULL,
            review_id TEXT NOT NULL,
            revision INTEGER NOT NULL,         -- +1 per write: compare-and-set
            body BLOB NOT NULL                 -- kernel_pb2.Task
        )""",
        "CREATE UNIQUE INDEX tasks_by_key ON tasks (tenant, idempotency_key) WHERE idempotency_key != ''",
        "CREATE INDEX tasks_by_state ON tasks (state)",
        "CREATE INDEX tasks_by_review ON tasks (review_id) WHERE review_id != ''",
        # A review resolved before its task recorded that it waits (or before a
        # crash let the task hear of it): applied when the task gets there.
        """CREATE TABLE review_completions (
            review_id TEXT PRIMARY KEY,
            decision BLOB NOT NULL,            -- kernel_pb2.Decision
            created_unix_ns INTEGER NOT NULL
        )""",
        """CREATE TABLE reviews (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- list order and page tokens
            review_id TEXT NOT NULL UNIQUE,
            pipeline TEXT NOT NULL,
            tenant TEXT NOT NULL,
            task_id TEXT NOT NULL,              -- '' when no task waits on it
            resolved INTEGER NOT NULL,
            lease_expires_unix_ns INTEGER NOT NULL,  -- 0 = never claimed
            sla_deadline_unix_ns INTEGER NOT NULL,   -- 0 = no SLA
            resolved_unix_ns INTEGER NOT NULL,
            delivered INTEGER NOT NULL,         -- every on_resolved hook has run
            revision INTEGER NOT NULL,
            body BLOB NOT NULL                  -- kernel_pb2.Review
        )""",
        "CREATE INDEX reviews_by_filter ON reviews (resolved, pipeline, tenant)",
        "CREATE UNIQUE INDEX reviews_by_task ON reviews (task_id) WHERE task_id != ''",
        "CREATE INDEX reviews_undelivered ON reviews (seq) WHERE resolved = 1 AND delivered = 0",
        """CREATE TABLE idempotency (
            tenant TEXT NOT NULL,
            key TEXT NOT NULL,
            request_hash TEXT NOT NULL,
            response BLOB NOT NULL,
            created_unix_ns INTEGER NOT NULL,
            expires_unix_ns INTEGER NOT NULL,
            PRIMARY KEY (tenant, key)
        ) WITHOUT ROWID""",
        "CREATE INDEX idempotency_by_expiry ON idempotency (expires_unix_ns)",
    )),
    (2, "named counters (the audit sequence below which every escalation has its review row)", (
        """CREATE TABLE meta (
            key TEXT PRIMARY KEY,
            value INTEGER NOT NULL
        ) WITHOUT ROWID""",
    )),
    (3, "resolved reviews that missed their SLA, indexed (ListReviews counted them over every resolved review)", (
        # (A soak audit: a ListReviews page of resolved reviews took 100 ms at 50 k of them, 450 ms at 500 k.)
        """CREATE INDEX reviews_sla_missed ON reviews (pipeline, tenant)
           WHERE resolved = 1 AND sla_deadline_unix_ns > 0 AND resolved_unix_ns > sla_deadline_unix_ns""",
    )),
    (4, "when each task finished, and both kinds of finished rows indexed by that time (store_retention_days)", (
        "ALTER TABLE tasks ADD COLUMN finished_unix_ns INTEGER NOT NULL DEFAULT 0",  # 0 = not finished
        # Tasks that finished before this version have their end time in their body only: they count as finished
        # at the upgrade, so retention never deletes one sooner than it promises (a retention period later).
        "UPDATE tasks SET finished_unix_ns = CAST(strftime('%s', 'now') AS INTEGER) * 1000000000"
        f" WHERE state IN ({_FINISHED_STATES})",
        "CREATE INDEX tasks_finished ON tasks (finished_unix_ns) WHERE finished_unix_ns > 0",
        # Only reviews whose resolution reached every hook (a task waiting on it, the idempotency record): one
        # still being delivered must stay until redeliver() finishes it.
        "CREATE INDEX reviews_resolved_at ON reviews (resolved_unix_ns) WHERE resolved = 1 AND delivered = 1",
    )),
    (5, "the audit sequence each stored answer cites, indexed (answers citing records the log lost are found)", (
        # -1: not known (an answer stored before this version, or not a decision's); kernel/decisions.py
        # _lost_records and IdempotencyStore.forget_recorded_from read it. The first start after the upgrade fills
        # it for the older answers from their bytes (IdempotencyStore.fill_old_sequences).
        "ALTER TABLE idempotency ADD COLUMN audit_sequence INTEGER NOT NULL DEFAULT -1",
        "CREATE INDEX idempotency_by_sequence ON idempotency (audit_sequence) WHERE audit_sequence >= 0",
    )),
    (6, "tasks indexed by tenant and state (ListTasks for one tenant)", (
        # ListTasks filtered by tenant walked every task in position order: a page of a tenant with 3 of 300,000
        # tasks took 55 ms (180 ms with a state filter), growing with the table. An index entry also carries the
        # rowid, so a page is a range of one (sqlite_tasks.page_query names which). Two: with a state filter
        # (tenant, state) reads only matching rows; without one it would sort all the tenant's tasks a page.
        "CREATE INDEX tasks_by_tenant ON tasks (tenant)",
        "CREATE INDEX tasks_by_tenant_state ON tasks (tenant, state)",
    )),
    (7, "resolved-late reviews counted per pipeline as rows change (a metrics scrape counted them all)", (
        # aios_reviews_resolved_late read reviews_sla_missed whole at every scrape: 159 ms at 1 M late reviews,
        # growing with the store's history, every 15 s per scraper. Triggers keep the count with every writer's
        # insert, resolution, withdrawal and retention delete, in the same transaction; filled once here.
        """CREATE TABLE review_counts (
            pipeline TEXT PRIMARY KEY,
            resolved_late INTEGER NOT NULL          -- reviews kept, resolved after their SLA deadline
        ) WITHOUT ROWID""",
        f"INSERT INTO review_counts (pipeline, resolved_late) SELECT pipeline, count(*) FROM reviews"
        f" INDEXED BY reviews_sla_missed WHERE {_LATE.format(row='reviews')} GROUP BY pipeline",
        f"""CREATE TRIGGER reviews_late_inserted AFTER INSERT ON reviews WHEN {_LATE.format(row='NEW')}
           BEGIN {_ADD.format(row='NEW', delta='1', when='1')}; END""",
        f"""CREATE TRIGGER reviews_late_changed AFTER UPDATE ON reviews
           WHEN ({_LATE.format(row='OLD')}) != ({_LATE.format(row='NEW')}) OR OLD.pipeline IS NOT NEW.pipeline
           BEGIN
             {_ADD.format(row='OLD', delta='-1', when=_LATE.format(row='OLD'))};
             {_ADD.format(row='NEW', delta='1', when=_LATE.format(row='NEW'))};
           END""",
        f"""CREATE TRIGGER reviews_late_deleted AFTER DELETE ON reviews WHEN {_LATE.format(row='OLD')}
           BEGIN {_ADD.format(row='OLD', delta='-1', when='1')}; END""",
    )),
    (8, "unresolved reviews counted per pipeline as rows change; the claimed and not yet due ones indexed", (
        # The other review gauges counted every unresolved review at each scrape, reading each row: 19 ms at 10 k,
        # 3.5 s at 1 M (a desk months behind), past a scrape's 10 s timeout with a few scrapers. Now the time-free
        # counts (unresolved; of them, with an SLA) are kept by triggers, and what depends on the time is a range
        # of a partial index bounded by traffic, not the backlog: claims whose lease runs (one per reviewer at
        # work) and SLAs not yet due (the reviews of the last SLA period). open = unresolved - claimed; overdue =
        # with an SLA - not yet due (sqlite_reviews.gauges).
        """CREATE TABLE review_backlog (
            pipeline TEXT PRIMARY KEY,
            unresolved INTEGER NOT NULL,            -- resolved = 0
            with_sla INTEGER NOT NULL               -- of them, with an SLA deadline
        ) WITHOUT ROWID""",
        "INSERT INTO review_backlog (pipeline, unresolved, with_sla) SELECT pipeline, count(*),"
        " count(*) FILTER (WHERE sla_deadline_unix_ns > 0) FROM reviews WHERE resolved = 0 GROUP BY pipeline",
        "CREATE INDEX reviews_unresolved_by_lease ON reviews (lease_expires_unix_ns, pipeline) WHERE resolved = 0",
        "CREATE INDEX reviews_unresolved_by_sla ON reviews (sla_deadline_unix_ns, pipeline) WHERE resolved = 0",
        f"""CREATE TRIGGER reviews_backlog_inserted AFTER INSERT ON reviews WHEN NEW.resolved = 0
           BEGIN {_BACKLOG.format(row='NEW', sign='')}; END""",
        f"""CREATE TRIGGER reviews_backlog_changed AFTER UPDATE ON reviews
           WHEN (OLD.resolved = 0) != (NEW.resolved = 0) OR OLD.pipeline IS NOT NEW.pipeline
             OR (OLD.resolved = 0 AND (OLD.sla_deadline_unix_ns > 0) != (NEW.sla_deadline_unix_ns > 0))
           BEGIN
             {_BACKLOG.format(row='OLD', sign='-')};
             {_BACKLOG.format(row='NEW', sign='')};
           END""",
        f"""CREATE TRIGGER reviews_backlog_deleted AFTER DELETE ON reviews WHEN OLD.resolved = 0
           BEGIN {_BACKLOG.format(row='OLD', sign='-')}; END""",
    )),
    (9, "tasks counted per state as rows change (a metrics scrape counted the tasks not final)", (
        # aios_tasks counted the queued, running and waiting tasks over tasks_by_state at each scrape: 255 ms at
        # 1 M tasks waiting for a review desk months behind. Triggers keep the count per state; filled once here.
        """CREATE TABLE task_counts (
            state INTEGER PRIMARY KEY,              -- kernel_pb2.TaskState
            tasks INTEGER NOT NULL
        ) WITHOUT ROWID""",
        "INSERT INTO task_counts (state, tasks) SELECT state, count(*) FROM tasks GROUP BY state",
        f"CREATE TRIGGER tasks_counted_inserted AFTER INSERT ON tasks BEGIN {_TASKS.format(row='NEW', delta='1')}; END",
        f"""CREATE TRIGGER tasks_counted_changed AFTER UPDATE OF state ON tasks WHEN OLD.state != NEW.state
           BEGIN {_TASKS.format(row='OLD', delta='-1')}; {_TASKS.format(row='NEW', delta='1')}; END""",
        f"CREATE TRIGGER tasks_counted_deleted AFTER DELETE ON tasks BEGIN {_TASKS.format(row='OLD', delta='-1')}; END",
    )),
    (10, "reviews by tenant; the waiting ones counted per pipeline and tenant (a page or a claim sorted the backlog)", (
        # At 200,000 waiting, each ClaimNextReview and each page of OPEN or UNRESOLVED reviews sorted the backlog
        # out of reviews_by_filter (ordered by pipeline and tenant, not by position: ~250 ms), a page of every state
        # or RESOLVED for one tenant walked every review kept (40-90 ms), and each page counted its filter's missed
        # SLAs row by row (~150 ms). Every escalated decision stores a row, so a row keeps its index entries and its
        # trigger as before (versions 10-12 of an earlier try, five more entries and a trigger, cost 2.5x a row and
        # were taken back): an index entry ends with the position (rowid), so each range of equal keys is in list
        # order, and a read merges a few such ranges (sqlite_reviews._page_query). reviews_by_filter, which nothing
        # needs then, makes way for reviews_by_tenant; version 8's index of the waiting reviews by lease and
        # pipeline already holds each pipeline's never claimed ones in list order. The waiting reviews' SLA index
        # gains the tenant and their count is kept per pipeline and tenant, so a filter's overdue ones are its
        # count less its reviews not yet due (the last SLA period's), from index entries alone.
        "DROP INDEX IF EXISTS reviews_by_filter",
        "CREATE INDEX reviews_by_tenant ON reviews (tenant, resolved)",
        # Retention's look for withdrawn reviews read reviews_by_filter's resolved = 2 range: without it, every review.
        # (Only withdrawn rows have entries: none is added as a row is stored.)
        "CREATE INDEX reviews_withdrawn_at ON reviews (resolved_unix_ns) WHERE resolved = 2",
        # (``resolved``, 0 in every entry, lets a count read the entries alone: SQLite reads the row for any column a
        # query names that its index lacks, the partial index's own condition included.)
        "DROP INDEX IF EXISTS reviews_unresolved_by_sla",
        "CREATE INDEX reviews_unresolved_by_sla ON reviews (sla_deadline_unix_ns, pipeline, tenant, resolved)"
        " WHERE resolved = 0",
        *(f"DROP TRIGGER IF EXISTS reviews_backlog_{change}" for change in ("inserted", "changed", "deleted")),
        "DROP TABLE IF EXISTS review_backlog",
        """CREATE TABLE review_backlog (
            pipeline TEXT NOT NULL,
            tenant TEXT NOT NULL,
            unresolved INTEGER NOT NULL,            -- resolved = 0
            with_sla INTEGER NOT NULL,              -- of them, with an SLA deadline
            PRIMARY KEY (pipeline, tenant)
        ) WITHOUT ROWID""",
        "INSERT INTO review_backlog (pipeline, tenant, unresolved, with_sla) SELECT pipeline, tenant, count(*),"
        " count(*) FILTER (WHERE sla_deadline_unix_ns > 0) FROM reviews WHERE resolved = 0 GROUP BY pipeline, tenant",
        f"""CREATE TRIGGER reviews_backlog_inserted AFTER INSERT ON reviews WHEN NEW.resolved = 0
           BEGIN {_BACKLOG_BY_TENANT.format(row='NEW', sign='')}; END""",
        f"""CREATE TRIGGER reviews_backlog_changed AFTER UPDATE ON reviews
           WHEN (OLD.resolved = 0) != (NEW.resolved = 0) OR OLD.pipeline IS NOT NEW.pipeline
             OR OLD.tenant IS NOT NEW.tenant
             OR (OLD.resolved = 0 AND (OLD.sla_deadline_unix_ns > 0) != (NEW.sla_deadline_unix_ns > 0))
           BEGIN
             {_BACKLOG_BY_TENANT.format(row='OLD', sign='-')};
             {_BACKLOG_BY_TENANT.format(row='NEW', sign='')};
           END""",
        f"""CREATE TRIGGER reviews_backlog_deleted AFTER DELETE ON reviews WHEN OLD.resolved = 0
           BEGIN {_BACKLOG_BY_TENANT.format(row='OLD', sign='-')}; END""",
    )),
]


def latest_version(migrations=MIGRATIONS) -> int:
    return migrations[-1][0] if migrations else 0


def migrate(conn: sqlite3.Connection, migrations, where: str) -> int:
    """Bring the database to the newest version; returns it."""
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    newest = latest_version(migrations)
    if current > newest:
        from .. import __version__

        raise FailedPrecondition(
            f"{where} has schema version {current}, newer than this kernel's {newest} (aios-kernel {__version__}); "
            "run a kernel at least as new as the one that wrote it, or restore the backup taken before the upgrade "
            "(docs/operations.md, Upgrades and rollbacks)"
        )
    before, applied = current, []
    for version, what, statements in migrations:
        if version <= current:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("PRAGMA user_version").fetchone()[0] >= version:  # another process got here first
                conn.execute("ROLLBACK")
                current = version
                continue
            for statement in statements:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {int(version)}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        current = version
        applied.append(f"{version}: {what}")
    if applied and before > 0:  # (a new file is created at the newest version, not upgraded)
        # Said once, by the start that migrated: an upgrade left no word in the log, so which start upgraded the
        # store, and from what, could not be told when a rollback was refused later.
        log.info("%s upgraded from schema version %d to %d (%s); a kernel older than this one refuses it from now "
                 "on: the way back is the backup taken before the upgrade", where, before, current, "; ".join(applied))
    return current

"""Running cells on an executor: the one skip / run / store / baselines logic of ``fuse bench`` and ``fuse sweep``.

A *cell* is one resolved config (plain data) with its seed.  :func:`run_cells` skips the
cells already stored (unless ``force``), hands the others to an executor as jobs, and
commits each result to the results database as it arrives (an interrupted run loses
nothing that finished).  Baselines (pretrained, individual) are evaluated by one cell per
pools hash while none are stored: in order when the executor runs in this process (a
failing cell hands the baselines to the next one), by the first cell of each pools hash
when jobs run in parallel (if that one fails, the next invocation evaluates them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs


@attrs.frozen
class PlannedCell:
    """One cell to run: a resolved config mapping and the summary stored with it."""

    config: Mapping[str, Any]
    summary: str

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def config_hash(self) -> str:
        from .results_db import config_hash

        return config_hash(self.config)

    @property
    def key(self) -> str:
        return f"{self.config_hash}/{self.seed}"


#: ``on_cell(cell, status, result)``: status ``skipped`` (result ``None``), ``ok`` (``{"report": ...}``) or
#: ``failed`` (``{"error": "Type: message", "duration_s": ...}``)
OnCell = Callable[[PlannedCell, str, "dict | None"], None]


def run_cells(cells: Sequence[PlannedCell], db, executor, *, registry, plugin_manager, source: str,
              benchmark: str | None = None, sweep: str | None = None, force: bool = False, baselines: bool = False,
              on_cell: OnCell | None = None) -> None:
    """Run the cells not stored yet (all with ``force``) on ``executor``; store each result as it arrives.

    In this process (no worker processes) each cell is checked again just before it runs, so
    several ``fuse bench`` runs on one database share its cells instead of repeating them.

    Cells with the same key run once.  ``baselines``: let cells evaluate the pretrained and
    individual models while the database has none for their pools hash (with ``force``: once
    per call).  The executor must be started (and is not stopped) by the caller.
    """
    from fusion_core import provenance

    from .executors import Job, WorkerEnv
    from .results_db import pools_hash, store_failure, store_report

    versions = provenance(plugin_manager)["versions"]
    env = WorkerEnv.from_plugin_manager(plugin_manager) if executor.runs_out_of_process() else None
    pending: dict[str, PlannedCell] = {}
    seen: set[str] = set()
    for cell in cells:
        if cell.key in seen:
            continue
        seen.add(cell.key)
        if not force and db.is_done(cell.config_hash, cell.seed):
            if on_cell:
                on_cell(cell, "skipped", None)
            continue
        pending[cell.key] = cell
    owed = {pools_hash(c.config) for c in pending.values() if baselines and (force or not db.has_baselines(pools_hash(c.config)))}

    def job_of(cell: PlannedCell) -> Job:
        pools = pools_hash(cell.config)
        evaluate = pools in owed
        if evaluate and env is not None:  # parallel: only the first cell of this pools hash
            owed.discard(pools)
        return Job(key=cell.key, config={**cell.config, "evaluate_inputs": evaluate} if baselines else dict(cell.config))

    def store(job: Job, result: dict) -> None:
        cell = pending[job.key]
        if result["status"] == "ok":
            report = result["report"]
            store_report(db, report, job.config, summary=cell.summary, source=source, benchmark=benchmark, sweep=sweep)
            if any(k in report.get("results", {}) for k in ("pretrained", "individual")):
                owed.discard(pools_hash(job.config))
        else:
            store_failure(db, job.config, result["error"], summary=cell.summary, source=source, benchmark=benchmark,
                          sweep=sweep, versions=versions, duration_s=result.get("duration_s"))
        if on_cell:
            on_cell(cell, result["status"], result)

    if env is None:  # in this process: one job at a time, so each decides its baselines when it starts
        for cell in pending.values():
            if not force and db.is_done(cell.config_hash, cell.seed):  # stored meanwhile by another process on this database
                if on_cell:
                    on_cell(cell, "skipped", None)
                continue
            executor.map([job_of(cell)], None, store, plugin_manager=plugin_manager, registry=registry)
    elif pending:
        executor.map([job_of(cell) for cell in pending.values()], env, store, plugin_manager=plugin_manager, registry=registry)

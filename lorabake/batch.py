"""`lorabake bake`: run a recipe's jobs (or one shard of them), resumably.

Order of work, so that nothing is written unless the whole batch can start:
1. expand the recipe, keep this shard's jobs;
2. per job, from headers only: is the output already made (skip), someone else's file (error
   without --force) or to do; plan every job to do (architecture, matches, shapes);
3. check pins by hashing (not in --dry-run, which reads headers only);
4. bake: the jobs sharing a base in one streamed read of it (up to `fan_out` outputs side by
   side, `fanout.merge_many`); each output is written to a temporary file and renamed when
   whole, so an interrupted batch leaves finished outputs and no partial one.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from lorabake import provenance, shards
from lorabake.errors import LorabakeError
from lorabake.jobs import Job
from lorabake.recipe import Recipe, load_recipe
from lorabake.shards import Shard


@dataclass(frozen=True)
class BatchOptions:
    recipe: str
    shard: Shard | None = None
    force: bool = False
    dry_run: bool = False
    device: str = "auto"
    fan_out: int = 8  # outputs written side by side from one read of a base


@dataclass
class JobReport:
    job: Job
    status: str  # "baked" | "skipped" | "planned" | "exists"
    reason: str = ""
    applied: int = 0  # modules, over all LoRAs
    skipped_modules: int = 0
    unmatched: list[str] = field(default_factory=list)
    tensors_changed: int = 0
    seconds: float = 0.0
    bytes_written: int = 0
    sha256: str | None = None
    base_bytes: int = 0

    @property
    def autov2(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None


@dataclass
class BatchReport:
    recipe: Recipe
    shard: Shard | None
    dry_run: bool
    jobs: list[JobReport]
    seconds: float = 0.0
    base_reads: int = 0
    removed_temps: list[str] = field(default_factory=list)


class BatchEvents:
    """What the batch tells its caller as it goes (the CLI draws progress from it); no-ops here."""

    def batch_started(self, total_bytes: int, jobs: int) -> None:
        """`total_bytes`: base bytes the batch will read."""

    def base_started(self, base: str, nbytes: int, outputs: int) -> None:
        """One streamed read of `base` begins, feeding `outputs` outputs."""

    def advance(self, nbytes: int) -> None:
        """`nbytes` more of the current base have been read and baked."""

    def job_done(self, row: JobReport) -> None:
        """A job finished (baked or skipped)."""


def select_jobs(recipe: Recipe, shard: Shard | None) -> list[Job]:
    if shard is None:
        return list(recipe.jobs)
    return shards.assign(recipe.jobs, shard.count, shards.path_size)[shard.index]


def run_batch(opts: BatchOptions, *, events: BatchEvents | None = None) -> BatchReport:
    events = events or BatchEvents()
    started = time.perf_counter()
    recipe = load_recipe(opts.recipe)
    jobs = select_jobs(recipe, opts.shard)
    report = BatchReport(recipe=recipe, shard=opts.shard, dry_run=opts.dry_run, jobs=[])
    rows, todo = _triage(jobs, opts, report)
    plans = {job.index: _plan(job, opts) for job in todo}
    for job in todo:
        _fill_plan(rows[job.index], plans[job.index])
    if not opts.dry_run and todo:
        pins = {p.resolved: p for job in todo for p in job.pins}
        provenance.verify_pins(list(pins.values()))
        groups = _by_base(todo, opts.fan_out)
        events.batch_started(sum(rows[g[0].index].base_bytes for g in groups), len(todo))
        for job in rows.values():
            if job.status == "skipped":
                events.job_done(job)
        for group in groups:
            report.base_reads += _bake_group(group, opts, rows, report, events)
    report.jobs = [rows[j.index] for j in jobs]
    report.seconds = time.perf_counter() - started
    return report


def _triage(jobs: list[Job], opts: BatchOptions, report: BatchReport) -> tuple[dict[int, JobReport], list[Job]]:
    """Skip what is made, refuse what is someone else's (before anything is written), keep the rest."""
    rows: dict[int, JobReport] = {}
    todo: list[Job] = []
    refused: list[LorabakeError] = []
    for job in jobs:
        _check_inputs(job)
        existing = provenance.existing_output(job, provenance.fingerprint(job))
        if existing.state == "done":  # --force overwrites other files, never redoes finished work
            rows[job.index] = JobReport(job, "skipped", existing.reason)
            continue
        status = "planned" if opts.dry_run else "todo"
        if existing.state == "other" and not opts.force:
            if not opts.dry_run:
                refused.append(provenance.refuse_existing(job, existing))
            status = "exists" if opts.dry_run else status
        reason = f"overwriting: {existing.reason}" if existing.state != "absent" else ""
        rows[job.index] = JobReport(job, status, reason if status != "exists" else existing.reason)
        todo.append(job)
    if refused:
        first = refused[0]
        if len(refused) > 1:
            first.message += f"; and {len(refused) - 1} more output(s) exist"
        raise first
    return rows, todo


def _check_inputs(job: Job) -> None:
    from lorabake.st_reader import check_input_path

    for use in job.inputs:
        if not os.path.isdir(use.resolved):
            check_input_path(use.resolved)


def _merge_options(job: Job, opts: BatchOptions, *, dry_run: bool, extra=()):
    from lorabake import ops
    from lorabake.plan import LoraSpec

    return ops.MergeOptions(
        base=job.base.resolved,
        loras=tuple(LoraSpec(path=u.resolved, strength=u.strength, te_strength=u.te_strength, blocks=u.blocks) for u in job.loras),
        output=None if dry_run else job.output_path,
        dtype=job.dtype,
        quant=job.quant,
        saturate=job.saturate,
        device=opts.device,
        rounding=job.rounding,
        allow_unmatched=job.allow_unmatched,
        dry_run=dry_run,
        force=True,  # what is at the path was judged by `_triage`
        extra_metadata=tuple(extra),
    )


def _plan(job: Job, opts: BatchOptions):
    """The job's merge plan from headers (raises on an architecture mismatch or unmatched modules)."""
    from lorabake import ops

    try:
        return ops.merge(_merge_options(job, opts, dry_run=True))
    except LorabakeError as exc:
        exc.message = f"{job.where}: {exc.message}"
        raise


def _fill_plan(row: JobReport, result) -> None:
    plan = result.plan
    row.base_bytes = plan.base.data_size
    for lp in plan.loras:
        counts = lp.counts()
        row.applied += sum(counts.get("applied", {}).values())
        row.skipped_modules += sum(counts.get("skipped", {}).values())
        row.unmatched += [o.stem for o in lp.by_status("unmatched")]


def _by_base(todo: list[Job], fan_out: int) -> list[list[Job]]:
    """Jobs sharing a base, in chunks of at most `fan_out` (one read of the base each)."""
    groups: dict[str, list[Job]] = {}
    for job in todo:
        groups.setdefault(job.base.resolved, []).append(job)
    size = max(1, fan_out)
    out = []
    for g in groups.values():
        plain = [j for j in g if not j.bakes_alone]
        out += [plain[i : i + size] for i in range(0, len(plain), size)]
        out += [[j] for j in g if j.bakes_alone]
    return out


def _bake_group(group: list[Job], opts: BatchOptions, rows: dict[int, JobReport], report: BatchReport,
                events: BatchEvents) -> int:
    """Bake the jobs of one base in one streamed read of it; returns the number of reads (1)."""
    from lorabake import fanout

    specs = []
    for job in group:
        report.removed_temps += provenance.remove_stale_temps(job.output_path)
        os.makedirs(os.path.dirname(job.output_path), exist_ok=True)
        extra = provenance.output_metadata(job, provenance.fingerprint(job))
        specs.append(_merge_options(job, opts, dry_run=False, extra=extra))
    events.base_started(group[0].base.resolved, rows[group[0].index].base_bytes, len(group))
    try:
        if group[0].bakes_alone:
            from lorabake import ops

            results = [ops.merge(specs[0], progress=events.advance)]
        else:
            results = fanout.merge_many(specs, progress=events.advance)
    except LorabakeError as exc:
        exc.message = f"{', '.join(j.where for j in group)}: {exc.message}"
        raise
    for job, result in zip(group, results):
        row = rows[job.index]
        row.status = "baked"
        row.tensors_changed = result.tensors_changed
        row.seconds = result.seconds
        row.bytes_written = result.bytes_written
        row.sha256 = result.sha256
        events.job_done(row)
    return 1

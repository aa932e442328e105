"""The batch report: progress while baking (rich bars on a terminal, plain lines otherwise), the
per-job table and totals, and the `--json` document."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from lorabake.batch import BatchEvents, BatchReport, JobReport
from lorabake.render import sanitize


class PlainEvents(BatchEvents):
    """One line per finished job on stderr (logs of Slurm, Kubernetes and CI read well)."""

    def __init__(self, total_jobs: int = 0) -> None:
        self.done = 0
        self.total = total_jobs

    def batch_started(self, total_bytes: int, jobs: int) -> None:
        self.total = jobs
        print(f"baking {jobs} job(s), {_size(total_bytes)} of base to read", file=sys.stderr, flush=True)

    def job_done(self, row: JobReport) -> None:
        if row.status == "skipped":
            print(f"skipped {_one(row.job.output)}: {row.reason}", file=sys.stderr, flush=True)
            return
        self.done += 1
        print(f"[{self.done}/{self.total}] {_one(row.job.output)}: {row.tensors_changed} tensors changed, "
              f"{_size(row.bytes_written)} in {row.seconds:.1f} s, AutoV2 {row.autov2}", file=sys.stderr, flush=True)


class RichEvents(BatchEvents):
    """Two bars on a terminal: the whole batch, and the base being read."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), console=Console(stderr=True, emoji=False), transient=True,
        )
        self.batch = None
        self.base = None

    def batch_started(self, total_bytes: int, jobs: int) -> None:
        self.progress.start()
        self.batch = self.progress.add_task(f"batch ({jobs} jobs)", total=total_bytes)

    def base_started(self, base: str, nbytes: int, outputs: int) -> None:
        if self.base is not None:
            self.progress.remove_task(self.base)
        label = sanitize(base.rsplit("/", 1)[-1], 40, one_line=True).replace("[", r"\[")
        self.base = self.progress.add_task(f"{label} → {outputs} output(s)", total=nbytes)

    def advance(self, nbytes: int) -> None:
        if self.batch is not None:
            self.progress.advance(self.batch, nbytes)
        if self.base is not None:
            self.progress.advance(self.base, nbytes)

    def job_done(self, row: JobReport) -> None:
        if row.status == "baked":
            self.progress.console.print(f"baked {_esc(row.job.output)} ({row.seconds:.1f} s)")

    def stop(self) -> None:
        self.progress.stop()


def job_json(row: JobReport) -> dict:
    job = row.job
    return {
        "index": job.index,
        "entry": job.where,
        "output": job.output,
        "base": job.base.text,
        "loras": [u.lora_text for u in job.loras],
        "dtype": job.dtype,
        "status": row.status,
        "reason": row.reason,
        "recipe_sha256": job.entry_sha256,
        "modules_applied": row.applied,
        "modules_skipped": row.skipped_modules,
        "modules_unmatched": row.unmatched,
        "tensors_changed": row.tensors_changed,
        "seconds": round(row.seconds, 3),
        "bytes_written": row.bytes_written,
        "sha256": row.sha256,
        "autov2": row.autov2,
    }


def batch_json(report: BatchReport) -> dict:
    rows = report.jobs
    return {
        "recipe": report.recipe.path,
        "shard": str(report.shard) if report.shard else None,
        "dry_run": report.dry_run,
        "jobs": [job_json(r) for r in rows],
        "totals": {
            "jobs": len(rows),
            "baked": sum(r.status == "baked" for r in rows),
            "skipped": sum(r.status == "skipped" for r in rows),
            "planned": sum(r.status in ("planned", "exists") for r in rows),
            "tensors_changed": sum(r.tensors_changed for r in rows),
            "bytes_written": sum(r.bytes_written for r in rows),
            "base_reads": report.base_reads,
            "seconds": round(report.seconds, 3),
        },
        "removed_partial_files": report.removed_temps,
    }


def print_batch(report: BatchReport) -> None:
    doc = batch_json(report)
    head = f"recipe {_one(doc['recipe'])}" + (f", shard {doc['shard']}" if doc["shard"] else "")
    if not doc["jobs"]:
        print(f"{head}: no jobs in this shard")
        return
    tty = sys.stdout.isatty()
    if tty:
        table = Table("output", "status", "modules", "tensors", "seconds", "bytes", "AutoV2", title=_esc(head),
                      title_justify="left")
        for j in doc["jobs"]:
            table.add_row(_esc(j["output"]), _status(j), _modules(j), str(j["tensors_changed"]),
                          f"{j['seconds']:.1f}", _size(j["bytes_written"]), j["autov2"] or "")
        Console(emoji=False).print(table)  # a `:skull:` in a file name is text
    else:
        print(f"{head}:")
        for j in doc["jobs"]:
            line = f"  {_one(j['output'])}: {_status(j)}"
            if j["status"] != "skipped":
                line += f"; {_modules(j)}"
            if j["status"] == "baked":
                line += (f"; tensors changed {j['tensors_changed']}; {j['seconds']:.1f} s; {j['bytes_written']} bytes; "
                         f"sha256 {j['sha256']}; AutoV2 {j['autov2']}")
            print(line)
    t = doc["totals"]
    print(f"total: {t['jobs']} job(s): {t['baked']} baked, {t['skipped']} skipped, {t['planned']} planned; "
          f"{t['tensors_changed']} tensors changed; {_size(t['bytes_written'])} written; "
          f"{t['base_reads']} base read(s); {t['seconds']:.1f} s")
    for name in doc["removed_partial_files"]:
        print(f"removed a partial file left by an interrupted run: {_one(name)}")


def _status(j: dict) -> str:
    return j["status"] + (f" ({_one(j['reason'])})" if j["reason"] else "")


def _modules(j: dict) -> str:
    text = f"{j['modules_applied']} modules applied"
    if j["modules_skipped"]:
        text += f", {j['modules_skipped']} skipped"
    if j["modules_unmatched"]:
        text += f", {len(j['modules_unmatched'])} unmatched"
    return text


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _one(text: object) -> str:
    return sanitize(text, 300, one_line=True)


def _esc(text: object) -> str:
    return _one(text).replace("[", r"\[")

"""Split a batch into N shards without coordination: every process computes the same split.

The split depends only on the recipe and the sizes of its base files, so shard i of N run on
any machine picks the same jobs. Jobs sharing a base stay in one shard (the base is read once)
unless there are fewer bases than shards, in which case the largest groups are halved until
every shard can get work. Groups then go, largest first, to the least loaded shard
(ties: lowest shard index). Shard indices are 0-based: `--shard 0/3`, `1/3`, `2/3`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from lorabake.errors import UsageError
from lorabake.jobs import Job


@dataclass(frozen=True)
class Shard:
    index: int
    count: int
    source: str = "--shard"  # where i and N came from (an environment variable for --shard auto)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


# (index variable, count variable, first-index variable, step variable) per engine, in the order
# tried. Slurm array task ids need not start at 0 (`--array=1-3`) and may step (`--array=0-10:2`).
# A Kubernetes indexed Job sets JOB_COMPLETION_INDEX but not the completion count: give it as
# LORABAKE_SHARD_COUNT in the Job's env.
ENGINES = (
    ("LORABAKE_SHARD_INDEX", "LORABAKE_SHARD_COUNT", None, None),
    ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP"),
    ("JOB_COMPLETION_INDEX", "LORABAKE_SHARD_COUNT", None, None),
)


def parse_shard(text: str, env: Mapping[str, str] | None = None) -> Shard:
    """`i/N` (0 ≤ i < N) or `auto` (from the environment of a Slurm array, a Kubernetes indexed
    Job, or LORABAKE_SHARD_INDEX/LORABAKE_SHARD_COUNT set by a CI matrix)."""
    if text == "auto":
        return _from_env(os.environ if env is None else env)
    index, sep, count = text.partition("/")
    if not sep:
        raise UsageError(f"--shard {text!r}: write i/N (e.g. 0/3) or auto")
    return _make(index, count, f"--shard {text}")


def _from_env(env: Mapping[str, str]) -> Shard:
    for index_var, count_var, min_var, step_var in ENGINES:
        if index_var not in env:
            continue
        if count_var not in env:
            raise UsageError(f"--shard auto: {index_var} is set but {count_var} is not",
                             hint=f"set {count_var} to the number of shards")
        index = _int(env[index_var], index_var)
        if min_var and min_var in env:
            step = _int(env.get(step_var, "1") or "1", step_var) if step_var else 1
            offset = index - _int(env[min_var], min_var)
            if step < 1 or offset % step:
                raise UsageError(f"--shard auto: {index_var}={index} is not on the array's {min_var}/{step_var} grid")
            index = offset // step
        return _make(str(index), env[count_var], f"{index_var}/{count_var}")
    names = ", ".join(sorted({v for row in ENGINES for v in row[:2]}))
    raise UsageError(f"--shard auto: none of {names} is set", hint="pass --shard i/N instead")


def _make(index_text: str, count_text: str, source: str) -> Shard:
    index, count = _int(index_text, source), _int(count_text, source)
    if count < 1:
        raise UsageError(f"{source}: the number of shards must be at least 1")
    if not 0 <= index < count:
        raise UsageError(f"{source}: shard index {index} is outside 0..{count - 1} (indices start at 0)")
    return Shard(index=index, count=count, source=source)


def _int(text: str, what: str) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise UsageError(f"{what}: {text!r} is not a whole number") from None


def assign(jobs: Sequence[Job], count: int, size_of: Callable[[str], int]) -> list[list[Job]]:
    """The jobs of each of `count` shards, each in recipe order. Deterministic, see module doc."""
    groups: dict[str, list[Job]] = {}
    for job in sorted(jobs, key=lambda j: j.index):
        groups.setdefault(job.base.resolved, []).append(job)
    sizes = {base: max(1, size_of(base)) for base in groups}
    parts = [(base, members) for base, members in groups.items()]
    while len(parts) < count:
        splittable = [p for p in parts if len(p[1]) > 1]
        if not splittable:
            break
        widest = max(splittable, key=lambda p: (_cost(sizes[p[0]], p[1]), -p[1][0].index))
        at = parts.index(widest)
        half = (len(widest[1]) + 1) // 2
        parts[at : at + 1] = [(widest[0], widest[1][:half]), (widest[0], widest[1][half:])]
    # Largest first; equal costs in recipe order.
    parts.sort(key=lambda p: (-_cost(sizes[p[0]], p[1]), p[1][0].index))
    loads = [0] * count
    shards: list[list[Job]] = [[] for _ in range(count)]
    for base, members in parts:
        target = min(range(count), key=lambda i: (loads[i], i))
        loads[target] += _cost(sizes[base], members)
        shards[target] += members
    return [sorted(s, key=lambda j: j.index) for s in shards]


def _cost(base_size: int, members: Sequence[Job]) -> int:
    """One read of the base plus one write per output (an output is about the base's size)."""
    return base_size * (1 + len(members))


def path_size(path: str) -> int:
    """Bytes of a base on disk: a file, or every .safetensors file under a folder or beside an index."""
    if path.endswith(".index.json") and os.path.isfile(path):
        path = os.path.dirname(path) or "."
    if os.path.isdir(path):
        total = 0
        for root, _dirs, files in os.walk(path):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in sorted(files) if f.endswith(".safetensors"))
        return total
    try:
        return os.path.getsize(path)
    except OSError:
        raise UsageError("a base named by the recipe is missing; every shard needs every base's size "
                         "to compute the same split", path=path) from None

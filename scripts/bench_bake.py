#!/usr/bin/env python3
"""`lorabake bake` against the `lorabake merge` runs it replaces, and the batch guarantees.

Builds (once, in $LORABAKE_BENCH_CACHE, default $TMPDIR/lorabake-bench-bake) two SD1.5-shaped
bases with real names and real shapes for a subset of blocks (UNet input blocks 1-5, the first
text-encoder layers; random values, fp16), three kohya LoRAs over every attention/feed-forward
module there, and a recipe of 2 bases × 3 LoRA sets × 2 strengths = 12 outputs. Then, in one run:

  merge x12     the 12 `lorabake merge` commands the recipe replaces, one process each
  bake          `lorabake bake recipe.toml`, one process; bytes read per base file counted
                in-process by a second, untimed run (`--count-reads` of this script)
  shards        `--shard i/3` in three processes at once, into a fresh folder
  kill/rerun    `lorabake bake` SIGKILLed once an output is finished and another is being
                written, then run again

and checks: each bake output equals its merge output (data section byte for byte, metadata equal
but for the recipe keys); the three shards write exactly the 12 files, byte-equal; the rerun
after the kill finishes with no temporary file left anywhere. Prints a table and the ratio
bake / (sum of merges). The machine is shared: read ratios within one run, not absolute times.

  python scripts/bench_bake.py            # ~90 MB bases
  python scripts/bench_bake.py --smoke    # tiny blocks, seconds (used by the test suite)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from lorabake import dtypes  # noqa: E402
from lorabake.st_header import read_header  # noqa: E402
from lorabake.st_writer import SafetensorsWriter  # noqa: E402
from tests.archfix import arch_tensors, select  # noqa: E402

CACHE = os.environ.get("LORABAKE_BENCH_CACHE", os.path.join(tempfile.gettempdir(), "lorabake-bench-bake"))
BLOCKS = {
    "full": [r"model\.diffusion_model\.input_blocks\.[1-5]\.", r"text_model\.encoder\.layers\.[01]\.",
             r"embeddings\.position_ids"],
    "smoke": [r"model\.diffusion_model\.input_blocks\.1\.1\.", r"text_model\.encoder\.layers\.0\.self_attn",
              r"embeddings\.position_ids"],
}
RECIPE = """
[[matrix]]
bases = { a = "bases/a.safetensors", b = "bases/b.safetensors" }
loras = { r16 = ["loras/r16.safetensors"], r64 = ["loras/r64.safetensors:1.0:0.5"], both = ["loras/r16.safetensors:0.5", "loras/r64.safetensors"] }
strengths = [0.5, 1.0]
output = "out/{base}-{loras}-{strength}.safetensors"
"""
RECIPE_KEYS = ("lorabake.recipe", "lorabake.recipe_sha256", "lorabake.inputs")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(work: str, size: str) -> str:
    """Bases, LoRAs and the recipe under `work` (kept between runs)."""
    bench = _bench_module()
    names = select("sd1", BLOCKS[size])
    spec = arch_tensors("sd1")
    os.makedirs(os.path.join(work, "bases"), exist_ok=True)
    os.makedirs(os.path.join(work, "loras"), exist_ok=True)
    for seed, base in enumerate(("a", "b")):
        path = os.path.join(work, "bases", f"{base}.safetensors")
        if os.path.exists(path):
            continue
        noise = bench._Noise(seed)
        entries = [(n, "F16" if spec[n]["dtype"].startswith("float") else dtypes.tag_of(getattr(torch, spec[n]["dtype"])),
                    tuple(spec[n]["shape"])) for n in names]
        with SafetensorsWriter(path, entries, {}, force=True) as w:
            for n, tag, shape in entries:
                dt = dtypes.torch_dtype(tag)
                w.write(n, noise.take(shape, dt) if dt.is_floating_point else torch.zeros(shape, dtype=dt))
    targets = bench.lora_targets("sd1", os.path.join(work, "bases", "a.safetensors"))
    bench.build_lora(os.path.join(work, "loras", "r16.safetensors"), targets, naming="kohya", rank=16, conv=False, seed=1)
    bench.build_lora(os.path.join(work, "loras", "r64.safetensors"), targets, naming="peft", rank=64, conv=False, seed=2)
    recipe = os.path.join(work, "recipe.toml")
    with open(recipe, "w", encoding="utf-8") as fh:
        fh.write(RECIPE)
    return recipe


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("lorabake_bench", os.path.join(ROOT, "scripts", "bench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cli(args: list[str], **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-m", "lorabake", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


PEAK_RSS_MIB: dict[str, float] = {}


def timed(args: list[str]) -> tuple[float, str]:
    """Wall seconds and stdout of one `lorabake` process; its peak RSS (wait4) goes to PEAK_RSS_MIB."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "lorabake", *args], env=dict(os.environ, PYTHONPATH=ROOT),
                                stdout=subprocess.PIPE, stderr=err, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        if status:
            err.seek(0)
            raise SystemExit(f"lorabake {' '.join(args)} failed: {err.read()}")
    PEAK_RSS_MIB[args[0]] = max(PEAK_RSS_MIB.get(args[0], 0.0), usage.ru_maxrss / 1024)
    return seconds, out


def outputs(folder: str) -> list[str]:
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def data_and_meta(path: str) -> tuple[bytes, dict]:
    header = read_header(path)
    with open(path, "rb") as fh:
        fh.seek(header.data_offset)
        return fh.read(), {k: v for k, v in header.metadata.items() if k not in RECIPE_KEYS}


def count_reads(recipe: str) -> dict[str, float]:
    """Bake in this process with every tensor read counted: base file -> bytes read / data size."""
    from lorabake import batch, st_reader

    counted: dict[str, int] = {}
    original = st_reader.SafetensorsReader.read_into

    def counting(self, name, view):
        path = self.shard_of(name).path
        counted[path] = counted.get(path, 0) + len(view)
        return original(self, name, view)

    st_reader.SafetensorsReader.read_into = counting
    try:
        batch.run_batch(batch.BatchOptions(recipe=recipe))
    finally:
        st_reader.SafetensorsReader.read_into = original
    folder = os.path.dirname(recipe)
    return {os.path.relpath(p, folder): n / read_header(p).data_size for p, n in counted.items() if "/bases/" in p}


def kill_and_rerun(recipe: str, out_dir: str) -> dict:
    proc = cli(["bake", recipe])
    finished: list[str] = []
    while proc.poll() is None:
        names = outputs(out_dir)
        finished = [n for n in names if not n.startswith(".")]
        # an output is finished, so the next is being written (its temp file may be anonymous, O_TMPFILE)
        if finished:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.communicate()
    left_behind = [n for n in outputs(out_dir) if n.startswith(".")]
    seconds, out = timed(["bake", recipe, "--json"])
    doc = json.loads(out)
    return {"finished_before_kill": len(finished), "partial_files_after_kill": len(left_behind),
            "rerun_baked": doc["totals"]["baked"], "rerun_skipped": doc["totals"]["skipped"],
            "temp_files_after_rerun": len([n for n in outputs(out_dir) if n.startswith(".")]),
            "rerun_s": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny blocks, seconds")
    ap.add_argument("--json-out", help="also write the results here")
    ap.add_argument("--count-reads", metavar="RECIPE", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.count_reads:
        print(json.dumps(count_reads(args.count_reads)))
        return 0
    size = "smoke" if args.smoke else "full"
    work = os.path.join(CACHE, size)
    recipe = build(work, size)
    from lorabake.recipe import load_recipe

    jobs = load_recipe(recipe).jobs
    runs = {name: os.path.join(work, name) for name in ("merge", "bake", "shards", "killed", "counted")}
    for folder in runs.values():
        shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(os.path.join(work, "out"), ignore_errors=True)
    for name in ("bake", "shards", "killed", "counted"):  # a recipe per run, so each writes its own out/
        os.makedirs(runs[name])
        for sub in ("bases", "loras"):
            os.symlink(os.path.join(work, sub), os.path.join(runs[name], sub))
        shutil.copy(recipe, runs[name])
    os.makedirs(runs["merge"])
    for path in jobs[0].inputs:  # warm the page cache for everyone alike
        with open(path.resolved, "rb") as fh:
            while fh.read(1 << 24):
                pass

    log("merge x12 ...")
    merge_s = 0.0
    for job in jobs:
        cmd = ["merge", job.base.resolved, "-o", os.path.join(runs["merge"], os.path.basename(job.output_path))]
        for u in job.loras:
            cmd += ["--lora", f"{u.resolved}:{u.strength!r}" + (f":{u.te_strength!r}" if u.te_strength is not None else "")]
        merge_s += timed(cmd)[0]
    log("bake ...")
    bake_s, out = timed(["bake", os.path.join(runs["bake"], "recipe.toml"), "--json"])
    base_reads = json.loads(out)["totals"]["base_reads"]
    baked = os.path.join(runs["bake"], "out")
    identical = sum(data_and_meta(os.path.join(baked, n)) == data_and_meta(os.path.join(runs["merge"], n))
                    for n in outputs(runs["merge"]))
    log("shards ...")
    started = time.perf_counter()
    procs = [cli(["bake", os.path.join(runs["shards"], "recipe.toml"), "--shard", f"{i}/3"]) for i in range(3)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"shard failed: {err}")
    shards_s = time.perf_counter() - started
    shard_out = os.path.join(runs["shards"], "out")
    shards_same = outputs(shard_out) == outputs(baked) and all(
        open(os.path.join(shard_out, n), "rb").read() == open(os.path.join(baked, n), "rb").read() for n in outputs(baked))
    log("kill and rerun ...")
    killed = kill_and_rerun(os.path.join(runs["killed"], "recipe.toml"), os.path.join(runs["killed"], "out"))
    killed_out = os.path.join(runs["killed"], "out")
    killed["same_12_files"] = outputs(killed_out) == outputs(baked) and all(
        open(os.path.join(killed_out, n), "rb").read() == open(os.path.join(baked, n), "rb").read() for n in outputs(baked))
    reads = json.loads(subprocess.run([sys.executable, os.path.abspath(__file__), "--count-reads",
                                       os.path.join(runs["counted"], "recipe.toml")], capture_output=True, text=True,
                                      check=True, env=dict(os.environ, PYTHONPATH=ROOT)).stdout)

    base_mib = sum(read_header(os.path.join(work, "bases", f"{b}.safetensors")).file_size for b in "ab") / 2 / 2**20
    result = {
        "base_mib": round(base_mib, 1), "jobs": len(jobs), "merge_x12_s": round(merge_s, 2), "bake_s": round(bake_s, 2),
        "ratio": round(bake_s / merge_s, 3), "identical_to_merge": identical, "base_reads": base_reads,
        "read_per_base": reads, "shards_3_processes_s": round(shards_s, 2), "shards_same_12_files": shards_same,
        "killed": killed, "peak_rss_mib": PEAK_RSS_MIB, "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
    }
    print(f"| case | seconds | notes |\n|---|---|---|\n"
          f"| merge x{len(jobs)} (one process each) | {merge_s:.2f} | base {base_mib:.0f} MiB each; "
          f"peak RSS {PEAK_RSS_MIB['merge']:.0f} MiB |\n"
          f"| bake (one process) | {bake_s:.2f} | {result['ratio']:.2f} × the merges; {identical}/{len(jobs)} identical; "
          f"peak RSS {PEAK_RSS_MIB['bake']:.0f} MiB; {base_reads} base reads; bytes read / base size: "
          + ", ".join(f"{k} {v:.2f}" for k, v in sorted(reads.items())) + " |\n"
          f"| bake --shard i/3, 3 processes | {shards_s:.2f} | same {len(jobs)} files and nothing else: {shards_same} |\n"
          f"| bake killed, rerun | {killed['rerun_s']:.2f} | {killed['finished_before_kill']} finished at the kill, "
          f"{killed['partial_files_after_kill']} partial left, rerun baked {killed['rerun_baked']} skipped "
          f"{killed['rerun_skipped']}, {killed['temp_files_after_rerun']} temp files after, same files: "
          f"{killed['same_12_files']} |")
    print(f"\nload average during the run: {result['loadavg']} on {result['cpus']} CPUs (shared machine)")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""Benchmarks: `lorabake merge` against the physical limit (`cp`) and a naive load-everything merge.

Builds full-size checkpoints (real names and shapes from tests/data/arch, random values) once, in a
cache outside the repository ($LORABAKE_BENCH_CACHE, default $TMPDIR/lorabake-bench), and LoRAs over
every attention and feed-forward module the trainers target: kohya r16 (+ 3x3 conv LoCon), PEFT r64,
kohya r128, PEFT r128. Then, in one run, each case repeated (min and median):

  cp BASE OUT            the I/O floor (no fsync), and `cp` + `sync OUT` (same durability as ours)
  lorabake merge         with 1, 2 and 4 LoRAs (fsyncs the output, hashes it while writing)
  naive merge            safetensors load_file, add, save_file (whole model in RAM, no fsync)
  lorabake inspect       header only
  lorabake extract       base vs the 1-LoRA merge, once; its factorisation against kohya's full SVD
                         comes from scripts/bench_extract.py's JSON (reused, not re-run for long)

Page cache: the inputs are read once untimed first, so every case runs warm (the base is a memory
copy for all of them); `sync` runs (untimed) before each timed case so no case pays for an earlier
one's writeback. Peak RSS is the child's ru_maxrss from wait4 (its VmHWM, waited-for children in).
Cases run interleaved round by round, so a noisy neighbour hurts all of them alike.

  python scripts/bench.py                 # SD1.5 + SDXL, 3 repeats
  python scripts/bench.py --flux          # also the 23 GB Flux DiT (naive skipped: needs > 24 GB RAM)
  python scripts/bench.py --smoke         # tiny shapes (every dim / 16), seconds
Prints a markdown table and writes JSON (--json-out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lorabake import dtypes  # noqa: E402
from lorabake.arch import FAMILIES  # noqa: E402
from lorabake.detect import detect_checkpoint  # noqa: E402
from lorabake.extract import kohya_modules  # noqa: E402
from lorabake.keymap import build_keymap  # noqa: E402
from lorabake.st_reader import SafetensorsReader  # noqa: E402
from lorabake.st_writer import SafetensorsWriter  # noqa: E402
from tests.archfix import arch_tensors  # noqa: E402

CACHE = os.environ.get("LORABAKE_BENCH_CACHE", os.path.join(tempfile.gettempdir(), "lorabake-bench"))
UNET_ROOT = "model.diffusion_model."
DTYPE = {"sd1": torch.float16, "sdxl": torch.float16, "flux": torch.bfloat16}
# (naming, rank, LoCon on 3x3 convs): merge xN uses the first N
LORAS = [("kohya", 16, True), ("peft", 64, False), ("kohya", 128, False), ("peft", 128, False)]
NAMES = {"sd1": "SD1.5 fp16", "sdxl": "SDXL fp16", "flux": "Flux.1 DiT bf16"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- inputs ----------------------------------------------------------------------------------------
class _Noise:
    """Cheap random values: slices of one randn pool at random offsets (randn per tensor is minutes)."""

    def __init__(self, seed: int, size: int = 1 << 22) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(size, generator=self.gen) * 0.02

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
        n = math.prod(shape)
        size = self.pool.numel()
        start = int(torch.randint(0, size, (1,), generator=self.gen))
        reps = (start + n + size - 1) // size
        flat = (self.pool.repeat(reps) if reps > 1 else self.pool)[start : start + n]
        return (flat * scale if scale != 1.0 else flat).to(dtype).reshape(shape)


def build_base(arch: str, path: str, *, scale_down: int = 1) -> None:
    """The whole checkpoint (Flux: the diffusion model only), streamed through our writer."""
    if os.path.exists(path):
        return
    spec = arch_tensors(arch, include_optional=False)
    if arch == "flux":
        spec = {k: v for k, v in spec.items() if v["component"] == "diffuser"}
    entries = []
    for name, e in spec.items():
        shape = tuple(max(1, d // scale_down) for d in e["shape"])
        dtype = DTYPE[arch] if e["dtype"].startswith(("float", "bfloat")) else getattr(torch, e["dtype"])
        entries.append((name, dtypes.tag_of(dtype), shape))
    log(f"building {path} ({len(entries)} tensors, once)")
    noise = _Noise(0)
    with SafetensorsWriter(path, entries, {"bench": arch}, force=True) as w:
        for name, tag, shape in entries:
            dt = dtypes.torch_dtype(tag)
            w.write(name, noise.take(shape, dt) if dt.is_floating_point else torch.zeros(shape, dtype=dt))


def lora_targets(arch: str, base_path: str) -> list[tuple[str, str, str | None, tuple[int, ...], bool]]:
    """(base key, kohya stem, PEFT stem, module shape, is 3x3 conv) of every trainer-targeted module."""
    with SafetensorsReader(base_path) as r:
        tensors = dict(r.tensors)
    km = build_keymap(tensors, detect_checkpoint(tensors))
    peft_of: dict[tuple[str, object], str] = {}
    own: dict[str, str] = {}  # smoke shapes match no family: the checkpoint's own `lora_unet_` names
    for stem, t in km.targets.items():
        if stem.startswith(("unet.base_model.model.", "base_model.model.")) and t.transform is None:
            peft_of.setdefault((t.key, t.slice), stem)
        if stem.startswith("lora_unet_") and t.slice is None and t.transform is None:
            own.setdefault(t.key, stem)
    out = []
    for key, info in tensors.items():
        if not key.startswith(UNET_ROOT) or len(info.shape) not in (2, 4):
            continue
        rel = key[len(UNET_ROOT) :]
        linear = any(rel.endswith("." + s) or rel == s for s in FAMILIES[arch].extract_targets)
        conv = (
            len(info.shape) == 4
            and info.shape[2] == 3
            and any(rel.endswith("." + s) for s in FAMILIES[arch].extract_conv_targets)
        )
        if not (linear or conv):
            continue
        for stem, rows in kohya_modules(km, key) or ([(own[key], None)] if key in own else []):
            shape = tuple(info.shape) if rows is None else (rows.length, *info.shape[1:])
            out.append((key, stem, peft_of.get((key, rows)), shape, conv))
    return out


def build_lora(path: str, targets, *, naming: str, rank: int, conv: bool, seed: int) -> None:
    if os.path.exists(path):
        return
    from safetensors.torch import save_file

    noise = _Noise(seed, 1 << 20)
    tensors: dict[str, torch.Tensor] = {}
    for _key, kstem, pstem, shape, is_conv in targets:
        if is_conv and not conv:
            continue
        out_f, in_f = shape[0], math.prod(shape[1:])
        r = min(rank, out_f, in_f)
        if naming == "peft" and pstem:
            up, down, alpha = f"{pstem}.lora_B.weight", f"{pstem}.lora_A.weight", None
        else:
            up, down, alpha = f"{kstem}.lora_up.weight", f"{kstem}.lora_down.weight", f"{kstem}.alpha"
        tail = tuple(shape[1:]) if len(shape) == 4 else (in_f,)
        tensors[down] = noise.take((r, *tail), torch.float16, 2.5)
        tensors[up] = noise.take((out_f, r, *((1, 1) if len(shape) == 4 else ())), torch.float16, 2.5)
        if alpha:
            tensors[alpha] = torch.tensor(float(r) / 2)
    save_file(tensors, path)


def naive_mapping(path: str, targets) -> None:
    """stem -> (base key, row start, rows) for the naive script (which has no key map of its own)."""
    if os.path.exists(path):
        return
    m = {}
    for key, kstem, pstem, _shape, _ in targets:
        for stem in (kstem, pstem):
            if stem:
                m[stem] = key
    with open(path, "w") as fh:
        json.dump(m, fh)


# The naive peer (kohya merge_lora / ComfyUI CheckpointSave style): whole checkpoint and every LoRA
# in RAM, add in fp32, save_file (no fsync). Understands exactly the files this script builds.
NAIVE = r"""
import json, sys
from safetensors.torch import load_file, save_file
base_path, out, mapping = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
base = load_file(base_path)
for lora_path in sys.argv[4:]:
    lora = load_file(lora_path)
    for k in list(lora):
        for up_s, down_s in ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight")):
            if k.endswith(up_s):
                stem = k[: -len(up_s)]
                up, down = lora[k].float(), lora[stem + down_s].float()
                alpha = lora.get(stem + ".alpha")
                scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
                key = mapping[stem]
                w = base[key]
                d = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
                base[key] = (w.float() + 0.7 * scale * d).to(w.dtype)
save_file(base, out)
"""


# -- measuring ----------------------------------------------------------------------------------------
# Children are started by this small launcher, not by the benchmark itself: a process inherits
# its parent's RSS high-water mark when it execs, so forking from a torch-sized parent would put
# a ~250 MiB floor under every measurement (`cp` included). The launcher times the child too.
LAUNCHER = r"""
import os, sys, time
t = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[1], sys.argv[1:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
cpu = usage.ru_utime + usage.ru_stime
sys.stderr.write("\n@@bench %.6f %d %.3f\n" % (time.perf_counter() - t, usage.ru_maxrss, cpu))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run(cmd: list[str]) -> tuple[float, int, float]:
    """Wall seconds, peak RSS (MiB: ru_maxrss of the child, its waited-for children included), CPU seconds."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-S", "-c", LAUNCHER, *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    err = proc.stderr.decode(errors="replace")
    if proc.returncode != 0 or "@@bench " not in err:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    wall, kib, cpu = err.rsplit("@@bench ", 1)[1].split()
    return float(wall), int(kib) // 1024, float(cpu)


def sync() -> None:
    subprocess.run(["sync"], check=False)


def warm(paths: list[str]) -> None:
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass


def summary(samples: list[tuple[float, int, float]]) -> dict:
    walls = [w for w, _, _ in samples]
    return {
        "runs": len(walls),
        "min_s": min(walls),
        "median_s": statistics.median(walls),
        "min_cpu_s": min(c for _, _, c in samples),
        "peak_rss_mib": max(m for _, m, _ in samples),
        "samples": samples,
    }


def startup_cases(exe: list[str], base: str) -> dict[str, list[str]]:
    """Header-only commands beside a bare interpreter start: `--help` and `inspect` never import torch.
    `import torch` is the floor under every merge (its fp32 math runs in torch), paid before any byte moves."""
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "lorabake --help": exe + ["--help"],
        "inspect (header only)": exe + ["inspect", base],
    }


def bench_arch(arch: str, work: str, args) -> dict:
    suffix = "-smoke" if args.smoke else ""
    base = os.path.join(CACHE, f"{arch}{suffix}.safetensors")
    build_base(arch, base, scale_down=16 if args.smoke else 1)
    targets = lora_targets(arch, base)
    loras = []
    for i, (naming, rank, conv) in enumerate(LORAS):
        p = os.path.join(CACHE, f"{arch}{suffix}-lora{i}-{naming}-r{rank}{'-locon' if conv else ''}.safetensors")
        build_lora(p, targets, naming=naming, rank=rank, conv=conv, seed=i + 1)
        loras.append(p)
    mapping = os.path.join(CACHE, f"{arch}{suffix}-naive-map.json")
    naive_mapping(mapping, targets)
    naive_script = os.path.join(work, "naive.py")
    with open(naive_script, "w") as fh:
        fh.write(NAIVE)

    out = os.path.join(work, "out.safetensors")
    exe = [sys.executable, "-m", "lorabake"]

    def merge_cmd(n: int, dest: str = out) -> list[str]:
        cmd = exe + ["merge", base, "-o", dest, "--quiet", "--force", "--device", args.device]
        for p in loras[:n]:
            cmd += ["--lora", f"{p}:0.7"]
        return cmd

    cases: dict[str, list[str]] = {
        "cp": ["cp", base, out],
        "cp + sync": ["sh", "-c", 'cp "$0" "$1" && sync "$1"', base, out],
        "merge x1": merge_cmd(1),
        "merge x2": merge_cmd(2),
    }
    if not args.smoke:  # smoke: fewer processes (each pays the torch import)
        cases["merge x4"] = merge_cmd(4)
    naive = arch != "flux" and not args.no_naive
    if naive:
        cases["naive x2"] = [sys.executable, naive_script, base, out, mapping, *loras[:2]]
    if not args.smoke:
        cases["inspect"] = exe + ["inspect", base, "--json"]
    cases.update(startup_cases(exe, base))

    log(f"{arch}: warming the page cache ({os.path.getsize(base) / 2**30:.1f} GiB + LoRAs)")
    warm([base, *loras])
    samples: dict[str, list[tuple[float, int, float]]] = {c: [] for c in cases}
    loads: dict[str, list[float]] = {c: [] for c in cases}
    for rnd in range(args.repeat):
        for case, cmd in cases.items():
            if os.path.exists(out):
                os.unlink(out)
            sync()
            samples[case].append(run(cmd))
            loads[case].append(os.getloadavg()[0])  # 1-minute average as the case ends (ours included)
            w, m, c = samples[case][-1]
            log(f"{arch} round {rnd + 1}/{args.repeat} {case}: {w:.2f} s, {c:.2f} s CPU, {m} MiB, load {loads[case][-1]:.1f}")
    if os.path.exists(out):
        os.unlink(out)
    rows = {c: {**summary(s), "load": max(loads[c])} for c, s in samples.items()}

    if not args.no_extract and not args.smoke:  # smoke shapes are too small for family detection
        tuned = os.path.join(work, "tuned.safetensors")
        run(merge_cmd(1, tuned))
        lora_out = os.path.join(work, "extracted.safetensors")
        sync()
        ext = [run(exe + ["extract", base, tuned, "-o", lora_out, "--rank", "32", "--quiet", "--force"])]
        rows["extract r32"] = {**summary(ext), "load": os.getloadavg()[0]}
        for p in (tuned, lora_out):
            if os.path.exists(p):
                os.unlink(p)
    return {
        "arch": arch,
        "name": NAMES[arch],
        "base_bytes": os.path.getsize(base),
        "lora_bytes": [os.path.getsize(p) for p in loras],
        "lora_modules": len(targets),
        "rows": rows,
    }


def extract_math(args) -> dict | None:
    """scripts/bench_extract.py's result (ours vs kohya's full SVD): reused if present, else a short run."""
    path = args.extract_json
    stale = False
    if os.path.exists(path) and not args.smoke:
        with open(path, encoding="utf-8") as fh:
            stale = json.load(fh).get("overall", {}).get("modules", 0) < 10  # a --smoke result
    if not os.path.exists(path) or stale or args.smoke:
        cmd = [sys.executable, os.path.join(ROOT, "scripts", "bench_extract.py"), "--json-out", path]
        cmd += ["--smoke"] if args.smoke else ["--limit", str(args.extract_limit)]
        log("running " + " ".join(cmd))
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(path, encoding="utf-8") as fh:
        doc = json.load(fh)
    return {"json": path, **doc["overall"], "threads": doc.get("threads")}


# -- report ---------------------------------------------------------------------------------------------
def table(results: list[dict], ext: dict | None) -> str:
    lines = [
        "| checkpoint | case | ÷ cp+sync | ÷ cp | ÷ naive x2 | ÷ merge x1 | min s | median s | CPU s | peak RSS MiB | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        rows = res["rows"]
        cp, cps = rows["cp"]["min_s"], rows["cp + sync"]["min_s"]
        naive = rows.get("naive x2", {}).get("min_s")
        label = f"{res['name']} ({res['base_bytes'] / 2**30:.2f} GiB)"
        for case, row in rows.items():
            io = case.startswith(("merge", "naive", "cp"))
            r_cp = f"{row['min_s'] / cp:.2f}" if io else ""
            r_cps = f"{row['min_s'] / cps:.2f}" if io else ""
            r_naive = f"{row['min_s'] / naive:.2f}" if naive and case.startswith("merge") else ""
            m1 = rows.get("merge x1", {}).get("min_s")
            r_m1 = f"{row['min_s'] / m1:.2f}" if m1 and case.startswith("merge") else ""
            lines.append(
                f"| {label} | {case} | {r_cps} | {r_cp} | {r_naive} | {r_m1} | {row['min_s']:.2f} | {row['median_s']:.2f} | "
                f"{row['min_cpu_s']:.2f} | {row['peak_rss_mib']} | {row.get('load', 0.0):.1f} |"
            )
    if ext:
        lines += [
            "",
            f"Extraction math ({ext['modules']} SDXL UNet modules, rank {ext['rank']}, {ext.get('threads')} thread(s), "
            f"from `{os.path.basename(ext['json'])}`): ours {ext['ours_s']:.1f} s vs full SVD {ext['kohya_s']:.1f} s"
            f"{' (extrapolated per shape)' if ext.get('kohya_extrapolated') else ''} = **{ext['speedup']:.1f}× faster**, "
            f"relative error {ext['err_ours']:.5f} vs {ext['err_kohya']:.5f} = **{ext['err_ratio']:.4f}×**.",
        ]
    return "\n".join(lines)


def targets_report(results: list[dict], ext: dict | None) -> list[str]:
    """Issue 14's targets, each with its measured ratio and met / NOT met."""
    out = []
    for res in results:
        rows, arch = res["rows"], res["arch"]
        cps = rows["cp + sync"]["min_s"]
        m1, m2 = rows["merge x1"]["min_s"], rows["merge x2"]["min_s"]
        if arch in ("sd1", "sdxl"):
            out.append(f"{arch}: merge x2 ≤ 1.2× cp+sync: {m2 / cps:.2f}× ({'met' if m2 / cps <= 1.2 else 'NOT met'})")
        if "merge x4" in rows:
            r = rows["merge x4"]["min_s"] / m1
            out.append(f"{arch}: merge x4 ≤ 1.1× merge x1: {r:.2f}× ({'met' if r <= 1.1 else 'NOT met'})")
        if "naive x2" in rows:
            r = m2 / rows["naive x2"]["min_s"]
            out.append(f"{arch}: merge x2 faster than naive x2: {r:.2f}× its time ({'met' if r < 1 else 'NOT met'})")
        peak = max(r["peak_rss_mib"] for c, r in rows.items() if c.startswith("merge"))
        out.append(f"{arch}: merge peak RSS ≤ 512 MiB: {peak} MiB ({'met' if peak <= 512 else 'NOT met'})")
    if ext:
        ok = ext["speedup"] >= 10 and ext["err_ratio"] <= 1.01
        out.append(
            f"extract ≥ 10× faster at ≤ 1.01× error: {ext['speedup']:.1f}×, {ext['err_ratio']:.4f}× ({'met' if ok else 'NOT met'})"
        )
    return out


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            mem = int(fh.readline().split()[1]) // 2**20
    except OSError:
        mem = None
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "ram_gib": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flux", action="store_true", help="also the 23 GB Flux DiT (needs ~50 GB of disk)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (every dim / 16), one repeat: checks the script runs")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--arch", action="append", choices=sorted(NAMES), help="only these (repeatable)")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive in-RAM merge")
    ap.add_argument("--device", default="cpu", help="lorabake merge --device (cpu, cuda, cuda:N, mps, auto)")
    ap.add_argument("--no-extract", action="store_true", help="skip `lorabake extract`")
    ap.add_argument("--extract-json", default=os.path.join(tempfile.gettempdir(), "bench_extract.json"),
                    help="scripts/bench_extract.py output to reuse (run briefly if missing)")
    ap.add_argument("--extract-limit", type=int, default=40, help="modules for the brief bench_extract run")
    ap.add_argument("--json-out", default=None, help="default: CACHE/bench[-smoke].json")
    args = ap.parse_args(argv)
    global CACHE
    if args.smoke:
        args.repeat = 1
        if "LORABAKE_BENCH_CACHE" not in os.environ:
            CACHE = os.path.join(tempfile.gettempdir(), "lorabake-bench-smoke")
        args.extract_json = os.path.join(CACHE, "bench_extract_smoke.json")
    os.makedirs(CACHE, exist_ok=True)
    json_out = args.json_out or os.path.join(CACHE, f"bench{'-smoke' if args.smoke else ''}.json")
    archs = args.arch or (["sd1"] if args.smoke else ["sd1", "sdxl"] + (["flux"] if args.flux else []))
    results = []
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        for arch in archs:
            results.append(bench_arch(arch, work, args))
    ext = None if args.no_extract else extract_math(args)
    md = table(results, ext)
    notes = targets_report(results, ext)
    mach = machine()
    print(
        f"\nMachine: {mach['cpu']}, {mach['cpus']} CPUs, {mach['ram_gib']} GiB RAM, {mach['platform']}, "
        f"Python {mach['python']}, torch {mach['torch']}\n"
        "Warm page cache for every case; `cp` does not fsync, `cp + sync` and lorabake do; "
        "naive = load_file/add/save_file (no fsync). Ratios use min times.\n"
    )
    print(md)
    print("\n" + "\n".join(f"- {n}" for n in notes))
    doc = {"machine": mach, "args": vars(args), "results": results, "extract_math": ext, "table": md, "targets": notes}
    with open(json_out, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2)
    log(f"written: {json_out}")
    if args.smoke:
        shutil.rmtree(os.path.join(CACHE), ignore_errors=True) if os.environ.get("LORABAKE_BENCH_SMOKE_CLEAN") else None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

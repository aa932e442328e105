#!/usr/bin/env python3
"""Benchmarks: lorabake against the physical limit (`cp`) and a naive load-everything merge.

Builds full-size checkpoints from ../shared/arch once (cached outside the repository), LoRAs over
every attention and feed-forward module, then times in one run, each case repeated:
  cp BASE OUT, lorabake merge with 1/2/4 LoRAs, a naive in-RAM merge (safetensors load_file,
  add, save_file), lorabake inspect, and lorabake extract against a full-SVD extraction.
Peak RSS of each process is read from /proc (VmHWM of the child, via wait4's rusage).
Prints a markdown table of ratios and writes it as JSON.

  python scripts/bench.py                       # SD1.5 + SDXL
  python scripts/bench.py --flux                # also the 23 GB Flux DiT
  python scripts/bench.py --smoke               # tiny sizes, seconds: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lorabake.dtypes import tag_of  # noqa: E402
from lorabake.st_writer import SafetensorsWriter  # noqa: E402
from tests.archfix import arch_tensors  # noqa: E402

CACHE = os.environ.get("LORABAKE_BENCH_CACHE", os.path.join(tempfile.gettempdir(), "lorabake-bench"))

# Module patterns a trainer targets: attention and feed-forward (and 3x3 conv for LoCon).
TARGETS = {
    "sd1": r"model\.diffusion_model\..*(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out)\.weight$",
    "sdxl": r"model\.diffusion_model\..*(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out)\.weight$",
    "flux": r"model\.diffusion_model\.(double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02])|single_blocks\.\d+\.linear[12])\.weight$",
}
CONV_TARGET = r"model\.diffusion_model\..*(in_layers\.2|out_layers\.3)\.weight$"
DTYPE = {"sd1": torch.float16, "sdxl": torch.float16, "flux": torch.bfloat16}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- building inputs (streamed with our own writer: RAM stays small) -------------------------
def build_base(arch: str, path: str, *, scale_down: int = 1) -> None:
    if os.path.exists(path):
        return
    spec = arch_tensors(arch, include_optional=False)
    if arch == "flux":
        spec = {k: v for k, v in spec.items() if v["component"] == "diffuser"}
    gen = torch.Generator().manual_seed(0)
    entries = []
    for name, e in spec.items():
        shape = tuple(max(1, d // scale_down) for d in e["shape"])
        dtype = DTYPE[arch] if e["dtype"].startswith("float") else getattr(torch, e["dtype"])
        entries.append((name, tag_of(dtype), shape, dtype))
    log(f"building {path} ({len(entries)} tensors)")
    with SafetensorsWriter(path, [(n, t, s) for n, t, s, _ in entries], {"bench": arch}, force=True) as w:
        for name, _, shape, dtype in entries:
            if dtype.is_floating_point:
                t = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
            else:
                t = torch.zeros(shape, dtype=dtype)
            w.write(name, t)


def build_lora(arch: str, base_path: str, path: str, rank: int, *, naming: str, seed: int, conv: bool = False) -> None:
    if os.path.exists(path):
        return
    from lorabake.st_reader import SafetensorsReader

    with SafetensorsReader(base_path) as r:
        shapes = {n: i.shape for n, i in r.tensors.items()}
    pattern = re.compile(TARGETS[arch])
    conv_pattern = re.compile(CONV_TARGET)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        is_conv = conv and conv_pattern.search(name) and len(shape) == 4 and shape[2] == 3
        if not (pattern.search(name) or is_conv):
            continue
        module = name.removeprefix("model.diffusion_model.").removesuffix(".weight")
        out_f, in_f = shape[0], int(torch.tensor(shape[1:]).prod())
        r = min(rank, out_f, in_f)
        if naming == "kohya":
            stem = "lora_unet_" + module.replace(".", "_")
            up, down, alpha = f"{stem}.lora_up.weight", f"{stem}.lora_down.weight", f"{stem}.alpha"
        else:  # PEFT names over the checkpoint's own module paths (ComfyUI "generic" style)
            stem = "diffusion_model." + module
            up, down, alpha = f"{stem}.lora_B.weight", f"{stem}.lora_A.weight", None
        if len(shape) == 4:
            tensors[down] = (torch.randn(r, shape[1], shape[2], shape[3], generator=gen) * 0.05).half()
            tensors[up] = (torch.randn(out_f, r, 1, 1, generator=gen) * 0.05).half()
        else:
            tensors[down] = (torch.randn(r, in_f, generator=gen) * 0.05).half()
            tensors[up] = (torch.randn(out_f, r, generator=gen) * 0.05).half()
        if alpha:
            tensors[alpha] = torch.tensor(float(r) / 2)
    from safetensors.torch import save_file

    save_file(tensors, path)


# -- running and measuring ---------------------------------------------------------------------
def run(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (MiB) of the child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return wall, usage.ru_maxrss // 1024


def measure(cmd: list[str], repeat: int, cleanup: str | None) -> dict:
    walls, rss = [], []
    for _ in range(repeat):
        if cleanup and os.path.exists(cleanup):
            os.unlink(cleanup)
        w, m = run(cmd)
        walls.append(w)
        rss.append(m)
    if cleanup and os.path.exists(cleanup):
        os.unlink(cleanup)
    return {"min_s": min(walls), "median_s": statistics.median(walls), "peak_rss_mib": max(rss)}


# The naive peer: whole checkpoint and LoRA in RAM (safetensors load_file), add, save_file.
NAIVE = """
import sys
from safetensors.torch import load_file, save_file
base = load_file(sys.argv[1])
names = {'lora_unet_' + n.removeprefix('model.diffusion_model.').removesuffix('.weight').replace('.', '_'): n
         for n in base if n.endswith('.weight')}
for lora_path in sys.argv[3:]:
    lora = load_file(lora_path)
    for k in [k for k in lora if k.endswith('.lora_up.weight')]:
        stem = k[: -len('.lora_up.weight')]
        up, down = lora[k].float(), lora[stem + '.lora_down.weight'].float()
        alpha = lora.get(stem + '.alpha')
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        w = base[names[stem]]
        base[names[stem]] = (w.float() + 0.7 * scale * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)).to(w.dtype)
save_file(base, sys.argv[2])
"""


def bench_arch(arch: str, work: str, *, repeat: int, ranks: list[int], smoke: bool) -> dict:
    scale = 16 if smoke else 1
    base = os.path.join(CACHE, f"{arch}{'-smoke' if smoke else ''}.safetensors")
    build_base(arch, base, scale_down=scale)
    loras = []
    for i in range(4):
        rank = ranks[min(i, len(ranks) - 1)]
        naming = "kohya" if i % 2 == 0 else "peft"
        p = os.path.join(CACHE, f"{arch}{'-smoke' if smoke else ''}-lora{i}-r{rank}-{naming}.safetensors")
        build_lora(arch, base, p, rank, naming=naming, seed=i, conv=(arch != "flux" and i == 0))
        loras.append(p)
    out = os.path.join(work, "out.safetensors")
    exe = [sys.executable, "-m", "lorabake"]
    rows: dict[str, dict] = {}
    size = os.path.getsize(base)
    rows["cp"] = measure(["cp", base, out], repeat, out)
    for n in (1, 2, 4):
        cmd = exe + ["merge", base, "-o", out, "--quiet"]
        for p in loras[:n]:
            cmd += ["--lora", f"{p}:0.7"]
        rows[f"lorabake merge x{n}"] = measure(cmd, repeat, out)
    kohya_loras = [p for p in loras[:2] if "kohya" in p]
    naive_script = os.path.join(work, "naive.py")
    with open(naive_script, "w") as fh:
        fh.write(NAIVE)
    if arch != "flux" or os.environ.get("LORABAKE_BENCH_NAIVE_FLUX"):
        rows["naive load_file merge x1"] = measure([sys.executable, naive_script, base, out, *kohya_loras[:1]], repeat, out)
    rows["lorabake inspect"] = measure(exe + ["inspect", base, "--json"], repeat, None)
    return {"arch": arch, "base_bytes": size, "rows": rows}


def table(results: list[dict]) -> str:
    lines = ["| checkpoint | case | min s | median s | ÷ cp | ÷ naive | peak RSS MiB |", "|---|---|---|---|---|---|---|"]
    for res in results:
        cp = res["rows"]["cp"]["min_s"]
        naive = res["rows"].get("naive load_file merge x1", {}).get("min_s")
        for case, row in res["rows"].items():
            ratio_naive = f"{row['min_s'] / naive:.2f}" if naive and "merge" in case else ""
            lines.append(
                f"| {res['arch']} ({res['base_bytes'] / 2**30:.2f} GiB) | {case} | {row['min_s']:.2f} | {row['median_s']:.2f} | "
                f"{row['min_s'] / cp:.2f} | {ratio_naive} | {row['peak_rss_mib']} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flux", action="store_true", help="also bench the 23 GB Flux DiT")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (every dim / 16): checks the script runs")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--arch", action="append", help="only these (sd1, sdxl, flux)")
    ap.add_argument("--json-out", default=os.path.join(CACHE, "bench.json"))
    args = ap.parse_args()
    os.makedirs(CACHE, exist_ok=True)
    archs = args.arch or (["sd1", "sdxl"] + (["flux"] if args.flux else []))
    results = []
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        for arch in archs:
            results.append(bench_arch(arch, work, repeat=1 if args.smoke else args.repeat, ranks=[16, 64, 128, 64], smoke=args.smoke))
    md = table(results)
    print(md)
    doc = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "results": results,
        "table": md,
    }
    with open(args.json_out, "w") as fh:
        json.dump(doc, fh, indent=2)
    print(f"\nwritten: {args.json_out}", file=sys.stderr)


if __name__ == "__main__":
    main()

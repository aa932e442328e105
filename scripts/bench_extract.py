#!/usr/bin/env python3
"""Benchmark: lorabake's extraction math against kohya's (full SVD, all of S into up) on SDXL.

Every SDXL UNet module a trainer targets (real names and shapes from tests/data/arch), one at a
time in memory: base W (fp16, randn·0.02) and tuned = fp16(W + D), D = a rank-64 delta with a
decaying spectrum plus dense noise, so ΔW = tuned − base is what a real fine-tune pair gives.
Each module is factored at --rank by

  ours:  lorabake.svd (randomized SVD with adaptive power iterations, or exact reduced SVD where
         that is the faithful choice) + rank selection + factors, as `lorabake extract` runs it;
  kohya: torch.linalg.svd(ΔW) (full_matrices=True), up = U_r·diag(S_r), down = Vh_r.

Only the factorization is timed (both sides); the relative Frobenius error of each result is
computed afterwards, overall = sqrt(Σ‖err‖² / Σ‖ΔW‖²). kohya's full SVD of a 10240×1280 matrix
takes ~20 s on 2 threads, so by default it runs on --kohya-per-shape modules of each distinct
shape and its time is extrapolated by the module count of that shape (all modules of one shape
are statistically identical here); --kohya-per-shape 0 runs it on every module.

  python scripts/bench_extract.py                 # all 722 modules, rank 32
  python scripts/bench_extract.py --smoke         # seconds: one small module per shape, rank 8
Prints a markdown table and writes JSON (--json-out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lorabake import svd  # noqa: E402
from lorabake.arch import FAMILIES  # noqa: E402
from tests.archfix import arch_tensors  # noqa: E402

UNET_ROOT = "model.diffusion_model."


def sdxl_unet_targets() -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for key, entry in arch_tensors("sdxl").items():
        if not key.startswith(UNET_ROOT):
            continue
        rel = "." + key[len(UNET_ROOT) :]
        if any(rel.endswith("." + s) for s in FAMILIES["sdxl"].extract_targets):
            out.append((key, tuple(entry["shape"])))
    return out


def make_pair(shape: tuple[int, ...], seed: int, *, true_rank: int = 64) -> torch.Tensor:
    """ΔW (fp32, 2-D) of an fp16 base/tuned pair whose exact difference is low rank + noise."""
    m = shape[0]
    n = math.prod(shape[1:])
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(m, n, generator=g) * 0.02).half()
    k = min(true_rank, m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    s = 0.5 * torch.exp(-torch.arange(k, dtype=torch.float32) / 16.0)
    d = (u * s) @ v.T + 0.005 * torch.randn(m, n, generator=g) / math.sqrt(max(m, n))
    tuned = (base.float() + d).half()
    return tuned.float() - base.float()


def ours(mat: torch.Tensor, rank: int, sketch: svd.SketchSettings) -> tuple[svd.LoraFactors, str, int]:
    total = svd.frobenius_sq(mat)
    cap = min(rank, *mat.shape)
    spec = svd.leading_spectrum(mat, cap, mode="fixed", sketch=sketch, total_sq=total)
    r = svd.select_rank(
        spec.s,
        mode="fixed",
        param=None,
        max_rank=cap,
        full_len=min(mat.shape),
        total_sq=total,
        complete=spec.complete,
    )
    return svd.lora_factors(spec, r), spec.method, spec.power_iters


def kohya(mat: torch.Tensor, rank: int) -> svd.LoraFactors:
    u, s, vh = torch.linalg.svd(mat)  # full_matrices=True, as extract_lora_from_models.py
    r = min(rank, *mat.shape)
    up = u[:, :r] @ torch.diag(s[:r])
    return svd.LoraFactors(up, vh[:r], r, float(r))


def err_sq(mat: torch.Tensor, f: svd.LoraFactors) -> float:
    return svd.residual_sq(mat, f.up, f.down, f.scale)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument(
        "--kohya-per-shape", type=int, default=2, help="kohya runs per distinct shape (0 = every module)"
    )
    ap.add_argument(
        "--smoke", action="store_true", help="tiny run: one module of each of the two smallest shapes, rank 8"
    )
    ap.add_argument("--limit", type=int, default=0, help="only the first N modules (0 = all)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for both sides (1: stable timings on a shared box)",
    )
    ap.add_argument("--json-out", default=os.path.join(tempfile.gettempdir(), "bench_extract.json"))
    args = ap.parse_args(argv)

    modules = sdxl_unet_targets()
    if args.smoke:
        args.rank = 8
        seen: dict[tuple[int, ...], str] = {}
        for key, shape in sorted(modules, key=lambda m: math.prod(m[1])):
            seen.setdefault(shape, key)
        modules = [(k, s) for s, k in list(seen.items())[:2]]
        args.kohya_per_shape = 1
    if args.limit:
        modules = modules[: args.limit]
    sketch = svd.SketchSettings()
    torch.set_num_threads(args.threads)
    warm = torch.randn(300, 64)  # first calls load LAPACK: keep that out of the timings
    torch.linalg.svd(warm)
    torch.linalg.qr(warm)

    by_shape: dict[tuple[int, ...], dict] = defaultdict(
        lambda: {
            "count": 0,
            "ours_s": 0.0,
            "ours_err_sq": 0.0,
            "norm_sq": 0.0,
            "kohya_s": 0.0,
            "kohya_n": 0,
            "kohya_err_sq": 0.0,
            "sample_norm_sq": 0.0,
            "sample_ours_err_sq": 0.0,
            "methods": defaultdict(int),
            "iters": 0,
        }
    )
    started = time.perf_counter()
    for i, (key, shape) in enumerate(modules):
        row = by_shape[shape]
        mat = make_pair(shape, seed=i).reshape(shape[0], -1)
        norm_sq = svd.frobenius_sq(mat)
        t0 = time.perf_counter()
        f, method, iters = ours(mat, args.rank, sketch)
        row["ours_s"] += time.perf_counter() - t0
        e_ours = err_sq(mat, f)
        row["count"] += 1
        row["ours_err_sq"] += e_ours
        row["norm_sq"] += norm_sq
        row["methods"][method] += 1
        row["iters"] += iters
        if args.kohya_per_shape == 0 or row["kohya_n"] < args.kohya_per_shape:
            t0 = time.perf_counter()
            fk = kohya(mat, args.rank)
            row["kohya_s"] += time.perf_counter() - t0
            row["kohya_n"] += 1
            row["kohya_err_sq"] += err_sq(mat, fk)
            row["sample_norm_sq"] += norm_sq
            row["sample_ours_err_sq"] += e_ours
        print(f"\r{i + 1}/{len(modules)} {key[len(UNET_ROOT) :]:<70}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    rows = []
    tot = defaultdict(float)
    for shape, r in sorted(by_shape.items(), key=lambda kv: -math.prod(kv[0])):
        kohya_total = r["kohya_s"] / r["kohya_n"] * r["count"]
        err_ours = math.sqrt(r["sample_ours_err_sq"] / r["sample_norm_sq"])
        err_kohya = math.sqrt(r["kohya_err_sq"] / r["sample_norm_sq"])
        rows.append(
            {
                "shape": list(shape),
                "modules": r["count"],
                "kohya_measured": r["kohya_n"],
                "ours_s": r["ours_s"],
                "kohya_s": kohya_total,
                "speedup": kohya_total / r["ours_s"],
                "err_ours": err_ours,
                "err_kohya": err_kohya,
                "err_ratio": err_ours / err_kohya,
                "methods": dict(r["methods"]),
                "mean_power_iters": r["iters"] / r["count"],
            }
        )
        tot["ours_s"] += r["ours_s"]
        tot["kohya_s"] += kohya_total
        # overall error over the modules both sides ran on, weighted by shape count
        w = r["count"] / r["kohya_n"]
        tot["err_ours_sq"] += r["sample_ours_err_sq"] * w
        tot["err_kohya_sq"] += r["kohya_err_sq"] * w
        tot["norm_sq"] += r["sample_norm_sq"] * w
    overall = {
        "modules": len(modules),
        "rank": args.rank,
        "ours_s": tot["ours_s"],
        "kohya_s": tot["kohya_s"],
        "speedup": tot["kohya_s"] / tot["ours_s"],
        "err_ours": math.sqrt(tot["err_ours_sq"] / tot["norm_sq"]),
        "err_kohya": math.sqrt(tot["err_kohya_sq"] / tot["norm_sq"]),
        "kohya_extrapolated": any(r["kohya_measured"] < r["modules"] for r in rows),
        "wall_s": time.perf_counter() - started,
    }
    overall["err_ratio"] = overall["err_ours"] / overall["err_kohya"]

    print(
        f"\nSDXL UNet trainer targets, rank {args.rank}, torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print(
        "| shape | modules | ours (s) | kohya full SVD (s) | speed-up | err ours | err kohya | err ratio | ours: method, mean power iters |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        k = f"{r['kohya_s']:.1f}" + (
            "" if r["kohya_measured"] == r["modules"] else f" (from {r['kohya_measured']})"
        )
        methods = ", ".join(f"{m} {n}" for m, n in r["methods"].items())
        print(
            f"| {'×'.join(map(str, r['shape']))} | {r['modules']} | {r['ours_s']:.2f} | {k} | {r['speedup']:.1f}× | "
            f"{r['err_ours']:.5f} | {r['err_kohya']:.5f} | {r['err_ratio']:.4f} | {methods}, {r['mean_power_iters']:.1f} |"
        )
    o = overall
    print(
        f"| **total** | {o['modules']} | {o['ours_s']:.1f} | {o['kohya_s']:.1f} | **{o['speedup']:.1f}×** | "
        f"{o['err_ours']:.5f} | {o['err_kohya']:.5f} | **{o['err_ratio']:.4f}** | |"
    )
    target = o["speedup"] >= 10 and o["err_ratio"] <= 1.01
    print(f"\ntarget ≥10× faster at ≤1.01× error: {'met' if target else 'NOT met'}")
    doc = {
        "machine": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "overall": overall,
        "by_shape": rows,
        "target_met": target,
    }
    with open(args.json_out, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2)
    print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Peak RSS of `lorabake merge` against the size of a Wan 2.1 14B-shaped base (issue 12: 30-50 GB outputs).

A whole Wan 14B file (28.6 GB in bf16) plus its output does not fit the disk this runs on, and the point is how
memory scales, not one size. So the base holds the real names and shapes of Wan 2.1 T2V 14B
(tests/data/arch/wan21-t2v-14b.json: every tensor outside the blocks, and blocks 0..N-1), in bf16, as a
*sparse* file: the header is written, the data section is a hole that reads as zeros and takes no disk. The
output is written whole (fsynced, hashed) like any merge. The LoRA is lightx2v-style, for the blocks present:
`diffusion_model.` names, rank-R `lora_down`/`lora_up` with `alpha` on every block linear, `diff_b` on their
biases, `diff_m` on each block's `modulation` and on the head's.

    python scripts/bench_bigfile.py --blocks 4,10,20

prints one row per size (file size, LoRA size, wall and CPU seconds, the merge's peak RSS: ru_maxrss of the child,
measured by scripts/bench.py's launcher) and deletes every file it made before building the next size.
`--lora-blocks K` holds the LoRA fixed (its first K blocks) so that only the file grows. If peak RSS is flat
across sizes, it does not grow with a 28-57 GB file either: nothing scales with the file but the time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

KEY_LIST = os.path.join(ROOT, "tests", "data", "arch", "wan21-t2v-14b.json")
LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
           "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
ITEM = 2  # bf16


def _bench():
    spec = importlib.util.spec_from_file_location("lorabake_bench", os.path.join(ROOT, "scripts", "bench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def wan_shapes(blocks: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of a Wan 2.1 T2V 14B file cut to its first `blocks` blocks (all other tensors kept)."""
    with open(KEY_LIST, encoding="utf-8") as fh:
        tensors = json.load(fh)["tensors"]
    out = {}
    for key, spec in tensors.items():
        parts = key.split(".")
        if parts[0] == "blocks" and int(parts[1]) >= blocks:
            continue
        out[key] = tuple(spec["shape"])
    return out


def write_sparse_base(path: str, shapes: dict[str, tuple[int, ...]]) -> int:
    """A bf16 safetensors file whose data section is a hole; returns its size in bytes."""
    header, offset = {}, 0
    for key in sorted(shapes):
        size = ITEM
        for d in shapes[key]:
            size *= d
        header[key] = {"dtype": "BF16", "shape": list(shapes[key]), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"modelspec.architecture": "wan"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little"))
        fh.write(blob)
        fh.truncate(8 + len(blob) + offset)
    return 8 + len(blob) + offset


def write_lightx2v_lora(path: str, shapes: dict[str, tuple[int, ...]], blocks: int, rank: int) -> int:
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * scale).to(torch.bfloat16)

    lora: dict[str, torch.Tensor] = {}
    for n in range(blocks):
        for m in LINEARS:
            out_f, in_f = shapes[f"blocks.{n}.{m}.weight"]
            stem = f"diffusion_model.blocks.{n}.{m}"
            lora[f"{stem}.lora_down.weight"] = rnd(rank, in_f, scale=in_f**-0.5)
            lora[f"{stem}.lora_up.weight"] = rnd(out_f, rank, scale=0.01)
            lora[f"{stem}.alpha"] = torch.tensor(float(rank), dtype=torch.bfloat16)
            lora[f"{stem}.diff_b"] = rnd(out_f, scale=0.01)
        lora[f"diffusion_model.blocks.{n}.diff_m"] = rnd(*shapes[f"blocks.{n}.modulation"], scale=0.01)
    lora["diffusion_model.head.diff_m"] = rnd(*shapes["head.modulation"], scale=0.01)
    save_file(lora, path)
    return os.path.getsize(path)


def measure(blocks: int, rank: int, work: str, bench, *, lora_blocks: int | None = None) -> dict:
    shapes = wan_shapes(blocks)
    lora_blocks = blocks if lora_blocks is None else min(lora_blocks, blocks)
    base, lora, out = (os.path.join(work, f) for f in ("base.safetensors", "lora.safetensors", "out.safetensors"))
    try:
        base_size = write_sparse_base(base, shapes)
        lora_size = write_lightx2v_lora(lora, shapes, lora_blocks, rank)
        bench.sync()
        wall, rss, cpu = bench.run([sys.executable, "-m", "lorabake", "merge", base, "--lora", lora, "-o", out])
        return {"blocks": blocks, "lora_blocks": lora_blocks, "tensors": len(shapes), "file_bytes": base_size,
                "base_on_disk_bytes": os.stat(base).st_blocks * 512, "out_bytes": os.path.getsize(out),
                "lora_bytes": lora_size, "wall_s": wall, "cpu_s": cpu, "peak_rss_mib": rss,
                "load": os.getloadavg()[0]}
    finally:
        for p in (base, lora, out):
            if os.path.exists(p):
                os.unlink(p)


def table(rows: list[dict]) -> str:
    gib = 1 << 30
    lines = ["| blocks | LoRA on blocks | tensors | file (output) GiB | base on disk MiB | LoRA MiB | wall s | CPU s | "
             "peak RSS MiB | load |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['blocks']} | {r['lora_blocks']} | {r['tensors']} | {r['out_bytes'] / gib:.2f} | {r['base_on_disk_bytes'] / 2**20:.1f} | "
                     f"{r['lora_bytes'] / 2**20:.0f} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mib']} | "
                     f"{r['load']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", default="4,10,20", help="comma-separated block counts (Wan 14B has 40)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--lora-blocks", type=int, default=None,
                    help="the LoRA covers only the first K blocks (default: all), to hold the LoRA fixed across sizes")
    ap.add_argument("--work", default=None, help="folder for the files (default: a new one under $TMPDIR)")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    bench = _bench()
    work = args.work or tempfile.mkdtemp(prefix="lorabake-bigfile-")
    os.makedirs(work, exist_ok=True)
    rows = []
    try:
        for blocks in (int(b) for b in args.blocks.split(",")):
            started = time.strftime("%H:%M:%S", time.gmtime())
            rows.append(measure(blocks, args.rank, work, bench, lora_blocks=args.lora_blocks))
            print(f"[{started} UTC] {blocks} blocks: {rows[-1]['peak_rss_mib']} MiB", file=sys.stderr, flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(table(rows))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as fh:
            json.dump({"rows": rows, "machine": bench.machine()}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""Headers of many tiny tensors: time and peak memory of reading them, and of `lorabake inspect`.

Builds (in $TMPDIR/lorabake-bench-header) safetensors files of N one-element F32 tensors, N = 10^4,
10^5 and 10^6 (the last has an 88 MB header), then times in fresh processes:

  read_header   `st_header.read_header` alone (JSON parse and validation)
  reader        `SafetensorsReader` (also indexes every tensor)
  inspect       `lorabake inspect FILE` end to end (import, detection, report)
  merge --dry-run  a small SD1 base with the N tensors added to its header, and a two-module
                kohya LoRA (detection, rule table, plan; tests/ helpers build them, with torch)

and prints a table with each process's wall and CPU time (user + system, from `wait4`) and peak
RSS. The machine may be shared: CPU time is the figure that transfers; compare rows within one run.

  python scripts/bench_header.py            # 10^4, 10^5, 10^6
  python scripts/bench_header.py --max 5    # up to 10^5
"""

from __future__ import annotations

import argparse
import os
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("LORABAKE_BENCH_CACHE", os.path.join(tempfile.gettempdir(), "lorabake-bench-header"))

CASES = {
    "read_header": "from lorabake.st_header import read_header; read_header(sys.argv[1])",
    "reader": "from lorabake.st_reader import SafetensorsReader; SafetensorsReader(sys.argv[1]).close()",
}


def build(n: int) -> str:
    path = os.path.join(CACHE, f"tiny-{n}.safetensors")
    if os.path.exists(path):
        return path
    os.makedirs(CACHE, exist_ok=True)
    entries = ",".join(f'"blocks.{i}.norm.weight":{{"dtype":"F32","shape":[1],"data_offsets":[{4 * i},{4 * i + 4}]}}'
                       for i in range(n))
    header = ("{" + entries + "}").encode()
    header += b" " * ((-(8 + len(header))) % 8)
    with open(path + ".part", "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header + b"\0" * (4 * n))
    os.replace(path + ".part", path)
    return path


def build_sd1_plus(n: int) -> tuple[str, str]:
    """(base, LoRA): the SD1 base and LoRA of tests/test_errors.py, the base's header grown by n
    one-element tensors after its own."""
    folder = os.path.join(CACHE, "sd1")
    base, lora = os.path.join(folder, "base.safetensors"), os.path.join(folder, "lora.safetensors")
    if not os.path.exists(lora):  # in a child: torch would grow this process (see LAUNCHER)
        code = f"from tests.test_errors import make_inputs; make_inputs({folder!r})"
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    path = os.path.join(CACHE, f"sd1-plus-{n}.safetensors")
    if os.path.exists(path):
        return path, lora
    with open(base, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header, data = fh.read(size).rstrip(b" "), fh.read()
    extra = "".join(f',"extra.{i}.weight":{{"dtype":"F32","shape":[1],"data_offsets":[{len(data) + 4 * i},{len(data) + 4 * i + 4}]}}'
                    for i in range(n))
    header = header[:-1] + extra.encode() + b"}"
    header += b" " * ((-(8 + len(header))) % 8)
    with open(path + ".part", "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header + data + b"\0" * (4 * n))
    os.replace(path + ".part", path)
    return path, lora


# Children are started by this small launcher, not by the benchmark itself: a process inherits its
# parent's RSS high-water mark when it execs, and building the 10^6 files grows this one.
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
sys.stderr.write("\n@@bench %.6f %.3f %d %d\n" % (time.perf_counter() - t, cpu, usage.ru_maxrss, os.waitstatus_to_exitcode(status)))
"""


def timed(argv: list[str]) -> tuple[float, float, float, int]:
    """(wall seconds, CPU seconds, peak RSS MiB, exit code) of one fresh process (its rusage, via wait4)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *argv], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, check=True)
    wall, cpu, kib, code = proc.stderr.decode(errors="replace").rsplit("@@bench ", 1)[1].split()
    return float(wall), float(cpu), int(kib) / 1024, int(code)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max", type=int, default=6, help="largest N as a power of ten (default 6)")
    args = ap.parse_args(argv)
    exps = range(4, args.max + 1)
    built = {exp: (build(10**exp), build_sd1_plus(10**exp)) for exp in exps}  # all before any timing
    print("| tensors | header MB | case | wall s | CPU s | peak RSS MiB |\n|---|---|---|---|---|---|")
    for exp in exps:
        path, (base, lora) = built[exp]
        with open(path, "rb") as fh:
            header_mb = struct.unpack("<Q", fh.read(8))[0] / 1e6
        rows = [(name, [sys.executable, "-c", f"import sys; {code}", path]) for name, code in CASES.items()]
        rows.append(("inspect", [sys.executable, "-m", "lorabake", "inspect", path]))
        out = os.path.join(CACHE, "out.safetensors")
        rows.append(("merge --dry-run", [sys.executable, "-m", "lorabake", "merge", base, "--lora", lora, "-o", out, "--dry-run"]))
        for name, cmd in rows:
            seconds, cpu, rss, code = timed(cmd)
            status = "" if code == 0 else f" (exit {code})"
            print(f"| 10^{exp} | {header_mb:.1f} | {name}{status} | {seconds:.2f} | {cpu:.2f} | {rss:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

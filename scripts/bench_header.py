#!/usr/bin/env python3
"""Headers of many tiny tensors: time and peak memory of reading them, and of `lorabake inspect`.

Builds (in $TMPDIR/lorabake-bench-header) safetensors files of N one-element F32 tensors, N = 10^4,
10^5 and 10^6 (the last has a ~83 MB header), then times in fresh processes:

  read_header   `st_header.read_header` alone (JSON parse and validation)
  reader        `SafetensorsReader` (also indexes every tensor)
  inspect       `lorabake inspect FILE` end to end (import, detection, report)

and prints a table with each process's peak RSS. The machine may be shared: compare rows within
one run, not with other machines.

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
import time

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


def timed(argv: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB, exit code) of one fresh process (its own rusage, via wait4)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return seconds, usage.ru_maxrss / 1024, proc.returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max", type=int, default=6, help="largest N as a power of ten (default 6)")
    args = ap.parse_args(argv)
    print("| tensors | header MB | case | wall s | peak RSS MiB |\n|---|---|---|---|---|")
    for exp in range(4, args.max + 1):
        path = build(10**exp)
        with open(path, "rb") as fh:
            header_mb = struct.unpack("<Q", fh.read(8))[0] / 1e6
        rows = [(name, [sys.executable, "-c", f"import sys; {code}", path]) for name, code in CASES.items()]
        rows.append(("inspect", [sys.executable, "-m", "lorabake", "inspect", path]))
        for name, cmd in rows:
            seconds, rss, code = timed(cmd)
            status = "" if code == 0 else f" (exit {code})"
            print(f"| 10^{exp} | {header_mb:.1f} | {name}{status} | {seconds:.2f} | {rss:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

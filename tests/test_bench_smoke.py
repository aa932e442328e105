"""scripts/bench.py --smoke: tiny shapes, one repeat; checks the script runs end to end (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_bench():
    spec = importlib.util.spec_from_file_location("lorabake_bench", os.path.join(ROOT, "scripts", "bench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_smoke(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORABAKE_BENCH_CACHE", str(tmp_path / "cache"))
    bench = _load_bench()
    bench.CACHE = str(tmp_path / "cache")
    out = tmp_path / "bench.json"
    assert bench.main(["--smoke", "--arch", "sd1", "--no-extract", "--json-out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| SD1.5 fp16" in printed and "merge x2" in printed
    doc = json.loads(out.read_text())
    rows = doc["results"][0]["rows"]
    assert {"cp", "cp + sync", "merge x1", "merge x2", "naive x2"} <= set(rows)
    for row in rows.values():
        assert row["min_s"] > 0 and row["peak_rss_mib"] > 0
    assert doc["targets"] and doc["machine"]["cpus"]
    # every case ran on a fresh output: no leftovers in the work folder
    assert not [p for p in (tmp_path / "cache").rglob("out.safetensors")]

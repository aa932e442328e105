"""`lorabake bake` end to end on SD1-shaped bases: outputs equal `lorabake merge`, resume, force,
pins, dry run from headers, recipe round trip from an output's metadata, shards in processes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from lorabake import jobs as jobs_mod
from lorabake.recipe import load_recipe
from lorabake.st_header import read_header
from tests.batchfix import files_under, make_world, merge_args
from tests.cli_helpers import ROOT, run_main

RECIPE_KEYS = (jobs_mod.RECIPE_KEY, jobs_mod.RECIPE_HASH_KEY, jobs_mod.INPUTS_KEY)


@pytest.fixture(scope="module")
def baked(tmp_path_factory):
    """One world baked once by the recipe (6 outputs); tests copy it before changing anything."""
    root = tmp_path_factory.mktemp("baked")
    world = make_world(root)
    code, out, err = run_main(["bake", world["recipe"], "--json"])
    assert code == 0, err
    return {**world, "doc": json.loads(out)}


def _data(path) -> bytes:
    header = read_header(path)
    with open(path, "rb") as fh:
        fh.seek(header.data_offset)
        return fh.read()


def _copy(baked, tmp_path) -> str:
    root = tmp_path / "w"
    shutil.copytree(baked["root"], root)
    return str(root)


def test_outputs_equal_separate_merge_runs(baked, tmp_path):
    doc = baked["doc"]
    assert doc["totals"]["baked"] == 6 and len(doc["jobs"]) == 6
    assert doc["totals"]["base_reads"] == 2  # one streamed read per base, 3 outputs each
    recipe = load_recipe(baked["recipe"])
    for job, row in zip(recipe.jobs, doc["jobs"]):
        ref = tmp_path / "ref" / os.path.basename(job.output_path)  # same file name: same modelspec.title
        ref.parent.mkdir(exist_ok=True)
        args = merge_args(job)
        args[args.index("-o") + 1] = str(ref)
        code, _, err = run_main(args)
        assert code == 0, err
        assert _data(job.output_path) == _data(ref), job.output
        ours, theirs = read_header(job.output_path), read_header(ref)
        assert list(ours.tensors) == list(theirs.tensors)
        assert {k: v for k, v in ours.metadata.items() if k not in RECIPE_KEYS} == theirs.metadata
        assert json.loads(ours.metadata[jobs_mod.RECIPE_KEY]) == job.entry()
        assert ours.metadata[jobs_mod.RECIPE_HASH_KEY] == row["recipe_sha256"] == job.entry_sha256
        with open(job.output_path, "rb") as fh:
            assert hashlib.sha256(fh.read()).hexdigest() == row["sha256"]
    assert files_under(os.path.join(baked["root"], "out")) == sorted(
        os.path.relpath(j.output_path, os.path.join(baked["root"], "out")) for j in recipe.jobs)


def test_rerun_skips_made_outputs_and_refuses_others(baked, tmp_path):
    root = _copy(baked, tmp_path)
    recipe = os.path.join(root, "recipe.toml")
    before = {p: os.stat(os.path.join(root, "out", p)).st_mtime_ns for p in files_under(os.path.join(root, "out"))}
    code, out, err = run_main(["bake", recipe, "--json"])
    assert code == 0, err
    doc = json.loads(out)
    assert [j["status"] for j in doc["jobs"]] == ["skipped"] * 6 and doc["totals"]["base_reads"] == 0
    after = {p: os.stat(os.path.join(root, "out", p)).st_mtime_ns for p in before}
    assert after == before
    # a LoRA rewritten after the outputs were made: refused, nothing rebaked without --force
    style = os.path.join(root, "loras", "style.safetensors")
    os.utime(style, ns=(time.time_ns(), time.time_ns() + 10**9))
    code, _, err = run_main(["bake", recipe])
    assert code == 1 and "modified after it was made" in err and "--force" in err
    assert {p: os.stat(os.path.join(root, "out", p)).st_mtime_ns for p in before} == before
    code, out, err = run_main(["bake", recipe, "--force", "--json"])
    assert code == 0, err
    statuses = [j["status"] for j in json.loads(out)["jobs"]]
    assert statuses == ["baked", "skipped", "baked"] * 2  # the detail-only jobs stay


def test_foreign_file_at_an_output_stops_before_writing(baked, tmp_path):
    root = tmp_path / "w"
    world = make_world(root)
    (root / "out").mkdir()
    (root / "out" / "b-both-0.5.safetensors").write_bytes(b"mine")
    code, _, err = run_main(["bake", world["recipe"]])
    assert code == 1
    assert err.startswith("Error: ") and "b-both-0.5.safetensors" in err and "not a readable safetensors" in err
    assert files_under(root / "out") == ["b-both-0.5.safetensors"]


def test_pin_mismatch_stops_before_any_output(tmp_path):
    one = '[[bake]]\nbase = "bases/a.safetensors"\nloras = ["loras/style.safetensors:0.5"]\noutput = "out/a.safetensors"\n'
    world = make_world(tmp_path, recipe=one)
    whole = hashlib.sha256(open(tmp_path / "loras" / "style.safetensors", "rb").read()).hexdigest()
    data = hashlib.sha256(_data(tmp_path / "bases" / "a.safetensors")).hexdigest()
    for base_pin in ("0" * 64, data):
        with open(world["recipe"], "w") as fh:
            fh.write(one + f'\n[pins]\n"loras/style.safetensors" = {{ sha256 = "{whole}" }}\n'
                           f'"bases/a.safetensors" = {{ data_sha256 = "{base_pin}" }}\n')
        code, _, err = run_main(["bake", world["recipe"]])
        if base_pin != data:  # wrong: stopped before any output, the file and both digests named
            assert code == 1 and "a.safetensors" in err and f"is {data}, the recipe pins {base_pin}" in err
            assert not (tmp_path / "out").exists()
    assert code == 0, err
    meta = read_header(tmp_path / "out" / "a.safetensors").metadata
    assert json.loads(meta[jobs_mod.RECIPE_KEY])["pins"] == {
        "bases/a.safetensors": {"data_sha256": data}, "loras/style.safetensors": {"sha256": whole}}


def test_dry_run_plans_from_headers_only(tmp_path, monkeypatch):
    world = make_world(tmp_path)
    from lorabake import st_reader

    def refuse(*_a, **_k):
        raise AssertionError("dry run read tensor data")

    monkeypatch.setattr(st_reader.SafetensorsReader, "read_into", refuse)
    code, out, err = run_main(["bake", world["recipe"], "--dry-run", "--json"])
    assert code == 0, err
    doc = json.loads(out)
    assert [j["status"] for j in doc["jobs"]] == ["planned"] * 6
    assert [j["modules_applied"] for j in doc["jobs"]] == [3, 3, 6] * 2
    assert not (tmp_path / "out").exists()


def test_unmatched_module_fails_the_plan_before_writing(tmp_path):
    from tests.lorafix import make_lora, save_lora

    world = make_world(tmp_path)
    save_lora(str(tmp_path / "loras" / "detail.safetensors"),
              make_lora([("lora_unet_no_such_block_proj", 320, 320)], rank=4), {"ss_base_model_version": "sd_v1"})
    code, _, err = run_main(["bake", world["recipe"]])
    assert code == 1 and "[[matrix]] #1 base=a loras=detail" in err and "match nothing" in err
    assert not (tmp_path / "out").exists()


def test_round_trip_from_an_outputs_metadata(baked, tmp_path):
    root = _copy(baked, tmp_path)
    out = os.path.join(root, "out", "b-both-0.5.safetensors")
    code, text, err = run_main(["inspect", out, "--json"])
    assert code == 0, err
    recorded = json.loads(text)["files"][0]["recipe"]
    assert recorded["matches"]
    assert recorded["entry"]["loras"] == ["loras/style.safetensors:0.25:0.125", "loras/detail.safetensors:0.5"]
    original = open(out, "rb").read()
    os.remove(out)
    again = os.path.join(root, "again.toml")
    with open(again, "w") as fh:
        fh.write(recorded["toml"])
    code, _, err = run_main(["bake", again])
    assert code == 0, err
    assert open(out, "rb").read() == original


def _spawn(args, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-m", "lorabake", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_three_shards_make_the_same_files_and_nothing_else(baked, tmp_path):
    root = tmp_path / "w"
    world = make_world(root)
    docs = []
    for i in range(3):  # in-process here; scripts/bench_bake.py runs them as three processes
        code, out, err = run_main(["bake", world["recipe"], "--shard", f"{i}/3", "--json"])
        assert code == 0, err
        docs.append(json.loads(out))
    outputs = [j["output"] for d in docs for j in d["jobs"]]
    assert sorted(outputs) == sorted(j["output"] for j in baked["doc"]["jobs"])  # disjoint and complete
    assert [d["totals"]["base_reads"] for d in docs] == [len({j["base"] for j in d["jobs"]}) for d in docs]
    assert files_under(root / "out") == files_under(os.path.join(baked["root"], "out"))  # nothing else
    for name in files_under(root / "out"):
        assert open(root / "out" / name, "rb").read() == open(os.path.join(baked["root"], "out", name), "rb").read()


def test_killed_batch_reruns_to_completion_with_no_partial_file(baked, tmp_path):
    root = tmp_path / "w"
    world = make_world(root)
    proc = _spawn(["bake", world["recipe"]])
    out_dir = root / "out"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            names = os.listdir(out_dir) if out_dir.exists() else []
            # the first finished output: the next job is under way (its temp file may be anonymous, O_TMPFILE)
            if any(n.endswith(".safetensors") and not n.startswith(".") for n in names):
                break
            time.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    left = os.listdir(out_dir)
    finished = [n for n in left if not n.startswith(".")]
    assert 0 < len(finished) < 6, left  # killed halfway
    code, out, err = run_main(["bake", world["recipe"], "--json"])
    assert code == 0, err
    doc = json.loads(out)
    statuses = [j["status"] for j in doc["jobs"]]
    assert statuses.count("skipped") == len(finished) and statuses.count("baked") == 6 - len(finished)
    assert files_under(out_dir) == files_under(os.path.join(baked["root"], "out"))  # no partial file anywhere
    for name in files_under(out_dir):
        assert open(out_dir / name, "rb").read() == open(os.path.join(baked["root"], "out", name), "rb").read()

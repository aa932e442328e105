"""Recipe parsing, matrix expansion, canonical entries and shards: pure, no model file read."""

from __future__ import annotations

import os

import pytest

from lorabake import jobs, recipe, shards
from lorabake.errors import UsageError

MATRIX = """
[defaults]
dtype = "fp16"

[[matrix]]
bases = { sd15 = "models/sd15.safetensors", dream = "models/dream.safetensors" }
loras = { style = ["loras/style.safetensors"], detail = ["loras/detail.safetensors:0.5:0.25"], both = ["loras/style.safetensors:1.0", "loras/detail.safetensors"] }
strengths = [0.5, 1.0]
output = "out/{base}-{loras}-{strength}.safetensors"
"""


def _load(tmp_path, text: str) -> recipe.Recipe:
    path = tmp_path / "r.toml"
    path.write_text(text)
    return recipe.load_recipe(str(path))


def test_minimal_entry_reads_like_the_command(tmp_path):
    r = _load(tmp_path, '[[bake]]\nbase = "sd15.safetensors"\nloras = ["a.safetensors:0.5", "b.safetensors:1.0"]\n'
                        'output = "out/sd15_ab.safetensors"\n')
    (job,) = r.jobs
    assert job.base.resolved == str(tmp_path / "sd15.safetensors")
    assert [(u.resolved, u.strength, u.te_strength) for u in job.loras] == [
        (str(tmp_path / "a.safetensors"), 0.5, None), (str(tmp_path / "b.safetensors"), 1.0, None)]
    assert job.output_path == str(tmp_path / "out" / "sd15_ab.safetensors")
    assert job.entry() == {"base": "sd15.safetensors", "loras": ["a.safetensors:0.5", "b.safetensors:1.0"],
                           "output": "out/sd15_ab.safetensors", "dtype": "keep", "rounding": "nearest",
                           "allow_unmatched": False}


def test_matrix_expands_bases_sets_strengths_in_order(tmp_path):
    r = _load(tmp_path, MATRIX)
    assert len(r.jobs) == 12
    assert [j.index for j in r.jobs] == list(range(12))
    first = r.jobs[0]
    assert first.output == "out/sd15-style-0.5.safetensors" and first.dtype == "fp16"
    assert [u.strength for u in first.loras] == [0.5]
    detail = r.jobs[2]  # sd15, detail, 0.5: the set strength scales both strengths
    assert detail.output == "out/sd15-detail-0.5.safetensors"
    assert (detail.loras[0].strength, detail.loras[0].te_strength) == (0.25, 0.125)
    both = r.jobs[5]
    assert both.output == "out/sd15-both-1.0.safetensors"
    assert [u.lora_text for u in both.loras] == ["loras/style.safetensors:1.0", "loras/detail.safetensors:1.0"]
    assert r.jobs[6].base.text == "models/dream.safetensors"
    assert len({j.output_path for j in r.jobs}) == 12


def test_list_forms_name_by_stem(tmp_path):
    r = _load(tmp_path, '[[matrix]]\nbases = ["a.safetensors", "b.safetensors"]\n'
                        'loras = [["x.safetensors:0.5", "y.safetensors"], ["z.safetensors"]]\n'
                        'output = "o/{base}_{loras}.safetensors"\n')
    assert [j.output for j in r.jobs] == ["o/a_x+y.safetensors", "o/a_z.safetensors",
                                          "o/b_x+y.safetensors", "o/b_z.safetensors"]


def test_parts_entry_makes_one_job_per_base(tmp_path):
    r = _load(tmp_path, """
[[bake]]
name = "wan22 lightning"
dtype = "bf16"
parts = [
  { base = "high.safetensors", loras = ["high_lora.safetensors"], output = "out/{name}-high.safetensors" },
  { base = "low.safetensors", loras = ["low_lora.safetensors:0.8"], output = "out/low.safetensors", dtype = "fp16" },
]
""")
    high, low = r.jobs
    assert high.output == "out/wan22 lightning-high.safetensors" and high.dtype == "bf16"
    assert low.dtype == "fp16" and low.loras[0].strength == 0.8
    assert high.entry()["name"] == "wan22 lightning"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[[bake]]\nbase="a.safetensors"\nloras=["b.safetensors"]\noutput="o.safetensors"\nstrenght=1\n', "unknown key 'strenght'"),
        ('[[bake]]\nbase="a.safetensors"\nloras=["b.safetensors@double:5-2=1"]\noutput="o.safetensors"\n', "runs backwards"),
        ('[[bake]]\nbase="a.safetensors"\nloras=[{path="b.safetensors", blocks=[1]}]\noutput="o.safetensors"\n', "'blocks' is a string"),
        ('[[bake]]\nbase="a.safetensors"\nloras=["b.safetensors"]\noutput="o.safetensors"\nquantization="q8_0"\n', "the key is 'quant'"),
        ('[[bake]]\nbase="a.safetensors"\nloras=["b.safetensors"]\noutput="o.safetensors"\ndtype="fp12"\n', "dtype 'fp12'"),
        ('[[bake]]\nbase="a.safetensors"\nloras=[]\noutput="o.safetensors"\n', "non-empty list"),
        ('[[bake]]\nbase="a.safetensors"\nloras=["b.safetensors"]\n', "missing 'output'"),
        ('[[matrix]]\nbases=["a.safetensors","c.safetensors"]\nloras=[["b.safetensors"]]\noutput="o.safetensors"\n', "both write"),
        ('[[matrix]]\nbases=["a.safetensors"]\nloras=[["b.safetensors"]]\noutput="{model}.safetensors"\n', "unknown field {model}"),
        ('[[bake]]\nbase="a.safetensors"\nloras=["b.safetensors"]\noutput="a.safetensors"\n', "is an input"),
        ('[[bake]]\nbase="a.safetensors"\nloras=["b.safetensors"]\noutput="o.safetensors"\n[pins]\n"a.safetensors"="abc"\n', "64 hex"),
        ('[[bake]]\nbase="a.safetensors"\nloras=["b.safetensors"]\noutput="o.safetensors"\n[pins]\n"zz.safetensors"="' + "0" * 64 + '"\n', "no entry uses"),
        ("[[bake]\n", "not valid TOML"),
        ("title = 'x'\n", "unknown key 'title'"),
    ],
)
def test_bad_recipes_name_the_problem(tmp_path, text, needle):
    with pytest.raises(UsageError) as info:
        _load(tmp_path, text)
    message = str(info.value)
    assert str(tmp_path / "r.toml") in message
    assert needle in message


def test_pins_attach_to_the_jobs_that_use_them(tmp_path):
    digest = "ab" * 32
    r = _load(tmp_path, MATRIX + f'\n[pins]\n"models/sd15.safetensors" = {{ data_sha256 = "{digest}" }}\n'
                                  f'"./loras/style.safetensors" = "{digest.upper()}"\n')
    first = r.jobs[0]
    assert first.entry()["pins"] == {"models/sd15.safetensors": {"data_sha256": digest},
                                     "./loras/style.safetensors": {"sha256": digest}}
    assert "pins" not in r.jobs[8].entry()  # dream + detail uses neither pinned file


def test_entry_toml_round_trips_to_the_same_entry_and_hash(tmp_path):
    r = _load(tmp_path, MATRIX + f'\n[pins]\n"models/sd15.safetensors" = {{ data_sha256 = "{"cd" * 32}" }}\n')
    for job in r.jobs:
        text = jobs.entry_toml(job.entry())
        again = recipe.parse_recipe(recipe.tomllib.loads(text), path=str(tmp_path / "again.toml"))
        (rebuilt,) = again.jobs
        assert rebuilt.entry() == job.entry()
        assert rebuilt.entry_sha256 == job.entry_sha256
        assert rebuilt.output_path == job.output_path
        assert [(u.strength, u.te_strength) for u in rebuilt.loras] == [(u.strength, u.te_strength) for u in job.loras]


def test_recipe_from_metadata_checks_the_hash():
    entry = {"base": "a.safetensors", "loras": ["b.safetensors:1.0"], "output": "o.safetensors"}
    meta = {jobs.RECIPE_KEY: jobs.entry_json(entry), jobs.RECIPE_HASH_KEY: jobs.entry_sha256(entry)}
    assert jobs.recipe_from_metadata(meta)["matches"]
    meta[jobs.RECIPE_HASH_KEY] = "0" * 64
    assert not jobs.recipe_from_metadata(meta)["matches"]
    assert jobs.recipe_from_metadata({}) is None


# -- shards --------------------------------------------------------------------------------
def _many(tmp_path, bases: int, sets: int, strengths: int) -> recipe.Recipe:
    base_list = ", ".join(f'"b{i}.safetensors"' for i in range(bases))
    set_list = ", ".join(f'["l{i}.safetensors"]' for i in range(sets))
    strength_list = ", ".join(str(0.25 * (i + 1)) for i in range(strengths))
    return _load(tmp_path, f"[[matrix]]\nbases = [{base_list}]\nloras = [{set_list}]\nstrengths = [{strength_list}]\n"
                           'output = "o/{base}_{loras}_{strength}.safetensors"\n')


SIZES = {f"b{i}.safetensors": (i % 3 + 1) * 1000 for i in range(10)}


def _size(path: str) -> int:
    return SIZES[os.path.basename(path)]


@pytest.mark.parametrize(("bases", "sets", "strengths"), [(2, 3, 2), (1, 5, 1), (7, 1, 2), (3, 1, 1)])
@pytest.mark.parametrize("count", [1, 2, 3, 4, 7, 13])
def test_shards_are_disjoint_complete_and_stable(tmp_path, bases, sets, strengths, count):
    r = _many(tmp_path, bases, sets, strengths)
    split = shards.assign(r.jobs, count, _size)
    assert len(split) == count
    flat = [j.index for s in split for j in s]
    assert sorted(flat) == list(range(len(r.jobs)))  # each job exactly once
    for s in split:
        assert [j.index for j in s] == sorted(j.index for j in s)
    assert shards.assign(tuple(reversed(r.jobs)), count, _size) == split  # independent of input order
    if count <= bases:  # enough bases: each base is read by exactly one shard
        owners = {}
        for i, s in enumerate(split):
            for j in s:
                assert owners.setdefault(j.base.resolved, i) == i
    if len(r.jobs) >= count:
        assert all(split)  # nobody idles while another shard has several jobs


def test_shards_balance_by_size(tmp_path):
    r = _many(tmp_path, 6, 2, 1)  # sizes 1000, 2000, 3000, 1000, 2000, 3000; 2 jobs each
    split = shards.assign(r.jobs, 2, _size)
    loads = [sum(3 * _size(j.base.resolved) // 2 for j in s) for s in split]
    assert loads[0] == loads[1]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"LORABAKE_SHARD_INDEX": "2", "LORABAKE_SHARD_COUNT": "3"}, (2, 3)),
        ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0"}, (0, 4)),
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"}, (2, 3)),
        ({"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0",
          "SLURM_ARRAY_TASK_STEP": "2"}, (3, 4)),
        ({"JOB_COMPLETION_INDEX": "1", "LORABAKE_SHARD_COUNT": "2"}, (1, 2)),
    ],
)
def test_shard_auto_reads_job_engines(env, expected):
    shard = shards.parse_shard("auto", env)
    assert (shard.index, shard.count) == expected


@pytest.mark.parametrize(
    ("text", "env", "needle"),
    [
        ("3/3", {}, "outside 0..2"),
        ("1", {}, "i/N"),
        ("a/3", {}, "whole number"),
        ("auto", {}, "none of"),
        ("auto", {"JOB_COMPLETION_INDEX": "1"}, "LORABAKE_SHARD_COUNT is not"),
    ],
)
def test_bad_shards_are_usage_errors(text, env, needle):
    with pytest.raises(UsageError, match=needle.replace(".", r"\.")):
        shards.parse_shard(text, env)

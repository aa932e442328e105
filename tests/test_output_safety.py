"""The output path is the only path ever written (issue 17, item 1).

Planted symlinks and files at temporary names, `-o` naming any file of a sharded or diffusers
input, `--force` onto a FIFO, a device, a dangling symlink or a symlink to a precious file, two
bakes racing to one `-o`, and output names as long as the filesystem allows. Each runs with the
anonymous temporary file (O_TMPFILE) and with the named fallback used where there is none.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorabake import outfile
from lorabake.errors import OutputError
from lorabake.st_writer import SafetensorsWriter
from tests.cli_helpers import run_main
from tests.test_errors import make_inputs, one_error, untouched

ENTRIES = [("a", "F32", (2,)), ("b", "F32", (3,))]


@pytest.fixture(params=["anonymous", "named"])
def mode(request, monkeypatch, tmp_path):
    if request.param == "named":
        monkeypatch.setattr(outfile, "_anonymous", lambda folder: None)
    elif outfile._anonymous(str(tmp_path)) is None:
        pytest.skip("this filesystem has no O_TMPFILE")
    return request.param


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("inputs"))


def write_small(target, *, force: bool = False) -> None:
    with SafetensorsWriter(target, ENTRIES, {"k": "v"}, force=force) as w:
        w.write("a", torch.ones(2))
        w.write("b", torch.zeros(3))


def test_planted_symlinks_at_temp_names_are_never_written_through(tmp_path, monkeypatch, mode):
    """Even with the random part guessed, the temp file is created O_EXCL|O_NOFOLLOW: the
    victim behind a planted symlink stays as it was (the old `.<out>.lorabake-tmp-<pid>`
    scheme wrote through it)."""
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    out = tmp_path / "o.safetensors"
    old_scheme = tmp_path / f".o.safetensors{outfile.TMP_MARKER}{os.getpid()}"
    os.symlink(victim, old_scheme)
    guessed = iter(["0" * 16] * 3 + ["1" * 16] * 100)
    monkeypatch.setattr(outfile.secrets, "token_hex", lambda n: next(guessed))
    planted = tmp_path / f".o.safetensors{outfile.TMP_MARKER}{os.getpid()}-{'0' * 16}"
    os.symlink(victim, planted)
    write_small(out)
    assert victim.read_bytes() == b"precious"
    assert os.readlink(planted) == str(victim) and os.readlink(old_scheme) == str(victim)
    assert load_file(str(out))["a"].tolist() == [1.0, 1.0]
    assert sorted(os.listdir(tmp_path)) == sorted(["victim.bin", "o.safetensors", planted.name, old_scheme.name])


def test_every_temp_name_taken_is_an_error_not_a_write_through(tmp_path, monkeypatch):
    monkeypatch.setattr(outfile, "_anonymous", lambda folder: None)
    monkeypatch.setattr(outfile.secrets, "token_hex", lambda n: "f" * 16)
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    os.symlink(victim, tmp_path / f".o.safetensors{outfile.TMP_MARKER}{os.getpid()}-{'f' * 16}")
    with pytest.raises(OutputError, match="cannot create the output: File exists"):
        write_small(tmp_path / "o.safetensors")
    assert victim.read_bytes() == b"precious" and not (tmp_path / "o.safetensors").exists()


def test_two_writers_to_one_path_the_second_fails(tmp_path, mode):
    """Both pass the up-front check; the first commit wins, the second finds it and fails."""
    out = tmp_path / "o.safetensors"
    first = SafetensorsWriter(out, ENTRIES)
    second = SafetensorsWriter(out, ENTRIES)
    with first, second:
        for w, value in ((first, 1.0), (second, 2.0)):
            w.write("a", torch.full((2,), value))
            w.write("b", torch.zeros(3))
        first.commit()
        with pytest.raises(OutputError, match="appeared while baking"):
            second.commit()
    assert load_file(str(out))["a"].tolist() == [1.0, 1.0]
    assert os.listdir(tmp_path) == ["o.safetensors"]


def test_no_replace_without_renameat2_falls_back_to_link(tmp_path, monkeypatch):
    monkeypatch.setattr(outfile, "_anonymous", lambda folder: None)
    monkeypatch.setattr(outfile, "_NOREPLACE", {})
    write_small(tmp_path / "first.safetensors")  # link, then unlink the temporary name
    assert load_file(str(tmp_path / "first.safetensors"))["a"].tolist() == [1.0, 1.0]
    out = tmp_path / "o.safetensors"
    with pytest.raises(OutputError, match="appeared while baking"):
        with SafetensorsWriter(out, ENTRIES) as w:
            w.write("a", torch.full((2,), 5.0))
            w.write("b", torch.zeros(3))
            out.write_bytes(b"someone else's")  # lands after the up-front check
    assert out.read_bytes() == b"someone else's"
    assert sorted(os.listdir(tmp_path)) == ["first.safetensors", "o.safetensors"]


def test_a_bake_racing_another_to_the_same_output_fails(tmp_path, good, monkeypatch, mode):
    """Through the CLI: another process commits to -o while this bake runs."""
    from lorabake import st_writer

    real_write, real_copy = st_writer.SafetensorsWriter.write, st_writer.SafetensorsWriter.copy_from
    out = tmp_path / "o.safetensors"

    def other_bake_commits(self):
        if self._next == 1:
            out.write_bytes(b"the other bake")

    def write(self, name, data):
        real_write(self, name, data)
        other_bake_commits(self)

    def copy_from(self, name, fd, offset):  # unchanged tensors are copied, not written
        real_copy(self, name, fd, offset)
        other_bake_commits(self)

    monkeypatch.setattr(st_writer.SafetensorsWriter, "write", write)
    monkeypatch.setattr(st_writer.SafetensorsWriter, "copy_from", copy_from)
    base, lora = good
    with untouched(os.path.dirname(base)):
        one_error(run_main(["merge", base, "--lora", lora, "-o", str(out)]), str(out), "appeared while baking", "--force")
    assert out.read_bytes() == b"the other bake"
    assert os.listdir(tmp_path) == ["o.safetensors"]


def test_dangling_symlink_at_output_needs_force_and_only_the_link_is_replaced(tmp_path, good, mode):
    base, lora = good
    out = tmp_path / "o.safetensors"
    nowhere = tmp_path / "sub" / "created-through-the-link.safetensors"
    (tmp_path / "sub").mkdir()
    os.symlink(nowhere, out)
    with untouched(tmp_path, os.path.dirname(base)):
        one_error(run_main(["merge", base, "--lora", lora, "-o", str(out)]), str(out), "exists (a symlink)", "--force")
    code, _, err = run_main(["merge", base, "--lora", lora, "-o", str(out), "--force", "--quiet"])
    assert code == 0, err
    assert not out.is_symlink() and out.is_file() and not nowhere.exists()
    assert len(load_file(str(out))) > 0


def test_force_replaces_a_symlink_itself_never_its_target(tmp_path, good, mode):
    base, lora = good
    victim = tmp_path / "victim.safetensors"
    save_file({"x": torch.ones(4)}, str(victim))
    before = victim.read_bytes()
    out = tmp_path / "o.safetensors"
    os.symlink(victim, out)
    code, _, err = run_main(["merge", base, "--lora", lora, "-o", str(out), "--force", "--quiet"])
    assert code == 0, err
    assert victim.read_bytes() == before
    assert not out.is_symlink() and "x" not in load_file(str(out))


def test_force_refuses_fifo_and_device(tmp_path, good, mode):
    base, lora = good
    fifo = tmp_path / "o.safetensors"
    os.mkfifo(fifo)
    with untouched(os.path.dirname(base)):
        one_error(run_main(["merge", base, "--lora", lora, "-o", str(fifo), "--force"]), str(fifo),
                  "is a FIFO; --force replaces only regular files and symlinks")
        one_error(run_main(["merge", base, "--lora", lora, "-o", os.devnull, "--force"]), os.devnull,
                  "is a character device")
    assert os.listdir(tmp_path) == ["o.safetensors"] and not fifo.is_file()
    with pytest.raises(OutputError, match="is a FIFO"):
        write_small(fifo, force=True)  # the writer checks again, not only the CLI


def _sharded_base(folder) -> str:
    """`m.safetensors.index.json` and two shards holding the SD1 test base's tensors."""
    base, _ = make_inputs(folder / "src")
    tensors = load_file(base)
    names = sorted(tensors)
    shards = {"m-00001-of-00002.safetensors": names[: len(names) // 2], "m-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / shard))
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    index = folder / "m.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return str(index)


@pytest.mark.parametrize("named", ["m-00001-of-00002.safetensors", "m-00002-of-00002.safetensors", "m.safetensors.index.json"])
@pytest.mark.parametrize("given", ["index", "folder"])
def test_output_may_not_name_any_file_of_a_sharded_input(tmp_path, named, given):
    index = _sharded_base(tmp_path)
    lora = str(tmp_path / "src" / "lora.safetensors")
    base = index if given == "index" else str(tmp_path)
    with untouched(tmp_path):
        for extra in ([], ["--force"]):
            one_error(run_main(["merge", base, "--lora", lora, "-o", str(tmp_path / named), *extra]),
                      named, "output path is one of the inputs")
        one_error(run_main(["extract", base, base, "-o", str(tmp_path / named), "--force"]), "one of the inputs")


@pytest.mark.parametrize("named", ["model_index.json", "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"])
def test_output_may_not_name_any_file_of_a_diffusers_folder(tmp_path, named):
    folder = tmp_path / "pipe"
    (folder / "unet").mkdir(parents=True)
    (folder / "text_encoder").mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    save_file({"down_blocks.0.attentions.0.proj_in.weight": torch.ones(4, 4)}, str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    save_file({"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.ones(4, 4)}, str(folder / "text_encoder" / "model.safetensors"))
    lora = tmp_path / "l.safetensors"
    save_file({"x": torch.ones(1)}, str(lora))
    with untouched(tmp_path):
        one_error(run_main(["merge", str(folder), "--lora", str(lora), "-o", str(folder / named), "--force"]),
                  "output path is one of the inputs")


def test_output_symlinked_to_an_input_is_refused(tmp_path, good):
    base, lora = good
    link = tmp_path / "o.safetensors"
    os.symlink(base, link)
    with untouched(os.path.dirname(base)):
        one_error(run_main(["merge", base, "--lora", lora, "-o", str(link), "--force"]), "one of the inputs")


def test_output_names_as_long_as_the_filesystem_allows(tmp_path, good, mode):
    base, lora = good
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    out = tmp_path / ("x" * (limit - len(".safetensors")) + ".safetensors")
    assert len(out.name) == limit
    for extra in ([], ["--force"]):
        code, _, err = run_main(["merge", base, "--lora", lora, "-o", str(out), "--quiet", *extra])
        assert code == 0, err
    assert os.listdir(tmp_path) == [out.name]
    assert all(len(os.fsencode(os.path.basename(outfile.temp_name(str(out))))) <= limit for _ in range(3))

"""The device pipeline (lorabake/pipeline.py): the same bytes as the plain bake kernel.

On the CPU (`HostBackend`) the pipeline must give bit for bit what `bake_kernel.bake_tensor`
gives: same ops, same blocks. The CUDA branch's logic (staging slots, three streams, events,
slot reuse) is run on CPU tensors by `LazyStreams`, a stand-in with CUDA's contract taken
literally: work issued to a stream runs only when something waits for it, as late as allowed,
and every staging/device buffer starts as NaN bytes. A missing wait or an early slot reuse then
reads NaN or another block's rows; the last tests show that it does.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lorabake import bake_kernel, pipeline, rounding
from tests.cli_helpers import run_main
from tests.test_bake_kernel import CASES as KERNEL_CASES
from tests.test_bake_kernel import fused_qkv, lora, rnd
from tests.test_merge import CASES as MERGE_CASES
from tests.test_merge import build_case

CPU = torch.device("cpu")
PRODUCTION_BLOCK = bake_kernel.BLOCK_ELEMS


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(bake_kernel, "BLOCK_ELEMS", 3 * 1280 + 17)  # many blocks, never aligned


def plain(stored, patches, out_dtype, mode="nearest"):
    codec = bake_kernel.FloatRows(stored.clone(), out_dtype, rounding_mode=mode, seed_key="k")
    lost = bake_kernel.bake_tensor(codec, patches, device=CPU)
    return codec.result(), lost


def piped(stored, patches, out_dtype, mode="nearest", backend=None):
    pipe = pipeline.Pipeline(backend or pipeline.HostBackend(CPU), block_elems=bake_kernel.BLOCK_ELEMS)
    before = stored.clone()
    done = pipe.bake(stored, patches, out_dtype, rounding_mode=mode, seed_key="k")
    assert torch.equal(stored.view(torch.uint8), before.view(torch.uint8))  # the input is never written
    return done


def same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


# The kernel's cases (real shapes, checked against whole-tensor math in test_bake_kernel; FLUX's fused qkv
# and swapped halves at SDXL width 1280, still more than one noise chunk (rounding._CHUNK) for the
# stochastic tests and with slice edges inside the 3-row blocks). One real-shape FLUX qkv case stays
# (test_host_pipeline_on_flux_qkv).
CASES = KERNEL_CASES


DTYPES = [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
          (torch.float16, torch.float32), (torch.bfloat16, torch.float8_e4m3fn)]
FOLDED = sorted(c for c in CASES if c != "dora_between")


@pytest.mark.parametrize("case", FOLDED)
@pytest.mark.parametrize(("stored_dtype", "out_dtype"), DTYPES)
def test_host_pipeline_is_the_plain_kernel_bit_for_bit(case, stored_dtype, out_dtype):
    shape, patches = CASES[case]()
    stored = rnd(*shape).to(stored_dtype)
    want, want_lost = plain(stored, patches, out_dtype)
    got, got_lost = piped(stored, patches, out_dtype)
    same_bits(got, want)
    assert got_lost == want_lost  # same blocks, same sums


def test_host_pipeline_on_flux_qkv():
    """The kernel's real-shape FLUX.1 fused qkv [9216, 3072], three slices and v twice, narrowed fp32 -> bf16."""
    shape, patches = fused_qkv(3072)
    assert shape == (9216, 3072)
    stored = rnd(*shape)
    want, want_lost = plain(stored, patches, torch.bfloat16)
    got, got_lost = piped(stored, patches, torch.bfloat16)
    same_bits(got, want)
    assert got_lost == want_lost


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float8_e5m2])
def test_stochastic_rounding_takes_the_same_noise(out_dtype):
    shape, patches = CASES["qkv_slices"]()
    stored = rnd(*shape).to(torch.float32)  # narrowed: slices and untouched rows both re-encoded
    assert stored.numel() > rounding._CHUNK  # the noise stream crosses a chunk edge mid-tensor
    got, _ = piped(stored, patches, out_dtype, mode="stochastic")
    same_bits(got, plain(stored, patches, out_dtype, mode="stochastic")[0])


def test_weight_dependent_adapters_go_to_the_plain_path():
    shape, patches = CASES["dora_between"]()
    assert piped(rnd(*shape).half(), patches, torch.float16) is None


@pytest.mark.parametrize(("value", "out_dtype"), [(7e4, torch.float16), (float("nan"), torch.bfloat16)])
def test_a_value_out_of_range_goes_to_the_plain_path(value, out_dtype):
    """fp16 overflow or NaN: the plain path's guard raises (or saturates); the pipeline does not decide."""
    stored = rnd(640, 1280)
    stored[500, 3] = value  # in a late block, after earlier blocks were already drained
    assert piped(stored, [lora(640, (1280,), 8)], out_dtype) is None


# --- the CUDA branch, on CPU tensors ---------------------------------------------------------


class _Stream:
    def __init__(self) -> None:
        self.queue: list = []
        self.done = 0


class _Event:
    def __init__(self) -> None:
        self.stream: _Stream | None = None
        self.pos = 0


class LazyStreams(pipeline.HostBackend):
    """CUDA's stream/event/pinned contract on CPU tensors, with work run as late as it may be."""

    def __init__(self) -> None:
        super().__init__(CPU)
        self.pinned: list[torch.Tensor] = []
        self.on_device: list[torch.Tensor] = []
        self.streams: list[_Stream] = []
        self.syncs = 0
        self.uploads = self.downloads = 0  # copies issued (staging slot → device, device → staging slot)
        self.uploads_at_first_sync: int | None = None

    def stream(self):
        self.streams.append(_Stream())
        return self.streams[-1]

    def event(self):
        return _Event()

    def run(self, stream, fn) -> None:
        assert isinstance(stream, _Stream), "device work outside a stream"
        stream.queue.append(fn)
        kind = {0: "uploads", 2: "downloads"}.get(self.streams.index(stream))
        if kind:  # one issue per block on the upload and download streams
            setattr(self, kind, getattr(self, kind) + 1)

    def wait(self, stream, event) -> None:
        src, pos = event.stream, event.pos  # CUDA waits for what was recorded when wait is called
        stream.queue.append(lambda: src and self._flush(src, pos))

    def record(self, event, stream) -> None:
        event.stream, event.pos = stream, len(stream.queue)

    def sync(self, event) -> None:
        if self.uploads_at_first_sync is None:
            self.uploads_at_first_sync = self.uploads
        self.syncs += 1
        if event.stream is not None:
            self._flush(event.stream, event.pos)

    def _flush(self, stream: _Stream, pos: int) -> None:
        while stream.done < pos:
            fn = stream.queue[stream.done]
            stream.done += 1
            fn()

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        self.pinned.append(torch.full((nbytes,), 0xFF, dtype=torch.uint8))  # 0xFF..: NaN in every float type
        return self.pinned[-1]

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        self.on_device.append(torch.full((nbytes,), 0xFF, dtype=torch.uint8))
        return self.on_device[-1]

    def _in(self, t: torch.Tensor, bufs: list[torch.Tensor]) -> bool:
        ptr = t.untyped_storage().data_ptr()
        return any(b.untyped_storage().data_ptr() == ptr for b in bufs)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        up = self._in(dst, self.on_device) and self._in(src, self.pinned)
        down = self._in(dst, self.pinned) and self._in(src, self.on_device)
        assert up or down, "a copy between the device and pageable memory (synchronous on CUDA)"
        dst.copy_(src)

    def upload(self, stream, t: torch.Tensor) -> torch.Tensor:
        d = torch.full_like(t, float("nan"))
        self.on_device.append(d)
        stream.queue.append(lambda: d.copy_(t))
        return d


@pytest.mark.parametrize("case", ["four_loras", "qkv_slices", "mixed_linear", "nothing"])
@pytest.mark.parametrize(("stored_dtype", "out_dtype"), [(torch.float16, torch.float16), (torch.float32, torch.bfloat16)])
def test_stream_pipeline_is_the_plain_kernel_bit_for_bit(case, stored_dtype, out_dtype):
    shape, patches = CASES[case]()
    stored = rnd(*shape).to(stored_dtype)
    want, want_lost = plain(stored, patches, out_dtype)
    fake = LazyStreams()
    got, got_lost = piped(stored, patches, out_dtype, backend=fake)
    same_bits(got, want)
    assert got_lost == want_lost
    if case != "nothing" or stored_dtype != out_dtype:
        assert fake.uploads == fake.downloads > pipeline.SLOTS
        # the host waits once per block, for its download, and first when SLOTS blocks are in flight
        assert fake.syncs == fake.downloads
        assert fake.uploads_at_first_sync == pipeline.SLOTS
        assert all(s.done == len(s.queue) for s in fake.streams[1:])  # every math and download ran


def test_stochastic_rounding_through_streams():
    shape, patches = CASES["qkv_slices"]()
    stored = rnd(*shape)
    assert stored.numel() > rounding._CHUNK
    got, _ = piped(stored, patches, torch.bfloat16, mode="stochastic", backend=LazyStreams())
    same_bits(got, plain(stored, patches, torch.bfloat16, mode="stochastic")[0])


def test_buffers_are_reused_across_tensors():
    fake = LazyStreams()
    pipe = pipeline.Pipeline(fake, block_elems=bake_kernel.BLOCK_ELEMS)
    for case in ("four_loras", "transpose", "four_loras"):
        shape, patches = CASES[case]()
        stored = rnd(*shape).half()
        got, _ = pipe.bake(stored, patches, torch.float16, seed_key="k")
        same_bits(got, plain(stored, patches, torch.float16)[0])
    assert len(fake.pinned) == pipeline.SLOTS * 3  # host_in, host_out and host_peak per slot, allocated once


@pytest.mark.parametrize("broken", ["wait", "sync", "record"])
def test_the_stand_in_catches_a_missing_wait(monkeypatch, broken):
    """Without one of the orderings the stand-in yields different bytes: the tests above can fail."""
    shape, patches = CASES["four_loras"]()
    stored = rnd(*shape).half()
    want, _ = plain(stored, patches, torch.float16)
    fake = LazyStreams()
    if broken == "record":  # events that mark nothing: waits wait for nothing
        monkeypatch.setattr(fake, "record", lambda event, stream: None)
    else:
        monkeypatch.setattr(fake, broken, lambda *a: None)
    done = piped(stored, patches, torch.float16, backend=fake)
    assert done is None or not torch.equal(done[0].view(torch.int16), want.view(torch.int16))


# torch at its default thread count (the session runs it at 1, see conftest.py): on the CPU both the bake
# threads and the pipeline run torch single-threaded, or a multi-threaded GEMM sums in another order and
# the pipeline's bits differ from the threads' (7e92a59; a whole merge at the production block size here
# does not show it, one at 3 * 1280 + 17 values per block did)
@pytest.mark.torch_threads
def test_backends_and_when_the_pipeline_runs(monkeypatch):
    assert type(pipeline.backend_for(torch.device("cuda", 0))) is pipeline.CudaBackend
    assert type(pipeline.backend_for(torch.device("mps"))) is pipeline.MpsBackend
    assert type(pipeline.backend_for(CPU)) is pipeline.HostBackend
    threads = torch.get_num_threads()
    assert threads >= 2
    monkeypatch.delenv(pipeline.ENV, raising=False)
    assert pipeline.wanted(torch.device("cuda")) and not pipeline.wanted(CPU)
    with pipeline.compute(CPU) as (pool, _, pipe):  # no pool on a 1-core machine
        assert pipe is None and (pool is None or torch.get_num_threads() == 1)
    assert torch.get_num_threads() == threads
    monkeypatch.setenv(pipeline.ENV, "1")
    with pipeline.compute(CPU) as (pool, workers, pipe):
        assert isinstance(pipe, pipeline.Pipeline) and pool is None and workers == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == threads


# --- a whole merge ---------------------------------------------------------------------------


@pytest.fixture
def baked(monkeypatch) -> list:
    """What each `Pipeline.bake` of a merge returned ("plain" when it handed the tensor back)."""
    seen, real = [], pipeline.Pipeline.bake

    def spy(self, *a, **kw):
        done = real(self, *a, **kw)
        seen.append("plain" if done is None else "piped")
        return done

    monkeypatch.setattr(pipeline.Pipeline, "bake", spy)
    return seen


@pytest.fixture
def production_blocks(monkeypatch):
    """Whole merges at the block size users get (the kernel-level tests above use tiny blocks): SD1's
    larger tensors still span many blocks (the mid-block conv 59, a feed-forward 51), more than SLOTS
    blocks in flight."""
    monkeypatch.setattr(bake_kernel, "BLOCK_ELEMS", PRODUCTION_BLOCK)
    assert 1280 * 1280 * 9 > 2 * pipeline.SLOTS * PRODUCTION_BLOCK  # the mid-block conv [1280, 1280, 3, 3]


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """The folder of test_merge's SD1 base and LoRA, built once for the merges below."""
    folder = tmp_path_factory.mktemp("sd1")
    _, arch, patterns, dtype, naming, rows, metadata = MERGE_CASES[0]
    build_case(folder, arch, patterns, dtype, naming, rows, metadata)
    return folder


def _merge(tmp_path, sd1, monkeypatch, env: str | None, *extra: str) -> tuple[int, str, str]:
    if env is None:
        monkeypatch.delenv(pipeline.ENV, raising=False)
    else:
        monkeypatch.setenv(pipeline.ENV, env)
    (tmp_path / f"env-{env}").mkdir(exist_ok=True)
    out = tmp_path / f"env-{env}" / "o.safetensors"  # the output's name is in its metadata
    code, stdout, err = run_main(["merge", str(sd1 / "base.safetensors"), "--lora", str(sd1 / "lora0.safetensors"),
                                  "-o", str(out), "--device", "cpu", *extra])
    return code, err, str(out)


@pytest.mark.torch_threads  # as a user's merge: torch at its default thread count outside the bake
@pytest.mark.parametrize("extra", [(), ("--dtype", "bf16"), ("--dtype", "fp16", "--rounding", "stochastic")])
def test_merge_through_the_pipeline_writes_the_same_file(tmp_path, sd1, monkeypatch, production_blocks, baked, extra):
    code, err, plain_out = _merge(tmp_path, sd1, monkeypatch, None, *extra)
    assert code == 0, err
    assert not baked
    code, err, piped_out = _merge(tmp_path, sd1, monkeypatch, "1", *extra)
    assert code == 0, err
    assert baked and set(baked) == {"piped"}
    with open(plain_out, "rb") as a, open(piped_out, "rb") as b:
        assert a.read() == b.read()
    assert any(not torch.equal(t, load_file(str(sd1 / "base.safetensors"))[k]) for k, t in load_file(piped_out).items())


def test_merge_out_of_range_is_the_same_error_through_the_pipeline(tmp_path, sd1, monkeypatch, production_blocks, baked):
    """A strength that overflows fp16: the pipeline hands the tensor to the guarded plain path."""
    lora_path = str(sd1 / "lora0.safetensors")
    outs = {}
    for env in (None, "1"):
        if env is None:
            monkeypatch.delenv(pipeline.ENV, raising=False)
        else:
            monkeypatch.setenv(pipeline.ENV, env)
        (tmp_path / f"big-{env}").mkdir()
        out = tmp_path / f"big-{env}" / "big.safetensors"
        args = ["merge", str(sd1 / "base.safetensors"), "--lora", f"{lora_path}:1e9", "-o", str(out), "--device", "cpu", "--dtype", "fp16"]
        code, _, err = run_main(args)
        assert code == 1 and "range" in err and not out.exists()
        code, _, err = run_main([*args, "--saturate"])
        assert code == 0, err
        outs[env] = out.read_bytes()
    assert outs[None] == outs["1"]
    assert "plain" in baked


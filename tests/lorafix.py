"""LoRA fixture builders: real stems and shapes in, a dict of adapter tensors out.

    mods = [("lora_unet_down_blocks_0_attentions_0_proj_in", 320, 320),
            ("lora_unet_down_blocks_0_resnets_0_conv1", 320, 320, 3)]
    tensors = make_lora(mods, algo="loha", rank=4, conv3x3=True)
    save_lora(path, tensors, {"ss_base_model_version": "sd_v1"})

The caller spells each stem for its flavour (kohya `lora_unet_…`, PEFT `transformer.…`, old
attn-proc `unet.….processor.to_q`); the builder appends the suffixes of `naming` for plain LoRA
and the LyCORIS suffixes for the other algorithms. Values are small random numbers (randn·0.1)
from a seeded generator, so ΔW is well conditioned and tests are repeatable.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from safetensors.torch import save_file

from lorabake import dtypes
from lorabake.st_header import TensorInfo

# naming -> (up suffix, down suffix); LyCORIS-only parts (mid, dora_scale) use kohya spelling.
NAMINGS = {
    "kohya": (".lora_up.weight", ".lora_down.weight"),
    "peft": (".lora_B.weight", ".lora_A.weight"),
    "diffusers": (".lora.up.weight", ".lora.down.weight"),
    "diffusers_old": ("_lora.up.weight", "_lora.down.weight"),  # stem ends `processor.to_q`
    "lora_linear_layer": (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    "mochi": (".lora_B", ".lora_A"),
}
ALGOS = ("lora", "loha", "lokr", "full", "norm", "ia3", "glora", "oft")

_DEFAULT = object()

ModuleSpec = Sequence  # (stem, out_features, in_features[, kernel int | (kh, kw)])


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m·n = dim and m ≤ n, m the largest divisor ≤ √dim (LyCORIS factor=-1 idea);
    with factor > 0 dividing dim, (factor, dim // factor)."""
    if factor > 0 and dim % factor == 0:
        return (factor, dim // factor) if factor <= dim // factor else (dim // factor, factor)
    m = int(math.isqrt(dim))
    while dim % m:
        m -= 1
    return m, dim // m


def make_lora(
    modules: Iterable[ModuleSpec],
    *,
    algo: str = "lora",
    rank: int = 4,
    alpha: float | None = _DEFAULT,  # type: ignore[assignment]
    naming: str = "kohya",
    conv3x3: bool = False,
    tucker: bool = False,
    dora: bool = False,
    lokr_w1: str = "full",
    lokr_w2: str = "factored",
    lokr_factor: int = -1,
    bias: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Adapter tensors for `modules`, in order.

    - `algo`: one of ALGOS ("lora" covers LoCon, 3x3 and Tucker `mid`).
    - `alpha`: default writes alpha = rank for kohya naming and LyCORIS algorithms, no alpha
      for PEFT/diffusers namings (they keep it in metadata); None never writes one; a number
      always writes one (shape [] ).
    - `conv3x3`: modules with a kernel > 1 are skipped unless True (kohya trains 3x3 convs
      only with --conv_dim); 1x1 kernels are always included.
    - `tucker`: 3x3 modules get a Tucker core (LoCon `lora_mid`, LoHa `hada_t1/t2`, LoKr
      `lokr_t2` when `lokr_w2="factored"`).
    - `dora`: kohya naming writes `dora_scale` [out, 1(,1,1)], PEFT namings
      `lora_magnitude_vector` [out].
    - LoKr: `lokr_w1` "full" | "factored", `lokr_w2` "full" | "factored"; factors of out/in
      from `factorization(·, lokr_factor)`.
    - "full" writes `diff` and (with `bias`) `diff_b`; "norm" writes `w_norm`/`b_norm` of
      size out_features; "ia3" writes `weight` [out] + `on_input`; "oft" writes diag-OFT
      `oft_blocks` [out/rank, rank, rank] (rank = block size).
    """
    if algo not in ALGOS:
        raise ValueError(f"algo {algo!r} not in {ALGOS}")
    if naming not in NAMINGS:
        raise ValueError(f"naming {naming!r} not in {sorted(NAMINGS)}")
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=gen, dtype=torch.float32) * 0.1).to(dtype)

    # kohya writes an alpha for every LoRA module, LyCORIS for every factorised algorithm;
    # PEFT/diffusers keep alpha in metadata; full/norm/ia3 have no alpha by default.
    write_alpha = alpha is not None and (
        alpha is not _DEFAULT
        or algo in ("loha", "lokr", "glora", "oft")
        or (algo == "lora" and naming == "kohya")
    )
    alpha_value = float(rank) if alpha is _DEFAULT else alpha
    up_sfx, down_sfx = NAMINGS[naming]
    peft_like = naming not in ("kohya",)
    out: dict[str, torch.Tensor] = {}
    for spec in modules:
        stem, n_out, n_in = spec[0], int(spec[1]), int(spec[2])
        kernel = _kernel(spec[3]) if len(spec) > 3 else None
        if kernel is not None and kernel != (1, 1) and not conv3x3:
            continue
        k = kernel or ()
        big = kernel is not None and kernel != (1, 1)
        ones = (1, 1) if kernel else ()
        if algo == "lora":
            if tucker and big:
                out[stem + down_sfx] = rnd(rank, n_in, 1, 1)
                out[stem + ".lora_mid.weight"] = rnd(rank, rank, *k)
            else:
                out[stem + down_sfx] = rnd(rank, n_in, *k)
            out[stem + up_sfx] = rnd(n_out, rank, *ones)
        elif algo == "loha":
            for n in ("1", "2"):
                if tucker and big:
                    out[f"{stem}.hada_w{n}_a"] = rnd(rank, n_out)
                    out[f"{stem}.hada_w{n}_b"] = rnd(rank, n_in)
                    out[f"{stem}.hada_t{n}"] = rnd(rank, rank, *k)
                else:
                    out[f"{stem}.hada_w{n}_a"] = rnd(n_out, rank)
                    out[f"{stem}.hada_w{n}_b"] = rnd(rank, n_in * math.prod(k))
        elif algo == "lokr":
            a, b = factorization(n_out, lokr_factor)
            c, d = factorization(n_in, lokr_factor)
            if lokr_w1 == "full":
                out[f"{stem}.lokr_w1"] = rnd(a, c)
            else:
                out[f"{stem}.lokr_w1_a"] = rnd(a, rank)
                out[f"{stem}.lokr_w1_b"] = rnd(rank, c)
            if lokr_w2 == "full":
                out[f"{stem}.lokr_w2"] = rnd(b, d, *k)
            elif tucker and big:
                out[f"{stem}.lokr_t2"] = rnd(rank, rank, *k)
                out[f"{stem}.lokr_w2_a"] = rnd(rank, b)
                out[f"{stem}.lokr_w2_b"] = rnd(rank, d)
            else:
                out[f"{stem}.lokr_w2_a"] = rnd(b, rank)
                out[f"{stem}.lokr_w2_b"] = rnd(rank, d * math.prod(k))
        elif algo == "full":
            out[f"{stem}.diff"] = rnd(n_out, n_in, *k)
            if bias:
                out[f"{stem}.diff_b"] = rnd(n_out)
        elif algo == "norm":
            out[f"{stem}.w_norm"] = rnd(n_out)
            if bias:
                out[f"{stem}.b_norm"] = rnd(n_out)
        elif algo == "ia3":
            out[f"{stem}.weight"] = rnd(n_out)
            out[f"{stem}.on_input"] = torch.tensor(False)
        elif algo == "glora":  # LyCORIS glora.py Linear weights: a2 in->r, a1 r->in, b2 in->r, b1 r->out
            out[f"{stem}.a1.weight"] = rnd(n_in, rank)
            out[f"{stem}.a2.weight"] = rnd(rank, n_in)
            out[f"{stem}.b1.weight"] = rnd(n_out, rank)
            out[f"{stem}.b2.weight"] = rnd(rank, n_in)
        elif algo == "oft":
            if n_out % rank:
                raise ValueError(f"OFT block size {rank} does not divide {n_out}")
            out[f"{stem}.oft_blocks"] = rnd(n_out // rank, rank, rank)
        if write_alpha:
            out[f"{stem}.alpha"] = torch.tensor(alpha_value, dtype=dtype)
        if dora and algo in ("lora", "loha", "lokr"):
            if peft_like:
                out[f"{stem}.lora_magnitude_vector"] = (1 + rnd(n_out)).to(dtype)
            else:
                out[f"{stem}.dora_scale"] = (1 + rnd(n_out, 1, *ones)).to(dtype)
    return out


def _kernel(k) -> tuple[int, int]:
    return (int(k), int(k)) if isinstance(k, int) else tuple(int(x) for x in k)


def save_lora(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write `tensors` (+ string metadata) as safetensors; returns the path."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return str(path)


def header_of(tensors: dict[str, torch.Tensor]) -> dict[str, TensorInfo]:
    """TensorInfo per key as a written file's header would give (no file needed)."""
    out: dict[str, TensorInfo] = {}
    cursor = 0
    for name, t in tensors.items():
        tag = dtypes.tag_of(t.dtype)
        size = dtypes.nbytes(tag, tuple(t.shape))
        out[name] = TensorInfo(name, tag, tuple(t.shape), cursor, cursor + size)
        cursor += size
    return out


def fake_header(shapes: dict[str, tuple[int, ...]], tag: str = "F16") -> dict[str, TensorInfo]:
    """TensorInfo per key from bare shapes, for header-only tests of odd layouts."""
    out: dict[str, TensorInfo] = {}
    cursor = 0
    for name, shape in shapes.items():
        size = dtypes.nbytes(tag, tuple(shape))
        out[name] = TensorInfo(name, tag, tuple(shape), cursor, cursor + size)
        cursor += size
    return out

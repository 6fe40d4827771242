"""Checkpoint -> model: the checks before loading, the dtype, the fill (which tensors fill which
parameter: moge_cli.names.parameter_sources).

`load_model` builds a MoGEForCausalLM (moge_cli.model) on the meta device and materialises each
parameter from the memory-mapped file; a compressed-tensors checkpoint goes through `load_quantized`,
which puts a QLinear (moge_kernels.qlinear; built by `qlinear` from the parts moge_cli.quant_format
reads) wherever a quantized weight was: attention, lm_head, the routed experts ([E, N, K] stacks, one
expert picked per call), the shared expert and dense MLPs. The model's modules run either kind of
weight through moge_kernels.ops. Embeddings, and any weight whose parts mix schemes, are dequantised
once. Calibration (converters/calibrate.py) loads one layer at a time with `checked_sources`,
`checkpoint_dtype` and `materialize`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from moge_cli import hugepages
from moge_cli.checkpoint import Checkpoint, open_checkpoint
from moge_cli.dtypes import loaded_dtype_name, resolve_dtype, torch_dtype
from moge_cli.errors import CheckpointError, UsageError
from moge_kernels.ops import runs_natively
from moge_kernels.qlinear import KERNELS, Parts, QLinear, dequantize
from moge_cli.model import MoGEForCausalLM
from moge_cli.names import PER_EXPERT, PER_EXPERT_RE, SHAPE, STACKED_RE, expected_tensors, module_of, parameter_sources, skipped_reason, tensor_name
from moge_cli.quant_format import QuantizedCheckpoint, Scheme, expected_quantized, quantization_of, read_module

LOAD_CHUNK_BYTES = 1 << 20  # file bytes mapped at a time while loading
DEFAULT_KERNEL = os.environ.get("MOGE_QUANT_KERNEL", "native")  # which kernels run quantized weights: moge_kernels.qlinear.KERNELS
LINEAR_PARAMS = ("qkv_weight", "o_weight", "lm_head", "gate_up", "down", "shared_w13", "shared_w2", "w13", "w2")  # a QLinear may take their place


# ---- float and quantized checkpoints ------------------------------------------------------------
def load_model(path, *, dtype=None, device="cpu", revision=None, experts: tuple[int, int] | None = None, narrow=None) -> MoGEForCausalLM:
    """Load a per-expert or stacked checkpoint (path, repo id or open Checkpoint) for inference.

    dtype: "float32" / "bfloat16" / "float16" / torch dtype, or None for the checkpoint's dtype.
    The model is built on the meta device and each parameter is then materialised from the
    memory-mapped file (per-expert tensors stacked straight into [E, 2I, H] / [E, H, I]); the
    mapped pages are released after every parameter, so file data never sits beside the model.
    A quantized (compressed-tensors) checkpoint is loaded by `load_quantized`.
    experts (first, stop): hold only those routed experts in every MoE layer (expert parallelism,
    moge_cli.distributed): their stacks are [stop - first, ...] and only their bytes are read.
    narrow: expected tensors -> the ones this checkpoint holds (a rank directory of `convert --ep`: moge_cli.ep.local_expected).
    """
    hugepages.keep_freed_memory()  # before anything big is allocated: the first prefill then runs as a warm one
    ckpt = path if isinstance(path, Checkpoint) else open_checkpoint(path, revision=revision)
    try:
        if (quant := quantization_of(ckpt)) is not None:
            if experts is not None:
                raise UsageError(f"{ckpt.root}: expert parallelism runs float checkpoints; this one is quantized")
            return load_quantized(ckpt, quant, dtype=dtype, device=device)
        sources = checked_sources(ckpt, narrow=narrow)
        dtype = resolve_dtype(dtype, default=checkpoint_dtype(ckpt))
        check_tied_head(ckpt)
        model = MoGEForCausalLM.from_config(ckpt.config, dtype, "meta")
        rows = {}
        if experts is not None:
            rows = expert_slice(model, sources, experts)
        model = materialize(model, ckpt, sources, device=device, rows=rows).tie_weights()
    finally:
        ckpt.close()
    return model


def load_quantized(ckpt, quant: QuantizedCheckpoint, *, dtype=None, device="cpu", kernel: str | None = None) -> MoGEForCausalLM:
    """A MoGEForCausalLM for a quantized checkpoint (open Checkpoint): a QLinear (kernel: see
    moge_kernels.qlinear) wherever a quantized weight was; embeddings, and weights whose parts mix
    schemes, dequantised once. On CUDA the QLinears repack for torch's CUDA int8 / int4 kernels
    (moge_kernels.qlinear: modes cuda_int8, cuda_int4)."""
    if torch.device(device).type not in ("cpu", "cuda"):
        raise UsageError(f"quantized checkpoints run on the CPU or CUDA (torch's weight-only int8 / int4 kernels); got device {device}")
    kernel = kernel or DEFAULT_KERNEL
    sources = checked_sources(ckpt, quant)
    check_tied_head(ckpt)
    dtype = resolve_dtype(dtype, default=checkpoint_dtype(ckpt, quant))
    model = MoGEForCausalLM.from_config(ckpt.config, dtype, "meta")
    for name, p in list(model.named_parameters()):
        names = sources[name]
        mods = [module_of(n) for n in names]
        schemes = {quant.modules.get(m) for m in mods}
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        if schemes == {None}:
            t = hugepages.empty(p.shape, p.dtype, device)
            fill(t, ckpt, names)
            value = nn.Parameter(t, requires_grad=False)
        elif leaf in LINEAR_PARAMS and len(schemes) == 1:
            value = _read_qlinear(ckpt, mods, quant, p.shape, dtype, kernel, device)
        else:  # embeddings, or parts of one weight with different schemes: dequantise once
            t = torch.cat([_dequantized(ckpt, m, n, quant) for m, n in zip(mods, names)]).reshape(p.shape)
            value = nn.Parameter(t.to(device, p.dtype), requires_grad=False)
        delattr(module, leaf)
        setattr(module, leaf, value)
    model.tie_weights()
    model.quantization = quant
    model.native_decode = runs_natively(model)
    return model


def _read_qlinear(ckpt, mods: list[str], quant: QuantizedCheckpoint, shape: torch.Size, dtype, kernel: str, device="cpu") -> QLinear:
    """One QLinear from the modules that make a model weight, in order (a stack of experts for 3-D weights)."""
    scheme = quant.modules[mods[0]]
    parts = [read_module(ckpt, m, scheme) for m in mods]
    experts = shape[0] if len(shape) == 3 else 1
    per = len(parts) // experts  # modules per expert: gate and up, or one
    joined = []
    for e in range(experts):
        mine = parts[e * per : (e + 1) * per]
        zero = None if mine[0][2] is None else torch.cat([z for _, _, z in mine])
        joined.append((torch.cat([q for q, _, _ in mine]), torch.cat([s for _, s, _ in mine]), zero))
        if tuple(joined[-1][0].shape) != tuple(shape[-2:]):
            raise CheckpointError(f"{mods[e * per]}: {SHAPE} {list(joined[-1][0].shape)} does not fit the config's {list(shape[-2:])}")
    ckpt.close()
    return qlinear(joined, scheme, dtype, kernel, device)


def qlinear(parts: list[Parts], scheme: Scheme, dtype: torch.dtype, kernel: str, device="cpu") -> QLinear:
    """The QLinear of a weight (or a stack of experts) from its parts (q, scale, zero) per expert, its
    stacks in 2 MB pages where they can be (moge_cli.hugepages: the decode kernels stream them)."""
    if kernel not in KERNELS:
        raise UsageError(f"quantized kernel {kernel!r}: use one of {', '.join(KERNELS)}")
    return QLinear(parts, scheme.bits, scheme.symmetric, dtype, kernel, empty=hugepages.empty, device=device)


def _dequantized(ckpt, module: str, name: str, quant: QuantizedCheckpoint) -> torch.Tensor:
    if module in quant.modules:
        return dequantize(*read_module(ckpt, module, quant.modules[module])).float()
    return ckpt.tensor(name).float()


# ---- checks and choices before loading ----------------------------------------------------------
def checked_sources(ckpt, quant: QuantizedCheckpoint | None = None, narrow=None) -> dict[str, list[str]]:
    """names.parameter_sources for the checkpoint's layout, after checking it holds exactly the tensors its
    config (and quantization) asks for, each of the expected shape (narrow: see load_model)."""
    layout, cfg = ckpt.layout, ckpt.config
    if layout == "mixed":
        raise CheckpointError(f"{ckpt.root}: holds both per-expert and stacked expert tensors; convert it to one layout")
    layout = PER_EXPERT if layout == "unknown" else layout
    expected = expected_tensors(cfg, layout)
    if quant is not None:
        expected = expected_quantized(expected, quant.modules)
    if narrow is not None:
        expected = narrow(expected)
    missing = [n for n in expected if n not in ckpt.tensors]
    unexpected = [n for n in ckpt.tensors if n not in expected and skipped_reason(n, cfg) is None]
    wrong = [f"{n} {list(i.shape)} (expected {list(expected[n])})" for n, i in ckpt.tensors.items()
             if n in expected and tuple(i.shape) != expected[n]]  # fmt: skip
    kind = "" if quant is None else "quantized checkpoint "
    for what, names in (("is missing", missing), ("has unexpected", unexpected), ("has wrongly shaped", wrong)):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            raise CheckpointError(
                f"{ckpt.root}: {kind}{what} tensor(s) for its config ({layout} layout): {', '.join(names[:3])}{more}; "
                f"the model cannot run it (check config.json, or run `moge load {ckpt.root}` for every problem)"
            )
    return parameter_sources(cfg, layout)


def check_tied_head(ckpt) -> None:
    """A tied checkpoint that also stores lm_head.weight: refuse it unless it equals the embedding it is tied to."""
    head_name, embed_name = tensor_name("lm_head"), tensor_name("embed")
    if not ckpt.config.tie_word_embeddings or head_name not in ckpt.tensors:
        return
    head, embed = ckpt.tensors[head_name], ckpt.tensors[embed_name]
    same = head.shape == embed.shape and head.dtype == embed.dtype and torch.equal(ckpt.tensor(head_name), ckpt.tensor(embed_name))
    ckpt.close()
    if not same:
        raise CheckpointError(
            f"{ckpt.root}: config.json sets tie_word_embeddings: true, but {head_name} differs from {embed_name}; "
            f"set tie_word_embeddings to false to use the stored lm_head, or remove {head_name}"
        )


def checkpoint_dtype(ckpt, quant: QuantizedCheckpoint | None = None) -> torch.dtype:
    """The dtype holding most of the checkpoint's bytes (dtypes.loaded_dtype_name; quantized: of its float bytes)."""
    return torch_dtype(loaded_dtype_name(((i.dtype, i.nbytes) for i in ckpt.tensors.values()), ckpt.root, quant is not None))


def expert_slice(model: MoGEForCausalLM, sources: dict[str, list[str]], experts: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """Narrow the (meta) model's routed-expert stacks to experts first..stop-1 and their per-expert sources to
    those experts (in place); returns {parameter: (first, stop)} for the stacked tensors that fill must slice."""
    first, stop = experts
    rows = {}
    for i, layer in enumerate(model.layers):
        mlp = layer.mlp
        if not hasattr(mlp, "gate_up"):
            continue
        for leaf in ("gate_up", "down"):
            p = getattr(mlp, leaf)
            setattr(mlp, leaf, nn.Parameter(p.new_empty((stop - first, *p.shape[1:])), requires_grad=False))
            name = f"layers.{i}.mlp.{leaf}"
            mine = [n for n in sources[name] if (m := PER_EXPERT_RE.match(n)) is None or first <= int(m.group(2)) < stop]
            if any(STACKED_RE.match(n) for n in mine):  # stacked: [E, ...] tensors, read rows first..stop-1
                rows[name] = experts
            sources[name] = mine
    return rows


# ---- the fill -----------------------------------------------------------------------------------
def materialize(
    module: nn.Module, ckpt, sources: dict[str, list[str]], prefix: str = "", device="cpu", rows: dict[str, tuple[int, int]] | None = None
) -> nn.Module:
    """module (built on the meta device) with each parameter filled from the checkpoint tensors
    sources[prefix + name] (names.parameter_sources), one parameter at a time; returns module.
    rows: parameters filled from rows first..stop-1 of their tensors only (expert_slice)."""
    for name, p in list(module.named_parameters()):
        t = hugepages.empty(p.shape, p.dtype, device)
        fill(t, ckpt, sources[prefix + name], (rows or {}).get(prefix + name))
        owner, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(owner), leaf, nn.Parameter(t, requires_grad=False))
    return module


def fill(dest: torch.Tensor, ckpt, names: list[str], rows: tuple[int, int] | None = None) -> None:
    """Copy (and cast) the named tensors, flattened and concatenated in order, into dest; with rows
    (first, stop), only rows first..stop-1 of each tensor's first dimension (only their bytes are read).

    Reads go through the memory map in pieces of LOAD_CHUNK_BYTES, and the map is closed after
    each piece, so at most one piece of file pages is ever resident beside the model.
    """
    flat, offset = dest.view(-1), 0
    for name in names:
        info = ckpt.tensors[name]
        row = info.numel // info.shape[0] if rows is not None else 0  # elements per row
        lo, hi = (0, info.numel) if rows is None else (rows[0] * row, rows[1] * row)
        step = max(1, LOAD_CHUNK_BYTES * info.numel // max(info.nbytes, 1))  # elements per piece
        for a in range(lo, hi, step):
            src = ckpt.tensor(name).view(-1)[a : min(a + step, hi)]  # memory-mapped, no copy
            flat[offset + a - lo : offset + a - lo + src.numel()].copy_(src)
            del src
            ckpt.close()  # unmap: the pages just read leave this process's resident set
        offset += hi - lo
    assert offset == flat.numel(), (names, offset, flat.numel())

"""Will a checkpoint fit? The memory a loaded model and its generation will hold, from headers and config only.

`plan_memory(ckpt, ...)` counts, without reading tensor data:
  weights     every model parameter at the dtype it has after load (norms, router gate and router_scale in
              float32; quantized weights as moge_kernels.qlinear.QLinear holds them: integers, scales and zeros
              in the layout of the mode that runs them); a tied lm_head once
  KV cache    num_hidden_layers * 2 * num_key_value_heads * head_dim * context * dtype bytes (batch 1)
  activations the prompt's prefill: its logits (float32 and the model dtype), one layer's float32 attention
              scores, a per-token working set, and on the CPU a float32 copy of the largest weight matrix
              (many-token matmuls run on float32 copies where the CPU has no bf16 GEMM: kernels/gemm.py)
  reserve     RESERVE_BYTES + RESERVE_FRACTION of the weights: allocator slack, RoPE tables, the decode plan,
              the interpreter
and compares the sum with the device's free memory (`free_bytes`). torch is imported only for quantized
checkpoints (their weights' mode and layout on the device: moge_kernels.qlinear's choose_mode and
qlinear_nbytes) and to ask CUDA.
Dimension letters: V vocab, H hidden, D head_dim, N output features, K input features, G groups, E experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moge_cli.checkpoint import Checkpoint
from moge_cli.config import MoGEConfig
from moge_cli.dtypes import NAME_OF_CODE, NAMES, SPELLINGS, loaded_dtype_name
from moge_cli.errors import UsageError
from moge_cli.names import PER_EXPERT, PER_EXPERT_RE, SCALE, STACKED, expected_tensors, module_of, parameter_sources
from moge_cli.quant_format import Scheme, read_quantization
from moge_cli.safetensors_format import DTYPE_SIZES

if TYPE_CHECKING:
    from moge_converters.quantize_plan import QuantOptions

DEFAULT_CONTEXT = 4096  # = model.DEFAULT_MAX_LEN (tested; the model imports torch, `moge load` must not)
RESERVE_BYTES = 256 << 20
RESERVE_FRACTION = 0.02
FLOAT32_PARAMS = ("input_layernorm", "post_attention_layernorm", "norm", "gate", "router_scale")  # leaf names (model.py)
QUANTIZED_LEAVES = ("qkv_weight", "o_weight", "lm_head", "gate_up", "down", "shared_w13", "shared_w2", "w13", "w2")  # = loader.LINEAR_PARAMS (tested)
BYTES_OF = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass
class MemoryPlan:
    """What loading and generating will hold on `device`, against what it has free (None: unknown)."""

    device: str
    dtype: str  # the model dtype after load
    quantization: str | None  # the schemes' labels ("int4 g128 asym"), or None for a float checkpoint
    weights_bytes: int
    kv_cache_bytes: int
    context_tokens: int  # positions the KV cache is allocated for
    activation_bytes: int
    reserve_bytes: int
    available_bytes: int | None

    @property
    def needed_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.activation_bytes + self.reserve_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.available_bytes is None else self.needed_bytes <= self.available_bytes

    def summary(self) -> str:
        """needs 72.4 GB (weights 70.1 GB + KV cache 2.0 GB for 4096 tokens + ...), cuda:0 has 60.2 GB free"""
        quant = f" {self.quantization}" if self.quantization else ""
        parts = (
            f"weights{quant} {_size(self.weights_bytes)} in {self.dtype} + KV cache {_size(self.kv_cache_bytes)} for "
            f"{self.context_tokens} tokens + activations {_size(self.activation_bytes)} + reserve {_size(self.reserve_bytes)}"
        )
        free = "free memory unknown" if self.available_bytes is None else f"{self.device} has {_size(self.available_bytes)} free"
        return f"needs {_size(self.needed_bytes)} ({parts}), {free}"

    def check(self) -> None:
        """UsageError (exit 2) with the figures when the model does not fit."""
        if self.fits is False:
            raise UsageError(
                f"the model does not fit: it {self.summary()}; use a quantized checkpoint (moge quantize), "
                f"a smaller --dtype, fewer tokens (-n), or another --device"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device, "dtype": self.dtype, "quantization": self.quantization,
            "weights_bytes": self.weights_bytes, "kv_cache_bytes": self.kv_cache_bytes, "context_tokens": self.context_tokens,
            "activation_bytes": self.activation_bytes, "reserve_bytes": self.reserve_bytes, "needed_bytes": self.needed_bytes,
            "available_bytes": self.available_bytes, "fits": self.fits,
        }  # fmt: skip


# ---- the plan ------------------------------------------------------------------------------------
def plan_memory(
    ckpt: Checkpoint,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    context: int | None = None,
    prompt_tokens: int | None = None,
    available: int | None = None,
    quantize: QuantOptions | None = None,
) -> MemoryPlan:
    """The memory plan of loading `ckpt` (open, headers only) at `dtype` (None: the loader's choice) on `device`
    and generating with a KV cache of `context` positions (None: model.new_cache's default) after a prompt of
    `prompt_tokens` (None: a full context). `available`: free bytes to compare with (None: ask the device).
    `quantize`: options of `moge quantize`, to plan the checkpoint it would write from `ckpt` instead."""
    cfg = ckpt.config
    tensors = {n: (i.dtype, tuple(i.shape)) for n, i in ckpt.tensors.items()}  # name -> (safetensors code, shape)
    layout = ckpt.layout if ckpt.layout == STACKED else PER_EXPERT  # "unknown" (no experts) reads as per-expert, as the loader does
    if quantize is not None:
        tensors, modules = _as_quantized(ckpt, quantize)
        layout = PER_EXPERT  # what quantize writes
    else:
        quant = read_quantization(cfg.to_dict(), {n: s for n, (_, s) in tensors.items()})
        modules = quant.modules if quant is not None else {}
    dtype_name = _dtype_name(dtype, tensors, bool(modules), ckpt)
    context = context if context is not None else default_context(cfg)
    prompt = min(prompt_tokens if prompt_tokens is not None else context, context)
    weights, largest = weight_bytes(cfg, layout, tensors, modules, dtype_name, device)
    labels = sorted({s.label for s in modules.values()})
    return MemoryPlan(
        device=device,
        dtype=dtype_name,
        quantization=", ".join(labels) or None,
        weights_bytes=weights,
        kv_cache_bytes=kv_cache_bytes(cfg, context, BYTES_OF[dtype_name]),
        context_tokens=context,
        activation_bytes=activation_bytes(cfg, prompt, context, BYTES_OF[dtype_name], largest if _device_type(device) == "cpu" else 0),
        reserve_bytes=RESERVE_BYTES + int(RESERVE_FRACTION * weights),
        available_bytes=available if available is not None else free_bytes(device),
    )


def kv_cache_bytes(cfg: MoGEConfig, context: int, dtype_bytes: int) -> int:
    """model.new_cache(1, context): keys and values [L, 1, nKV, context, D] in the model dtype."""
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * context * dtype_bytes


def activation_bytes(cfg: MoGEConfig, prompt: int, context: int, dtype_bytes: int, float32_copy: int) -> int:
    """The prefill of `prompt` tokens: logits [T, V] in the model dtype and float32, one layer's float32 attention
    scores [nH, T, S], a per-token float32 working set (hidden states, q/k/v, the picked experts' and the shared
    or dense MLP's activations), and `float32_copy` bytes of weight upcast for a many-token matmul."""
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    mlp = cfg.num_experts_per_tok * 2 * cfg.moe_intermediate_size + 2 * cfg.shared_expert_intermediate_size + 2 * (cfg.intermediate_size or 0)
    per_token = cfg.vocab_size * (4 + dtype_bytes) + 4 * (8 * cfg.hidden_size + qkv + mlp)
    scores = cfg.num_attention_heads * prompt * context * 4
    return prompt * per_token + scores + float32_copy


def default_context(cfg: MoGEConfig) -> int:
    """The KV cache model.new_cache() allocates without a length (the interactive chat's)."""
    return min(cfg.max_position_embeddings, DEFAULT_CONTEXT)


def cache_tokens(capacity: int, prompt_tokens: int, max_new_tokens: int) -> int:
    """The KV cache positions moge_cli.generate.generate allocates: the prompt and every generated token
    but the last (never fed back), within the model's context `capacity`."""
    return min(capacity, prompt_tokens + max_new_tokens)


# ---- weights -------------------------------------------------------------------------------------
def weight_bytes(cfg: MoGEConfig, layout: str, tensors: dict[str, tuple[str, tuple[int, ...]]], modules: dict[str, Scheme],
                 dtype_name: str, device: str) -> tuple[int, int]:  # fmt: skip
    """(bytes the loaded model's parameters hold, bytes of its largest float weight matrix in float32), following
    moge_cli.loader: a parameter whose sources are all float is filled at its dtype; one made of one scheme's
    quantized modules is a QLinear; any other (embeddings, mixed schemes) is dequantised to its dtype."""
    shapes = expected_tensors(cfg, layout)  # the float names: what each parameter is made of
    total = largest = 0
    for param, names in parameter_sources(cfg, layout).items():
        leaf = param.rpartition(".")[2]
        numel = sum(math.prod(shapes[n]) for n in names)
        if leaf not in FLOAT32_PARAMS and len(shapes[names[0]]) >= 2:
            largest = max(largest, 4 * _matrix_numel(names, shapes, numel))
        schemes = {modules.get(module_of(n)) for n in names}
        if schemes != {None} and leaf in QUANTIZED_LEAVES and len(schemes) == 1:
            total += qlinear_bytes(names, shapes, tensors, schemes.pop(), dtype_name, device)
        else:
            total += numel * (4 if leaf in FLOAT32_PARAMS else BYTES_OF[dtype_name])
    return total, largest


def qlinear_bytes(names: list[str], shapes: dict[str, tuple[int, ...]], tensors: dict[str, tuple[str, tuple[int, ...]]], scheme: Scheme,
                  dtype_name: str, device: str) -> int:  # fmt: skip
    """Bytes of the QLinear built from quantized modules `names` (their float weight names; for a stack of experts,
    the parts of each expert in turn, gate and up joined as one [N, K] per expert) on `device`: the mode
    moge_kernels.qlinear.choose_mode picks there, and that mode's layout (qlinear_nbytes)."""
    from moge_cli.dtypes import torch_dtype
    from moge_cli.loader import DEFAULT_KERNEL
    from moge_kernels.qlinear import choose_mode, qlinear_nbytes

    k = shapes[names[0]][-1]
    scale_code, (_, g) = tensors[f"{module_of(names[0])}.{SCALE}"]
    experts = _experts(names)
    n = sum(shapes[nm][0] for nm in names) // experts  # rows of one expert's [N, K]
    dtype = torch_dtype(dtype_name)
    mode = choose_mode(scheme.bits, scheme.symmetric, n, k, g, dtype, DEFAULT_KERNEL, device)
    scale_dtype = torch_dtype(NAME_OF_CODE[scale_code]) if scale_code in NAME_OF_CODE else None
    return qlinear_nbytes(mode, scheme.bits, scheme.symmetric, n, k, g, dtype, experts=experts, scale_dtype=scale_dtype)


def _matrix_numel(names: list[str], shapes: dict[str, tuple[int, ...]], numel: int) -> int:
    """Elements of one matrix of a parameter: the whole 2-D weight, or one expert of a stack."""
    first = shapes[names[0]]
    return numel // (first[0] if len(first) == 3 else _experts(names))


def _experts(names: list[str]) -> int:
    """How many routed experts a parameter's per-expert sources hold (1 for anything else)."""
    ids = {m.group(2) for n in names if (m := PER_EXPERT_RE.match(n))}
    return max(1, len(ids))


def _as_quantized(ckpt: Checkpoint, options: QuantOptions) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, Scheme]]:
    """The tensors and schemes of the checkpoint `moge quantize` would write from `ckpt` with `options` (its plan, no data)."""
    from moge_converters.quantize_plan import build_quant_plan

    plan, schemes, _ = build_quant_plan(ckpt.tensors, ckpt.config.to_dict(), options)
    return {t.name: (t.dtype, tuple(t.shape)) for t in plan.tensors}, schemes


def _dtype_name(dtype: str | None, tensors: dict[str, tuple[str, tuple[int, ...]]], quantized: bool, ckpt: Checkpoint) -> str:
    """The model dtype after load: `dtype`, else the float dtype holding most of the checkpoint's bytes (quantized:
    of its float tensors; bfloat16 where there are none): dtypes.loaded_dtype_name, as the loader chooses."""
    if dtype is not None:
        name = SPELLINGS.get(str(dtype).removeprefix("torch.").lower())
        if name is None:
            raise UsageError(f"unsupported dtype {dtype!s}; use one of {', '.join(NAMES)}")
        return name
    sizes = ((code, math.prod(shape) * DTYPE_SIZES.get(code, 1)) for code, shape in tensors.values())
    return loaded_dtype_name(sizes, ckpt.root, quantized)


# ---- the device ----------------------------------------------------------------------------------
def free_bytes(device: str) -> int | None:
    """Free memory of `device`: CUDA's free bytes (torch.cuda.mem_get_info), the CPU's MemAvailable
    (/proc/meminfo), None where unknown (another OS, MPS)."""
    kind = _device_type(device)
    if kind == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    if kind == "cpu":
        return mem_available()
    return None


def mem_available(meminfo: str = "/proc/meminfo") -> int | None:
    """MemAvailable in bytes, or None without /proc/meminfo."""
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _device_type(device: str) -> str:
    return str(device).split(":", 1)[0]


def _size(n: int) -> str:
    """Decimal units, as the CLI prints sizes: 72.4 GB, 512.0 MB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


"""The float dtypes moge loads, computes in and writes: one table of names, spellings and safetensors codes.

Importing this does not import torch (the CLI reads it at start-up); torch dtypes are looked up when
asked for. kernels/native.py keeps its own map from torch dtypes to the C enum (kernels import nothing of ours).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from moge_cli.errors import UsageError

if TYPE_CHECKING:
    import torch

# canonical name (torch's) -> safetensors code, in the order help texts and errors list them
FLOAT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
NAMES = tuple(FLOAT_DTYPES)
NAME_OF_CODE = {code: name for name, code in FLOAT_DTYPES.items()}
FLOAT_CODES = {*NAME_OF_CODE, "F64"}  # float tensors a checkpoint may hold (float64 is read and cast, never run)
# what people type (lower case, without "torch.") -> canonical name
SPELLINGS = {
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "f16": "float16",
    "float32": "float32", "fp32": "float32", "f32": "float32",
}  # fmt: skip
CHOICES = " | ".join(f"{n} ({', '.join(s for s, m in SPELLINGS.items() if m == n and s != n)})" for n in NAMES)  # for help texts


def loaded_dtype_name(tensors: Iterable[tuple[str, int]], where: object, quantized: bool = False) -> str:
    """The model dtype a load picks without one given: the code holding most bytes among `tensors` ((safetensors
    code, bytes) pairs; quantized: only the float ones count, the packed integers do not; bfloat16 where there are
    none). UsageError where that is not a float dtype moge runs (`where` names the checkpoint)."""
    by_code: dict[str, int] = {}
    for code, nbytes in tensors:
        if not quantized or code in NAME_OF_CODE:
            by_code[code] = by_code.get(code, 0) + nbytes
    if not by_code:
        return "bfloat16"
    code = max(by_code, key=by_code.get)
    if code not in NAME_OF_CODE:
        raise UsageError(f"{where}: weights are {code}; choose a dtype (--dtype, or dtype= in Python): one of {', '.join(NAMES)}")
    return NAME_OF_CODE[code]


def torch_dtype(name: str) -> torch.dtype:
    """torch.bfloat16 for "bfloat16", and so on (a canonical name)."""
    import torch

    return getattr(torch, name)


def resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype | None = None) -> torch.dtype:
    """torch dtype for a canonical name / "torch."name / torch dtype; None -> default (bfloat16 if None).
    Only float32, bfloat16 and float16 (UsageError otherwise)."""
    if dtype is None:
        return default if default is not None else torch_dtype("bfloat16")
    name = str(dtype).removeprefix("torch.")
    if name not in FLOAT_DTYPES or (not isinstance(dtype, str) and dtype != torch_dtype(name)):
        raise UsageError(f"unsupported dtype {dtype!s}; use one of {', '.join(NAMES)}")
    return torch_dtype(name)

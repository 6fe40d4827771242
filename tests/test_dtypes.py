"""moge_cli.dtypes: the one table of float dtype names, read without torch."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from moge_cli.dtypes import CHOICES, NAMES, SPELLINGS, resolve_dtype
from moge_cli.errors import UsageError


def test_importing_the_table_does_not_import_torch():
    code = "import sys, moge_cli.dtypes, moge_cli.commands.options; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


@pytest.mark.parametrize("given", [*NAMES, *(f"torch.{n}" for n in NAMES), *(getattr(torch, n) for n in NAMES)])
def test_resolve_takes_names_and_torch_dtypes(given):
    assert resolve_dtype(given) == getattr(torch, str(given).removeprefix("torch."))


@pytest.mark.parametrize("given", ["float64", torch.float64, torch.int8, "bf16", "int3", np.dtype("float32")])
def test_resolve_refuses_the_others_naming_the_choices(given):
    with pytest.raises(UsageError, match="use one of bfloat16, float16, float32"):
        resolve_dtype(given)


def test_every_spelling_names_a_dtype_and_the_help_lists_them():
    assert set(SPELLINGS.values()) == set(NAMES)
    assert all(s in CHOICES for s in SPELLINGS)
    assert resolve_dtype(None) == torch.bfloat16 and resolve_dtype(None, torch.float16) == torch.float16


def test_loaded_dtype_name_is_the_one_choice_loader_and_memory_plan_make():
    """The code holding most bytes; quantized: only float codes count (bfloat16 where none); non-float: UsageError."""
    from moge_cli.dtypes import loaded_dtype_name

    assert loaded_dtype_name([("BF16", 10), ("F32", 30), ("BF16", 25)], "ck") == "bfloat16"
    assert loaded_dtype_name([("I32", 100), ("F16", 5)], "ck", quantized=True) == "float16"
    assert loaded_dtype_name([("I32", 100)], "ck", quantized=True) == "bfloat16"
    with pytest.raises(UsageError, match="^ck: weights are I32; choose a dtype"):
        loaded_dtype_name([("I32", 100), ("F16", 5)], "ck")

"""The installed `moge` console script, run as users run it: from a directory outside the checkout, in an
environment that also holds transformers, compressed-tensors and Hugging Face's `kernels`; and once from a
plain (non-editable) wheel in a fresh venv.

The rest of the suite imports the package in-process from the repository root (python -m pytest puts the
root first on sys.path), which is how an import-name clash with another package once went unseen while
every fresh install was broken.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINED = ROOT / "fixtures" / "tiny-trained"
TINY = ROOT / "fixtures" / "tiny-moge"
BIN = Path(sys.executable).parent
PROMPT = "    def __init__(self"


def _env() -> dict[str, str]:
    """The user's environment: nothing of the checkout on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH")}
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _run(args: list[str | Path], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, args))} -> exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def _outside(tmp_path: Path) -> Path:
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    assert ROOT not in cwd.resolve().parents
    return cwd


@pytest.fixture(scope="module")
def moge() -> Path:
    script = BIN / "moge"
    assert script.is_file(), f"no installed console script at {script}: install first (README, Set-up)"
    return script


# ---- the import names, beside the packages users have ---------------------------------------------
@pytest.mark.parametrize("where", ["root", "outside"])
def test_neighbours_import_their_own_packages(where, tmp_path):
    """transformers, compressed-tensors and Hugging Face's `kernels` import as themselves, also in a process
    started in the repository root (cwd first on sys.path), and ours import beside them."""
    cwd = ROOT if where == "root" else _outside(tmp_path)
    code = (
        "import kernels, transformers, compressed_tensors, moge_kernels.native, moge_converters.convert, moge_cli.cli\n"
        "from kernels import get_kernel\n"  # Hugging Face's API, not our folder
        "import os; print(os.path.dirname(kernels.__file__))"
    )
    r = _run([sys.executable, "-c", code], cwd)
    assert Path(r.stdout.strip()).resolve() != (ROOT / "kernels").resolve()


# ---- every command through the installed script, outside the checkout ----------------------------
def test_installed_cli_runs_every_command(moge, tmp_path):
    cwd = _outside(tmp_path)
    report = json.loads(_run([moge, "load", TRAINED, "--json"], cwd).stdout)
    assert report["problems"] == [] and report["num_experts"] == 16

    _run([moge, "convert", TINY, "stacked", "--layout", "stacked", "--verify", "-q"], cwd)
    assert json.loads(_run([moge, "load", "stacked", "--json"], cwd).stdout)["layout"] == "stacked"

    _run([moge, "quantize", TRAINED, "q4", "--bits", "4"], cwd)
    assert json.loads(_run([moge, "load", "q4", "--json"], cwd).stdout)["quantization"]["bits"] == 4

    prof = json.loads(_run([moge, "profile", TRAINED, "--prompt", PROMPT, "--decode", "4", "--json"], cwd).stdout)
    assert len(prof["generated_ids"]) == 4

    out = json.loads(_run([moge, "generate", TRAINED, "--prompt", PROMPT, "--max-new-tokens", "12", "--json"], cwd).stdout)
    assert out["generated_ids"] == _greedy_in_process(PROMPT, 12)
    assert out["text"].strip()
    q = json.loads(_run([moge, "generate", "q4", "--prompt", PROMPT, "--max-new-tokens", "12", "--json"], cwd).stdout)
    assert len(q["generated_ids"]) == 12

    _run([moge, "fixture", "tiny-moge", "made", "--max-shard-size", "160000"], cwd)
    assert json.loads(_run([moge, "load", "made", "--json"], cwd).stdout)["problems"] == []


def _greedy_in_process(prompt: str, n: int) -> list[int]:
    from moge_cli.chat import encode_prompt
    from moge_cli.generate import generate
    from moge_cli.loader import load_model
    from moge_cli.tokenizer import load_tokenizer

    ids = encode_prompt(load_tokenizer(TRAINED), prompt)
    return list(generate(load_model(TRAINED), ids, max_new_tokens=n))


# ---- a plain wheel in a fresh venv ---------------------------------------------------------------
def test_plain_wheel_runs_the_main_job(tmp_path):
    """`pip install .` (not editable) into a new venv: everything a command needs ships in the wheel.

    About 35 s on two cores: torch comes from the pip cache / local disk, the C extension is compiled."""
    src = tmp_path / "src"  # the files git would commit: no build/, .so or egg-info of the working copy
    ls = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    files = subprocess.run(ls, cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, "torch==2.13.0", src], tmp_path, timeout=900)  # torch==2.13.0: the CPU build on local disk
    shutil.rmtree(src)  # the venv must not lean on the source tree

    cwd = _outside(tmp_path)
    python, wheel_moge = venv / "bin" / "python", venv / "bin" / "moge"
    where = _run([python, "-c", "import moge_cli, moge_kernels.native as n; print(moge_cli.__file__, n.available())"], cwd)
    path, native = where.stdout.split()
    assert str(venv) in path
    from moge_kernels import native as ours

    assert native == str(ours.available())  # the C extension ships where the editable install built it

    assert json.loads(_run([wheel_moge, "load", TRAINED, "--json"], cwd).stdout)["problems"] == []
    out = json.loads(_run([wheel_moge, "generate", TRAINED, "--prompt", PROMPT, "--max-new-tokens", "12", "--json"], cwd).stdout)
    assert out["generated_ids"] == _greedy_in_process(PROMPT, 12)
    _run([wheel_moge, "fixture", "tiny-moge", "made", "--skeleton"], cwd)
    assert json.loads(_run([wheel_moge, "load", "made", "--json"], cwd).stdout)["num_experts"] == 8

"""`moge profile` end to end: a router forced into exact ties gives known counts and Imbalance Scores."""

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moge_cli.synthetic import write_checkpoint
from moge_cli.cli import app
from moge_cli.config import PRESETS, MoGEConfig
from moge_cli.profiling import profile

TINY = MoGEConfig.from_dict(PRESETS["tiny-moge"])  # E=8 in 4 groups of 2, 1 pick per group, k=4
REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def zero_router(tmp_path_factory) -> Path:
    """tiny-moge with every router gate zeroed: all probabilities tie at 1/E, so MoGE picks the
    first expert of each group (0, 2, 4, 6) and plain top-4 picks experts 0-3 (groups 0 and 1)."""
    import torch
    from safetensors.torch import save_file

    from moge_cli.checkpoint import open_checkpoint

    src = write_checkpoint(TINY, tmp_path_factory.mktemp("src"), dtype="float32", tokenizer=False)
    ckpt = open_checkpoint(src)
    state = {n: ckpt.tensor(n).clone() for n in ckpt.tensors}
    for n in state:
        if n.endswith(".mlp.gate.weight"):
            state[n] = torch.zeros_like(state[n])
    out = tmp_path_factory.mktemp("zero")
    shutil.copy(src / "config.json", out)
    save_file(state, out / "model.safetensors")
    return out


def test_forced_ties_known_counts_and_imbalance(zero_router):
    prompt = [5, 9, 2, 7, 7, 1]
    r = profile(zero_router, prompt_ids=prompt, decode=4)
    tokens = len(prompt) + 3  # the last decoded token is sampled, never run through the model
    assert r.routing.tokens == tokens
    for layer in r.routing.layers:
        assert layer["expert_counts"] == [tokens, 0, tokens, 0, tokens, 0, tokens, 0]
        assert layer["group_counts"] == [tokens] * 4
        assert layer["never_picked"] == [1, 3, 5, 7]
        assert layer["imbalance_moge"] == 0.0
        assert layer["imbalance_topk"] == pytest.approx(2.0)  # devices get 2T, 2T, 0, 0
    two = profile(zero_router, prompt_ids=prompt, decode=4, devices=2)
    assert all(l["imbalance_topk"] == pytest.approx(4.0) for l in two.routing.layers)  # 4T vs 0


def test_report_shape_and_components(zero_router):
    r = profile(zero_router, prompt_ids=[1, 2, 3, 4], decode=3)
    for phase in (r.prefill, r.decode):
        comps = phase.components
        assert set(comps) >= {"embedding", "attention", "router", "routed_experts", "shared_expert", "lm_head", "sampling", "other"}
        assert sum(c["percent"] for c in comps.values()) == pytest.approx(100.0, abs=0.5)
        assert comps["routed_experts"]["seconds"] > 0 and comps["attention"]["seconds"] > 0
    assert r.decode.tokens == 2 and len(r.generated_ids) == 3
    bw = r.bandwidth
    assert bw.measured_read_bytes_per_s > 0 and bw.active_weight_bytes_per_token > 0
    # float32 tiny-moge: every weight once, but only 4 of 8 experts and one embedding row
    c = TINY
    experts = c.num_hidden_layers * c.num_experts * 3 * c.moe_intermediate_size * c.hidden_size * 4
    embedding_rest = (c.vocab_size - 1) * c.hidden_size * 4
    assert bw.active_weight_bytes_per_token == 214_736 * 4 - experts // 2 - embedding_rest
    assert r.peak_memory_bytes > 0


def test_cli_json_perplexity_weights_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    text = tmp_path / "t.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 4)
    png = tmp_path / "load.png"
    res = runner.invoke(app, ["profile", str(REPO / "fixtures" / "tiny-moge"), "-f", str(text), "-n", "3",
                              "--perplexity", str(text), "--weights", "--plot", str(png), "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    layer = r["routing"]["layers"][0]
    assert len(layer["expert_counts"]) == 8 and len(layer["group_counts"]) == 4
    assert sum(layer["expert_counts"]) == 4 * r["routing"]["tokens"]  # k=4 picks per token
    assert layer["group_counts"] == [r["routing"]["tokens"]] * 4  # MoGE: one pick in every group
    assert r["perplexity"]["tokens"] > 10 and r["perplexity"]["perplexity"] > 1
    assert "routed_experts" in r["weights"]["components"] and r["weights"]["advice"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_table_output():
    res = runner.invoke(app, ["profile", str(REPO / "fixtures" / "tiny-moge"), "--prompt", "import os", "--decode", "2"])
    assert res.exit_code == 0, res.output
    for fragment in ("time per component", "routed_experts", "IS MoGE", "mean Imbalance Score", "decode weight bandwidth"):
        assert fragment in res.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--prompt-ids", "1,2", "--devices", "3"], "divisor of 4"),
        (["--prompt-ids", "1,2", "--prompt", "x"], "exactly one of"),
        (["--prompt-ids", "1,2", "-n", "0"], "--max-new-tokens"),
        (["--prompt-ids", "1,2", "--decode", "0"], "--max-new-tokens"),  # the old spelling still works
        (["--prompt-ids", "1,x"], "error:"),
    ],
)
def test_cli_bad_input(args, fragment):
    res = runner.invoke(app, ["profile", str(REPO / "fixtures" / "tiny-moge"), *args])
    assert res.exit_code == 2
    assert res.stderr.startswith("error:") and fragment in res.stderr


def test_plot_without_matplotlib_says_how(monkeypatch, zero_router, tmp_path):
    import builtins

    from moge_cli.errors import UsageError
    from moge_cli.plot import plot_routing

    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    with pytest.raises(UsageError, match=r"moge-toolkit\[plot\]"):
        plot_routing({"routing": {"layers": [{}], "devices": 4}}, tmp_path / "x.png")


# In a fresh interpreter: `moge_cli.profile` read lazily (PEP 562) before and after its defining module
# and then every submodule of the package are imported. An import of a submodule binds its name on
# the package, so a submodule named like an export (say a moge_cli/profile.py) would replace the function.
_EXPORTS_SURVIVE_IMPORTS = """
import importlib, json, pkgutil, types
import moge_cli
assert "moge_cli.profiling" not in __import__("sys").modules  # nothing read yet: the lazy path
first = moge_cli.profile
import moge_cli.profiling
after_module = moge_cli.profile
for m in pkgutil.walk_packages(moge_cli.__path__, "moge_cli."):
    if not m.name.endswith("__main__"):  # __main__ runs the CLI
        importlib.import_module(m.name)
wrong = [n for n in moge_cli.__all__ if isinstance(getattr(moge_cli, n), types.ModuleType)
         or getattr(moge_cli, n) is not getattr(importlib.import_module(moge_cli._EXPORTS[n]), n)]
f = moge_cli.profiling.profile
print(json.dumps({"first": first is f, "after_module": after_module is f, "after_all": moge_cli.profile is f,
                  "from_import": __import__("moge_cli", fromlist=["profile"]).profile is f, "wrong": wrong}))
"""


def test_python_api_is_importable_from_the_package(zero_router):
    import subprocess
    import sys
    import types

    import moge_cli
    import moge_cli.profiling

    assert moge_cli.profile is moge_cli.profiling.profile and not isinstance(moge_cli.profile, types.ModuleType)
    res = subprocess.run([sys.executable, "-c", _EXPORTS_SURVIVE_IMPORTS], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"first": True, "after_module": True, "after_all": True, "from_import": True, "wrong": []}
    # and calling it profiles: the same tokens and routing as the function called directly
    r = moge_cli.profile(zero_router, prompt_ids=[1, 2], decode=2)
    direct = profile(zero_router, prompt_ids=[1, 2], decode=2)
    assert r.generated_ids == direct.generated_ids and len(r.generated_ids) == 2
    assert r.routing == direct.routing and r.routing.tokens == 3


def test_decode_speed_comes_from_an_untimed_pass_over_the_same_tokens(zero_router):
    """Sections run the model op by op; the reported decode speed is a second pass without them."""
    r = profile(zero_router, prompt_ids=[1, 2, 3, 4], decode=5)
    d = r.decode
    assert d.tokens == 4 and d.seconds > 0
    assert d.tokens_per_s == pytest.approx(4 / d.seconds)
    assert d.op_by_op_tokens_per_s > 0
    assert sum(c["seconds"] for c in d.components.values()) == pytest.approx(4 / d.op_by_op_tokens_per_s)


def test_the_timed_decode_pass_starts_with_its_plan_built(zero_router, monkeypatch):
    """The whole-step plan (the C step; on CUDA the captured graph, one per cache) is made at a cache's first
    step: the timed pass must start with it made, not time its making."""
    import moge_cli.profiling as module
    from moge_kernels import native

    seen = {"model": None, "plan at start": "unread"}
    real_replay, real_clock = module._replay_decode, module.time.perf_counter

    def replay(model, *args):
        seen["model"] = model
        try:
            return real_replay(model, *args)
        finally:
            seen["model"] = None

    def clock():
        if seen["model"] is not None and seen["plan at start"] == "unread":
            seen["plan at start"] = seen["model"]._plan  # False: not built yet
        return real_clock()

    monkeypatch.setattr(module, "_replay_decode", replay)
    monkeypatch.setattr(module.time, "perf_counter", clock)
    profile(zero_router, prompt_ids=[1, 2, 3, 4], decode=5)
    assert seen["plan at start"] != "unread"
    assert seen["plan at start"] is not False or not native.available()


def test_report_to_dict_is_the_json_output(zero_router, tmp_path, monkeypatch):
    import moge_cli.profiling as module

    seen = []
    monkeypatch.setattr(module, "profile", lambda *a, **k: seen.append(profile(*a, **k)) or seen[-1])  # keep what the command printed
    r = runner.invoke(app, ["profile", str(zero_router), "--prompt-ids", "1,2,3", "-n", "2", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == seen[-1].to_dict()
    assert not {"generated_text", "perplexity", "weights", "plot"} & seen[-1].to_dict().keys()  # not asked for: absent, not null
    text = tmp_path / "t.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 4)
    r = runner.invoke(app, ["profile", str(REPO / "fixtures" / "tiny-moge"), "-f", str(text), "-n", "2", "--perplexity", str(text),
                            "--weights", "--json", "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == seen[-1].to_dict() and {"generated_text", "perplexity", "weights"} <= seen[-1].to_dict().keys()


def test_peak_memory_is_this_process_not_the_launcher(tmp_path):
    """A process started by a big one (a spawned --ep rank) reports its own peak, not the launcher's:
    ru_maxrss carries the parent's peak through fork + exec, /proc/self/status VmHWM does not."""
    import subprocess
    import sys

    child = "from moge_cli.profiling import peak_memory_bytes; print(peak_memory_bytes())"
    launcher = (
        "import subprocess, sys\n"
        "big = bytearray(1 << 30)  # 1 GiB, touched: the launcher's peak\n"
        f"print(subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, text=True, check=True).stdout)\n"
    )
    out = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert 0 < int(out.strip()) < (1 << 30) // 2

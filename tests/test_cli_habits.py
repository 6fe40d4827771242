"""The CLI as llama.cpp, mlx-lm and hf CLI users expect it: --version, dtype names, --device checks,
one option name per idea, quiet closed pipes, JSON errors, exit codes (issue 14, part 3)."""

import json
import os
import signal
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer
from typer.testing import CliRunner

from moge_cli.cli import app
from moge_cli.commands.options import DTYPE_CHOICES, canonical_dtype
from moge_cli.main import main

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "fixtures" / "tiny-moge"
runner = CliRunner()
COMMANDS = typer.main.get_command(app).commands  # name -> click command


def moge(*args):
    return runner.invoke(app, [str(a) for a in args])


def run_main(capsys, *argv) -> tuple[int, str, str]:
    """The `moge` entry point in this process: (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def python_moge(*args, **kw) -> subprocess.CompletedProcess:
    """`python -m moge_cli ARGS` in a fresh process (the installed entry point's code)."""
    return subprocess.run([sys.executable, "-m", "moge_cli", *map(str, args)], capture_output=True, text=True, timeout=120, **kw)


def option(command: str, name: str):
    return next(p for p in COMMANDS[command].params if name in p.opts)


# -- moge --version


def test_version_fast_path_imports_neither_typer_nor_torch():
    code = "import sys; from moge_cli.main import main; main(['--version']); print(sorted({'typer', 'torch', 'rich'} & set(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"moge {version('moge-toolkit')}", "[]"]


def test_version_through_the_app_and_short_flag(capsys):
    assert moge("--version").stdout == f"moge {version('moge-toolkit')}\n"
    assert run_main(capsys, "-V")[1] == f"moge {version('moge-toolkit')}\n"


# -- --dtype


@pytest.mark.parametrize(
    "typed, canonical",
    [("bf16", "bfloat16"), ("BF16", "bfloat16"), ("bfloat16", "bfloat16"), ("fp16", "float16"), ("f16", "float16"),
     ("torch.float16", "float16"), ("fp32", "float32"), ("f32", "float32"), ("float32", "float32")],
)  # fmt: skip
def test_dtype_names_people_type(typed, canonical):
    assert canonical_dtype(typed) == canonical


def test_every_dtype_option_lists_the_same_names_in_the_same_order():
    helps = {name: option(name, "--dtype").help for name in COMMANDS if any("--dtype" in p.opts for p in COMMANDS[name].params)}
    assert set(helps) == {"convert", "generate", "profile", "fixture", "load"}
    assert all(h.startswith(DTYPE_CHOICES) for h in helps.values()), helps


def test_convert_and_fixture_take_short_dtype_names(tmp_path, capsys):
    r = moge("fixture", "tiny-moge", tmp_path / "f", "--dtype", "f32", "--no-tokenizer")
    assert r.exit_code == 0, r.output
    r = moge("convert", tmp_path / "f", tmp_path / "c", "--dtype", "bf16", "--quiet")
    assert r.exit_code == 0, r.output
    dtypes = {p: run_main(capsys, "load", tmp_path / p, "--json")[1] for p in ("f", "c")}
    assert [json.loads(dtypes[p])["dtype"] for p in ("f", "c")] == ["float32", "bfloat16"]


def test_fixture_takes_shard_sizes_as_convert_does(tmp_path):
    for size, name in (("200KB", "units"), ("200000", "bytes")):
        r = moge("fixture", "tiny-moge", tmp_path / name, "--max-shard-size", size, "--no-tokenizer")
        assert r.exit_code == 0, r.output
    shards = [sorted(p.name for p in (tmp_path / name).glob("*.safetensors")) for name in ("units", "bytes")]
    assert shards[0] == shards[1] and len(shards[0]) > 1


def test_unknown_dtype_names_the_choices(tmp_path):
    r = moge("convert", TINY, tmp_path / "c", "--dtype", "int3")
    assert r.exit_code == 2 and "int3" in r.stderr and "bf16" in r.stderr and not (tmp_path / "c").exists()


# -- --device


def _refuse_loading(monkeypatch):
    import moge_cli.loader

    def load_model(*a, **k):
        raise AssertionError("the model was loaded before --device was checked")

    monkeypatch.setattr(moge_cli.loader, "load_model", load_model)


def _bad_devices():
    import torch

    yield "gpu", "not a device"
    yield "cuda:x", "not a device"
    yield "xpu", "moge runs on cpu, cuda"
    if not torch.cuda.is_available():
        yield "cuda", "CUDA"
    else:
        yield f"cuda:{torch.cuda.device_count()}", "CUDA device(s)"
    if not torch.backends.mps.is_available():
        yield "mps", "Metal (MPS) is not available"


@pytest.mark.parametrize("device, says", list(_bad_devices()))
@pytest.mark.parametrize("command", ["generate", "profile"])
def test_bad_device_is_one_line_before_the_model_loads(monkeypatch, command, device, says):
    _refuse_loading(monkeypatch)
    r = moge(command, TINY, "--prompt-ids", "1,2", "--device", device)
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert lines[0].startswith(f"error: --device {device}: ") and says in lines[0], lines[0]


# -- one option name per idea


# load --verify checks the source, convert/quantize --verify the output; fixture's own --layout, --seed (of its random
# weights) and defaults (--dtype bfloat16, --max-shard-size: one file); the same value syntax; convert --ep writes rank
# directories, generate --ep runs ranks
SAME_NAME_OTHER_IDEA = {"--verify", "--layout", "--max-shard-size", "--seed", "--dtype", "--ep"}


def test_shared_options_have_one_help_text():
    helps: dict[str, set] = {}
    for name, cmd in COMMANDS.items():
        for p in cmd.params:
            for decl in p.opts:
                if decl.startswith("--") and not getattr(p, "hidden", False):
                    helps.setdefault(decl, set()).add(p.help)
    differing = {d: h for d, h in helps.items() if len(h) > 1 and d not in SAME_NAME_OTHER_IDEA}
    assert differing == {}
    assert {"--json", "--quiet", "--revision", "--device", "--max-new-tokens", "--perplexity", "--prompt"} <= set(helps)


@pytest.mark.parametrize("command", ["load", "convert", "quantize", "generate", "profile"])
def test_quiet_everywhere_and_short_flags_mean_what_llama_cpp_means(command):
    params = COMMANDS[command].params
    assert any("--quiet" in p.opts for p in params) and any("--json" in p.opts for p in params)
    shown = {d: p for p in params if not getattr(p, "hidden", False) for d in p.opts}
    assert "-q" not in shown  # mlx-lm's -q is --quantize: not an unlisted meaning here
    if "-t" in shown:
        assert "--threads" in shown["-t"].opts
    if "-n" in shown:
        assert "--max-new-tokens" in shown["-n"].opts


def test_profile_and_generate_share_the_token_and_prompt_file_options(tmp_path):
    for command in ("generate", "profile"):
        assert option(command, "-n").opts == ["--max-new-tokens", "-n"] and option(command, "-f").opts == ["--file", "-f"]
    text = tmp_path / "p.txt"
    text.write_text("def add(a, b):")
    new = moge("profile", TINY, "-f", text, "-n", "3", "--json", "--quiet")
    old = moge("profile", TINY, "--text-file", text, "--decode", "3", "--json")  # old spellings: hidden, still work
    assert new.exit_code == 0 and old.exit_code == 0, (new.output, old.output)
    assert json.loads(new.stdout)["generated_ids"] == json.loads(old.stdout)["generated_ids"]
    assert len(json.loads(new.stdout)["generated_ids"]) == 3
    gen = moge("generate", TINY, "-f", text, "-n", "3", "--temp", "0", "--json")
    assert gen.exit_code == 0 and len(json.loads(gen.stdout)["generated_ids"]) <= 3, gen.output
    help_text = moge("profile", "--help").stdout
    assert "--decode" not in help_text and "--text-file" not in help_text


def test_threads_sets_torchs_thread_count(monkeypatch):
    import torch

    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    r = moge("generate", TINY, "--prompt-ids", "1,2", "-n", "1", "-t", "3", "--device", "cpu", "--json")
    assert r.exit_code == 0 and seen[:1] == [3], r.output


@pytest.mark.parametrize("command", ["generate", "profile"])
def test_quiet_silences_stderr(command):
    loud = moge(command, TINY, "--prompt-ids", "1,2", "-n", "2")
    quiet = moge(command, TINY, "--prompt-ids", "1,2", "-n", "2", "--quiet")
    assert loud.exit_code == 0 and quiet.exit_code == 0, quiet.output
    assert loud.stderr and quiet.stderr == "" and quiet.stdout


def test_load_quiet():
    r = moge("load", TINY, "--verify", "--quiet")
    assert r.exit_code == 0 and r.stderr == "", r.output


# -- closed pipes


def _into_closed_pipe(*args) -> tuple[int, str]:
    """Run `python -m moge_cli ARGS` with stdout a pipe nobody reads (what `| head -1` becomes): (exit code, stderr)."""
    read, write = os.pipe()
    os.close(read)
    try:
        r = subprocess.run([sys.executable, "-m", "moge_cli", *map(str, args)], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    return r.returncode, r.stderr


@pytest.mark.parametrize(
    "args",
    [("load", TINY, "--tensors"), ("load", TINY, "--json"), ("load", TINY, "--tensors", "--json"),
     ("generate", TINY, "--prompt-ids", "1,2", "-n", "4"), ("--help",), ("generate", "--help")],
)  # fmt: skip
def test_closed_pipe_exits_quietly(args):
    assert _into_closed_pipe(*args) == (141, "")  # 128 + SIGPIPE, as `seq 1e9 | head -1` leaves it


def test_head_one():
    r = subprocess.run(
        f"{sys.executable} -m moge_cli load {TINY} --tensors | head -1; echo \"status ${{PIPESTATUS[0]}}\"",
        shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("path") and lines[1] in ("status 141", "status 0"), r.stdout
    assert r.stderr == ""


# -- --json failures


@pytest.mark.parametrize(
    "args",
    [["load", "{missing}", "--tensors", "--json"], ["convert", "{missing}", "{tmp}/out", "--json"],
     ["quantize", "{missing}", "{tmp}/out", "--json"], ["generate", "{missing}", "--prompt-ids", "1", "--json"],
     ["profile", "{missing}", "--prompt-ids", "1", "--json"]],
)  # fmt: skip
def test_json_failure_is_one_json_object(tmp_path, args):
    argv = [a.format(missing=tmp_path / "missing", tmp=tmp_path) for a in args]
    r = runner.invoke(app, argv)
    assert r.exit_code == 2, r.output
    obj = json.loads(r.stdout)
    assert obj == {"error": r.stderr.strip().removeprefix("error: "), "kind": obj["kind"], "exit_code": 2}
    assert obj["kind"] in ("checkpoint", "os", "usage") and "missing" in obj["error"]


def test_json_error_kinds():
    from moge_converters.shards import WriteError
    from moge_converters.verify import VerifyError

    from moge_cli.errors import CheckpointError, ConfigError, MogeError, Terminated, UsageError, error_kind

    errors = [UsageError("x"), ConfigError("x"), CheckpointError("x"), VerifyError("x"), WriteError("x"), MogeError("x"),
              FileNotFoundError(2, "x"), ValueError("x"), KeyboardInterrupt(), Terminated()]  # fmt: skip
    kinds = ["usage", "config", "checkpoint", "verify", "write", "error", "os", "bug", "interrupted", "terminated"]
    assert [error_kind(e) for e in errors] == kinds


def test_json_usage_errors_and_fast_path(capsys, tmp_path):
    code, out, err = run_main(capsys, "convert", TINY, tmp_path / "x", "--json", "--no-such-option")
    assert code == 2 and json.loads(out) == {"error": "No such option: --no-such-option", "kind": "usage", "exit_code": 2}
    assert "No such option" in err
    code, out, err = run_main(capsys, "load", tmp_path / "missing", "--json")  # the typer-free fast path
    assert code == 2 and json.loads(out)["error"] == err.strip().removeprefix("error: ")
    code, out, err = run_main(capsys, "load", TINY, "--no-such-option")  # without --json: nothing on stdout
    assert code == 2 and out == ""


def test_json_fast_path_stays_free_of_typer_and_rich(tmp_path):
    code = (
        "import sys\nfrom moge_cli.main import main\ntry:\n    main(['load', sys.argv[1], '--json'])\nexcept SystemExit:\n    pass\n"
        "print(sorted({'typer', 'rich', 'torch'} & set(sys.modules)), file=sys.stderr)"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert json.loads(r.stdout)["kind"] == "checkpoint" and r.stderr.splitlines()[-1] == "[]", r.stderr


# -- generate at the context window


def test_generate_says_when_the_context_window_ends_it():
    prompt = ",".join(str(i * 7 % 500 + 3) for i in range(500))  # greedy meets no eos in the 13 tokens left
    r = moge("generate", TINY, "--prompt-ids", prompt, "-n", "1000", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["finish_reason"] == "context" and len(d["generated_ids"]) == 512 - 500 + 1  # the last id is never fed back
    assert r.stderr == "note: the context window is full (512 tokens, 500 of them the prompt): stopped after 13 of the 1000 tokens asked for\n"
    r = moge("generate", TINY, "--prompt-ids", prompt, "-n", "13")
    assert r.exit_code == 0 and "finish: length" in r.stderr and "note:" not in r.stderr, r.output  # just fits: not the context
    assert "finish: context" in moge("generate", TINY, "--prompt-ids", prompt, "-n", "14").stderr


# -- --plot


def test_plot_without_matplotlib_fails_before_profiling(monkeypatch, tmp_path):
    import builtins

    import moge_cli.profiling

    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *a, **k)

    def profile(*a, **k):
        raise AssertionError("profiled before checking --plot")

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    monkeypatch.setattr(moge_cli.profiling, "profile", profile)
    r = moge("profile", TINY, "--prompt-ids", "1,2", "--plot", tmp_path / "p.png")
    assert r.exit_code == 2 and r.stderr == "error: --plot needs matplotlib: pip install 'moge-toolkit[plot]'\n", r.output
    monkeypatch.setattr(builtins, "__import__", real)
    r = moge("profile", TINY, "--prompt-ids", "1,2", "--plot", tmp_path / "no-such-dir" / "p.png")
    assert r.exit_code == 2 and "no-such-dir" in r.stderr and "does not exist" in r.stderr


def test_plot_help_keeps_the_extra_name():
    assert "moge-toolkit[plot]" in moge("profile", "--help").stdout


# -- --dry-run and --perplexity progress


def test_dry_run_is_a_summary_unless_verbose(tmp_path):
    plain = moge("convert", TINY, tmp_path / "o", "--dry-run")
    verbose = moge("convert", TINY, tmp_path / "o", "--dry-run", "--verbose")
    as_json = moge("convert", TINY, tmp_path / "o", "--dry-run", "--json")
    assert plain.exit_code == verbose.exit_code == as_json.exit_code == 0, plain.output
    tensor = "model.layers.0.self_attn.q_proj.weight"
    assert tensor not in plain.stdout and tensor in verbose.stdout and tensor in as_json.stdout
    assert len(plain.stdout.splitlines()) < 10 and "--verbose" in plain.stdout
    q = moge("quantize", TINY, tmp_path / "q", "--dry-run")
    assert q.exit_code == 0 and tensor not in q.stdout, q.output


@pytest.fixture()
def fake_quantize(monkeypatch):
    """Records the keyword arguments `moge quantize` passes to the library."""
    import moge_converters.quantize_pipeline as qp

    calls = []

    def quantize_checkpoint(src, dst, **kw):
        calls.append(kw)
        if kw.get("eval_progress"):
            for done in (100, 200, 300, 400):
                kw["eval_progress"](done, 400)
        return SimpleNamespace(notes=[], to_dict=lambda: {"destination": str(dst), "notes": []})  # what --json reads of a result

    monkeypatch.setattr(qp, "quantize_checkpoint", quantize_checkpoint)
    return calls


def test_quantize_perplexity_has_a_progress_bar_unless_quiet(fake_quantize, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("x")
    r = moge("quantize", TINY, tmp_path / "q", "--perplexity", text, "--perplexity-window", "32", "--json")
    assert r.exit_code == 0, r.output
    assert callable(fake_quantize[0]["eval_progress"]) and fake_quantize[0]["eval_text"] == text
    assert fake_quantize[0]["eval_window"] == 32
    r = moge("quantize", TINY, tmp_path / "q", "--eval", text, "--eval-window", "16", "--json", "--quiet")  # old spellings
    assert r.exit_code == 0 and "eval_progress" not in fake_quantize[1], r.output
    assert fake_quantize[1]["eval_text"] == text and fake_quantize[1]["eval_window"] == 16


def test_perplexity_progress_covers_both_passes(tmp_path):
    from moge_converters.quantize_pipeline import quantize_checkpoint

    text = tmp_path / "t.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 8)
    seen = []
    r = quantize_checkpoint(TINY, tmp_path / "q", bits=8, eval_text=text, eval_window=32, eval_progress=lambda d, t: seen.append((d, t)))
    total = 2 * r.eval.tokens
    assert seen[-1] == (total, total) and [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) > 2
    assert {t for _, t in seen} == {total}


# -- SIGTERM and exit codes


@pytest.mark.parametrize("command, module, function", [("convert", "moge_converters.convert", "convert"),
                                                       ("quantize", "moge_converters.quantize_pipeline", "quantize_checkpoint")])  # fmt: skip
def test_sigterm_cleans_up_as_ctrl_c_and_exits_143(monkeypatch, tmp_path, command, module, function):
    import importlib

    cleaned = []

    def killed(*a, **k):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        finally:
            cleaned.append(True)

    monkeypatch.setattr(importlib.import_module(module), function, killed)
    r = moge(command, TINY, tmp_path / "out", "--quiet", "--json")
    assert r.exit_code == 143 and r.stderr == "error: terminated\n" and cleaned == [True], r.output
    assert json.loads(r.stdout)["kind"] == "terminated"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored


def test_every_command_documents_its_exit_codes():
    for name, cmd in COMMANDS.items():
        assert "Exit codes: 0 " in cmd.help and "2 error" in cmd.help, name
        assert "141 output pipe closed" in cmd.help, name
    assert all("143 SIGTERM" in COMMANDS[name].help for name in ("convert", "quantize"))

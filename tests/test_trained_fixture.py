"""The committed fixtures/tiny-trained checkpoint: it learned its corpus, and the runtime agrees with
the independent training implementation in fixtures/train_tiny.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moge_cli.config import MoGEConfig
from moge_cli.loader import load_model
from moge_cli.perplexity import perplexity
from moge_cli.synthetic import write_checkpoint
from moge_cli.tokenizer import load_tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TRAINED_DIR = FIXTURES / "tiny-trained"
WINDOW = 512  # the training sequence length
# Per token of ~2.9 bytes. For scale on heldout.txt: uniform 2048, a smoothed unigram model of the
# training text ~480, the random model of the same config ~3200; the committed model ~55.
MAX_HELDOUT_PERPLEXITY = 100.0


def _train_tiny():
    """fixtures/train_tiny.py, a script (fixtures/ is not a package: `fixtures` is a PyPI name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_tiny", FIXTURES / "train_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model():
    return load_model(TRAINED_DIR)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TRAINED_DIR)


@pytest.fixture(scope="module")
def heldout_ids(tokenizer) -> list[int]:
    return tokenizer.encode((TRAINED_DIR / "heldout.txt").read_text(encoding="utf-8"), add_bos=True)


def test_fixture_matches_preset_and_is_small(model):
    cfg = MoGEConfig.from_file(TRAINED_DIR / "config.json")
    assert cfg.to_dict() == MoGEConfig.from_name(_train_tiny().PRESET).to_dict()
    assert (cfg.n_groups, cfg.experts_per_group, cfg.picks_per_group) == (4, 4, 1)
    assert model.dtype == torch.float32
    assert sum(p.stat().st_size for p in TRAINED_DIR.iterdir()) < 20 * 10**6


def test_heldout_perplexity_far_below_random(model, heldout_ids, tmp_path):
    trained = perplexity(model, heldout_ids, window=WINDOW)["perplexity"]
    cfg = MoGEConfig.from_file(TRAINED_DIR / "config.json")
    random_dir = write_checkpoint(cfg, tmp_path / "random", dtype="float32", tokenizer=False)
    random = perplexity(load_model(random_dir), heldout_ids, window=WINDOW)["perplexity"]
    assert trained < MAX_HELDOUT_PERPLEXITY, trained
    assert trained < random / 4, (trained, random)


# Greedy continuations of these starts are scored by the share of their characters that lie in
# complete lines of Python code: a line that compiles (given a `pass` body where it opens a block),
# neither blank nor a comment. The committed model: ~0.46 of the characters, code after 7 of the 8
# starts. The random model of the same config (seeds 0-5 tried, float32 and bfloat16) emits no line
# of code at all: it scores 0 and 0.
CODE_PROMPTS = ("def ", "import ", "class ", "    return ", "for i in ", "    def ", "x = ", "if ")
GREEDY_TOKENS = 40
MIN_CODE_SHARE = 0.2
MIN_PROMPTS_WITH_CODE = 4


def _greedy_text(model, tokenizer, prompt: str) -> str:
    ids = tokenizer.encode(prompt, add_bos=True)
    cache = model.new_cache(1, len(ids) + GREEDY_TOKENS)
    with torch.no_grad():
        logits = model(torch.tensor([ids]), cache)
        out = []
        for _ in range(GREEDY_TOKENS):
            out.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([out[-1:]]), cache)
    return prompt + tokenizer.decode(out)


def _is_code_line(line: str) -> bool:
    s = line.strip()
    if not s or s.startswith("#"):
        return False
    for candidate in (s, s + " pass"):  # `def f(x):` / `for i in y:` compile with a body
        try:
            compile(candidate, "<line>", "exec")
            return True
        except (SyntaxError, ValueError):  # ValueError: a NUL character (Python < 3.12)
            pass
    return False


def _code_chars(text: str) -> int:
    """Characters in complete lines of code (the last line may be cut off mid-statement: not counted)."""
    return sum(len(line) for line in text.split("\n")[:-1] if _is_code_line(line))


def _python_likeness(model, tokenizer) -> tuple[float, int]:
    """(share of all characters that lie in code lines, number of prompts whose continuation has one)."""
    texts = [_greedy_text(model, tokenizer, p) for p in CODE_PROMPTS]
    code = [_code_chars(t) for t in texts]
    return sum(code) / sum(map(len, texts)), sum(c > 0 for c in code)


def test_scoring_knows_code_from_text():
    assert _is_code_line("        self.write(self.path)") and _is_code_line("def __init__(self, other):")
    assert not _is_code_line("las actionssl errorsPro writlp") and not _is_code_line("# a comment")
    assert _code_chars("x = 1\nnot code here\ny = (") == len("x = 1")


def test_greedy_output_looks_like_python(model, tokenizer, tmp_path):
    share, prompts = _python_likeness(model, tokenizer)
    cfg = MoGEConfig.from_file(TRAINED_DIR / "config.json")
    random_dir = write_checkpoint(cfg, tmp_path / "random", dtype="float32", tokenizer=False)
    random_share, random_prompts = _python_likeness(load_model(random_dir), tokenizer)
    assert share >= MIN_CODE_SHARE and prompts >= MIN_PROMPTS_WITH_CODE, (share, prompts)
    # the thresholds tell the two apart: the untrained model of the same shape fails both
    assert random_share < MIN_CODE_SHARE and random_prompts < MIN_PROMPTS_WITH_CODE, (random_share, random_prompts)
    assert share > 3 * random_share


def test_runtime_matches_training_implementation(model, heldout_ids):
    tensors = {}
    for shard in sorted(TRAINED_DIR.glob("model-*.safetensors")):
        tensors.update(load_file(shard))
    twin = _train_tiny().TinyMoGE(MoGEConfig.from_file(TRAINED_DIR / "config.json")).load_tensors(tensors).eval()
    ids = torch.tensor([heldout_ids[:200]])
    with torch.no_grad():
        expected, _ = twin(ids)
    assert (model(ids) - expected).abs().max().item() < 1e-4

"""Sliding-window perplexity: every token scored once, equal to the full-sequence value when context does not matter."""

import math
from types import SimpleNamespace

import pytest
import torch

from moge_cli.errors import UsageError
from moge_cli.perplexity import perplexity

V = 11


class Bigram(torch.nn.Module):
    """Logits depend on the current token only, so any window gives the same per-token scores."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.randn(V, V, generator=torch.Generator().manual_seed(0))
        self.config = SimpleNamespace(max_position_embeddings=64)
        self.calls = []

    def forward(self, ids):
        self.calls.append(ids.shape[1])
        return self.table[ids]


def full_nll(model, ids):
    logp = torch.log_softmax(model.table[torch.tensor(ids[:-1])], dim=-1)
    return -float(logp.gather(1, torch.tensor(ids[1:])[:, None]).sum()) / (len(ids) - 1)


@pytest.mark.parametrize("window, stride", [(64, None), (8, 4), (8, 8), (5, 1), (2, 1)])
def test_window_scores_each_token_once(window, stride):
    ids = torch.randint(0, V, (50,), generator=torch.Generator().manual_seed(1)).tolist()
    m = Bigram()
    r = perplexity(m, ids, window=window, stride=stride)
    assert r["tokens"] == len(ids) - 1
    assert r["nll"] == pytest.approx(full_nll(m, ids), rel=1e-6)
    assert r["perplexity"] == pytest.approx(math.exp(r["nll"]))
    assert max(m.calls) <= window


def test_real_model_window_covering_text_equals_one_forward():
    from pathlib import Path

    from moge_cli.loader import load_model

    model = load_model(Path(__file__).resolve().parents[1] / "fixtures" / "tiny-moge", dtype="float32")
    ids = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    logits = model(torch.tensor([ids]))[0]
    logp = torch.log_softmax(logits[:-1], dim=-1)
    expected = -float(logp.gather(1, torch.tensor(ids[1:])[:, None]).sum()) / 39
    assert perplexity(model, ids, window=64)["nll"] == pytest.approx(expected, rel=1e-5)
    # a short window gives less context, so a different (but finite) value
    assert math.isfinite(perplexity(model, ids, window=8, stride=4)["perplexity"])


def test_bad_arguments():
    with pytest.raises(UsageError, match="at least 2 tokens"):
        perplexity(Bigram(), [1])
    with pytest.raises(UsageError, match="stride"):
        perplexity(Bigram(), [1, 2, 3], window=4, stride=5)

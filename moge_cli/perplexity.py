"""Perplexity of a model on a token sequence, with a sliding window over the context length.

Windows of `window` tokens advance by `stride`; each window scores only the tokens the previous
one did not, so every token after the first is scored exactly once with up to window-1 tokens of
context (the usual strided evaluation).
"""

from __future__ import annotations

import math
from typing import Any, Callable

DEFAULT_WINDOW = 512


def perplexity(
    model: Any,
    ids: list[int],
    *,
    window: int | None = None,
    stride: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """{"perplexity", "nll" (mean, nats), "tokens" (scored), "window", "stride"} of `ids` under `model`.

    model(input_ids [1, T]) -> logits [1, T, V]. window defaults to min(512, max_position_embeddings),
    stride to window // 2.
    """
    import torch

    from moge_cli.errors import UsageError

    if len(ids) < 2:
        raise UsageError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    window = window or min(DEFAULT_WINDOW, model.config.max_position_embeddings)
    stride = stride or max(1, window // 2)
    if not 0 < stride <= window:
        raise UsageError(f"stride must be in 1..window ({window}), got {stride}")
    tokens = torch.tensor(ids, dtype=torch.long)
    nll_sum, scored, done = 0.0, 0, 1  # `done`: targets 0..done-1 already scored (target 0 never is)
    begin = 0
    while done < len(ids):
        end = min(begin + window, len(ids))
        chunk = tokens[begin:end].unsqueeze(0)  # [1, W]
        logits = model(chunk)[0].float()  # [W, V]
        logp = torch.log_softmax(logits[:-1], dim=-1)  # predicts chunk[1:]
        targets = chunk[0, 1:]
        first = done - begin - 1  # index in targets of the first new target
        picked = logp[first:].gather(1, targets[first:, None]).squeeze(1)
        nll_sum -= float(picked.sum(dtype=torch.float64))
        scored += picked.numel()
        done = end
        if progress:
            progress(done, len(ids))
        begin = min(begin + stride, done - 1)  # keep >= 1 token of context for the first new target
    nll = nll_sum / scored
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": scored, "window": window, "stride": stride}

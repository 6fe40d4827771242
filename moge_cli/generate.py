"""Text generation: sampling, the prefill + KV-cache decode loop, stop handling and run statistics.

Pure library: nothing here prints. `generate()` yields token ids as they are produced;
`run_generation()` drives it, detokenises incrementally, applies stop strings and measures speed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from moge_cli.errors import UsageError
from moge_cli.memory_plan import cache_tokens
from moge_cli.profiling import peak_memory_bytes

if TYPE_CHECKING:
    from moge_cli.tokenizer import Tokenizer


def check_sampling(*, max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    if max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if not temperature >= 0:  # also rejects NaN
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {top_p}")


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None) -> int:
    """One token id from float32 logits [V]. temperature 0: argmax (first of ties); else top-k, top-p, multinomial."""
    if logits.dtype != torch.float32:
        logits = logits.float()
    if temperature == 0 or top_k == 1:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        keep = torch.topk(logits, top_k).indices
        logits = torch.full_like(logits, float("-inf")).scatter_(-1, keep, logits[keep])
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        p_sorted, order = torch.sort(probs, descending=True)
        mass_before = torch.cumsum(p_sorted, dim=-1) - p_sorted
        p_sorted = p_sorted.masked_fill(mass_before >= top_p, 0.0)  # keeps the smallest head with mass >= top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, p_sorted)
    # Sample on the CPU so a seed gives the same ids on every device.
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator(device="cpu")
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def model_device(model: Any) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, (torch.device, str)):
        return torch.device(dev)
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def context_capacity(model: Any, cache: Any = None) -> int:
    """Most positions the model (or this cache) can hold."""
    for attr in ("max_len", "max_length", "capacity"):
        v = getattr(cache, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return int(model.config.max_position_embeddings)


def generate(
    model: Any,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_ids: Sequence[int] = (),
    cache: Any = None,
) -> Iterator[int]:
    """Yield up to max_new_tokens ids after prompt_ids; stops after yielding an id in stop_ids.

    The prompt is prefilled in one forward; then one token per forward through the KV cache.
    With a `cache` (multi-turn), the prompt continues at `cache.length`. The last yielded id is
    never fed back, so afterwards the cache holds the prompt and all generated ids but the last.
    The token budget is clamped to what the context can hold.
    """
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    ids = [int(i) for i in prompt_ids]
    if not ids:
        raise UsageError("the prompt is empty: give at least one token")
    vocab = int(model.config.vocab_size)
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise UsageError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
    start = int(getattr(cache, "length", 0)) if cache is not None else 0
    capacity = context_capacity(model, cache)
    if start + len(ids) > capacity:
        where = f" after {start} cached tokens" if start else ""
        raise UsageError(f"the prompt is {len(ids)} tokens{where}; the model's context is {capacity} tokens")
    budget = min(max_new_tokens, capacity - start - len(ids) + 1)  # the last token is never fed
    if budget <= 0:
        return
    if cache is None:
        cache = model.new_cache(batch_size=1, max_len=cache_tokens(capacity, len(ids), budget))  # as memory_plan counts it
    device = model_device(model)
    gen = make_generator(seed)
    stops = {int(i) for i in stop_ids}

    x = torch.tensor([ids], dtype=torch.long, device=device)  # [1, T]
    one = torch.empty(1, 1, dtype=torch.long, device=device)  # each next token: filled, not built from a list
    for n in range(budget):
        with torch.inference_mode():
            logits = model(x, cache=cache)  # [1, T, V] float32
        token = sample_next(logits[0, -1], temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
        yield token
        if token in stops or n == budget - 1:
            return
        x = one.fill_(token)  # (between decode steps every torch call runs on cold caches: see DecodePlan.step)


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back any tail that may begin one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.buf = ""
        self.hit: str | None = None

    def feed(self, text: str) -> str:
        """Text that is safe to emit now (never any part of a stop string)."""
        if self.hit is not None:
            return ""
        self.buf += text
        found = [(i, s) for s in self.stops if (i := self.buf.find(s)) >= 0]
        if found:
            i, self.hit = min(found)
            out, self.buf = self.buf[:i], ""
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.buf.endswith(s[:k])), default=0)
        cut = len(self.buf) - hold
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.hit is not None else self.buf), ""
        return out


@dataclass
class GenerationResult:
    """What one generation produced and how fast. generated_ids include a final eos / stop-completing id."""

    prompt_ids: list[int]
    generated_ids: list[int]
    text: str  # decoded reply without eos and without the stop string; "" without a tokenizer
    finish_reason: str  # "eos" | "stop" | "length" (max_new_tokens) | "context" (the context window is full)
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0  # generated ids after the first (the first comes from the prefill forward)
    decode_seconds: float = 0.0
    peak_memory_bytes: int = 0
    stop: str | None = None
    ep: Any = None  # --ep N: moge_cli.distributed.EPSummary (the `ep` section of --json)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["ep"]
        d["prefill_tokens_per_s"] = self.prefill_tokens_per_s
        d["decode_tokens_per_s"] = self.decode_tokens_per_s
        return d if self.ep is None else d | {"ep": self.ep.to_dict()}


def run_generation(
    model: Any,
    prompt_ids: Sequence[int],
    *,
    tokenizer: "Tokenizer | None" = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_ids: Sequence[int] | None = None,
    on_text: Callable[[str], None] | None = None,
    on_token: Callable[[int], None] | None = None,
    cache: Any = None,
) -> GenerationResult:
    """Generate, streaming text deltas to on_text (ids to on_token), and return ids, text and speed.

    stop_ids default to the tokenizer's eos ids. Stop strings need a tokenizer; they may span
    token boundaries and are not part of `text` (nor of what on_text receives).
    """
    if stop and tokenizer is None:
        raise UsageError("stop strings need a tokenizer, and this checkpoint has none")
    if stop_ids is None:
        stop_ids = tokenizer.eos_ids if tokenizer is not None else ()
    eos = {int(i) for i in stop_ids}
    decoder = tokenizer.incremental() if tokenizer is not None else None
    matcher = StopMatcher(stop)
    pieces: list[str] = []

    def emit(text: str) -> None:
        if text:
            pieces.append(text)
            if on_text:
                on_text(text)

    generated: list[int] = []
    finish = "length"
    t0 = time.perf_counter()
    t_first = t_last = t0
    steps = generate(
        model, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        seed=seed, stop_ids=sorted(eos), cache=cache,
    )  # fmt: skip
    for token in steps:
        t_last = time.perf_counter()
        if not generated:
            t_first = t_last
        generated.append(token)
        if on_token:
            on_token(token)
        if token in eos:
            finish = "eos"
            break
        if decoder is not None:
            emit(matcher.feed(decoder.push(token)))
            if matcher.hit is not None:
                finish = "stop"
                steps.close()
                break
    if decoder is not None and finish != "stop":
        emit(matcher.feed(decoder.flush()))
        finish = "stop" if matcher.hit is not None else finish
        emit(matcher.flush())
    if finish == "length" and len(generated) < max_new_tokens:  # generate() clamps the budget to the context only
        finish = "context"
    return GenerationResult(
        prompt_ids=[int(i) for i in prompt_ids],
        generated_ids=generated,
        text="".join(pieces),
        finish_reason=finish,
        prefill_tokens=len(prompt_ids) if generated else 0,
        prefill_seconds=t_first - t0,
        decode_tokens=max(len(generated) - 1, 0),
        decode_seconds=t_last - t_first,
        peak_memory_bytes=peak_memory_bytes(model_device(model)),
        stop=matcher.hit,
    )

"""`moge_cli.profile(...)`: where the time, the memory and the tokens go (the library behind `moge profile`), as a ProfileReport.

Runtime: prefill + greedy decode with the model's sections timed, achieved weight bandwidth vs the
machine's read bandwidth measured in the same run. Routing: per-layer expert load and the MoGE
Imbalance Score against plain top-k on the same tokens. Optional perplexity and weight statistics.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from moge_cli.errors import UsageError

COMPONENTS = ("embedding", "attention", "router", "routed_experts", "shared_expert", "dense_mlp", "lm_head", "sampling")
BANDWIDTH_BUFFER_BYTES = 512 * 1024 * 1024

Components = dict[str, dict[str, float]]  # component (COMPONENTS, "other") -> {"seconds", "percent"}


@dataclass
class PrefillFigures:
    """The prompt's forward pass, timed per component."""

    tokens_per_s: float
    seconds: float
    components: Components


@dataclass
class DecodeFigures:
    """Greedy decode after the prompt: its speed without instrumentation, and the op-by-op pass timed per component."""

    tokens: int  # steps after the first generated token (which comes from the prefill)
    tokens_per_s: float  # replayed without a Recorder: the real speed
    seconds: float
    op_by_op_tokens_per_s: float  # the timed pass the components come from
    components: Components


@dataclass
class RoutingSummary:
    """Expert load per MoE layer and the Imbalance Score of MoGE against plain top-k on the same tokens."""

    devices: int  # expert groups are placed on this many devices
    tokens: int  # prompt + decode tokens routed
    mean_imbalance_moge: float
    mean_imbalance_topk: float
    layers: list[dict[str, Any]]  # per MoE layer: layer, expert_counts, group_counts, imbalance_moge... (routing_stats)


@dataclass
class Bandwidth:
    """Decode's weight reads against the machine's read bandwidth, measured in the same run."""

    active_weight_bytes_per_token: int
    achieved_bytes_per_s: float
    measured_read_bytes_per_s: float
    percent_of_measured: float
    decode_ceiling_tokens_per_s: float  # measured bandwidth / active weight bytes


@dataclass
class RuntimeProfile:
    """Prefill and greedy decode of one prompt: speed, time per component, routing."""

    prompt_tokens: int  # profiled (the first context-length window of a longer text)
    prompt_tokens_given: int
    generated_ids: list[int]
    prefill: PrefillFigures
    decode: DecodeFigures
    routing: RoutingSummary


@dataclass
class ProfileReport:
    """What `profile()` measured: the runtime profile, peak memory and bandwidth, and the asked-for extras; `to_dict()` is its --json."""

    model: str
    dtype: str  # torch name, e.g. bfloat16
    device: str
    prompt_tokens: int
    prompt_tokens_given: int
    generated_ids: list[int]
    prefill: PrefillFigures
    decode: DecodeFigures
    routing: RoutingSummary
    peak_memory_bytes: int
    bandwidth: Bandwidth
    generated_text: str | None = None  # with a tokenizer
    perplexity: dict[str, Any] | None = None  # perplexity_file: perplexity, tokens, window, stride
    weights: dict[str, Any] | None = None  # weights=True: weight_stats.weight_profile
    plot: str | None = None  # `moge profile --plot`: the PNG written

    def to_dict(self) -> dict[str, Any]:
        """The --json object: the extras that are None are left out."""
        return {k: v for k, v in asdict(self).items() if v is not None or k not in OPTIONAL}


OPTIONAL = ("generated_text", "perplexity", "weights", "plot")  # ProfileReport fields absent from --json when None


def measure_read_bandwidth(device: Any = "cpu", nbytes: int = BANDWIDTH_BUFFER_BYTES, repeats: int = 5) -> float:
    """Bytes/s of streaming reads: best of `repeats` sums over a buffer far larger than the caches."""
    import torch

    buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if buf.device.type == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        buf.sum()
        sync()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def active_weight_bytes(model: Any) -> int:
    """Weight bytes batch-1 decode reads per token: everything once, except only k/E of the routed
    experts and one row of the embedding table."""
    cfg = model.config
    total = 0
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if name == "embed_tokens":
            nbytes //= cfg.vocab_size
        elif name.endswith(("mlp.gate_up", "mlp.down")):
            nbytes = nbytes * cfg.num_experts_per_tok // cfg.num_experts
        total += nbytes
    return total


def peak_memory_bytes(device: Any = "cpu") -> int:
    """Process peak: CUDA max allocated on a CUDA device, else this process's peak resident set size.

    On Linux that is /proc/self/status VmHWM: ru_maxrss would carry the parent's peak through fork + exec,
    so a spawned rank (moge generate --ep) would report its launcher's peak as its own."""
    import resource

    import torch

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device))
    if (hwm := proc_status_kib("VmHWM")) is not None:
        return hwm * 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB elsewhere


def proc_status_kib(field: str) -> int | None:
    """A `field:  N kB` line of /proc/self/status, in KiB; None where there is no such file (macOS)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def prompt_tokens(model_path: Path, prompt: str | None, text_file: str | None, prompt_ids: list[int] | None) -> tuple[list[int], Any]:
    from moge_cli.tokenizer import has_tokenizer, load_tokenizer

    tok = load_tokenizer(model_path) if has_tokenizer(model_path) else None
    given = [x is not None for x in (prompt, text_file, prompt_ids)]
    if sum(given) != 1:
        raise UsageError("give exactly one of --prompt, --file or --prompt-ids")
    if prompt_ids is not None:
        return list(prompt_ids), tok
    if tok is None:
        raise UsageError(f"{model_path}: no tokenizer.model or tokenizer.json; use --prompt-ids")
    text = prompt if prompt is not None else Path(text_file).read_text(encoding="utf-8")
    return tok.encode(text, add_bos=True), tok


def _time_components(rec: Any, total: float) -> Components:
    rows = {c: rec.seconds.get(c, 0.0) for c in COMPONENTS}
    rows["other"] = max(total - sum(rows.values()), 0.0)
    return {c: {"seconds": s, "percent": 100 * s / total if total else 0.0} for c, s in rows.items()}


def _replay_decode(model: Any, x: Any, generated: list[int], sync: Any) -> float:
    """Seconds to decode `generated` (but the last) again after prefilling x, with no Recorder.

    A Recorder runs the model op by op, so that every section is timed (the one-call C decode step
    has no sections): the timed pass shows where time goes, this one how fast decode really is.
    """
    import torch

    cache = model.new_cache(1, x.shape[1] + len(generated))
    one = torch.empty(1, 1, dtype=torch.long, device=model.device)  # filled per token, as generate does
    model(x, cache=cache)
    model(one.fill_(generated[0]), cache=cache)  # untimed: a cache's first step builds the whole-step plan / CUDA graph
    cache.reset()
    model(x, cache=cache)
    t0 = time.perf_counter()
    for token in generated[:-1]:
        model(one.fill_(token), cache=cache)
    if sync is not None:
        sync()
    return time.perf_counter() - t0


def runtime_profile(model: Any, ids: list[int], *, decode: int, devices: int | None) -> RuntimeProfile:
    """Prefill `ids`, decode `decode` tokens greedily; time per component, routing per layer."""
    import numpy as np
    import torch

    from moge_cli.instrument import Recorder
    from moge_cli.routing_stats import layer_routing_stats

    cfg = model.config
    cuda = model.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else None
    context = cfg.max_position_embeddings
    if decode >= context:
        raise UsageError(f"--max-new-tokens {decode} leaves no room for a prompt in the {context}-token context")
    given = len(ids)
    ids = ids[: context - decode]  # a long text is profiled on its first context-length window
    cache = model.new_cache(1, len(ids) + decode)
    x = torch.tensor([ids], dtype=torch.long, device=model.device)

    with Recorder(sync=sync, keep_routing=True) as pre:
        t0 = time.perf_counter()
        logits = model(x, cache=cache)
        with pre.section("sampling"):
            nxt = int(logits[0, -1].argmax())
        prefill_s = time.perf_counter() - t0
    generated = [nxt]
    with Recorder(sync=sync, keep_routing=True) as dec:
        t0 = time.perf_counter()
        for _ in range(decode - 1):
            logits = model(torch.tensor([[nxt]], device=model.device), cache=cache)
            with dec.section("sampling"):
                nxt = int(logits[0, -1].argmax())
            generated.append(nxt)
        decode_s = time.perf_counter() - t0
    steps = max(decode - 1, 0)
    fast_s = _replay_decode(model, x, generated, sync) if steps else 0.0

    layers = []
    for layer in cfg.moe_layers:
        probs = torch.cat(pre.probs[layer] + dec.probs[layer]).numpy()  # [T, E]
        picks = torch.cat(pre.picks[layer] + dec.picks[layer]).numpy()  # [T, k]
        stats = layer_routing_stats(probs, picks, n_groups=cfg.n_groups, num_experts_per_tok=cfg.num_experts_per_tok, devices=devices)
        layers.append({"layer": layer, **stats})
    is_moge = [l["imbalance_moge"] for l in layers]
    is_topk = [l["imbalance_topk"] for l in layers]
    return RuntimeProfile(
        prompt_tokens=len(ids),
        prompt_tokens_given=given,
        generated_ids=generated,
        prefill=PrefillFigures(len(ids) / prefill_s, prefill_s, _time_components(pre, prefill_s)),
        decode=DecodeFigures(
            tokens=steps,
            tokens_per_s=steps / fast_s if steps else 0.0,
            seconds=fast_s,
            op_by_op_tokens_per_s=steps / decode_s if steps else 0.0,
            components=_time_components(dec, decode_s),
        ),
        routing=RoutingSummary(
            devices=devices or cfg.n_groups,
            tokens=len(ids) + steps,
            mean_imbalance_moge=float(np.mean(is_moge)) if layers else 0.0,
            mean_imbalance_topk=float(np.mean(is_topk)) if layers else 0.0,
            layers=layers,
        ),
    )


def profile(
    model: str | os.PathLike,
    *,
    prompt: str | None = None,
    text_file: str | os.PathLike | None = None,
    prompt_ids: list[int] | None = None,
    decode: int = 32,
    dtype: str | None = None,
    device: str = "cpu",
    devices: int | None = None,
    perplexity_file: str | os.PathLike | None = None,
    weights: bool = False,
    revision: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> ProfileReport:
    """Profile a checkpoint; the report's to_dict() is what `moge profile --json` prints.

    One of prompt / text_file / prompt_ids gives the tokens; decode: greedy tokens after them;
    devices: how many devices whole expert groups are placed on for the Imbalance Score
    (default one group per device); perplexity_file: also report perplexity on that text;
    weights: also stream per-tensor weight statistics.
    """
    from moge_cli.checkpoint import open_checkpoint
    from moge_cli.devices import check_device
    from moge_cli.loader import load_model

    say = progress or (lambda msg: None)
    ckpt = open_checkpoint(model, revision=revision)
    root = ckpt.root
    if devices is not None and (devices <= 0 or ckpt.config.n_groups % devices):
        raise UsageError(f"--devices {devices}: whole groups must be spread evenly; choose a divisor of {ckpt.config.n_groups}")
    if decode < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {decode}")
    ids, tok = prompt_tokens(root, prompt, text_file, prompt_ids)
    if not ids:
        raise UsageError("the prompt is empty")
    check_device(device)  # before the model loads
    say("loading model")
    net = load_model(model, dtype=dtype, device=device, revision=revision)
    say(f"profiling {len(ids)} prompt tokens + {decode} decode tokens")
    runtime = runtime_profile(net, ids, decode=decode, devices=devices)
    peak = peak_memory_bytes(net.device)  # before the bandwidth buffer exists
    say("measuring memory bandwidth")
    bandwidth = measure_read_bandwidth(net.device)
    weight_bytes = active_weight_bytes(net)
    achieved = weight_bytes * runtime.decode.tokens_per_s
    report = ProfileReport(
        model=str(ckpt.source),
        dtype=str(net.dtype).removeprefix("torch."),
        device=str(net.device),
        **vars(runtime),
        peak_memory_bytes=peak,
        bandwidth=Bandwidth(weight_bytes, achieved, bandwidth, 100 * achieved / bandwidth, bandwidth / weight_bytes),
    )
    if tok is not None:
        report.generated_text = tok.decode(report.generated_ids)
    if perplexity_file is not None:
        from moge_cli.perplexity import perplexity

        if tok is None:
            raise UsageError(f"{root}: --perplexity needs a tokenizer")
        say("computing perplexity")
        text = Path(perplexity_file).read_text(encoding="utf-8")
        report.perplexity = perplexity(net, tok.encode(text, add_bos=True))
    if weights:
        from moge_cli.weight_stats import weight_profile

        say("streaming weight statistics")
        report.weights = weight_profile(ckpt)
    return report

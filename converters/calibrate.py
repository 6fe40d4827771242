"""`moge quantize --calib TEXT`: how much each input column of each quantized weight matters, from text
run through the model (activation-aware, as AWQ and GPTQ measure it).

For every linear module the calibration tokens reach, the mean square of the activations entering
each input column: importance_j = mean_t x_tj^2. Quantizing w to w' then costs each token about
sum_j x_tj^2 (w_j - w'_j)^2 of output error, so the mse search (converters/quantize.py) weights each
column's error by importance_j. Routed experts get their own statistics from the tokens the router
sends them; an expert that no calibration token reaches gets none and is quantized by the plain
search (counted in the report).

The model runs one layer at a time, each layer's weights read from the memory-mapped checkpoint and
dropped after it: memory holds one layer and the hidden states of the calibration tokens.
Shapes: N calibration tokens, H hidden, I expert width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from moge_cli.errors import UsageError
from moge_cli.names import module_name, part_kinds, tensor_name

WINDOW = 512  # tokens per sequence the calibration text is cut into


@dataclass
class Calibration:
    """Column importance per quantizable module, and how many tokens and experts it came from."""

    importance: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> [K] float32
    tokens: int = 0
    experts: int = 0  # routed experts in the model
    experts_reached: int = 0  # of them, reached by at least one calibration token

    def summary(self, file: str) -> dict:  # modules: those with statistics (the pipeline recounts the quantized ones)
        return {"file": file, "tokens": self.tokens, "modules": len(self.importance), "experts": self.experts,
                "experts_reached": self.experts_reached}  # fmt: skip


def calibrate(
    src, text_file, *, max_tokens: int = 2048, dtype: torch.dtype | None = None, device: str = "cpu", progress=None
) -> Calibration:
    """Column importance of every quantizable module of the checkpoint at src, from text_file's first
    max_tokens tokens (the checkpoint's tokenizer), the layers run on `device` (the importance comes back
    on the CPU). progress(1, layers) is called after each layer."""
    from moge_cli.checkpoint import open_checkpoint
    from moge_cli.instrument import Recorder
    from moge_cli.loader import checked_sources, checkpoint_dtype, materialize
    from moge_cli.model import DecoderLayer, rms_norm
    from moge_cli.rope import call_rows, rope_tables
    from moge_cli.tokenizer import has_tokenizer, load_tokenizer

    root = Path(src)
    if not root.is_dir() or not has_tokenizer(root):
        raise UsageError(f"{src}: --calib needs a checkpoint directory with its tokenizer (tokenizer.model or tokenizer.json)")
    ids = load_tokenizer(root).encode(Path(text_file).read_text(encoding="utf-8"), add_bos=True)[:max_tokens]
    if len(ids) < 2:
        raise UsageError(f"{text_file}: too little text to calibrate on ({len(ids)} tokens)")
    ckpt = open_checkpoint(root)
    try:
        cfg, sources = ckpt.config, checked_sources(ckpt)
        dtype = dtype or checkpoint_dtype(ckpt)
        embed = ckpt.tensor(tensor_name("embed"))
        xs = [embed[torch.tensor(ids[a : a + WINDOW])].to(device, dtype)[None] for a in range(0, len(ids), WINDOW)]  # [1, W, H] each
        cos, sin = rope_tables(cfg, min(len(ids), WINDOW), device)
        rows = [call_rows(cfg, 0, x.shape[1], device) or (cos[: x.shape[1]], sin[: x.shape[1]]) for x in xs]  # each window from position 0
        cal = Calibration(tokens=len(ids), experts=cfg.num_experts * len(cfg.moe_layers))
        for L in range(cfg.num_hidden_layers):
            layer = materialize(DecoderLayer(cfg, L, dtype, "meta"), ckpt, sources, f"layers.{L}.", device=device)
            with torch.inference_mode(), Recorder(keep_routing=True, keep_inputs=True) as rec:
                h1 = torch.cat([rms_norm(x, layer.input_layernorm, cfg.rms_norm_eps).flatten(0, 1) for x in xs])  # [N, H]
                xs = [layer(x, c[:, None], s[:, None], None) for x, (c, s) in zip(xs, rows)]
            _layer_importance(cal, cfg, L, layer, h1, rec)
            del layer
            ckpt.close()  # unmap this layer's pages
            if progress:
                progress(1, cfg.num_hidden_layers)
        if tensor_name("lm_head") in ckpt.tensors and not cfg.tie_word_embeddings:
            norm = ckpt.tensor(tensor_name("norm")).to(device, torch.float32)
            cal.importance[module_name("lm_head")] = _mean_square(torch.cat([rms_norm(x.float(), norm, cfg.rms_norm_eps).flatten(0, 1) for x in xs]))
    finally:
        ckpt.close()
    return cal


def _mean_square(x: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [K]: mean over tokens of x^2, in float32, on the CPU (where quantization runs)."""
    return x.float().pow(2).mean(0).cpu()


def _swiglu_act(x: torch.Tensor, w13: torch.Tensor) -> torch.Tensor:
    """silu(gate x) * up x, the input of the down projection: x [n, H], w13 [2I, H] -> [n, I] float32."""
    gate, up = F.linear(x.float(), w13.float()).chunk(2, dim=-1)
    return F.silu(gate) * up


def _layer_importance(cal: Calibration, cfg, L: int, layer, h1: torch.Tensor, rec) -> None:
    a = _mean_square(h1)
    for kind in ("q_proj", "k_proj", "v_proj"):
        cal.importance[module_name(kind, L)] = a
    cal.importance[module_name("o_proj", L)] = _mean_square(torch.cat([o.flatten(0, 1) for o in rec.inputs[("o_proj", L)]]))
    h2 = torch.cat([h.flatten(0, 1) for h in rec.inputs[("mlp", L)]])  # [N, H]
    mlp = layer.mlp
    if not hasattr(mlp, "gate"):  # a dense layer
        _mlp_importance(cal, "dense", L, None, h2, mlp.w13)
        return
    if mlp.shared_w13 is not None:
        _mlp_importance(cal, "shared", L, None, h2, mlp.shared_w13)
    picks = torch.cat(rec.picks[L])  # [N, k]
    for e in picks.unique().tolist():
        xe = h2[(picks == e).any(-1)]  # [n, H]: the tokens routed to expert e
        _mlp_importance(cal, "expert", L, e, xe, mlp.gate_up[e])
        cal.experts_reached += 1


def _mlp_importance(cal: Calibration, part: str, L: int, e: int | None, x: torch.Tensor, w13: torch.Tensor) -> None:
    """One MLP's importance: `part` (names.PARTS: dense, shared or expert) holds its gate, up and down kinds in
    table order, the order in which gate and up fill w13."""
    gate, up, down = (module_name(k, L, e) for k in part_kinds(part))
    a = _mean_square(x)
    cal.importance[gate] = cal.importance[up] = a
    cal.importance[down] = _mean_square(_swiglu_act(x, w13))

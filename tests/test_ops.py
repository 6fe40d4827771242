"""moge_kernels.ops, the one compute entry: the same calls take float tensors or quantized weights (QLinear)."""

from __future__ import annotations

import pytest
import torch

from moge_converters.quantize import quantize
from moge_converters.quantize_pipeline import quantize_checkpoint
from moge_kernels import ops
from moge_kernels.qlinear import QLinear
from moge_cli.config import MoGEConfig
from moge_cli.loader import load_model
from moge_cli.model import DenseMLP, MoE
from moge_cli.quant_format import Scheme, pack_int32
from moge_cli.loader import qlinear
from moge_cli.synthetic import write_checkpoint


def _q(shape, scheme, e=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    parts = []
    for _ in range(e):
        t = quantize(torch.randn(*shape, generator=g) / 4, scheme, torch.bfloat16)
        parts.append((t.q, t.scale, t.zero))
    return parts


@pytest.mark.parametrize("kernel", ["native", "torch", "dequant"])
@pytest.mark.parametrize("rows", [1, 3, 20])
def test_ops_run_quantized_weights_as_their_dequantised_float_twins(kernel, rows):
    """linear, moe, shared_mlp and mlp on QLinears agree with the same calls on the dequantised float32 weights."""
    E, H, I, k = 4, 64, 32, 2
    scheme = Scheme(8, None, True)
    gate_up, down = qlinear(_q((2 * I, H), scheme, E, 1), scheme, torch.bfloat16, kernel), qlinear(_q((H, I), scheme, E, 2), scheme, torch.bfloat16, kernel)
    w13, w2 = qlinear(_q((2 * I, H), scheme, 1, 3), scheme, torch.bfloat16, kernel), qlinear(_q((H, I), scheme, 1, 4), scheme, torch.bfloat16, kernel)
    f_gate_up = torch.stack([gate_up.dequantized(e) for e in range(E)])
    f_down = torch.stack([down.dequantized(e) for e in range(E)])
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(rows)])
    w = torch.rand(rows, k, generator=g)
    xb = x.bfloat16()
    x = xb.float()  # the same values: only the weights' kind and the rounding of results differ
    close = dict(atol=0.06, rtol=0.06)  # bfloat16 activations against float32 ones
    torch.testing.assert_close(ops.linear(xb, w13).float(), ops.linear(x, w13.dequantized(0)), **close)
    torch.testing.assert_close(ops.moe(xb, ids, w, gate_up, down).float(), ops.moe(x, ids, w, f_gate_up, f_down), **close)
    torch.testing.assert_close(ops.shared_mlp(xb, w13, w2).float(), ops.shared_mlp(x, w13.dequantized(0), w2.dequantized(0)), **close)
    torch.testing.assert_close(ops.mlp(xb, w13, w2).float(), ops.mlp(x, w13.dequantized(0), w2.dequantized(0)), **close)


def test_packed4_words_are_the_checkpoints_words():
    """kernels/qlinear packs int4 into compressed-tensors' own int32 words (quant_format.pack_int32) without importing it."""
    scheme = Scheme(4, 64, False)
    parts = _q((32, 256), scheme, 2)
    lin = QLinear(parts, 4, False, torch.bfloat16, "native")
    if lin.mode != "packed4":
        pytest.skip("kernels._cpu not built")
    for e, (q, _, _) in enumerate(parts):
        assert torch.equal(lin.weight[e], pack_int32(q, 4))


def test_one_moe_module_holds_float_or_quantized_weights(tmp_path):
    """Loading a quantized checkpoint swaps QLinears into the float model's own MoE / DenseMLP modules."""
    cfg = MoGEConfig.from_dict({**MoGEConfig.from_name("tiny-moge").to_dict(), "mlp_only_layers": [0], "intermediate_size": 96})
    src = write_checkpoint(cfg, tmp_path / "src", tokenizer=False)
    quantize_checkpoint(src, tmp_path / "q", bits=8)
    model = load_model(tmp_path / "q")
    dense, moe = model.layers[0].mlp, model.layers[1].mlp
    assert type(dense) is DenseMLP and type(moe) is MoE
    assert type(dense.w13) is QLinear and type(moe.gate_up) is QLinear and type(moe.shared_w2) is QLinear
    assert type(load_model(src).layers[1].mlp) is MoE


def test_one_query_attention_takes_a_non_contiguous_sdpa_output(monkeypatch):
    """CUDA's scaled_dot_product_attention can return a non-contiguous tensor for one query; the GQA fold
    must not .view it (issue 16: every `generate --device cuda` crashed there). CPU stands in for it."""
    import torch.nn.functional as F

    from moge_kernels import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 1, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g)
    want = attention._attend(q, k, v, start=4)
    sdpa = F.scaled_dot_product_attention

    def strided_sdpa(*args, **kwargs):
        out = sdpa(*args, **kwargs)  # [B, nKV, nH/nKV, D]
        strided = out.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, other strides
        assert not strided.is_contiguous()
        return strided

    monkeypatch.setattr(F, "scaled_dot_product_attention", strided_sdpa)
    torch.testing.assert_close(attention._attend(q, k, v, start=4), want, rtol=0, atol=0)


def test_quantized_experts_off_the_cpu_take_the_device_path(monkeypatch):
    """Off the CPU (meta tensors stand in for a device), decode-sized calls on QLinear stacks go to
    qexperts.moe_device, which reads nothing back; many tokens keep the grouped path (one host read, prefill)."""
    E, H, I, k = 4, 64, 32, 2
    scheme = Scheme(8, None, True)
    gate_up, down = qlinear(_q((2 * I, H), scheme, E, 1), scheme, torch.bfloat16, "torch"), qlinear(_q((H, I), scheme, E, 2), scheme, torch.bfloat16, "torch")
    calls = []
    monkeypatch.setattr(ops, "moe_device", lambda x, ids, w, gu, dn: calls.append(tuple(ids.shape)) or torch.zeros(x.shape, device=x.device))
    for T in (1, 2):  # T * k <= E
        ids = torch.zeros(T, k, dtype=torch.long, device="meta")
        ops.moe(torch.zeros(T, H, dtype=torch.bfloat16, device="meta"), ids, ids.float(), gate_up, down)
    assert calls == [(1, k), (2, k)]
    x = torch.randn(1, H, dtype=torch.bfloat16)  # on the CPU: the CPU's paths, never the device one
    ops.moe(x, torch.tensor([[0, 3]]), torch.tensor([[0.5, 0.5]]), gate_up, down)
    assert calls == [(1, k), (2, k)]

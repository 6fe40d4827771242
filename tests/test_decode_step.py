"""kernels/step.c (whole decode steps from kernels/decode_step.py) against the op-by-op paths, float and quantized."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from moge_converters.quantize_pipeline import quantize_checkpoint
from moge_kernels import native
from moge_cli.config import MoGEConfig
from moge_cli.loader import load_model, qlinear
from moge_cli.model import MoGEForCausalLM
from moge_cli.quant_format import Scheme, pack_int32
from moge_kernels.qlinear import QLinear, dequantize

pytestmark = pytest.mark.skipif(not native.available(), reason="kernels._cpu not built or this CPU lacks AVX2/FMA")

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            moe_intermediate_size=16, shared_expert_intermediate_size=32, max_position_embeddings=128)  # fmt: skip
SHAPES = {
    "G2-K2": dict(BASE, num_experts=8, num_experts_per_tok=4, num_expert_groups=2),
    "G8-K1": dict(BASE, num_experts=16, num_experts_per_tok=8, rope_theta=1e6),
    "dense": dict(BASE, num_hidden_layers=3, num_experts=8, num_experts_per_tok=4, mlp_only_layers=[1], intermediate_size=48),
    "GQA-6to1": dict(BASE, hidden_size=96, num_attention_heads=6, num_key_value_heads=1, num_experts=8, num_experts_per_tok=2),
    "no-shared": dict(BASE, num_experts=8, num_experts_per_tok=4, shared_expert_intermediate_size=0),
    "no-experts": dict(BASE, num_experts=0, num_experts_per_tok=0, moe_intermediate_size=0, intermediate_size=48),
}
PROMPT = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
FEED = [7, 2, 9, 4, 4, 1, 8, 3, 5, 0, 6, 2]  # the same tokens on every path (greedy bf16 paths may part at near-ties)


def random_model(shape: str, dtype: torch.dtype) -> MoGEForCausalLM:
    torch.manual_seed(23)
    model = MoGEForCausalLM.from_config(MoGEConfig.from_dict(SHAPES[shape]), dtype=dtype, device="cpu")
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    return model


def decode(model, plan: bool) -> torch.Tensor:
    """Last-position logits [1 + len(FEED), V]: the prompt's prefill, then one step per fed token."""
    model._plan = False if plan else None  # None: the op-by-op path
    cache = model.new_cache(1, 64)
    logits = [model(PROMPT, cache)[:, -1]]
    for t in FEED:
        logits.append(model(torch.tensor([[t]]), cache)[:, -1])
    assert (model._plan is not None) == plan  # the step really ran (or really did not)
    return torch.cat(logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_step_matches_the_op_by_op_paths(shape, dtype, monkeypatch):
    model = random_model(shape, dtype)
    step = decode(model, plan=True)
    ops = decode(model, plan=False)  # kernels/cpu.c one op at a time
    monkeypatch.setenv("MOGE_NATIVE", "0")
    torch_ops = decode(model, plan=False)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 0.05, "atol": 0.05}
    torch.testing.assert_close(step, ops, **tol)
    torch.testing.assert_close(step, torch_ops, **tol)


def test_steps_on_two_caches_in_turn_match_each_alone():
    """The plan keeps the addresses of the last cache it ran on: switching caches must switch them."""
    model = random_model("G2-K2", torch.float32)
    alone = decode(model, plan=True)
    a, b = model.new_cache(1, 64), model.new_cache(1, 64)
    model._plan = False
    la, lb = [model(PROMPT, a)[:, -1]], [model(PROMPT[:, :5], b)[:, -1]]
    for t in FEED:  # a runs the same tokens as `alone`; b other ones, in between
        la.append(model(torch.tensor([[t]]), a)[:, -1])
        lb.append(model(torch.tensor([[(t + 1) % 96]]), b)[:, -1])
    torch.testing.assert_close(torch.cat(la), alone, rtol=1e-5, atol=1e-5)
    assert b.length == 5 + len(FEED)


def test_a_dropped_cache_is_freed_though_the_plan_ran_on_it():
    import gc
    import weakref

    model = random_model("G2-K2", torch.float32)
    cache = model.new_cache(1, 16)
    model(torch.tensor([[1]]), cache)
    assert model._plan is not None
    k = weakref.ref(cache.k)
    del cache
    gc.collect()
    assert k() is None


def test_a_bad_token_on_the_step_path_is_a_usage_error_and_leaves_the_cache():
    """The kernels decline a token id outside the vocabulary; the model's own check names it, as for prefill."""
    from moge_cli.errors import UsageError

    model = random_model("G2-K2", torch.float32)
    cache = model.new_cache(1, 16)
    model(torch.tensor([[1]]), cache)
    assert model._plan not in (None, False) and cache.length == 1  # the step path is the one asked
    for bad in (96, -1):
        with pytest.raises(UsageError, match=rf"^token id {bad} is outside the vocabulary 0\.\.95$"):
            model(torch.tensor([[bad]]), cache)
    assert cache.length == 1


def test_a_recorder_makes_decode_run_op_by_op():
    """Profiling times every section: while a Recorder is active no plan is built and no step runs."""
    from moge_cli.instrument import Recorder

    model = random_model("G2-K2", torch.float32)
    cache = model.new_cache(1, 16)
    with Recorder() as rec:
        model(torch.tensor([[1]]), cache)
    assert model._plan is False and rec.seconds["routed_experts"] > 0 and cache.length == 1
    model(torch.tensor([[2]]), cache)
    assert model._plan not in (None, False) and cache.length == 2


def test_moge_native_0_switches_the_step_off_at_any_time(monkeypatch):
    """MOGE_NATIVE=0 set after the plan was built (bench_runtime toggles it between engines in one process)
    stops the C step; unset, the same plan runs again; set before the first step, no plan is built."""
    model = random_model("G2-K2", torch.float32)
    cache = model.new_cache(1, 16)
    model(torch.tensor([[1]]), cache)
    assert model._plan not in (None, False)
    steps = []
    real = native.step
    monkeypatch.setattr(native, "step", lambda *a: steps.append(1) or real(*a))
    monkeypatch.setenv("MOGE_NATIVE", "0")
    model(torch.tensor([[2]]), cache)
    assert steps == [] and cache.length == 2
    monkeypatch.delenv("MOGE_NATIVE")
    model(torch.tensor([[3]]), cache)
    assert steps == [1] and cache.length == 3
    fresh = random_model("G2-K2", torch.float32)
    monkeypatch.setenv("MOGE_NATIVE", "0")
    fresh(torch.tensor([[1]]), fresh.new_cache(1, 16))
    assert fresh._plan is False  # not built (and not cached as None) while the kernels are off


def test_float16_and_torch_int4_models_get_no_plan(tmp_path):
    model = random_model("G2-K2", torch.float16)
    assert model.decode_plan() is None
    cache = model.new_cache(1, 16)
    model(PROMPT, cache)
    assert model(torch.tensor([[1]]), cache).shape == (1, 1, 96)  # the op-by-op path still decodes


# ---- int4 / int8 weights -------------------------------------------------------------------------
@pytest.fixture(params=["avx2", "avx512"])
def isa(request):
    """The int8 / int4 dot products in their AVX2 and (where the CPU has it) AVX-512 versions."""
    on = native.use_avx512(request.param == "avx512")
    if request.param == "avx512" and not on:
        pytest.skip("this CPU lacks AVX-512 VNNI")
    yield request.param
    native.use_avx512(True)


@pytest.mark.parametrize("group, symmetric, k", [(32, False, 512), (64, True, 512), (128, False, 512), (256, True, 512),
                                                 (128, True, 256), (32, False, 256), (256, False, 256), (64, True, 128),
                                                 (32, True, 192), (64, False, 192), (64, False, 1344)])  # fmt: skip
def test_int4_linear_is_the_dequantised_weight_on_int8_activations(group, symmetric, k, isa):
    """One token against int4 words: activations are quantized per 32 values (as llama.cpp's Q8_0),
    so the result is the dequantised weight's product to within that rounding (well under 1%).
    AVX-512 reads rows of k <= 256 four at a time (n = 42: two rows left over), and ends k = 192 and
    Pangu's expert width 1344 (not whole 128-value steps) with a masked step of 64 values."""
    g = torch.Generator().manual_seed(group)
    n = 42
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, k // group, generator=g) / 10 + 0.01
    zero = None if symmetric else torch.randint(-8, 8, (n, k // group), generator=g, dtype=torch.int8)
    z8 = (torch.zeros_like(scale, dtype=torch.int8) if zero is None else zero).to(torch.uint8) + 8
    x = torch.randn(1, k, generator=g)
    x[0, 5] = 40.0  # an outlier: its 32-value block gets a coarse scale, the others do not
    w = dequantize(q, scale, zero)
    want = x @ w.t()
    got = native.linear_vec(x, pack_int32(q, 4), None, scale, z8)
    half_step = (x.view(-1, 32).abs().amax(1) / 127 / 2).repeat_interleave(32)  # [k]: each value's rounding bound
    bound = w.abs() @ half_step + 1e-5 * float(want.abs().max())  # [n]
    assert ((got - want).abs()[0] <= bound).all()
    assert (got - want).abs().max() > 0  # activations really are quantized: not the float product bit for bit
    other = native.use_avx512(isa == "avx2")  # the other version: the same integer products, summed in another order
    if other != (isa == "avx512"):
        torch.testing.assert_close(native.linear_vec(x, pack_int32(q, 4), None, scale, z8), got, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [320, 352])  # 128-value blocks: the last one of 64 or 96 values
def test_int8_linear_reads_activations_as_int16_within_their_rounding(k, isa):
    """int8 weights against x as int16 per 128 values: error within the rounding bound, far below bfloat16's."""
    g = torch.Generator().manual_seed(8)
    n = 24
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) / 50
    x = torch.randn(1, k, generator=g)
    x[0, 7] = 300.0
    want = (x.double() @ (w.double() * scale.double()[:, None]).t()).float()
    got = native.linear_vec(x, w, None, scale)
    half_step = torch.cat([b.abs().max().expand(len(b)) / 32767 / 2 for b in x[0].split(128)])  # [k]
    bound = (w.float().abs() * scale[:, None]) @ half_step + 1e-5 * float(want.abs().max())
    assert ((got - want).abs()[0] <= bound).all()
    odd = native.linear_vec(x[:, :300], w[:, :300].contiguous(), None, scale)  # k % 32 != 0: the float32 path
    torch.testing.assert_close(odd, x[:, :300] @ (w[:, :300].float() * scale[:, None]).t(), rtol=1e-5, atol=1e-4)


def test_int4_kernel_refuses_shapes_it_cannot_read():
    q = pack_int32(torch.zeros(4, 96, dtype=torch.int8), 4)  # k = 96: not a multiple of 64
    s, z = torch.ones(4, 3), torch.full((4, 3), 8, dtype=torch.uint8)
    assert native.linear_vec(torch.zeros(1, 96), q, None, s, z) is None
    q = pack_int32(torch.zeros(4, 192, dtype=torch.int8), 4)  # groups of 96: neither 32 nor a multiple of 64
    assert native.linear_vec(torch.zeros(1, 192), q, None, torch.ones(4, 2), torch.full((4, 2), 8, dtype=torch.uint8)) is None


QUANT_SHAPE = dict(BASE, hidden_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=128,
                   num_experts=8, num_experts_per_tok=4, num_expert_groups=2, torch_dtype="bfloat16")  # fmt: skip


@pytest.fixture(scope="module", params=["shared", "no-shared"])
def quant_src(request, tmp_path_factory) -> Path:
    from moge_cli.synthetic import write_checkpoint

    shape = QUANT_SHAPE if request.param == "shared" else dict(QUANT_SHAPE, shared_expert_intermediate_size=0)
    return write_checkpoint(MoGEConfig.from_dict(shape), tmp_path_factory.mktemp("qsrc") / "ck", seed=3, tokenizer=False)


@pytest.mark.parametrize("opts, modes", [(dict(bits=8), {"int8"}), (dict(bits=4), {"packed4"}),
                                         (dict(bits=4, group_size=32, symmetric=True, lm_head=True), {"packed4"})])  # fmt: skip
def test_quantized_step_follows_the_dequantised_model(quant_src, tmp_path, opts, modes, monkeypatch):
    quantize_checkpoint(quant_src, tmp_path / "q", **opts)
    model = load_model(tmp_path / "q")  # bfloat16; kernel "native"
    assert {m.mode for m in model.modules() if isinstance(m, QLinear)} == modes
    step = decode(model, plan=True)
    ops = decode(model, plan=False)  # the same kernels one op at a time
    ref = decode(_float_twin(model), plan=False)  # float32 weights = the dequantised ones, torch ops
    monkeypatch.setenv("MOGE_NATIVE", "0")
    torch_ops = decode(model, plan=False)  # bfloat16 as well, torch ops on the dequantised weights
    scale = float(ref.abs().max())
    assert float((step - ops).abs().max()) < 0.02 * scale
    assert float((step - torch_ops).abs().max()) < 0.05 * scale
    # against float32: a near-tie in the router can pick another expert at a position, for torch's
    # bfloat16 path as for the step (seen at one position of 13 here), so all but one position
    per_position = (step - ref).abs().amax(-1)  # [positions]
    assert int((per_position >= 0.05 * scale).sum()) <= 1
    assert (step.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


def _float_twin(model) -> MoGEForCausalLM:
    """The same model with every QLinear replaced by its dequantised float32 weight."""
    twin = MoGEForCausalLM.from_config(model.config, dtype=torch.float32, device="cpu")
    for name, p in twin.named_parameters():
        owner, _, leaf = name.rpartition(".")
        src = getattr(model.get_submodule(owner), leaf)
        if isinstance(src, QLinear):
            w = torch.stack([src.dequantized(e) for e in range(src.num_experts)])
            p.data.copy_(w.reshape(p.shape))
        else:
            p.data.copy_(src.float())
    return twin


def test_int4_decode_perplexity_on_the_trained_fixture(tmp_path):
    """Decoding token by token through kernels/step.c (int8 activations) scores held-out text like the
    prefill path (float32 GEMMs on the dequantised weights) does."""
    quantize_checkpoint(ROOT / "fixtures/tiny-trained", tmp_path / "q", bits=4)
    model = load_model(tmp_path / "q", dtype="bfloat16")
    assert model.decode_plan() is not None
    from moge_cli.tokenizer import load_tokenizer

    ids = load_tokenizer(ROOT / "fixtures/tiny-trained").encode((ROOT / "fixtures/tiny-trained/heldout.txt").read_text())[:160]
    ids = torch.tensor([ids])
    prefill = model(ids)[0, :-1].float()  # [T-1, V]
    cache = model.new_cache(1, ids.shape[1])
    steps = torch.cat([model(ids[:, i : i + 1], cache)[0] for i in range(ids.shape[1] - 1)]).float()
    target = ids[0, 1:]

    def ppl(logits):
        return math.exp(float(torch.nn.functional.cross_entropy(logits, target)))

    assert abs(ppl(steps) / ppl(prefill) - 1) < 0.02, (ppl(steps), ppl(prefill))


@pytest.mark.parametrize("group, symmetric", [(32, False), (128, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_dequantisation_in_c_is_the_torch_one_bit_for_bit(group, symmetric, dtype, isa, monkeypatch):
    """Prefill dequantises packed4 experts with kernels/cpu.c: the same values as the torch ops (and compressed-tensors)."""
    from moge_converters.quantize import quantize
    from moge_cli.quant_format import Scheme

    g = torch.Generator().manual_seed(group)
    scheme = Scheme(4, group, symmetric)
    parts = []
    for _ in range(2):
        t = quantize(torch.randn(24, 256, generator=g), scheme, torch.bfloat16)
        parts.append((t.q, t.scale, t.zero))
    lin = qlinear(parts, scheme, torch.bfloat16, "native")
    assert lin.mode == "packed4"
    fast = [lin.dequantized(e, dtype) for e in range(2)]
    monkeypatch.setenv("MOGE_NATIVE", "0")
    slow = [lin.dequantized(e, dtype) for e in range(2)]
    for e in range(2):
        assert torch.equal(fast[e], slow[e])
        assert torch.equal(slow[e], dequantize(*parts[e]).to(dtype))


def test_int4_dequantisation_keeps_nan_and_inf_scales(isa, monkeypatch):
    """A broken scale (NaN, inf) dequantises to NaN / inf as the torch ops make them, not to numbers."""
    from moge_converters.quantize import quantize
    from moge_cli.quant_format import Scheme

    scheme = Scheme(4, 64, False)
    t = quantize(torch.randn(16, 256, generator=torch.Generator().manual_seed(5)), scheme, torch.bfloat16)
    lin = qlinear([(t.q, t.scale, t.zero)], scheme, torch.bfloat16, "native")
    lin.scales.data[0, 3, 1] = torch.tensor(0x7FFFFFFF, dtype=torch.int32).view(torch.float32)  # a NaN whose rounding would carry into the sign
    lin.scales.data[0, 5, 0] = float("inf")
    fast = lin.dequantized(0, torch.bfloat16).float()
    monkeypatch.setenv("MOGE_NATIVE", "0")
    slow = lin.dequantized(0, torch.bfloat16).float()
    assert fast[3, 64:128].isnan().all() and fast[5, :64].isinf().sum() > 0
    assert torch.equal(fast.isnan(), slow.isnan())
    assert torch.equal(fast.nan_to_num(0.0), slow.nan_to_num(0.0))  # the rest (inf included) the same


@pytest.mark.parametrize("k", [256, 200])  # 200: a tail of 8 values past the 16-value steps
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_dequantisation_in_c_is_the_torch_one_bit_for_bit(k, dtype, isa, monkeypatch):
    """Prefill dequantises int8 experts with kernels/dot.c: w.to(dtype) * scale.to(dtype), as the torch ops,
    also for a row whose scale is NaN or inf."""
    g = torch.Generator().manual_seed(k)
    parts = [(torch.randint(-127, 128, (12, k), generator=g, dtype=torch.int8), (torch.rand(12, 1, generator=g) / 50).bfloat16(), None)]
    lin = qlinear(parts, Scheme(8, None, True), torch.bfloat16, "native")
    assert lin.mode == "int8"
    lin.scales.data[0, 3] = float("nan")
    lin.scales.data[0, 7] = float("inf")
    fast = lin.dequantized(0, dtype)
    monkeypatch.setenv("MOGE_NATIVE", "0")
    slow = lin.dequantized(0, dtype)
    assert torch.equal(fast.isnan(), slow.isnan()) and bool(fast[3].isnan().all())
    assert torch.equal(fast.nan_to_num(0.0), slow.nan_to_num(0.0))


def test_graph_step_buffers_can_be_written_outside_inference_mode():
    """The CUDA graph's static inputs are made at the first decode step, often inside inference mode (generate);
    a later step outside it writes them: they must not be inference tensors. (Capture itself needs CUDA:
    tests/test_cuda.py.)"""
    from moge_kernels.cuda_graph import GraphStep

    model = random_model("G2-K2", torch.float32)
    with torch.inference_mode():
        step = GraphStep(model)
    assert not step.token.is_inference() and not step.pos.is_inference()
    step.token.copy_(torch.tensor([[3]]))
    step.pos.fill_(5)

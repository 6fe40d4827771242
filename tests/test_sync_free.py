"""The device-side routed experts (issue 16, "decode without host round-trips"): moe_grouped and
moe_gathered against the float64 reference and the host-grouped paths, and that they read no value back
to the host: on the CPU, every Tensor method that would is made to raise (the `no_host_reads` fixture);
on a GPU, torch's sync debug mode runs a model's decode steps."""

# T tokens, E experts, G groups, K' picks per group, k = G*K', H hidden, I intermediate.

from __future__ import annotations

import contextlib

import pytest
import torch

from moge_kernels import experts, routing
from moge_kernels.experts import moe_decode, moe_experts, moe_gathered, moe_grouped, moe_prefill
from moge_kernels.reference import moe_reference
from moge_kernels.routing import route
from test_kernels import H, _experts, _routed  # the same random experts and routing as the kernel tests

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICE_PATHS = {"grouped": moe_grouped, "gathered": moe_gathered}
# Every way a tensor's value reaches Python (and nonzero, whose output size does).
HOST_READS = ["tolist", "item", "__bool__", "__int__", "__index__", "__float__", "nonzero"]


class HostRead(AssertionError):
    pass


@pytest.fixture
def no_host_reads(monkeypatch):
    """Inside `with no_host_reads():` any Tensor method that reads a value back to the host raises HostRead."""

    @contextlib.contextmanager
    def scope():
        with monkeypatch.context() as m:
            for name in HOST_READS:
                def read(*args, _name=name, **kwargs):
                    raise HostRead(f"Tensor.{_name} read a value back to the host")

                m.setattr(torch.Tensor, name, read)
            yield

    return scope


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """tests/test_kernels.py's tolerances for a computation in dtype (out's by default): float32 1e-5;
    bf16 2e-2 relative to the output's scale."""
    if (dtype or out.dtype) == torch.float32:
        torch.testing.assert_close(out, ref.to(out.dtype), rtol=1e-5, atol=1e-5)
    else:
        atol = 2e-2 * ref.float().abs().max().item()
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=atol)


@pytest.mark.parametrize("path", DEVICE_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("E,G,K", [(64, 8, 1), (16, 4, 2), (8, 1, 4)])
@pytest.mark.parametrize("T", [1, 2, 7, 512])
def test_device_paths_match_reference_and_host_paths(path, dtype, E, G, K, T):
    x, ids, w = _routed(T, E, G, K, dtype=dtype, seed=T + E)
    gate_up, down = _experts(E, dtype)
    out = DEVICE_PATHS[path](x, ids, w, gate_up, down)
    assert out.shape == (T, H) and out.dtype == dtype
    _assert_close(out, moe_reference(x, ids, w, gate_up, down))
    host = moe_decode if ids.numel() <= experts.DECODE_MAX_PAIRS else moe_prefill
    _assert_close(out, host(x, ids, w, gate_up, down))


@pytest.mark.parametrize("path", DEVICE_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_paths_with_idle_experts_and_one_crowded_expert(path, dtype):
    # every token to expert 3 (and 60): 62 experts idle, their weights never read (poisoned: same output)
    E = 64
    x = torch.randn(9, H, generator=torch.Generator().manual_seed(17)).to(dtype)
    gate_up, down = _experts(E, dtype)
    for ids in (torch.full((9, 1), 3), torch.tensor([[3, 60]] * 9)):
        w = torch.rand(ids.shape, generator=torch.Generator().manual_seed(18))
        out = DEVICE_PATHS[path](x, ids, w, gate_up, down)
        _assert_close(out, moe_reference(x, ids, w, gate_up, down))
        poisoned_gu, poisoned_dn = gate_up.clone(), down.clone()
        idle = [e for e in range(E) if e not in (3, 60)]
        poisoned_gu[idle], poisoned_dn[idle] = float("nan"), float("nan")
        assert torch.equal(DEVICE_PATHS[path](x, ids, w, poisoned_gu, poisoned_dn), out)


@pytest.mark.parametrize("path", DEVICE_PATHS)
def test_device_paths_repeated_expert_in_one_token(path):
    x = torch.randn(4, H, generator=torch.Generator().manual_seed(19))
    ids = torch.tensor([[5, 5, 1], [1, 2, 5], [0, 0, 0], [7, 6, 5]])
    w = torch.rand(4, 3, generator=torch.Generator().manual_seed(20))
    gate_up, down = _experts(8)
    _assert_close(DEVICE_PATHS[path](x, ids, w, gate_up, down), moe_reference(x, ids, w, gate_up, down))


@pytest.mark.parametrize("path", DEVICE_PATHS)
@pytest.mark.parametrize("T", [1, 2, 7, 512])
def test_route_and_device_paths_read_nothing_back(path, T, no_host_reads, monkeypatch):
    monkeypatch.setattr(routing.native, "route_vec", lambda *a: None)  # T == 1: torch's route, as off the CPU
    g = torch.Generator().manual_seed(T)
    x, logits, scale = torch.randn(T, H, generator=g), torch.randn(T, 64, generator=g), torch.rand(64, generator=g)
    gate_up, down = _experts(64)
    with no_host_reads():
        ids, w = route(logits, 8, 1, scale)
        out = DEVICE_PATHS[path](x, ids, w, gate_up, down)
    _assert_close(out, moe_reference(x, ids, w, gate_up, down))


@pytest.mark.parametrize("host_path", [moe_decode, moe_prefill])
def test_the_host_grouped_paths_fail_under_the_same_fixture(host_path, no_host_reads):
    x, ids, w = _routed(7, 64, 8, 1)
    gate_up, down = _experts(64)
    with no_host_reads(), pytest.raises(HostRead):
        host_path(x, ids, w, gate_up, down)


def test_off_the_cpu_moe_experts_chooses_the_device_paths(monkeypatch):
    """The choice on a non-CPU device (meta tensors stand in for one): moe_grouped where torch's grouped GEMM
    runs on the device; else moe_gathered for a few pairs, moe_prefill (one sync) for many."""
    calls = []
    for name in ("moe_grouped", "moe_gathered", "moe_prefill", "moe_decode"):
        monkeypatch.setattr(experts, name, lambda *a, _n=name: calls.append(_n))
    gate_up, down = (t.to("meta") for t in _experts(8))
    k = 8
    for on_device in (True, False):
        monkeypatch.setattr(experts, "grouped_mm_on_device", lambda x, gate_up=None, _v=on_device: _v)
        for T in (1, experts.DECODE_MAX_PAIRS // k, 512):
            ids = torch.zeros(T, k, dtype=torch.long, device="meta")
            moe_experts(torch.zeros(T, H, device="meta"), ids, ids.float(), gate_up, down)
    assert calls == ["moe_grouped"] * 3 + ["moe_gathered", "moe_gathered", "moe_prefill"]


MODEL = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             moe_intermediate_size=16, shared_expert_intermediate_size=32, max_position_embeddings=128,
             num_experts=16, num_experts_per_tok=8, num_expert_groups=8)  # fmt: skip


def _random_model(dtype: torch.dtype, device: str):
    from moge_cli.config import MoGEConfig
    from moge_cli.model import MoGEForCausalLM

    torch.manual_seed(23)
    model = MoGEForCausalLM.from_config(MoGEConfig.from_dict(MODEL), dtype=dtype, device=device)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    return model


def _decode(model, feed: list[torch.Tensor], host_reads=None) -> torch.Tensor:
    """Logits [len(feed), V] of one decode step per fed token [1, 1] after a 5-token prefill; the steps run
    inside host_reads() when given."""
    cache = model.new_cache(1, 16)
    model(torch.tensor([[3, 1, 4, 1, 5]]), cache)
    with host_reads() if host_reads else contextlib.nullcontext():
        return torch.cat([model(token, cache)[0] for token in feed])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_step_off_the_cpu_kernels_reads_nothing_back_but_the_token_check(dtype, no_host_reads, monkeypatch):
    """The model's op-by-op decode step as a GPU runs it (kernels/cpu.c off, moe_experts' off-CPU choice)
    reads no value back, once the token ids' range check is left out: moge_cli.model._check_ids reads CPU
    ids' min and max (it skips ids already on an accelerator). Same logits as the CPU's paths."""
    from moge_cli import model as model_module
    from moge_kernels import ops

    model = _random_model(dtype, "cpu")
    model._plan = None  # op by op, as on a GPU
    feed = [torch.tensor([[t]]) for t in (7, 2, 9)]
    expected = _decode(model, feed)
    monkeypatch.setenv("MOGE_NATIVE", "0")
    monkeypatch.setattr(ops, "moe_experts", experts.moe_grouped if dtype == torch.bfloat16 else experts.moe_gathered)
    monkeypatch.setattr(model_module, "_check_ids", lambda ids, vocab: tuple(ids.shape))
    _assert_close(_decode(model, feed, no_host_reads), expected, dtype)


# ---- CUDA ------------------------------------------------------------------------------


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 2, 300])
def test_cuda_device_paths_match_the_cpu(dtype, T):
    x, ids, w = _routed(T, 64, 8, 1, dtype=dtype, seed=29)
    gate_up, down = _experts(64, dtype)
    ref = moe_reference(x, ids, w, gate_up, down)
    paths = [moe_experts, moe_gathered] + ([moe_grouped] if dtype == torch.bfloat16 else [])
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # TF32 may be on for fp32 matmuls
    for f in paths:
        out = f(*(t.cuda() for t in (x, ids, w, gate_up, down)))
        assert out.is_cuda
        torch.testing.assert_close(out.cpu().float(), ref.float(), rtol=tol, atol=tol * ref.float().abs().max().item())


@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_decode_steps_never_sync(dtype):
    """A model's decode steps on the GPU (token ids on the device, as a sync-free generate loop feeds them)
    under torch.cuda.set_sync_debug_mode("error"): any host round-trip in the step raises."""
    model = _random_model(dtype, "cuda")
    cache = model.new_cache(1, 64)
    token = model(torch.tensor([[3, 1, 4, 1, 5]], device="cuda"), cache)[:, -1:].argmax(-1)  # [1, 1] on the GPU
    torch.cuda.synchronize()
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            token = model(token, cache)[:, -1:].argmax(-1)
    finally:
        torch.cuda.set_sync_debug_mode(before)
    assert cache.length == 9 and token.is_cuda


def test_grouped_mm_needs_a_device_kernel_and_aligned_rows(monkeypatch):
    """Only CUDA bf16 on compute capability 9.x / 10.x with H and I multiples of 8 (16-byte rows): elsewhere
    torch's fallback reads the offsets back to the host."""
    x = torch.zeros(2, 64, dtype=torch.bfloat16, device="meta")
    assert not experts.grouped_mm_on_device(x)  # not CUDA
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    cuda_x = type("CudaLike", (), {"device": torch.device("cuda", 0), "dtype": torch.bfloat16})()
    for capability, ok in (((9, 0), True), ((10, 0), True), ((8, 0), False), ((12, 0), False)):
        capability = [capability]
        assert experts.grouped_mm_on_device(cuda_x) is ok
    capability = [(9, 0)]
    assert experts.grouped_mm_on_device(cuda_x, torch.empty(8, 2 * 1344, 5120, device="meta"))  # Pangu: I = 1344
    assert not experts.grouped_mm_on_device(cuda_x, torch.empty(8, 2 * 20, 64, device="meta"))  # I = 20: rows of 40 bytes
    assert not experts.grouped_mm_on_device(cuda_x, torch.empty(8, 64, 60, device="meta"))  # H = 60

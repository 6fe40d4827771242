"""Routing statistics and the Imbalance Score on constructed cases; streamed weight statistics."""

import math

import numpy as np
import pytest
import torch

from moge_cli import weight_stats
from moge_cli.routing_stats import device_of_expert, entropy_bits, global_topk, imbalance_score, layer_routing_stats


def forced_case(tokens: int = 10):
    """E=8 in G=4 groups of 2; the router always picks the first expert of each group (MoGE, K'=1),
    while the probabilities rank experts 0,1,2,3 highest, so global top-4 piles onto groups 0 and 1."""
    probs = np.tile(np.array([0.20, 0.19, 0.18, 0.17, 0.07, 0.07, 0.06, 0.06], dtype=np.float32), (tokens, 1))
    ids = np.tile(np.array([0, 2, 4, 6]), (tokens, 1))
    return probs, ids


def test_forced_router_counts_and_is_one_group_per_device():
    probs, ids = forced_case()
    s = layer_routing_stats(probs, ids, n_groups=4, num_experts_per_tok=4)
    assert s["expert_counts"] == [10, 0, 10, 0, 10, 0, 10, 0]
    assert s["group_counts"] == [10, 10, 10, 10]
    assert s["topk_expert_counts"] == [10, 10, 10, 10, 0, 0, 0, 0]
    assert s["never_picked"] == [1, 3, 5, 7]
    assert (s["min"], s["max"], s["mean"]) == (0, 10, 5.0)
    assert s["entropy_bits"] == pytest.approx(2.0) and s["max_entropy_bits"] == 3.0
    assert s["imbalance_moge"] == 0.0
    # top-k: devices (one group each) get 20, 20, 0, 0 activations over 10 tokens
    assert s["imbalance_topk"] == pytest.approx(2.0)
    assert s["imbalance_ratio"] is None  # MoGE perfectly balanced


def test_two_devices_holding_two_groups_each():
    probs, ids = forced_case()
    s = layer_routing_stats(probs, ids, n_groups=4, num_experts_per_tok=4, devices=2)
    assert s["devices"] == 2
    assert s["imbalance_moge"] == 0.0
    assert s["imbalance_topk"] == pytest.approx(4.0)  # 40 vs 0 activations over 10 tokens


def test_imbalance_score_and_ratio_when_picks_are_uneven():
    # Four single-expert groups, each on its own device: IS is (max - min) activations per token.
    counts = np.array([3, 1, 4, 0])
    dev = device_of_expert(4, 4, 4)
    assert imbalance_score(counts, dev, num_tokens=4) == pytest.approx((4 - 0) / 4)
    # The stats take the picks as given: counts 1, 1, 2, 0 over 2 tokens -> IS (2 - 0) / 2 = 1.0
    probs = np.array([[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]], dtype=np.float32)
    ids = np.array([[0, 2], [1, 2]])
    s = layer_routing_stats(probs, ids, n_groups=4, num_experts_per_tok=2)
    assert s["imbalance_moge"] == pytest.approx(1.0)
    assert s["imbalance_topk"] == pytest.approx(1.0)  # top-2 = experts 0,1 for both tokens: 2,2,0,0
    assert s["imbalance_ratio"] == pytest.approx(1.0)


def test_device_placement_of_whole_groups():
    assert device_of_expert(8, 4, 2).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert device_of_expert(8, 4, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="divisor of 4"):
        device_of_expert(8, 4, 3)


def test_global_topk_ties_lowest_index():
    probs = np.array([[0.25, 0.25, 0.25, 0.25]], dtype=np.float32)
    assert global_topk(probs, 2).tolist() == [[0, 1]]


def test_entropy():
    assert entropy_bits(np.array([5, 5, 5, 5])) == pytest.approx(2.0)
    assert entropy_bits(np.array([7, 0, 0])) == 0.0
    assert entropy_bits(np.array([0, 0])) == 0.0


def test_tensor_stats_known_values():
    t = torch.zeros(1000, dtype=torch.float32)
    t[:10] = 1.0
    t[10] = 70000.0  # one fp16 overflow, one outlier
    s = weight_stats.tensor_stats(t.to(torch.float32))
    assert s["numel"] == 1000
    assert s["absmax"] == 70000.0
    assert s["fp16_overflow"] == 1
    assert s["zero_fraction"] == pytest.approx(989 / 1000)
    mean = (10 + 70000) / 1000
    std = math.sqrt((10 + 70000.0**2) / 1000 - mean**2)
    assert s["mean"] == pytest.approx(mean) and s["std"] == pytest.approx(std)
    assert s["outlier_fraction"] == pytest.approx(1 / 1000)


def test_tensor_stats_chunked_equals_whole(monkeypatch):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(300, 70, generator=g).to(torch.bfloat16)
    t[5, 5] = 40.0
    whole = weight_stats.tensor_stats(t)
    monkeypatch.setattr(weight_stats, "CHUNK_ELEMENTS", 997)
    chunked = weight_stats.tensor_stats(t)
    for k in whole:
        assert chunked[k] == pytest.approx(whole[k], rel=1e-9, abs=1e-12), k
    assert whole["outlier_fraction"] >= 1 / t.numel()


def test_weight_profile_on_fixture_and_advice():
    from pathlib import Path

    from moge_cli.checkpoint import open_checkpoint

    ckpt = open_checkpoint(Path(__file__).resolve().parents[1] / "fixtures" / "tiny-moge")
    seen = []
    prof = weight_stats.weight_profile(ckpt, progress=lambda n, total: seen.append(n))
    assert set(prof["tensors"]) == set(ckpt.tensors)
    assert sum(seen) == sum(t.nbytes for t in ckpt.tensors.values())
    comps = prof["components"]
    assert comps["routed_experts"]["tensors"] == 2 * 8 * 3
    assert comps["norms"]["mean_std"] < 0.05  # norms are 1 +- 0.02
    assert prof["advice"].startswith("float16 is safe")
    risky = weight_stats.advice({"attention": {**comps["attention"], "outlier_fraction": 0.01}, "routed_experts": comps["routed_experts"]})
    assert "int4 needs care for attention" in risky
    assert "unsafe" in weight_stats.advice({"attention": {**comps["attention"], "fp16_overflow": 3}})

"""The tensor vocabulary (moge_cli/names.py): what is derived from the one table agrees with the model and with itself."""

from __future__ import annotations

import math

import pytest
import torch

from moge_cli import names
from moge_cli.config import PRESETS, MoGEConfig
from moge_cli.model import MoGEForCausalLM


@pytest.mark.parametrize("preset", ["tiny-moge", "tiny-trained", "bench-0.47b"])
@pytest.mark.parametrize("layout", names.LAYOUTS)
def test_parameter_sources_fill_every_model_parameter(preset, layout):
    cfg = MoGEConfig.from_name(preset)
    model = MoGEForCausalLM.from_config(cfg, torch.bfloat16, "meta")
    sources, shapes = names.parameter_sources(cfg, layout), names.expected_tensors(cfg, layout)
    params = dict(model.named_parameters())
    assert set(sources) == set(params)
    for param, tensors in sources.items():
        assert sum(math.prod(shapes[n]) for n in tensors) == params[param].numel(), param
    assert sorted(n for ns in sources.values() for n in ns) == sorted(shapes)  # every tensor fills exactly one parameter


def test_expert_weights_stack_expert_major():
    cfg = MoGEConfig.from_name("tiny-moge")
    gate_up = names.parameter_sources(cfg, names.PER_EXPERT)["layers.0.mlp.gate_up"]
    assert gate_up[:4] == [names.expert_name(0, 0, "gate_proj"), names.expert_name(0, 0, "up_proj"), names.expert_name(0, 1, "gate_proj"), names.expert_name(0, 1, "up_proj")]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_expected_name_has_its_kind_and_component(preset):
    cfg = MoGEConfig.from_name(preset)
    for layout in names.LAYOUTS:
        for n, kind in names.entries(cfg, layout):
            assert names.kind_of_name(n) == kind
            assert names.component_of(n) == names.KINDS[kind].component, n
    assert names.kind_of_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None


def test_names_and_regexes_come_from_one_table():
    n = names.expert_name(3, 7, "down_proj")
    assert n == "model.layers.3.mlp.experts.7.down_proj.weight" and names.PER_EXPERT_RE.match(n).groups() == ("3", "7", "down_proj")
    s = names.stacked_name(5, "gate_up_proj")
    assert s == "model.layers.5.mlp.experts.gate_up_proj" and names.STACKED_RE.match(s).groups() == ("5", "gate_up_proj")
    assert names.kind_of_name(n + "_packed") == "expert_down"
    assert names.KINDS["expert_down"].module == "model.layers.{L}.mlp.experts.{e}.down_proj" and names.KINDS["experts_down"].module is None
    assert names.with_expert(names.with_layer("model.layers.12.mlp.experts.40.down_proj.input_scale", 2), 5) == "model.layers.2.mlp.experts.5.down_proj.input_scale"


def test_module_names_and_the_mlp_kinds_calibration_reads():
    for k, kind in names.KINDS.items():
        if kind.quantizable:
            assert names.module_name(k, 2, 5) == names.module_of(names.tensor_name(k, 2, 5)) and not names.module_name(k, 2, 5).endswith(".weight")
    assert names.module_name("lm_head") == "lm_head" and names.module_name("expert_up", 1, 3) == "model.layers.1.mlp.experts.3.up_proj"
    cfg = MoGEConfig.from_dict(dict(PRESETS["tiny-moge"], intermediate_size=96, mlp_only_layers=[1]))
    sources = names.parameter_sources(cfg, names.PER_EXPERT)
    for part, layer in (("dense", 1), ("shared", 0), ("expert", 0)):
        gate, up, down = (names.KINDS[k] for k in names.part_kinds(part))  # calibrate: gate and up fill w13 in this order
        assert [names.module_of(k.template).rsplit(".", 1)[1] for k in (gate, up, down)] == list(names.PROJS)
        w13 = sources[gate.param.format(L=layer)]
        assert w13[:2] == [gate.template.format(L=layer, e=0), up.template.format(L=layer, e=0)]


def test_quantized_tensors_count_as_their_weight():
    from moge_cli.quant_format import Scheme

    assert set(Scheme(4, 64, False).tensor_shapes(64, 128)) == set(names.QUANT_SUFFIXES)  # the format writes the vocabulary's names
    module = names.module_name("expert_down", 3, 7)
    for suffix in names.QUANT_SUFFIXES:
        assert names.kind_of_name(f"{module}.{suffix}") == "expert_down"
    assert names.kind_of_name(f"{module}.weight_other") is None
    assert names.detect_layout([f"{module}.{names.PACKED}", f"{module}.{names.SCALE}"]) == names.PER_EXPERT


def test_names_outside_the_vocabulary_count_with_the_module_holding_them():
    """component_of derives from the table: a quantized module's tensors count as its weight, W8A8 scales and offsets
    with the module they sit beside (global modules too), buffers as "other"."""
    head, down = names.module_name("lm_head"), names.module_name("expert_down", 3, 7)
    for suffix in names.QUANT_SUFFIXES:
        assert names.component_of(names.quant_name(head, suffix)) == "lm_head"
        assert names.component_of(names.quant_name(down, suffix)) == "routed_experts"
    w8a8 = {  # msmodelslim W8A8 exports: input_scale, input_offset, deq_scale, quant_bias, weight_offset beside each weight
        down + ".input_scale": "routed_experts", names.module_name("q_proj", 0) + ".deq_scale": "attention",
        names.module_name("shared_up", 2) + ".quant_bias": "shared_experts", names.module_name("dense_down", 1) + ".input_offset": "dense_mlp",
        names.module_name("embed") + ".weight_offset": "embeddings", "model.layers.4.mlp.gate.input_scale": "router",
        "model.norm.bias": "norms",
    }  # fmt: skip
    buffers = ["model.rotary_emb.inv_freq", "model.layers.0.self_attn.rotary_emb.inv_freq", "model.layers.1.self_attn.k_proj.kv_cache_scale",
               "model.layers.1.self_attn.attn.k_scale", "model.layers.3.mtp.12.proj.weight", "model.layers.0.mlp.experts.1.2.3.weight"]  # fmt: skip
    assert {n: names.component_of(n) for n in w8a8} == w8a8
    assert [names.component_of(n) for n in buffers] == ["other"] * len(buffers)
    assert names.kind_of_name("model.layers.{L}.input_layernorm.weight") is None  # a template is no tensor name

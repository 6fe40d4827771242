"""MoGEConfig: parsing, derived sizes, validation messages, presets."""

import json

import pytest

from moge_cli.config import PRESETS, MoGEConfig
from moge_cli.errors import ConfigError
from moge_cli.inspect import count_params


def base(**over):
    d = dict(PRESETS["tiny-moge"])
    d.update(over)
    return d


def test_72b_preset_derived_sizes():
    cfg = MoGEConfig.from_name("pangu-pro-moe-72b")
    assert (cfg.head_dim, cfg.n_groups, cfg.experts_per_group, cfg.picks_per_group) == (128, 8, 8, 1)
    assert cfg.moe_layers == list(range(48)) and cfg.dense_layers == []


def test_72b_parameter_counts_match_fact_sheet():
    p = count_params(MoGEConfig.from_name("pangu-pro-moe-72b"))
    assert p["total"] == 71_988_781_056
    assert p["active"] == 16_498_139_136
    parts = ("embeddings", "attention", "router", "routed_experts", "shared_experts", "dense_mlp", "norms", "lm_head")
    assert sum(p[c] for c in parts) == p["total"]


def test_num_expert_groups_overrides_default():
    cfg = MoGEConfig.from_dict(base(num_experts=8, num_experts_per_tok=4, num_expert_groups=2))
    assert (cfg.n_groups, cfg.experts_per_group, cfg.picks_per_group) == (2, 4, 2)


def test_unknown_keys_are_kept_and_round_trip():
    cfg = MoGEConfig.from_dict(base(router_aux_loss_coef=0.01, something_new=[1, 2]))
    assert cfg.extra == {"router_aux_loss_coef": 0.01, "something_new": [1, 2]}
    again = MoGEConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_dense_layers_need_intermediate_size():
    with pytest.raises(ConfigError, match="intermediate_size"):
        MoGEConfig.from_dict(base(mlp_only_layers=[0]))
    cfg = MoGEConfig.from_dict(base(mlp_only_layers=[1], intermediate_size=96))
    assert cfg.moe_layers == [0] and cfg.dense_layers == [1]


@pytest.mark.parametrize(
    "over, fragment",
    [
        ({"num_experts": 6}, "num_experts (6) is not divisible"),
        ({"num_expert_groups": 3}, "not divisible"),
        ({"num_experts_per_tok": 6, "num_expert_groups": 4}, "num_experts_per_tok (6) is not divisible"),
        ({"num_attention_heads": 3}, "hidden_size (64) is not divisible by num_attention_heads"),
        ({"num_key_value_heads": 3}, "num_attention_heads (4) is not divisible by num_key_value_heads"),
        ({"hidden_size": -64}, "hidden_size must be a positive integer"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
        ({"vocab_size": "512"}, "vocab_size must be an integer"),
        ({"num_experts": 8.0}, "num_experts must be an integer"),
        ({"rms_norm_eps": "tiny"}, "rms_norm_eps must be a number"),
        ({"mlp_only_layers": [5], "intermediate_size": 8}, "outside 0..1"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_validation_names_the_key(over, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        MoGEConfig.from_dict(base(**over))


def test_missing_keys_listed():
    d = base()
    del d["num_experts"], d["hidden_size"]
    with pytest.raises(ConfigError, match="missing required key\\(s\\) hidden_size, num_experts"):
        MoGEConfig.from_dict(d)


def test_from_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        MoGEConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        MoGEConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        MoGEConfig.from_file(tmp_path / "config.json")


def test_presets_are_valid():
    for name in PRESETS:
        MoGEConfig.from_name(name)
    with pytest.raises(ConfigError, match="unknown preset"):
        MoGEConfig.from_name("nope")

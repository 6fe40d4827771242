"""moge quantize --calib: column importance from text run through the model, and the search it weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moge_converters.calibrate import calibrate
from moge_converters.quantize import dequantize, quantize
from moge_converters.quantize_pipeline import quantize_checkpoint
from moge_cli.checkpoint import open_checkpoint
from moge_cli.cli import app
from moge_cli.instrument import Recorder
from moge_cli.loader import load_model
from moge_cli.model import rms_norm
from moge_cli.quant_format import Scheme
from moge_cli.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TRAINED = ROOT / "fixtures/tiny-trained"
CALIB = ROOT / "fixtures/train_tiny.py"  # Python source, like the fixture's training text, and not its held-out text
runner = CliRunner()


@pytest.mark.parametrize("scheme", [Scheme(4, 64, False, "mse"), Scheme(4, 32, True, "mse"), Scheme(8, None, True, "mse")])
def test_weighted_search_cuts_the_error_the_activations_see(scheme):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g)
    a = torch.randn(256, generator=g).mul(2).exp()  # a few columns meet much larger activations than the rest
    plain = dequantize(quantize(w, scheme, torch.float32)).float()
    aware = dequantize(quantize(w, scheme, torch.float32, importance=a)).float()
    err = lambda wq: float(((w - wq).pow(2) * a).sum())  # noqa: E731  sum_j a_j (w_j - w'_j)^2
    assert err(aware) < 0.97 * err(plain)
    assert float((w - aware).pow(2).sum()) >= float((w - plain).pow(2).sum())  # plain mse stays best on its own measure
    with pytest.raises(ValueError, match="mse"):
        quantize(w, Scheme(4, 64, False, "rtn"), torch.float32, importance=a)


def test_importance_is_the_mean_square_of_what_each_weight_meets():
    cal = calibrate(TRAINED, CALIB, max_tokens=300)
    model = load_model(TRAINED)
    cfg = model.config
    ids = load_tokenizer(TRAINED).encode(CALIB.read_text(), add_bos=True)[:300]
    with torch.inference_mode(), Recorder(keep_routing=True, keep_inputs=True) as rec:
        model(torch.tensor([ids]))  # the whole model at once: the same numbers as layer by layer
    x0 = model.embed_tokens[torch.tensor(ids)]
    want = rms_norm(x0, model.layers[0].input_layernorm, cfg.rms_norm_eps).float().pow(2).mean(0)
    a = cal.importance["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(a, want)
    assert cal.importance["model.layers.0.self_attn.v_proj"] is a  # q, k, v meet the same activations
    L = 1
    o = rec.inputs[("o_proj", L)][0].flatten(0, 1).float()
    torch.testing.assert_close(cal.importance[f"model.layers.{L}.self_attn.o_proj"], o.pow(2).mean(0))
    h, picks = rec.inputs[("mlp", L)][0].flatten(0, 1).float(), rec.picks[L][0]
    e = int(picks[0, 0])
    torch.testing.assert_close(cal.importance[f"model.layers.{L}.mlp.experts.{e}.gate_proj"], h[(picks == e).any(-1)].pow(2).mean(0))
    down = cal.importance[f"model.layers.{L}.mlp.experts.{e}.down_proj"]
    assert down.shape == (cfg.moe_intermediate_size,) and bool((down > 0).all())
    assert cal.importance["model.layers.0.mlp.shared_expert.down_proj"].shape == (cfg.shared_expert_intermediate_size,)
    assert cal.tokens == 300 and cal.experts == cfg.num_experts * cfg.num_hidden_layers


def test_experts_no_token_reaches_fall_back_to_the_plain_search(tmp_path):
    r = quantize_checkpoint(TRAINED, tmp_path / "cal", bits=4, method="mse", calib=CALIB, calib_tokens=12, verify=True)
    c = r.quantization.calibration
    assert c["tokens"] == 12 and 0 < c["experts_reached"] < c["experts"]  # a dozen tokens cannot reach every expert
    quantize_checkpoint(TRAINED, tmp_path / "plain", bits=4, method="mse")
    rows = {row["tensor"]: row["calibrated"] for row in r.quality.tensors}
    cal, plain = open_checkpoint(tmp_path / "cal"), open_checkpoint(tmp_path / "plain")
    same = {name: torch.equal(cal.tensor(name.replace(".weight", ".weight_packed")), plain.tensor(name.replace(".weight", ".weight_packed")))
            for name in rows}  # fmt: skip
    assert all(same[n] for n, calibrated in rows.items() if not calibrated)  # unreached experts: exactly the plain search
    assert not all(same[n] for n, calibrated in rows.items() if calibrated)  # the rest moved
    assert sum(not calibrated for calibrated in rows.values()) == 3 * (c["experts"] - c["experts_reached"])


def test_calibrated_int4_scores_heldout_text_like_the_plain_search_or_better(tmp_path):
    heldout = TRAINED / "heldout.txt"
    cal = quantize_checkpoint(TRAINED, tmp_path / "cal", bits=4, method="mse", calib=CALIB, eval_text=heldout).eval
    plain = quantize_checkpoint(TRAINED, tmp_path / "plain", bits=4, method="mse", eval_text=heldout).eval
    assert cal.change < 0.01 and cal.after <= plain.after * 1.001


def test_cli_calib_needs_mse_and_a_tokenizer(tmp_path):
    r = runner.invoke(app, ["quantize", str(TRAINED), str(tmp_path / "q"), "--calib", str(CALIB)])
    assert r.exit_code == 2 and "--method mse" in r.output
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in TRAINED.iterdir():
        if not f.name.startswith("tokenizer"):
            shutil.copyfile(f, bare / f.name)
    r = runner.invoke(app, ["quantize", str(bare), str(tmp_path / "q2"), "--method", "mse", "--calib", str(CALIB)])
    assert r.exit_code == 2 and "tokenizer" in r.output
    r = runner.invoke(app, ["quantize", str(TRAINED), str(tmp_path / "q3"), "--method", "mse", "--calib", str(CALIB), "--calib-tokens", "64"])  # with the progress bars
    assert r.exit_code == 0 and "calibrated on 64 tokens of train_tiny.py" in r.output


def test_dense_layers_and_stacked_experts_calibrate_too(tmp_path):
    from moge_cli.synthetic import write_checkpoint
    from moge_cli.config import MoGEConfig

    cfg = MoGEConfig.from_dict(dict(vocab_size=1000, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                    moe_intermediate_size=32, shared_expert_intermediate_size=64, intermediate_size=96,
                                    num_experts=8, num_experts_per_tok=4, num_expert_groups=2, mlp_only_layers=[1]))  # fmt: skip
    src = write_checkpoint(cfg, tmp_path / "src", layout="stacked")
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 40)
    cal = calibrate(src, text)
    assert cal.importance["model.layers.1.mlp.down_proj"].shape == (96,)  # the dense layer's MLP
    assert "model.layers.1.mlp.shared_expert.gate_proj" not in cal.importance
    assert cal.experts == 2 * 8 and cal.experts_reached > 0
    r = quantize_checkpoint(src, tmp_path / "q", bits=4, group_size=32, method="mse", calib=text, verify=True)
    weighted = r.quantization.calibration["modules"]  # the quantized weights that met calibration tokens
    assert weighted == sum(row["calibrated"] for row in r.quality.tensors) == len(cal.importance) - 1  # lm_head stays bf16

"""Tokenizer (SentencePiece and tokenizer.json), streaming detokenisation, chat formats, stop strings."""

import json
import shutil
from pathlib import Path

import pytest

from moge_cli.chat import chat_prompt, encode_prompt, messages_for, pangu_prompt
from moge_cli.errors import UsageError
from moge_cli.generate import StopMatcher
from moge_cli.tokenizer import REPLACEMENT, eos_ids_from_dir, load_tokenizer

TINY_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-moge"
UNUSED = [f"[unused{i}]" for i in range(18)]
TEXTS = [
    "hello world",
    "def foo(x):\n    return x + 1\n",
    "  leading and trailing spaces  ",
    "héllo wörld, naïve café",
    "你好，世界！系统用户助手",
    "emoji 😀🎉 mixed 中文 and ascii",
    "<s>raw bos</s> and [unused9]用户：hi[unused10]",
    "",
]


@pytest.fixture(scope="module")
def sp():
    return load_tokenizer(TINY_DIR)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer.json with the Pangu special pieces, trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<pad>", "<s>", "</s>", "<unk>"] + UNUSED
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 20 + ["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    d = tmp_path_factory.mktemp("hf")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "[unused10]", "add_bos_token": False}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 14, 15]}))
    return d


@pytest.fixture(scope="module")
def hf(hf_dir):
    return load_tokenizer(hf_dir)


@pytest.fixture(params=["sentencepiece", "tokenizers"])
def tok(request, sp, hf):
    return sp if request.param == "sentencepiece" else hf


def stream(tok, ids) -> list[str]:
    dec = tok.incremental()
    chunks = [dec.push(i) for i in ids]
    return chunks + [dec.flush()]


# ---- both backends -------------------------------------------------------------------------------
@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("piece", UNUSED + ["<s>", "</s>", "<pad>"])
def test_special_pieces_are_single_tokens(tok, piece):
    ids = tok.encode(piece)
    assert len(ids) == 1
    assert tok.decode(ids) == piece
    assert tok.id_to_piece(ids[0]) == piece
    inside = tok.encode(f"ab{piece}cd")
    assert ids[0] in inside and tok.decode(inside) == f"ab{piece}cd"


def test_bos_and_eos(tok):
    assert tok.bos_id == 1
    assert tok.encode("hi", add_bos=True) == [1] + tok.encode("hi")
    assert {2, 14} <= set(tok.eos_ids)  # </s> and [unused10]


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_equals_full_decode(tok, text):
    ids = tok.encode(text)
    chunks = stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids)
    assert not any(REPLACEMENT in c for c in chunks)  # incomplete characters are held back


def test_streaming_holds_back_partial_utf8(sp):
    ids = sp.encode("😀")  # byte-fallback: four byte pieces
    assert len(ids) == 4
    assert stream(sp, ids) == ["", "", "", "😀", ""]


def test_streaming_flushes_invalid_bytes(sp):
    ids = [sp.piece_to_id("<0xF0>")]  # a lone lead byte never completes
    assert "".join(stream(sp, ids)) == sp.decode(ids)


# ---- per backend ---------------------------------------------------------------------------------
def test_sentencepiece_fixture_ids(sp):
    assert sp.vocab_size == 512
    assert sp.encode("[unused9][unused10]") == [13, 14]
    assert sp.eos_ids == [2, 14]
    assert sp.add_bos_token  # tokenizer_config.json has no add_bos_token: the default is True
    assert sp.eos_token == "[unused10]"


def test_tokenizer_json_settings(hf):
    assert type(hf.backend).__name__ == "_HFTokenizers"
    assert hf.eos_ids == [2, 14, 15]  # generation_config.json list merged in
    assert not hf.add_bos_token


def test_tokenizer_json_preferred(hf_dir, tmp_path):
    d = tmp_path / "both"
    shutil.copytree(hf_dir, d)
    shutil.copy(TINY_DIR / "tokenizer.model", d)
    assert type(load_tokenizer(d).backend).__name__ == "_HFTokenizers"


def test_missing_tokenizer(tmp_path):
    with pytest.raises(UsageError, match="prompt-ids"):
        load_tokenizer(tmp_path)


def test_eos_ids_without_tokenizer():
    assert eos_ids_from_dir(TINY_DIR) == [14]


def test_out_of_vocab_decode(sp):
    with pytest.raises(UsageError, match="outside"):
        sp.decode([sp.vocab_size])


# ---- chat format ---------------------------------------------------------------------------------
def test_pangu_single_turn():
    got = pangu_prompt(messages_for("你好", "be brief"))
    assert got == "[unused9]系统：be brief[unused10][unused9]用户：你好[unused10][unused9]助手："


def test_pangu_default_system_block_is_empty():
    assert pangu_prompt(messages_for("hi")) == "[unused9]系统：[unused10][unused9]用户：hi[unused10][unused9]助手："


def test_pangu_multi_turn():
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
    ]
    assert pangu_prompt(msgs) == (
        "[unused9]系统：S[unused10][unused9]用户：u1[unused10][unused9]助手：a1[unused10]"
        "[unused9]用户：u2[unused10][unused9]助手："
    )
    assert pangu_prompt(msgs, add_generation_prompt=False).endswith("[unused9]用户：u2[unused10]")


def test_pangu_bad_role():
    with pytest.raises(UsageError, match="role"):
        pangu_prompt([{"role": "robot", "content": "x"}])


def test_chat_ids(sp):
    ids = encode_prompt(sp, chat_prompt(sp, messages_for("hi")))
    # bos, then [unused9] 系统 ： [unused10] [unused9] 用户 ： h i [unused10] [unused9] 助手 ：
    assert ids == [1, 13, 23, 22, 14, 13, 24, 22, *sp.encode("hi"), 14, 13, 25, 22]


TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _with_template(tmp_path: Path, template: str, as_file: bool = False) -> Path:
    d = tmp_path / "tpl"
    d.mkdir()
    shutil.copy(TINY_DIR / "tokenizer.model", d)
    cfg = json.loads((TINY_DIR / "tokenizer_config.json").read_text())
    if as_file:
        (d / "chat_template.jinja").write_text(template)
    else:
        cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def test_chat_template_override(tmp_path):
    tok = load_tokenizer(_with_template(tmp_path, TEMPLATE))
    text = chat_prompt(tok, messages_for("hi", "sys"))
    assert text == "<s><|system|>sys[unused10]<|user|>hi[unused10]<|assistant|>"
    ids = encode_prompt(tok, text)
    assert ids[0] == 1 and ids[1] != 1  # the template's <s> is the bos: not added twice


def test_chat_template_file(tmp_path):
    tok = load_tokenizer(_with_template(tmp_path, "{% for m in messages %}[{{ m.content }}]{% endfor %}", as_file=True))
    assert chat_prompt(tok, messages_for("a", "b")) == "[b][a]"


def test_chat_template_is_sandboxed(tmp_path):
    tok = load_tokenizer(_with_template(tmp_path, "{{ messages.__class__.__mro__ }}"))
    with pytest.raises(UsageError, match="chat template"):
        chat_prompt(tok, messages_for("x"))


def test_chat_template_raise_exception(tmp_path):
    tok = load_tokenizer(_with_template(tmp_path, "{{ raise_exception('only user turns') }}"))
    with pytest.raises(UsageError, match="only user turns"):
        chat_prompt(tok, messages_for("x"))


# ---- stop strings --------------------------------------------------------------------------------
def feed_all(stops, chunks):
    m = StopMatcher(stops)
    out = [m.feed(c) for c in chunks]
    return "".join(out) + m.flush(), m.hit


def test_stop_spanning_chunks():
    assert feed_all(["STOP"], ["abc S", "T", "OP and more"]) == ("abc ", "STOP")


def test_stop_partial_prefix_released():
    m = StopMatcher(["STOP"])
    assert m.feed("abST") == "ab"  # "ST" may start the stop string: held
    assert m.feed("x") == "STx"  # it did not
    assert m.flush() == ""


def test_stop_earliest_wins():
    assert feed_all(["world", "lo w"], ["hello world"]) == ("hel", "lo w")


def test_no_stop_flushes_everything():
    assert feed_all(["zz"], ["abc z"]) == ("abc z", None)

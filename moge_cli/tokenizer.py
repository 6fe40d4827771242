"""Tokenizer for a checkpoint directory: SentencePiece tokenizer.model or Hugging Face tokenizer.json.

Special pieces (`<s>`, `</s>`, `[unused9]`, `[unused10]`...) are single tokens both ways: text is split
on their strings before the backend sees it, and decoding renders them as their strings.
`IncrementalDecoder` turns a growing id sequence into text deltas for streaming.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Protocol

from moge_cli.errors import UsageError
from moge_cli.files import checked_file, optional_file, present, read_json

SP_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
BOS_PIECE, EOS_PIECE = "<s>", "</s>"
TURN_END = "[unused10]"  # Pangu end of turn: the chat model's eos
REPLACEMENT = "\ufffd"  # what a decoder gives for an incomplete UTF-8 sequence
MAX_HELD_TOKENS = 8  # an incomplete character never needs more pieces than this (4 bytes, plus slack)


class _Backend(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...  # plain text, no special handling, no bos
    def decode(self, ids: list[int]) -> str: ...
    def piece_to_id(self, piece: str) -> int | None: ...
    def id_to_piece(self, i: int) -> str: ...
    def special_pieces(self) -> dict[str, int]: ...  # pieces the backend would not produce from text


class _SentencePiece:
    def __init__(self, path: Path) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(str(path))
        except (OSError, RuntimeError) as e:
            raise UsageError(f"{path}: not a readable SentencePiece model ({e})") from None
        self.vocab_size = self.sp.get_piece_size()
        # Control pieces (and <unk>) never come out of sp.encode and decode to ""; user-defined pieces
        # ([unusedN]) already encode as single tokens and decode as themselves.
        self._control = {i for i in range(self.vocab_size) if self.sp.is_control(i) or self.sp.is_unknown(i)}

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text)) if text else []

    def decode(self, ids: list[int]) -> str:
        # Decode runs between control ids with SentencePiece, render control ids as their piece.
        out, run = [], []
        for i in ids:
            if i in self._control:
                out.append(self.sp.decode(run) if run else "")
                out.append(self.sp.id_to_piece(i))
                run = []
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def piece_to_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None  # unknown pieces map to unk_id

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def special_pieces(self) -> dict[str, int]:
        return {self.sp.id_to_piece(i): i for i in sorted(self._control)}


class _HFTokenizers:
    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception subclasses for bad files
            raise UsageError(f"{path}: not a readable tokenizer.json ({e})") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def piece_to_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)

    def id_to_piece(self, i: int) -> str:
        return self.tok.id_to_token(i) or ""

    def special_pieces(self) -> dict[str, int]:
        return {t.content: i for i, t in self.tok.get_added_tokens_decoder().items()}


class Tokenizer:
    """Text <-> ids for one checkpoint, with the ids generation needs (bos, eos set) and its chat template."""

    def __init__(self, backend: _Backend, *, config: dict[str, Any] | None = None, generation_config: dict[str, Any] | None = None) -> None:
        self.backend = backend
        self.config = config or {}
        self.vocab_size = backend.vocab_size
        specials = dict(backend.special_pieces())
        for piece in (_token_str(self.config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")):
            if piece and (i := backend.piece_to_id(piece)) is not None:
                specials.setdefault(piece, i)
        for tid, tok in (self.config.get("added_tokens_decoder") or {}).items():
            piece = _token_str(tok)
            if piece and (i := backend.piece_to_id(piece)) is not None and str(i) == str(tid):
                specials.setdefault(piece, i)
        self.special_ids = specials  # piece -> id, split out of text before the backend sees it
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")") if specials else None

        bos = _token_str(self.config.get("bos_token")) or BOS_PIECE
        self.bos_token = bos
        self.bos_id = backend.piece_to_id(bos)
        self.add_bos_token = bool(self.config.get("add_bos_token", True)) and self.bos_id is not None
        eos = _token_str(self.config.get("eos_token")) or TURN_END
        self.eos_token = eos
        self.eos_ids = sorted(set(
            i for i in (backend.piece_to_id(p) for p in (EOS_PIECE, TURN_END, eos)) if i is not None
        ) | set(eos_ids_from_generation_config(generation_config or {})))  # fmt: skip
        self.chat_template: str | None = None

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Ids for `text`; special-piece strings in it become their single ids. add_bos prepends bos (if any)."""
        ids = [self.bos_id] if add_bos and self.bos_id is not None else []
        parts = self._split.split(text) if self._split else [text]
        for k, part in enumerate(parts):
            if k % 2:  # odd parts are the captured special pieces
                ids.append(self.special_ids[part])
            elif part:
                ids.extend(self.backend.encode(part))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text for `ids`; special pieces are rendered as their strings (`<s>`, `[unused10]`)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise UsageError(f"token id {bad[0]} is outside the tokenizer's vocabulary (0..{self.vocab_size - 1})")
        return self.backend.decode(ids)

    def id_to_piece(self, i: int) -> str:
        return self.backend.id_to_piece(i)

    def piece_to_id(self, piece: str) -> int | None:
        return self.backend.piece_to_id(piece)

    def incremental(self) -> "IncrementalDecoder":
        return IncrementalDecoder(self)


class IncrementalDecoder:
    """Streaming detokenisation: push ids one by one, get the new text each time.

    Decodes a short window of recent ids twice (with and without the new ones) and emits the
    difference, holding the text back while it ends in an incomplete UTF-8 / byte-fallback
    sequence. The concatenation of everything returned (including `flush()`) equals
    `tokenizer.decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start: text before it is final
        self.read = 0  # ids[prefix:read] have been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._step(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        return self._step(final=True)

    def _step(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        done = self.tok.decode(self.ids[self.prefix : self.read])
        text = self.tok.decode(self.ids[self.prefix :])
        held = len(self.ids) - self.read
        if not final and text.endswith(REPLACEMENT) and held < MAX_HELD_TOKENS:
            return ""
        delta = text[len(done) :]  # `done` is a prefix of `text`: both decode from the same window start
        self.prefix, self.read = self.read, len(self.ids)
        return delta


def load_tokenizer(root: str | Path) -> Tokenizer:
    """Tokenizer from a checkpoint directory (tokenizer.json preferred over tokenizer.model when both exist).

    Every file read is checked by moge_cli.files (no links leading out of the checkpoint, no FIFOs)."""
    root = Path(root)
    config = _read_json(root, TOKENIZER_CONFIG)
    generation = _read_json(root, GENERATION_CONFIG)
    if present(root, HF_FILE):
        backend: _Backend = _HFTokenizers(checked_file(root, root / HF_FILE))
    elif present(root, SP_FILE):
        backend = _SentencePiece(checked_file(root, root / SP_FILE))
    else:
        raise UsageError(
            f"{root}: no {SP_FILE} or {HF_FILE}; text prompts need a tokenizer (use --prompt-ids to pass token ids)"
        )
    tok = Tokenizer(backend, config=config, generation_config=generation)
    tok.chat_template = _chat_template(root, config)
    return tok


def has_tokenizer(root: str | Path) -> bool:
    """Whether root holds a tokenizer file (load_tokenizer then checks it, and refuses a bad link or a FIFO)."""
    return present(root, HF_FILE) or present(root, SP_FILE)


def eos_ids_from_generation_config(generation_config: dict[str, Any]) -> list[int]:
    v = generation_config.get("eos_token_id")
    vals = v if isinstance(v, list) else [v]
    return [int(x) for x in vals if isinstance(x, int) and not isinstance(x, bool)]


def eos_ids_from_dir(root: str | Path) -> list[int]:
    """Eos ids a checkpoint declares without a tokenizer (generation_config.json, config.json)."""
    ids: set[int] = set()
    for name in (GENERATION_CONFIG, "config.json"):
        ids |= set(eos_ids_from_generation_config(_read_json(Path(root), name)))
    return sorted(ids)


def _chat_template(root: Path, config: dict[str, Any]) -> str | None:
    if (path := optional_file(root, CHAT_TEMPLATE_FILE)) is not None:
        return path.read_text(encoding="utf-8")
    t = config.get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    return t if isinstance(t, str) and t.strip() else None


def _token_str(v: Any) -> str | None:
    if isinstance(v, dict):  # {"content": "<s>", "lstrip": false, ...}
        v = v.get("content")
    return v if isinstance(v, str) and v else None


def _read_json(root: Path, name: str) -> dict[str, Any]:
    """root / name as a JSON object ({} when absent or not an object), checked by moge_cli.files."""
    path = optional_file(root, name)
    if path is None:
        return {}
    data = read_json(path, error=UsageError)
    return data if isinstance(data, dict) else {}

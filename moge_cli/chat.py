"""Chat prompts: the Pangu turn format (or a checkpoint's Jinja chat_template) and a multi-turn session.

Pangu format, full-width colons, every turn closed by `[unused10]`:

    [unused9]系统：{system}[unused10][unused9]用户：{user}[unused10][unused9]助手：

The system block is always present, as in Pangu's own examples: with no system prompt it is
empty (`[unused9]系统：[unused10]`). A tokenizer_config.json `chat_template` (or a
chat_template.jinja file) replaces this format when present.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from moge_cli.errors import UsageError
from moge_cli.tokenizer import TURN_END, Tokenizer

if TYPE_CHECKING:
    from moge_cli.generate import GenerationResult

TURN_START = "[unused9]"
ROLE_NAMES = {"system": "系统", "user": "用户", "assistant": "助手"}
DEFAULT_SYSTEM_PROMPT = ""  # Pangu's examples send an empty system block


def pangu_prompt(messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
    """The Pangu chat string for messages [{role, content}]; an empty system block is added if none leads."""
    msgs = list(messages)
    if not msgs or msgs[0].get("role") != "system":
        msgs.insert(0, {"role": "system", "content": DEFAULT_SYSTEM_PROMPT})
    out = []
    for m in msgs:
        role = m.get("role")
        if role not in ROLE_NAMES:
            raise UsageError(f"chat message role {role!r} is not one of {', '.join(ROLE_NAMES)}")
        out.append(f"{TURN_START}{ROLE_NAMES[role]}：{m.get('content', '')}{TURN_END}")
    if add_generation_prompt:
        out.append(f"{TURN_START}{ROLE_NAMES['assistant']}：")
    return "".join(out)


def render_template(template: str, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True, bos_token: str = "", eos_token: str = "") -> str:
    """Render a Hugging Face style Jinja chat template in a sandbox with a budget (moge_cli.template_sandbox:
    steps, seconds, output characters); UsageError for a template that fails or breaks a limit."""
    from moge_cli.template_sandbox import BoundedSandbox

    def raise_exception(message: str) -> None:
        raise UsageError(f"chat template: {message}")

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.render_bounded(
        template, messages=list(messages), add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token
    )


def chat_prompt(tokenizer: Tokenizer, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
    """Prompt text for messages: the checkpoint's chat_template when it has one, else the Pangu format."""
    if tokenizer.chat_template:
        return render_template(
            tokenizer.chat_template, messages, add_generation_prompt=add_generation_prompt,
            bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
        )  # fmt: skip
    return pangu_prompt(messages, add_generation_prompt=add_generation_prompt)


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids for a whole prompt: bos first when the tokenizer adds one and the text does not already start with it."""
    add_bos = tokenizer.add_bos_token and not text.startswith(tokenizer.bos_token)
    return tokenizer.encode(text, add_bos=add_bos)


def messages_for(user: str, system: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system is not None else []
    return msgs + [{"role": "user", "content": user}]


@dataclass
class ChatSession:
    """Multi-turn chat that keeps the KV cache between turns and feeds only each turn's new tokens.

    The cache holds `fed_ids`; the conversation's prompt is re-rendered every turn and, when it
    extends the text already in the cache, only the difference is encoded and fed. Otherwise
    (a template that rewrites history, a reply cut by a stop string) the cache is rebuilt.
    """

    model: Any = field(repr=False)
    tokenizer: Tokenizer = field(repr=False)
    system: str | None = None
    max_len: int | None = None  # KV cache size (None: the model's default)
    messages: list[dict[str, str]] = field(default_factory=list)
    fed_ids: list[int] = field(default_factory=list)  # ids whose keys/values are in the cache
    pending_ids: list[int] = field(default_factory=list)  # generated but not yet fed (the last token)
    cache: Any = field(default=None, repr=False)
    cached_text: str | None = None  # the text fed_ids + pending_ids stand for

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays) and empty the cache."""
        self.messages = []
        self._drop_cache()

    def _drop_cache(self) -> None:
        self.fed_ids, self.pending_ids, self.cache, self.cached_text = [], [], None, None

    @property
    def context_length(self) -> int:
        return len(self.fed_ids) + len(self.pending_ids)

    def send(
        self,
        user: str,
        *,
        max_new_tokens: int,
        on_text: Callable[[str], None] | None = None,
        on_notice: Callable[[str], None] | None = None,
        **sampling: Any,
    ) -> "GenerationResult":
        """One turn: append the user's message, generate the reply (streamed through on_text), remember it.

        `sampling` goes to run_generation (temperature, top_k, top_p, seed, stop...). on_notice gets
        one-line messages such as "context full: conversation reset".
        """
        from moge_cli.generate import context_capacity, run_generation

        notice = on_notice or (lambda _msg: None)
        turn = {"role": "user", "content": user}
        full = chat_prompt(self.tokenizer, self._head() + self.messages + [turn])
        new_ids = self._continuation(full)
        if new_ids is None:
            notice("conversation history no longer matches the cache: rebuilding it")
            self._drop_cache()
            new_ids = encode_prompt(self.tokenizer, full)
        if self.cache is None:
            self.cache = self.model.new_cache(batch_size=1, max_len=self.max_len)
        capacity = context_capacity(self.model, self.cache)
        if len(self.fed_ids) + len(new_ids) >= capacity and self.messages:
            notice(f"context full ({self.context_length} of {capacity} tokens): conversation reset")
            self.messages = []
            self._drop_cache()  # free the old cache before making the new one
            self.cache = self.model.new_cache(batch_size=1, max_len=self.max_len)
            full = chat_prompt(self.tokenizer, self._head() + [turn])
            new_ids = encode_prompt(self.tokenizer, full)
        if len(new_ids) >= capacity:
            raise UsageError(f"this turn is {len(new_ids)} tokens; the model's context is {capacity} tokens")
        try:
            result = run_generation(
                self.model, new_ids, tokenizer=self.tokenizer, max_new_tokens=max_new_tokens, on_text=on_text,
                cache=self.cache, **sampling,
            )  # fmt: skip
        except BaseException:  # the cache may hold part of this turn: start the next one from scratch
            self._drop_cache()
            raise
        self.fed_ids += new_ids + result.generated_ids[:-1]
        self.pending_ids = result.generated_ids[-1:]
        self.messages += [turn, {"role": "assistant", "content": result.text}]
        self.cached_text = full + self.tokenizer.decode(result.generated_ids)
        return result

    def _head(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}] if self.system is not None else []

    def _continuation(self, full: str) -> list[int] | None:
        """Ids to feed so that the cache holds `full`; None when `full` does not extend what it holds."""
        if self.cached_text is None:
            return encode_prompt(self.tokenizer, full)
        if not full.startswith(self.cached_text):
            return None
        return self.pending_ids + self.tokenizer.encode(full[len(self.cached_text) :])

"""A Jinja sandbox with a budget, for the chat templates that checkpoints carry: steps, seconds, characters.

Jinja's sandbox stops a template from reaching Python's internals, not from running long or growing
large: two nested `range(99999)` loops run for hours and print gigabytes. Here every loop step
(`range()` item), call, attribute or item look-up and filter is a step of a budget checked against a
step count and a deadline, and every string or list a template builds, as well as the rendered text,
is held under a character cap. Arguments that would make one builtin call allocate past the cap (a
width, a repeat count, a format width) are refused before the call. Anything a template raises
becomes a UsageError saying so.
"""

from __future__ import annotations

import functools
import math
import re
import string
import time
from typing import Any, Callable, Iterator

from jinja2 import TemplateError
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment, safe_range

from moge_cli.errors import MogeError, UsageError

MAX_STEPS = 200_000  # a Pangu-style template spends about ten per message
MAX_SECONDS = 5.0
MAX_CHARS = 1_000_000  # far past any context window
MAX_INT_BITS = 4096  # `**` results
_PRINTF_WIDTHS = re.compile(r"%[#0\- +]*(\d*)(?:\.(\d*))?")


class _CountedRange:
    """A range whose iteration spends one budget step per item (len and indexing as range's)."""

    def __init__(self, r: range, tick: Callable[[], None]):
        self._r, self._tick = r, tick

    def __len__(self) -> int:
        return len(self._r)

    def __getitem__(self, i: Any) -> Any:
        return self._r[i]

    def __iter__(self) -> Iterator[int]:
        for i in self._r:
            self._tick()
            yield i


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment whose `render_bounded` stops at max_steps, seconds or max_chars."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self, *, max_steps: int = MAX_STEPS, seconds: float = MAX_SECONDS, max_chars: int = MAX_CHARS, **options: Any):
        super().__init__(**options)
        self.max_steps, self.seconds, self.max_chars = max_steps, seconds, max_chars
        self.globals["range"] = self._range
        self.filters = {name: self._bounded_filter(f) for name, f in self.filters.items()}
        self._steps, self._deadline = 0, math.inf

    def render_bounded(self, template: str, **context: Any) -> str:
        """The template rendered with `context`, or UsageError for a template that breaks a limit or fails."""
        self._steps, self._deadline = 0, time.monotonic() + self.seconds
        out: list[str] = []
        size = 0
        try:
            for chunk in self.from_string(template).generate(**context):
                size += len(chunk)
                if size > self.max_chars:
                    raise UsageError(f"chat template: output passes {self.max_chars:,} characters; refusing to render it")
                out.append(chunk)
        except MogeError:
            raise
        except TemplateError as e:
            raise UsageError(f"chat template cannot be rendered: {e}") from None
        except Exception as e:  # the template's own failure (1/0, recursion, overflow): it is code from the checkpoint
            raise UsageError(f"chat template failed: {type(e).__name__}: {e}") from None
        return "".join(out)

    # ---- the budget ----
    def _tick(self) -> None:
        self._steps += 1
        if self._steps > self.max_steps:
            raise UsageError(f"chat template: more than {self.max_steps:,} steps (loop items, calls, look-ups); refusing to render it")
        if time.monotonic() > self._deadline:
            raise UsageError(f"chat template: still rendering after {self.seconds:g} s; refusing to render it")

    def _sized(self, value: Any) -> Any:
        if isinstance(value, (str, list, tuple, dict)) and len(value) > self.max_chars:
            raise UsageError(f"chat template: builds a value of {len(value):,} items or characters, over {self.max_chars:,}")
        return value

    def _check_args(self, args: tuple, kwargs: dict) -> None:
        """Refuse an integer argument (a width, a count) over the character cap before a call allocates it."""
        for a in (*args, *kwargs.values()):
            if type(a) is int and abs(a) > self.max_chars:
                raise UsageError(f"chat template: argument {a} is over the {self.max_chars:,} limit")

    def _check_format(self, fmt: str, printf: bool) -> None:
        """Refuse a format string whose widths or precisions would allocate past the cap ("%999999999d", "{:999999999}")."""
        if printf:
            numbers = [n for m in _PRINTF_WIDTHS.finditer(fmt) for n in m.groups() if n]
        else:
            try:
                numbers = [n for _, _, spec, _ in string.Formatter().parse(fmt) if spec for n in re.findall(r"\d+", spec)]
            except ValueError:  # not a format string: str.format raises it when called
                numbers = []
        if any(len(n) > 9 or int(n) > self.max_chars for n in numbers):
            raise UsageError(f"chat template: format string {fmt[:40]!r} asks for a width over {self.max_chars:,}")

    # ---- the hooks Jinja calls ----
    def _range(self, *args: int) -> _CountedRange:
        try:
            return _CountedRange(safe_range(*args), self._tick)
        except OverflowError:
            raise UsageError(f"chat template: range({', '.join(map(repr, args))}) has over {MAX_RANGE:,} items, the sandbox's limit") from None

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        self._tick()
        if obj != self._range:  # range() says what is wrong with its own arguments
            self._check_args(args, kwargs)
        return self._sized(super().call(context, obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        self._tick()
        if isinstance(obj, str) and attribute in ("format", "format_map"):
            self._check_format(obj, printf=False)
        return self._sized(super().getattr(obj, attribute))

    def getitem(self, obj: Any, argument: Any) -> Any:
        self._tick()
        return self._sized(super().getitem(obj, argument))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        self._tick()
        if operator == "*":
            seq, n = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
            if isinstance(seq, (str, list, tuple)) and type(n) is int and len(seq) * n > self.max_chars:
                raise UsageError(f"chat template: repeats a value to {len(seq) * n:,} items or characters, over {self.max_chars:,}")
        elif operator == "**" and type(left) is int and type(right) is int and abs(left) > 1 and right * math.log2(abs(left)) > MAX_INT_BITS:
            raise UsageError(f"chat template: {left} ** {right} is over {MAX_INT_BITS} bits")
        elif operator == "%" and isinstance(left, str):
            self._check_format(left, printf=True)
        return self._sized(super().call_binop(context, operator, left, right))

    def _bounded_filter(self, f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)  # keeps jinja_pass_arg (pass_context / pass_environment)
        def bounded(*args: Any, **kwargs: Any) -> Any:
            self._tick()
            first = 1 if getattr(f, "jinja_pass_arg", None) else 0  # args[first] is the filtered value
            self._check_args(args[first + 1 :], kwargs)
            if f.__name__ == "do_format" and len(args) > first:
                self._check_format(str(args[first]), printf=True)
            return self._sized(f(*args, **kwargs))

        return bounded

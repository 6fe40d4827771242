"""`moge generate`: run a checkpoint on a prompt (or an interactive chat) and report its speed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from moge_cli.commands.common import handle_errors, human_bytes, print_json
from moge_cli.commands.options import (
    DEVICE, DTYPE, EP, JSON, MAX_NEW_TOKENS, PROMPT, PROMPT_FILE, PROMPT_IDS, QUIET, REVISION, THREADS, apply_threads, parse_ids,
)  # fmt: skip
from moge_cli.errors import UsageError

DEFAULT_MAX_NEW_TOKENS = 128
EXIT_WORDS = ("/exit", "/quit")


@handle_errors
def generate_command(
    model_path: str = typer.Argument(..., metavar="MODEL", help="Checkpoint directory or cached Hugging Face repo id (org/name)."),
    revision: REVISION = None,
    prompt: PROMPT = None,
    prompt_file: PROMPT_FILE = None,
    prompt_ids: PROMPT_IDS = None,
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the chat format (Pangu turns, or the checkpoint's chat_template)."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt (implies --chat; default: an empty system block)."),
    interactive: bool = typer.Option(False, "--interactive", "-i", help="Multi-turn chat in the terminal; /reset clears, /exit or EOF quits."),
    max_new_tokens: MAX_NEW_TOKENS = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = typer.Option(0.0, "--temp", "--temperature", help="0 = greedy (deterministic); > 0 samples."),
    top_k: int = typer.Option(0, "--top-k", help="Sample from the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Sample from the smallest set with this probability mass (1 = off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed: the same seed gives the same output."),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="Stop when this text appears (repeatable); it is not printed."),
    dtype: DTYPE = None,
    device: DEVICE = "cpu",
    threads: THREADS = None,
    ep: EP = None,
    quiet: QUIET = False,
    as_json: JSON = False,
) -> None:
    """Generate text from a MoGE checkpoint, streaming it to stdout; speed and peak memory go to stderr.

    The prompt: --prompt, --file, --prompt-ids, or stdin when it is not a terminal. Generation ends at an end-of-sequence token (finish: eos), a --stop text (stop), -n tokens (length), or the model's context window (context, with a note on stderr).

    --ep N runs N ranks (expert parallel); the text is printed when generation ends, and per-rank statistics follow on stderr (in the JSON: "ep"). Under `torchrun --nproc-per-node N -m moge_cli generate ...` each process is one rank (--ep may be omitted) and rank 0 prints.

    Exit codes: 0 done, 2 error or bad usage (bad option, unreadable checkpoint, prompt longer than the context, a model that does not fit the device's free memory: the figures are printed), 130 Ctrl-C, 141 output pipe closed.
    """
    from moge_cli.devices import check_device
    from moge_cli.distributed import launched_world
    from moge_cli.ep import refuse_rank_directory

    ep = launched_world(ep)  # under torchrun: its WORLD_SIZE

    refuse_rank_directory(model_path)  # one rank of `convert --ep`: say so, before reading a prompt
    chat = chat or system is not None
    if sum(x is not None for x in (prompt, prompt_file, prompt_ids)) > 1:
        raise UsageError("give one of --prompt, --file or --prompt-ids")
    if interactive and (prompt is not None or prompt_file is not None or prompt_ids is not None or as_json):
        raise UsageError("--interactive reads its prompts from the terminal; drop --prompt, --file, --prompt-ids and --json")
    if interactive and ep is not None:
        raise UsageError("--interactive runs in one process; drop --ep")
    if prompt_ids is not None and chat:
        raise UsageError("--chat and --system format text prompts; they cannot be used with --prompt-ids")
    ids = parse_ids(prompt_ids) if prompt_ids is not None else None
    if prompt_file is not None:
        prompt = read_prompt_file(prompt_file)
    if ids is None and prompt is None and not interactive:
        prompt = read_stdin()
    check_device(device)
    apply_threads(threads)

    from moge_cli.tokenizer import eos_ids_from_dir, has_tokenizer, load_tokenizer

    from moge_cli.distributed import open_source

    ckpt, ranks_path = open_source(model_path, ep, revision)  # with --ep every check before anything is spawned; a split: its rank 0
    root = ckpt.root
    tokenizer = None
    if has_tokenizer(root):
        tokenizer = load_tokenizer(root)
    elif ids is None:
        raise UsageError(f"{root}: no tokenizer.model or tokenizer.json; text prompts need one (use --prompt-ids)")
    stop_ids = tokenizer.eos_ids if tokenizer is not None else eos_ids_from_dir(root)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop or ())

    from moge_cli.generate import check_sampling

    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    if stop and tokenizer is None:
        raise UsageError("--stop needs a tokenizer, and this checkpoint has none")

    if ep is not None:
        ckpt.close()
        if ids is None:
            ids = _encode(tokenizer, prompt, system, chat)
        run_expert_parallel(ranks_path, str(root), ep, ids, tokenizer, dict(max_new_tokens=max_new_tokens, stop_ids=stop_ids, **sampling),
                            dtype=dtype, device=device, threads=threads, quiet=quiet, as_json=as_json)  # fmt: skip
        return

    if ids is None and not interactive:
        ids = _encode(tokenizer, prompt, system, chat)
    plan = memory_plan(ckpt, ids, max_new_tokens, dtype=dtype, device=device)
    plan.check()  # does not fit: exit 2 with the figures, before any weight is read

    from moge_cli.loader import load_model

    model = load_model(ckpt, dtype=dtype, device=device)
    if interactive:
        run_interactive(model, tokenizer, system=system, max_new_tokens=max_new_tokens, quiet=quiet, **sampling)
        return

    from moge_cli.generate import context_capacity, run_generation

    stream: dict[str, Any] = {}
    if not as_json:
        stream = dict(on_text=_writer()) if tokenizer is not None else dict(on_token=_id_writer())
    result = run_generation(model, ids, tokenizer=tokenizer, max_new_tokens=max_new_tokens, stop_ids=stop_ids, **sampling, **stream)
    if as_json:
        print_json(result.to_dict() | {"memory_plan": plan.to_dict()})
    else:
        _end_line(result.text if tokenizer is not None else result.generated_ids)
    if quiet:
        return
    if result.finish_reason == "context":
        sys.stderr.write(context_note(result, context_capacity(model), max_new_tokens) + "\n")
    if not as_json:
        sys.stderr.write(stats_line(result) + "\n")


def _encode(tokenizer: Any, prompt: str, system: Optional[str], chat: bool) -> list[int]:
    from moge_cli.chat import chat_prompt, encode_prompt, messages_for

    text = chat_prompt(tokenizer, messages_for(prompt, system)) if chat else prompt
    return encode_prompt(tokenizer, text)


def memory_plan(ckpt: Any, ids: Optional[list[int]], max_new_tokens: int, *, dtype: Optional[str], device: str) -> Any:
    """What loading `ckpt` and generating will hold (moge_cli.memory_plan): the KV cache generate allocates
    for the prompt and -n tokens, or the interactive chat's default cache (ids None)."""
    from moge_cli.memory_plan import cache_tokens, plan_memory

    context = None if ids is None else cache_tokens(ckpt.config.max_position_embeddings, len(ids), max_new_tokens)
    return plan_memory(ckpt, device=device, dtype=dtype, context=context, prompt_tokens=None if ids is None else len(ids))


def run_expert_parallel(path: str, root: str, world: int, ids: list[int], tokenizer: Any, options: dict[str, Any], *, dtype: Optional[str],
                        device: str, threads: Optional[int], quiet: bool, as_json: bool) -> None:  # fmt: skip
    """--ep N: generate on N ranks loading `path` (tokenizer from `root`); rank 0's text (or JSON with "ep") on stdout,
    per-rank statistics on stderr."""
    from moge_cli.distributed import generate_on_ranks

    tokenizer_root = root if tokenizer is not None else None
    result = generate_on_ranks(path, world, ids, tokenizer_root, options, dtype=dtype, device=device, threads=threads)
    if result is None:  # a torchrun rank other than 0: rank 0 prints
        return
    if as_json:
        print_json(result.to_dict())
    else:
        printed = result.text if tokenizer is not None else ",".join(map(str, result.generated_ids))
        sys.stdout.write(printed)
        _end_line(printed)
    if quiet or as_json:
        return
    sys.stderr.write(stats_line(result) + "\n")
    from moge_cli.distributed import rank_lines

    for line in rank_lines(result.ep):
        sys.stderr.write(line + "\n")


def context_note(result: Any, capacity: int, max_new_tokens: int) -> str:
    return (
        f"note: the context window is full ({capacity} tokens, {len(result.prompt_ids)} of them the prompt): "
        f"stopped after {len(result.generated_ids)} of the {max_new_tokens} tokens asked for"
    )


def read_prompt_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None
    if not text.strip():
        raise UsageError(f"{path}: the prompt file is empty")
    return text


def read_stdin() -> str:
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("no prompt: give --prompt TEXT or --prompt-ids IDS, or pipe the prompt on stdin")
    text = sys.stdin.read().rstrip("\n")  # `echo text |` adds one
    if not text:
        raise UsageError("the prompt read from stdin is empty")
    return text


def stats_line(result: Any) -> str:
    return (
        f"prefill {result.prefill_tokens} tokens, {result.prefill_tokens_per_s:.1f} tokens/s | "
        f"decode {result.decode_tokens} tokens, {result.decode_tokens_per_s:.1f} tokens/s | "
        f"peak memory {human_bytes(result.peak_memory_bytes)} | finish: {result.finish_reason}"
    )


def run_interactive(model: Any, tokenizer: Any, *, system: Optional[str], max_new_tokens: int, quiet: bool = False, **sampling: Any) -> None:
    """Read a line, answer it, keep the KV cache between turns. /reset clears, /exit or EOF quits."""
    if tokenizer is None:
        raise UsageError("--interactive needs a tokenizer, and this checkpoint has none")
    from moge_cli.chat import ChatSession

    session = ChatSession(model, tokenizer, system=system)
    err = sys.stderr
    err.write("interactive chat: /reset clears the conversation, /exit or Ctrl-D quits\n")
    while True:
        err.write(">>> ")
        err.flush()
        line = sys.stdin.readline()
        if not line:  # EOF
            err.write("\n")
            return
        user = line.rstrip("\n")
        if user.strip() in EXIT_WORDS:
            return
        if user.strip() == "/reset":
            session.reset()
            err.write("conversation cleared\n")
            continue
        if not user.strip():
            continue
        try:
            result = session.send(
                user, max_new_tokens=max_new_tokens, on_text=_writer(), on_notice=lambda m: err.write(f"[{m}]\n"), **sampling
            )
        except UsageError as e:  # e.g. one turn longer than the context: say so and keep the session
            err.write(f"error: {e}\n")
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the session (its cache is rebuilt next turn)
            err.write("\n[reply interrupted]\n")
            continue
        _end_line(result.text)
        if not quiet:
            err.write(stats_line(result) + f" | context {session.context_length} tokens\n")
            if result.finish_reason == "context":
                err.write(f"[the context window is full ({session.context_length} tokens): the reply was cut short; "
                          "the next turn starts a new conversation]\n")  # fmt: skip


def _writer() -> Callable[[str], None]:
    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    return write


def _id_writer() -> Callable[[int], None]:
    first = [True]

    def write(token: int) -> None:
        sys.stdout.write(("" if first[0] else ",") + str(token))
        sys.stdout.flush()
        first[0] = False

    return write


def _end_line(printed: Any) -> None:
    """Finish the streamed output with a newline (when anything was printed and it lacks one)."""
    if printed and not (isinstance(printed, str) and printed.endswith("\n")):
        sys.stdout.write("\n")
        sys.stdout.flush()


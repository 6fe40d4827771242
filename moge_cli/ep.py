"""Expert-parallel splits written by `moge convert --ep N`: rank directories and ep_plan.json.

A rank directory is a complete-looking checkpoint. Its config.json is the global config (num_experts
stays the global count, so the router tensors keep their [E, H] / [1, E] shapes) plus
`moge_ep: {"rank", "world_size", "experts": [global ids]}`. Its expert tensors hold only those
experts, named by LOCAL id 0..El-1 (per-expert) or stacked [El, ...]; local id i is global id
experts[i]. Non-expert tensors are replicated on every rank. The top directory holds rank-0 ...
rank-{N-1} and ep_plan.json, which maps every global expert id to (rank, local id).

`moge load` reports a rank directory as such (rank_summary) and a split as one checkpoint (inspect.inspect_split); commands that need the whole model refuse
one with that sentence (refuse_rank_directory); `moge convert TOP DST` merges the ranks back
(moge_converters.sources.SplitSource).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moge_cli.config import MoGEConfig
from moge_cli.errors import CheckpointError, ConfigError, MogeError, UsageError
from moge_cli.files import checked_dir, checked_file, present, read_json
from moge_cli.names import PER_EXPERT_RE, STACKED_RE

EP_PLAN_NAME = "ep_plan.json"


@dataclass
class RankSummary:
    """One rank directory of a split, as `moge load` reports it: which experts and groups, and what to do with it."""

    rank: int
    world_size: int
    experts: list[int]  # global expert ids, in local id order
    groups: list[int]  # expert groups they make up
    explanation: str  # the sentence a command that needs the whole model prints

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ep_info(cfg: MoGEConfig) -> dict[str, Any] | None:
    """The validated `moge_ep` of a rank directory's config, or None for a whole checkpoint."""
    ep = cfg.extra.get("moge_ep")
    if ep is None:
        return None
    ok = isinstance(ep, dict) and all(isinstance(ep.get(k), int) for k in ("rank", "world_size")) and isinstance(ep.get("experts"), list)
    if not ok or not 0 <= ep["rank"] < ep["world_size"]:
        raise ConfigError(f"config.json: moge_ep must be {{'rank', 'world_size', 'experts'}} with 0 <= rank < world_size, got {ep!r}")
    experts = ep["experts"]
    if (
        len(experts) * ep["world_size"] != cfg.num_experts
        or len(set(experts)) != len(experts)
        or not all(isinstance(e, int) and 0 <= e < cfg.num_experts for e in experts)
    ):
        raise ConfigError(
            f"config.json: moge_ep.experts must list {cfg.num_experts // max(ep['world_size'], 1)} distinct expert ids "
            f"in 0..{cfg.num_experts - 1} (num_experts / world_size), got {experts!r}"
        )
    return {"rank": ep["rank"], "world_size": ep["world_size"], "experts": list(experts)}


def local_expected(expected: dict[str, tuple[int, ...]], n_local: int) -> dict[str, tuple[int, ...]]:
    """expected_tensors of a whole checkpoint narrowed to a rank holding n_local experts (local ids)."""
    out = {}
    for name, shape in expected.items():
        if (m := PER_EXPERT_RE.match(name)) and int(m.group(2)) >= n_local:
            continue
        out[name] = (n_local, *shape[1:]) if STACKED_RE.match(name) else shape
    return out


def rank_summary(cfg: MoGEConfig, ep: dict[str, Any], parent: str | Path) -> RankSummary:
    """ep_info plus the groups the rank holds and the sentence that says what the directory is (parent: the split's top)."""
    groups = sorted({e // cfg.experts_per_group for e in ep["experts"]})
    what = (
        f"rank {ep['rank']} of {ep['world_size']} of an expert-parallel split (groups {_span(groups)}, experts {_span(ep['experts'])}); "
        f"load the split's parent directory, or run it with `moge generate {parent} --ep {ep['world_size']}`"
    )
    return RankSummary(ep["rank"], ep["world_size"], ep["experts"], groups, what)


def _span(ids: list[int]) -> str:
    return f"{ids[0]}..{ids[-1]}" if len(ids) > 1 and ids == list(range(ids[0], ids[-1] + 1)) else ", ".join(map(str, ids))


def rank_directory_error(path: str | Path) -> str | None:
    """What a rank directory of `convert --ep` is, for a command that needs a whole checkpoint; None otherwise.

    Reads config.json only (no tensor header): a rank directory is the one whose config has `moge_ep`.
    Anything unreadable is left to the command's own checks."""
    p = Path(path)
    try:
        if not (p.is_dir() and present(p, "config.json")):
            return None
        config = read_json(checked_file(p, p / "config.json"), error=ConfigError)
        if not isinstance(config, dict) or "moge_ep" not in config:
            return None
        cfg = MoGEConfig.from_dict(config)
        ep = ep_info(cfg)
    except (MogeError, OSError):
        return None
    return f"{p}: {rank_summary(cfg, ep, p.parent).explanation}"


def refuse_rank_directory(path: str | Path) -> None:
    """Raise UsageError (exit 2) when `path` is one rank directory of a split (see rank_directory_error)."""
    if (message := rank_directory_error(path)) is not None:
        raise UsageError(message)


def is_ep_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and present(p, EP_PLAN_NAME) and not present(p, "config.json")


def read_ep_plan(root: Path) -> dict[str, Any]:
    path = checked_file(root, root / EP_PLAN_NAME)
    try:
        plan = read_json(path)
        ranks = plan["ranks"]
        n = int(plan["world_size"])
        if not isinstance(ranks, list) or len(ranks) != n or [r["rank"] for r in ranks] != list(range(n)):
            raise ValueError("ranks must list rank 0 .. world_size-1 in order")
        for r in ranks:
            rel = Path(r["path"])
            if rel.is_absolute() or ".." in rel.parts:
                raise ValueError(f"rank path {r['path']!r} points outside the directory")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid expert-parallel plan ({e})") from None
    for r in ranks:
        checked_dir(root, root / r["path"])  # a rank folder that is a link must stay inside the split
    return plan


def plan_problems(plan: dict[str, Any], rank_eps: list[dict[str, Any] | None]) -> list[tuple[str, str]]:
    """(tensor, detail) for every way the plan and the rank directories disagree."""
    out = []
    owners: dict[int, list[tuple[int, int]]] = {}
    for r, entry in enumerate(plan["ranks"]):
        for local, e in enumerate(entry["experts"]):
            owners.setdefault(e, []).append((r, local))
        want = {"rank": r, "world_size": plan["world_size"], "experts": entry["experts"]}
        if rank_eps[r] != want:
            out.append((entry["path"], f"config.json moge_ep is {rank_eps[r]}, the plan says {want}"))
    for e in range(plan["num_experts"]):
        if len(owners.get(e, [])) != 1:
            out.append((f"expert {e}", f"held by {len(owners.get(e, []))} ranks, expected exactly 1"))
    for m in plan.get("experts", []):
        if owners.get(m.get("expert")) != [(m.get("rank"), m.get("local"))]:
            out.append((f"expert {m.get('expert')}", f"mapped to rank {m.get('rank')} local {m.get('local')}, ranks hold {owners.get(m.get('expert'))}"))
    return out

"""Layers point down only: CLI -> library -> runtime -> core -> kernels, with no import cycle, not even a lazy one.

Every import statement of moge_cli, moge_converters (converters/) and moge_kernels (kernels/) is read
with ast: at module top, inside functions (the lazy imports that keep the CLI fast), under
`if TYPE_CHECKING:`; all of them count. A module may import its own layer and the layers below it.
"""

from __future__ import annotations

import ast
import fnmatch
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"moge_cli": "moge_cli", "moge_converters": "converters", "moge_kernels": "kernels"}  # import name -> folder
FACADE = "moge_cli"  # moge_cli/__init__.py, see test_public_api_facade_points_down

# Top to bottom. A module belongs to the first layer with a matching pattern; a module in no layer fails
# test_every_module_has_a_layer (place a new module here when you add it).
LAYERS: list[tuple[str, list[str]]] = [
    # The CLI: the `moge` entry point (the fast `load --json` path), the root Typer app, one module per command.
    ("cli: entry", ["moge_cli.__main__", "moge_cli.main"]),
    ("cli: app", ["moge_cli.cli"]),
    ("cli: commands", ["moge_cli.commands", "moge_cli.commands.*"]),
    # The library: what a command calls, one importable function per job (load report, generate, chat, profile,
    # perplexity, plot, fixture checkpoints, convert and quantize pipelines, calibration), and their helpers.
    ("library", [
        "moge_cli.inspect", "moge_cli.ep", "moge_cli.shard_scan",  # moge load
        "moge_cli.generate", "moge_cli.chat", "moge_cli.template_sandbox", "moge_cli.distributed", "moge_cli.memory_plan",  # moge generate (--ep; will it fit)
        "moge_cli.profiling", "moge_cli.perplexity", "moge_cli.routing_stats", "moge_cli.weight_stats", "moge_cli.plot",  # moge profile
        "moge_cli.synthetic", "moge_cli.synthetic_tokenizer",  # moge fixture
        "moge_converters.*",  # moge convert, moge quantize (with calibration)
    ]),  # fmt: skip
    # The runtime: the model as a torch module, its loader, quantized weights at run time, the decode-step
    # plan, and what they need from torch (devices, huge pages, RoPE tables, instrumentation hooks); the float64
    # reference model is its slow twin. Between library and core: the library runs it, core knows no model.
    ("runtime", [
        "moge_cli.model", "moge_cli.loader", "moge_cli.rope",
        "moge_cli.instrument", "moge_cli.hugepages", "moge_cli.devices", "moge_cli.reference_model",
    ]),  # fmt: skip
    # Core: errors, the config, tensor names, dtypes, files, the safetensors and quantized formats, checkpoint
    # and tokenizer access, the load report's Problem rows, the version. No model, no command.
    ("core", [
        "moge_cli.errors", "moge_cli.config", "moge_cli.names", "moge_cli.dtypes", "moge_cli.files",
        "moge_cli.safetensors_format", "moge_cli.quant_format", "moge_cli.checkpoint", "moge_cli.tokenizer",
        "moge_cli.problems", "moge_cli.version",
    ]),  # fmt: skip
    # Compute only: imports nothing of ours (test_kernels_import_nothing_of_ours).
    ("kernels", ["moge_kernels.*"]),
]

# Commands share only these; one command never imports another.
SHARED_COMMAND_MODULES = {"moge_cli.commands.common", "moge_cli.commands.options", "moge_cli.commands.render"}

# What moge_kernels may import besides itself.
KERNEL_DEPENDENCIES = {"torch", "numpy"}

# Known edges that break the rules while other work is in progress: (importer, imported) -> who removes it and why.
# Each must still exist (test_allow_list_is_current), so the list only shrinks.
ALLOWED: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    where: str  # path:line
    lazy: bool  # not a statement of the module body itself: inside a function, a class, an if or a try

    def __str__(self) -> str:
        return f"{self.src} -> {self.dst}  ({self.where}{', lazy' if self.lazy else ''})"


def modules() -> dict[str, Path]:
    """Import name -> file, for every .py of our three packages."""
    out = {}
    for name, folder in PACKAGES.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            rel = f.relative_to(ROOT / folder).with_suffix("")
            out[".".join([name, *rel.parts]).removesuffix(".__init__")] = f
    return out


def _ours(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def _resolve(target: str, known: dict[str, Path]) -> str:
    """The module `import target` loads last: the longest known prefix below a top-level package; else target
    itself (`moge_kernels._cpu`, the C extension, or a module that does not exist)."""
    parts = target.split(".")
    for n in range(len(parts), 1, -1):
        if ".".join(parts[:n]) in known:
            return ".".join(parts[:n])
    return target


def imports_of(module: str, path: Path, known: dict[str, Path]) -> list[Edge]:
    """Every module of ours that `module` imports, anywhere in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    top = {id(node) for node in tree.body}
    is_package = path.name == "__init__.py"
    out, seen = [], set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub, `from mod import name` imports mod, and
            # `from moge_kernels import _cpu` the extension (kernels/ and converters/ have no __init__.py)
            namespace = base in PACKAGES and base not in known
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known or namespace else base for a in node.names]
        for t in targets:
            if _ours(t):
                dst = _resolve(t, known)
                if dst != module and (dst, node.lineno) not in seen:
                    seen.add((dst, node.lineno))
                    out.append(Edge(module, dst, f"{path.relative_to(ROOT)}:{node.lineno}", id(node) not in top))
    return out


def facade_exports(known: dict[str, Path]) -> list[Edge]:
    """moge_cli/__init__.py's PEP 562 table (public name -> module), as edges from the facade."""
    path = known[FACADE]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets):
            return [Edge(FACADE, v.value, f"{path.relative_to(ROOT)}:{v.lineno}", True) for v in node.value.values]
    raise AssertionError(f"{path}: no _EXPORTS table")


def graph() -> tuple[dict[str, Path], list[Edge]]:
    known = modules()
    edges = [e for m, p in known.items() for e in imports_of(m, p, known)]
    return known, edges + facade_exports(known)


def layer_of(module: str) -> int | None:
    """Index into LAYERS (0 = top), or None."""
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return i
    return None


def _report(title: str, edges: list[Edge], note=lambda e: "") -> str:
    return title + "\n" + "\n".join(f"  {e}{note(e)}" for e in sorted(edges, key=str))


def _not_allowed(edges: list[Edge]) -> list[Edge]:
    return [e for e in edges if (e.src, e.dst) not in ALLOWED]


def strongly_connected(nodes: list[str], edges: list[Edge]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module: the import cycles."""
    succ: dict[str, set[str]] = {n: set() for n in nodes}
    for e in edges:
        succ.setdefault(e.src, set()).add(e.dst)
        succ.setdefault(e.dst, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(succ[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(succ) + 100))
    try:
        for v in sorted(succ):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return out


# ---- the tests -------------------------------------------------------------------------------------


def test_the_graph_is_read():
    """The parser sees top-level, lazy and package-style imports (a broken parser would pass everything)."""
    known, edges = graph()
    pairs = {(e.src, e.dst, e.lazy) for e in edges}
    assert ("moge_cli.checkpoint", "moge_cli.safetensors_format", False) in pairs  # from m import name, at top
    assert ("moge_cli.commands.load", "moge_cli.inspect", True) in pairs  # inside the command function
    assert ("moge_cli.cli", "moge_cli.commands.load", False) in pairs  # from package import submodule
    assert ("moge_kernels.native", "moge_kernels._cpu", True) in pairs  # the C extension, inside try
    assert len(known) > 50


def test_no_import_cycles():
    known, edges = graph()
    cycles = strongly_connected(sorted(known), _not_allowed(edges))
    inside = [e for e in _not_allowed(edges) if any(e.src in c and e.dst in c for c in cycles)]
    assert not cycles, _report(
        f"import cycles (lazy imports count too): {cycles}\nthe edges inside them:", inside
    )


def test_every_module_has_a_layer():
    known, _ = graph()
    missing = [m for m in known if m != FACADE and layer_of(m) is None]
    assert not missing, f"modules in no layer: {missing}; place each in LAYERS in tests/test_layers.py"


def test_layers_point_down():
    """A module imports its own layer or the layers below it, never one above."""
    _, edges = graph()
    layered = [e for e in _not_allowed(edges) if layer_of(e.src) is not None and layer_of(e.dst) is not None]
    up = [e for e in layered if layer_of(e.dst) < layer_of(e.src)]
    name = lambda m: LAYERS[layer_of(m)][0]  # noqa: E731
    assert not up, _report("imports that point up a layer:", up, lambda e: f"   [{name(e.src)} -> {name(e.dst)}]")


def test_kernels_import_nothing_of_ours():
    """moge_kernels imports the standard library, torch, numpy and itself; errors are plain ValueError / TypeError."""
    bad = []
    for module, path in modules().items():
        if not module.startswith("moge_kernels"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            for n in names:
                root = n.split(".")[0]
                if root not in sys.stdlib_module_names and root not in KERNEL_DEPENDENCIES and root != "moge_kernels":
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {module} imports {n}")
    assert not bad, "kernels/ may import only the standard library, torch, numpy and moge_kernels:\n  " + "\n  ".join(bad)


def test_commands_do_not_import_each_other():
    """One module per command; what two commands share lives in commands/common.py, options.py or render.py."""
    _, edges = graph()
    bad = [
        e for e in _not_allowed(edges)
        if e.src.startswith("moge_cli.commands") and e.dst.startswith("moge_cli.commands.") and e.dst not in SHARED_COMMAND_MODULES
    ]  # fmt: skip
    assert not bad, _report(f"a command module imports another command (share through {sorted(SHARED_COMMAND_MODULES)}):", bad)


def test_public_api_facade_points_down():
    """moge_cli/__init__.py is the public Python API: a lazy (PEP 562) table of names from library, runtime and
    core modules, read here from its _EXPORTS table since it has no import statements for them. It sits above
    the library, beside the CLI, so none of our modules may import a name from it (that would point up, and
    make a cycle as soon as the named module imported it back); `from moge_cli import model` imports the
    submodule, not the facade, and is fine."""
    known, edges = graph()
    exported = [e for e in edges if e.src == FACADE]
    library = [i for i, (name, _) in enumerate(LAYERS) if name == "library"][0]
    bad = [e for e in exported if e.dst not in known or layer_of(e.dst) is None or layer_of(e.dst) < library]
    assert not bad, _report("the public API names a module that is missing or in the CLI layer:", bad)
    into = [e for e in edges if e.dst == FACADE]
    assert not into, _report("modules that import a name from the moge_cli package (import it from its module):", into)


def test_allow_list_is_current():
    """Every ALLOWED edge still exists: when its owner removes the import, the entry goes too."""
    _, edges = graph()
    present = {(e.src, e.dst) for e in edges}
    stale = [f"{a} -> {b}" for a, b in ALLOWED if (a, b) not in present]
    assert not stale, f"ALLOWED entries whose import is gone; delete them from tests/test_layers.py: {stale}"

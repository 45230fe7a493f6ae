"""The package's layering: every import in src/padrec points down this order, and no modules import each other in a
circle (README, "Layout"). A new module goes where its imports allow; an import that has to point up means a
definition sits in the wrong layer."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# lowest first; a module may import from its own layer's package and from any lower layer
LAYERS = [
    ["padrec", "padrec.files", "padrec.metrics", "padrec.provenance", "padrec.ui"],  # shared utilities
    ["padrec.zoo"],  # finding shipped models (torch-free; `Run` resolves zoo:NAME through it)
    ["padrec.data"],
    ["padrec.tokenizer"],
    ["padrec.models"],
    ["padrec.byo"],  # an imported checkpoint (its vocabulary renamed, its prompts); `Run` holds one
    ["padrec.decoding", "padrec.run"],
    ["padrec.training"],
    ["padrec.drafts"],
    ["padrec.speculative"],
    ["padrec.evaluation"],
    ["padrec.baselines"],
    ["padrec.api", "padrec.pipeline"],
    ["padrec.zoo_pack"],
    ["padrec.serving"],
    ["padrec.demo"],
    ["padrec.cli"],
    ["padrec.__main__"],
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the padrec modules it imports (at the top or inside a function)."""
    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges = {}
    for mod, path in mods.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            found |= {r for n in names if n.startswith("padrec") and (r := resolve(n)) and r != mod}
        edges[mod] = found
    return edges


def _layer(mod: str) -> tuple[int, str]:
    """(layer index, the entry of LAYERS the module belongs to: its longest matching prefix)."""
    best = max(((i, entry) for i, layer in enumerate(LAYERS) for entry in layer
                if mod == entry or mod.startswith(entry + ".")), key=lambda x: len(x[1]))
    return best


def test_every_import_points_down():
    edges = _imports(_modules())
    up = []
    for mod, targets in edges.items():
        for t in targets:
            if t == "padrec":
                continue
            (lm, em), (lt, et) = _layer(mod), _layer(t)
            if lt > lm or (lt == lm and em != et):
                up.append(f"{mod} -> {t}")
    assert not up, "imports that point up or sideways:\n" + "\n".join(sorted(up))


def test_no_circular_imports():
    edges = _imports(_modules())
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, f"modules that import each other: {cycles}"


def test_every_module_has_a_layer():
    for mod in _modules():
        _layer(mod)  # raises ValueError (max of nothing) for a module outside LAYERS

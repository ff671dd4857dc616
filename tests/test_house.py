"""The shape of the code: no import cycles between modules or between packages, no oversized source files or functions.

Every import counts, those inside functions too: an import deferred into a function to dodge a cycle is still a
dependency that runs the wrong way."""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def imports() -> dict[str, set[str]]:
    """moespec module -> the moespec modules it imports (relative imports resolved; `from pkg import name` counts
    pkg.name when that is a module)."""
    mods = {}
    for p in SRC.rglob("*.py"):
        name = ".".join(p.relative_to(SRC).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    edges = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                found = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                continue
            edges[m] |= {t for t in found if t in mods and t != m}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycles_between_modules():
    assert cycles(imports()) == []


def test_no_import_cycles_between_packages():
    """moespec's subpackages (models, experts, loading, spec_decode, perf, ...) and top-level modules, each one node."""
    def node(m: str) -> str:
        return ".".join(m.split(".")[:2])
    pk: dict[str, set[str]] = {}
    for m, ts in imports().items():
        pk.setdefault(node(m), set()).update(node(t) for t in ts if node(t) != node(m))
    for ts in list(pk.values()):
        for t in ts:
            pk.setdefault(t, set())
    found = cycles(pk)
    where = {tuple(c): sorted(f"{a} -> {b}" for a, ts in imports().items() for b in ts
                              if node(a) in c and node(b) in c and node(a) != node(b)) for c in found}
    assert found == [], where


def test_no_source_file_is_over_400_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_no_function_is_over_60_lines():
    """A function reads on one screen: longer ones are split where a step of theirs has a name."""
    long = [f"{p.relative_to(SRC)}: {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for p in SRC.rglob("*.py") for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
    assert long == []

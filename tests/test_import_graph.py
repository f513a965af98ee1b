"""Imports point one way: pipeline/ -> application modules -> core and ML modules; no circle anywhere.

Every import of the repository's own modules counts, also those inside functions (they run too, only later).
"""
from __future__ import annotations

import ast
from pathlib import Path

from repo_copy import REPO


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def own_modules() -> dict[str, Path]:
    return {module_name(p): p for d in ("tlvit", "pipeline") for p in (REPO / d).rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """module -> the repository modules it imports (a name resolves to its longest module prefix)."""
    mods = own_modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {resolve(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                found |= {resolve(f"{base}.{a.name}") or resolve(base) for a in node.names}
        graph[mod] = {m for m in found if m and m != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def package_of(mod: str) -> str:
    """tlvit.labels.annotator -> tlvit.labels; pipeline.train -> pipeline."""
    parts = mod.split(".")
    return ".".join(parts[:2]) if parts[0] == "tlvit" else parts[0]


def test_no_import_circle_between_modules():
    assert cycles(import_graph()) == []


def test_no_import_circle_between_packages():
    graph: dict[str, set[str]] = {}
    for mod, deps in import_graph().items():
        graph.setdefault(package_of(mod), set()).update(package_of(d) for d in deps if package_of(d) != package_of(mod))
    assert cycles(graph) == []


def test_the_library_never_reaches_into_pipeline_or_tests():
    for mod, deps in import_graph().items():
        if mod.startswith("tlvit"):
            assert not [d for d in deps if d.startswith("pipeline")], mod
    for path in (REPO / "tlvit").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        loads = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in ("tests", "pipeline")]
        assert not ({"tests", "repo_copy", "conftest"} & names) and not loads, path


def test_the_report_does_not_import_the_training_loop():
    graph = import_graph()
    seen, todo = set(), [m for m in graph if m.startswith("tlvit.report")]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph[m]
    assert not seen & {"tlvit.train", "tlvit.engine", "tlvit.supervision", "tlvit.samplers", "tlvit.distributed"}


NOT_IN_THE_REPOSITORY = ("../" + "shared", "shared/" + "seeds", "shared/" + "notes")  # split: this file is checked too


def test_no_file_names_a_path_outside_the_repository():
    """The papers are cited by title, venue and arXiv id; notes outside the repository are not part of it."""
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for f in files:
        path = REPO / f
        if path.suffix in (".py", ".md", ".yaml", ".yml", ".csv", ".tex", ".txt", ".toml", ".sh", ".cfg") or f == "Makefile":
            text = path.read_text(errors="replace")
            if any(needle in text for needle in NOT_IN_THE_REPOSITORY):
                offenders.append(f)
    assert offenders == []

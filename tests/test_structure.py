"""The package's structure: dependencies run one way, and no module reaches into another's
private names. Read from the source (every import statement, at module level, inside functions
and under ``TYPE_CHECKING`` alike), so an import hidden in a function counts as much as one at
the top."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "pytest_llmload"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute name ``from <...> import`` refers to in ``module``."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module):
        base.pop()
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _with_parents(name: str) -> Iterator[str]:
    """Importing ``a.b.c`` runs ``a``, ``a.b`` and ``a.b.c``."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        yield ".".join(parts[:i])


def imports_of(module: str) -> list[tuple[str, list[str], int]]:
    """``(imported module, names taken from it, line)`` for every import in ``module``."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found: list[tuple[str, list[str], int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            names = []
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:  # ``from . import config``: the module itself
                    found.append((sub, [], node.lineno))
                else:
                    names.append(alias.name)
            found.append((target, names, node.lineno))
    return found


def dependency_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, _, _ in imports_of(module):
            for name in _with_parents(target):
                # a package that holds ``module`` is already running when ``module`` imports
                if name in MODULES and name != module and not module.startswith(name + "."):
                    graph[module].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_reader_sees_every_kind_of_import() -> None:
    """The check below is only as good as the reader: it must see imports inside functions,
    under TYPE_CHECKING, relative ones and ``from . import module``."""
    graph = dependency_graph()
    assert "pytest_llmload.report" in graph["pytest_llmload.merge"]  # module level, relative
    assert "pytest_llmload.session" in graph["pytest_llmload.plugin"]  # inside a function
    assert "pytest_llmload.metrics" in graph["pytest_llmload.verdict"]  # under TYPE_CHECKING
    assert "pytest_llmload.config" in graph["pytest_llmload.options"]  # from . import config
    assert "pytest_llmload.mock" in graph["pytest_llmload.fixtures"]  # a package's __init__


def test_finds_a_cycle_when_there_is_one() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_the_modules() -> None:
    assert cycles(dependency_graph()) == []


def test_statistics_and_verdicts_sit_above_the_grammar() -> None:
    """grammar -> statistics -> verdict: the SLO grammar knows nothing of the figures it is
    checked against, and the statistics nothing of the verdicts."""
    graph = dependency_graph()
    assert "pytest_llmload.metrics" not in graph["pytest_llmload.slo"]
    assert "pytest_llmload.verdict" not in graph["pytest_llmload.slo"]
    assert "pytest_llmload.verdict" not in graph["pytest_llmload.metrics"]
    assert graph["pytest_llmload.errors"] == set()  # the leaf everyone raises from


def private_uses() -> list[str]:
    """Imports of another module's ``_name``, and ``module._name`` on an imported module."""
    found = []
    for module in MODULES:
        tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
        aliases: dict[str, str] = {}
        for target, names, line in imports_of(module):
            if not target.startswith(PACKAGE) or target == module:
                continue
            found.extend(
                f"{module}:{line} imports {target}.{n}"
                for n in names
                if n.startswith("_") and not n.startswith("__")
            )
            if target.rsplit(".", 1)[-1].startswith("_") and not target.endswith("__main__"):
                found.append(f"{module}:{line} imports the private module {target}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    sub = f"{_resolve(module, node)}.{alias.name}"
                    if sub in MODULES:
                        aliases[alias.asname or alias.name] = sub
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith(PACKAGE) and alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                found.append(f"{module}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names() -> None:
    assert private_uses() == []


def test_tox_reaches_the_integration_tests() -> None:
    """The default tox envs install no integration extra, so tests/integration skip there: an
    env of its own must run them, and a plain ``tox`` must include it."""
    import configparser

    tox = configparser.ConfigParser()
    tox.read(ROOT.parent / "tox.ini", encoding="utf-8")
    envlist = [e.strip() for e in tox["tox"]["envlist"].split(",")]
    assert "integration" in envlist
    env = tox["testenv:integration"]
    assert "integration" in [e.strip() for e in env["extras"].split(",")]
    command = env["commands"].split()
    assert command[:2] == ["pytest", "tests/integration"]
    # the extra it installs is declared, and holds what the integration fixtures need
    pyproject = (ROOT.parent / "pyproject.toml").read_text(encoding="utf-8")
    assert "integration = [" in pyproject and "transformers[serving]" in pyproject


def _user_facing_text() -> dict[Path, str]:
    repo = ROOT.parent
    paths = [repo / "README.md", repo / "benchmarks" / "README.md", *sorted((repo / "docs").glob("*.md")),
             *MODULES.values(), *sorted((repo / "examples").glob("*.py"))]
    return {p: p.read_text(encoding="utf-8") for p in paths}


def test_docs_and_code_stand_on_their_own() -> None:
    """No pointer to a document that is not in the repository, and no history for an
    explanation: the README, docs, examples and code say what things do on their own terms."""
    for path, text in _user_facing_text().items():
        lowered = text.lower()
        assert "design.md" not in lowered, path
        assert "seed script" not in lowered, path


def test_readme_links_lead_somewhere() -> None:
    import re

    repo = ROOT.parent
    readme = (repo / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    assert "docs/glossary.md" in links and "docs/architecture.md" in links
    missing = [link for link in links if "://" not in link and not (repo / link).exists()]
    assert missing == []

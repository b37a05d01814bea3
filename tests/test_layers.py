"""The package's layers (issue 20): no import cycles between its units, counting imports inside
functions too; the arrows the layering forbids are absent; the central modules name no method;
cheap commands import neither torch nor dp_accounting."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pfedmoap import algorithms

SRC = Path(__file__).resolve().parent.parent / "src" / "pfedmoap"
# (from, to): the model layer knows no data set; config knows no method; the transport no method
FORBIDDEN = {("clip", "data"), ("config", "algorithms"), ("exchange", "algorithms")}


def _unit(rel: Path) -> str:
    """A top-level module or subpackage of the package ("config", "algorithms", ...)."""
    return rel.parts[0].removesuffix(".py")


def _targets(node, package: list[str]) -> list[str]:
    """The package units an import statement names (relative or absolute)."""
    if isinstance(node, ast.Import):
        return [a.name.split(".")[1] for a in node.names if a.name.startswith("pfedmoap.")]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level == 0:
        parts = (node.module or "").split(".")
        if parts[0] != "pfedmoap":
            return []
        return [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
    base = package[:len(package) - (node.level - 1)]
    parts = base + (node.module.split(".") if node.module else [])
    return [parts[0]] if parts else [a.name for a in node.names]


def import_graph(root: Path) -> dict[str, set[str]]:
    units = {p.name.removesuffix(".py") for p in root.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    edges: dict[str, set[str]] = {}
    for f in root.rglob("*.py"):
        rel = f.relative_to(root)
        src = _unit(rel)
        for node in ast.walk(ast.parse(f.read_text())):
            for t in _targets(node, list(rel.parts[:-1])):
                if t in units and t != src and t != "__init__":
                    edges.setdefault(src, set()).add(t)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one unit."""
    reach = {}
    for start in edges:
        seen, todo = set(), [start]
        while todo:
            for t in edges.get(todo.pop(), ()):
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        reach[start] = seen
    comps = {frozenset({a} | {b for b in reach[a] if a in reach.get(b, ())}) for a in edges}
    return sorted(sorted(c) for c in comps if len(c) > 1)


def test_the_walker_sees_in_function_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("def f():\n    from .sub import x\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "x.py").write_text("from ..a import f\nimport pfedmoap.a\n")
    edges = import_graph(pkg)
    assert edges == {"a": {"sub"}, "sub": {"a"}} and cycles(edges) == [["a", "sub"]]


def test_no_import_cycles_and_no_forbidden_arrows():
    edges = import_graph(SRC)
    assert "algorithms" in edges and "config" in edges["algorithms"]        # the walker sees the package
    assert cycles(edges) == []
    assert sorted((a, b) for a, b in FORBIDDEN if b in edges.get(a, ())) == []


def _code(path: Path) -> str:
    """A module's code without comments and docstrings."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            body[0] = ast.Pass()
    return ast.unparse(tree)


@pytest.mark.parametrize("module", ["config.py", "tables.py", "cli.py", "federation.py", "store.py",
                                    "build.py", "exchange.py"])
def test_central_modules_name_no_method(module):
    code = _code(SRC / module)
    for m in algorithms.manifests():
        # the package is named like one method, and "local" is an English word: those as values only
        # (and the program's name, prog='pfedmoap')
        pattern = rf"(?<!prog=)['\"]{m.name}['\"]|={m.name}\b" if m.name in ("pfedmoap", "local") else rf"\b{m.name}\b"
        assert not re.search(pattern, code), (module, m.name)
        if m.section:
            assert not re.search(rf"\b{m.section}\.\w", code), (module, m.section)


# ---------------------------------------------------------------------------- cheap commands

_PROBE = ("import sys\n"
          "from pfedmoap import cli\n"
          "try:\n"
          "    rc = cli.main(sys.argv[1:])\n"
          "except SystemExit as e:\n"
          "    rc = e.code\n"
          "print('HEAVY', sorted(m for m in ('torch', 'dp_accounting') if m in sys.modules), file=sys.stderr)\n"
          "sys.exit(rc)\n")


@pytest.mark.parametrize("args, rc", [
    (["run", "--set", "data.beta=-1"], 2),                                  # a config error
    (["run", "paper/food101", "--set", "algorithm=promptfl", "--set", "moe.lam=1"], 2),
    (["run", "--set", "algorithm=nosuch"], 2),
    (["table", "list"], 0),
    (["table", "runs", "fewshot", "--count"], 0),
    (["run", "--help"], 0),
    (["data", "check", "--help"], 0),
])
def test_cheap_commands_import_neither_torch_nor_dp_accounting(args, rc, tmp_path):
    p = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert p.returncode == rc, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == "HEAVY []", p.stderr[-2000:]
    if rc == 2:
        assert p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 2


def test_every_packaged_config_validates_without_torch():
    probe = ("import sys\nfrom pfedmoap import algorithms, config, configs\n"
             "for name in configs.packaged():\n"
             "    for m in algorithms.manifests():\n"
             "        config.load(name, [f'algorithm={m.name}', 'data.augment=none'])\n"
             "print(sorted(m for m in ('torch', 'dp_accounting') if m in sys.modules))\n")
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "[]"

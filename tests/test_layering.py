"""The package's layering, read from the source: the serving core never imports the offline tools or the
benchmarks, the tools' two CLIs do not import each other, the registry names only core functions, and the
torch-free modules load without torch.

Core: every module of ``sgl_minference`` outside ``sgl_minference/tools`` (config, registry, layout, checks,
kernels, patterns, backend, plugin and what they need). Imports are read with ``ast``, at any depth (a lazy
import inside a function counts too), relative ones resolved against the importing module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sgl_minference"
TOOLS = "sgl_minference.tools"
TORCH_FREE = ("sgl_minference.checks", "sgl_minference.cli", "sgl_minference.config", "sgl_minference.gpu_memory",
              "sgl_minference.registry", "sgl_minference.tools.prompts")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports (``from a import b`` counts as ``a`` and ``a.b``), absolute names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
CORE = sorted(m for m in MODULES if m != TOOLS and not m.startswith(TOOLS + "."))


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_the_reader_sees_relative_imports():
    got = imports_of(PACKAGE / "tools" / "search" / "recall.py")
    assert {"sgl_minference.patterns.selection", "sgl_minference.checks"} <= got
    assert "sgl_minference.patterns" in imports_of(PACKAGE / "backend" / "planner.py")


@pytest.mark.parametrize("module", CORE)
def test_core_imports_no_tool_and_no_benchmark(module):
    bad = sorted(i for i in imports_of(MODULES[module]) if under(i, TOOLS) or under(i, "benchmarks"))
    assert not bad, f"{module} (core) imports {bad}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_the_package_imports_no_benchmark(module):
    assert not [i for i in imports_of(MODULES[module]) if under(i, "benchmarks")]


def test_search_and_eval_share_no_cli():
    for module, path in MODULES.items():
        for cli in ("sgl_minference.tools.search.__main__", "sgl_minference.tools.eval.__main__"):
            if module != cli:
                assert cli not in imports_of(path), f"{module} imports the CLI {cli}"
    for module in MODULES:
        if under(module, "sgl_minference.tools.search"):
            assert not [i for i in imports_of(MODULES[module]) if under(i, "sgl_minference.tools.eval")], module


def test_the_registry_names_core_functions_only():
    from sgl_minference.registry import PATTERNS, Ref

    for entry in PATTERNS.values():
        for ref in (entry.build, entry.realise, entry.fit):
            if isinstance(ref, Ref):
                module = ref.path.split(":")[0]
                assert module in CORE, f"{entry.name}: {ref.path} is not a core module"


def test_torch_free_modules_load_without_torch():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in TORCH_FREE) +
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton', 'transformers'))\n"
            "print(heavy)\nsys.exit(1 if heavy else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

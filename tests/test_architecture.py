"""The layout's promises, checked: what ``import modelshare`` loads, who imports what, where every
exception lives, and that process state has one owner (one at-fork hook, one exit hook)."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import subprocess
import sys

import modelshare
from modelshare import errors

from .support import ROOT


def _python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                          timeout=120).stdout


_IMPORT_EVERYTHING = """
import pkgutil, importlib, modelshare
for info in pkgutil.walk_packages(modelshare.__path__, "modelshare."):
    if info.name.endswith("__main__") or info.name == "modelshare.codecs.tensorrt":
        continue  # __main__ runs the CLI; tensorrt is imported lazily and needs NVIDIA's libraries
    importlib.import_module(info.name)
"""


def test_import_modelshare_loads_only_the_exceptions() -> None:
    """A process pays for the code it runs: every public name but the exceptions loads on first use."""
    loaded = json.loads(_python("import json, sys, modelshare; print(json.dumps(sorted(sys.modules)))"))
    assert [m for m in loaded if m.startswith("modelshare")] == ["modelshare", "modelshare.errors"]
    assert not [m for m in loaded if m.split(".")[0] in ("torch", "onnxruntime", "onnx", "sklearn", "apache_beam")]
    gpu = json.loads(_python("import json, sys, modelshare; modelshare.GpuCopyInfo; "
                             "print(json.dumps(sorted(sys.modules)))"))
    assert "modelshare._gpu.keeper" in gpu, "a GPU name loads the GPU code on first use"
    assert "modelshare._router.router" not in gpu


def test_every_public_name_is_what_type_checkers_are_told() -> None:
    """The lazy names resolve to the objects the ``TYPE_CHECKING`` imports name, one for one, and
    ``__all__`` lists exactly those, the two functions and the exceptions."""
    tree = ast.parse(inspect.getsource(modelshare))
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    told = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom)
        for alias in node.names:
            module = importlib.import_module("." * node.level + (node.module or ""), "modelshare")
            told[alias.asname or alias.name] = getattr(module, alias.name)
    assert {name: getattr(modelshare, name) for name in told} == told
    assert set(modelshare.__all__) == {*told, "list_segments", "gc_segments", "errors", *errors.__all__}
    assert set(modelshare.__all__) <= set(dir(modelshare))


def test_the_package_registers_one_at_fork_hook_and_one_exit_hook() -> None:
    code = """
import atexit, os
hooks = []
real_fork, real_exit = os.register_at_fork, atexit.register
def count(kind, *fns):
    modules = {getattr(fn, "__module__", "") or "" for fn in fns}
    if any(m.startswith(("modelshare", "beam_adapter")) for m in modules):
        hooks.append((kind, *sorted(modules), *(fn.__qualname__ for fn in fns)))
os.register_at_fork = lambda **kw: (count("fork", *(kw[k] for k in sorted(kw))), real_fork(**kw))[1]
atexit.register = lambda fn, *a, **kw: (count("exit", fn), real_exit(fn, *a, **kw))[1]
""" + _IMPORT_EVERYTHING + "import beam_adapter\nprint(sorted(set(hooks)))"
    hooks = eval(_python(code))
    assert hooks == [("exit", "modelshare._process", "_release_all_at_exit"),
                     ("fork", "modelshare._process", "_after_fork_in_child", "_after_fork_in_parent", "_before_fork")]


def test_every_exception_lives_in_errors_and_is_public() -> None:
    code = _IMPORT_EVERYTHING + """
import inspect, sys
found = set()
for name, module in list(sys.modules.items()):
    if name.startswith("modelshare") or name.startswith("beam_adapter"):
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.startswith(("modelshare", "beam_adapter")):
                found.add(f"{obj.__module__}.{obj.__qualname__}")
print(sorted(found))
"""
    defined = eval(_python("import beam_adapter\n" + code))
    assert defined and all(name.startswith("modelshare.errors.") for name in defined), defined
    public = {name for name, obj in inspect.getmembers(errors, inspect.isclass) if issubclass(obj, BaseException)}
    assert public == set(errors.__all__)
    assert all(getattr(modelshare, name) is getattr(errors, name) for name in errors.__all__)
    assert set(errors.__all__) <= set(modelshare.__all__)


def test_beam_adapter_uses_nothing_private_of_modelshare() -> None:
    offending = []
    for path in sorted((ROOT / "beam_adapter").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "modelshare":
                names = [f"modelshare.{node.attr}"]
            offending += [f"{path.name}: {n}" for n in names
                          if n.startswith("modelshare") and any(part.startswith("_") for part in n.split(".")[1:])]
    assert offending == []


def test_the_top_level_holds_about_a_dozen_modules() -> None:
    top = sorted(p.name for p in (ROOT / "modelshare").glob("*.py"))
    packages = sorted(p.parent.name for p in (ROOT / "modelshare").glob("*/__init__.py"))
    assert len(top) <= 14, top
    assert packages == ["_gpu", "_host", "_modes", "_owners", "_router", "codecs"]


def test_the_readme_layout_lists_every_module() -> None:
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    modules = sorted(str(p.relative_to(ROOT)) for package in ("modelshare", "beam_adapter")
                     for p in (ROOT / package).rglob("*.py"))
    assert [m for m in modules if f"`{m}`" not in layout] == []


def test_every_import_of_modelshare_anywhere_resolves() -> None:
    """Imports inside functions (GPU benchmarks, probes) run only where CI cannot: check them here."""
    import importlib

    missing = []
    for folder in ("modelshare", "beam_adapter", "benchmarks", "examples", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("modelshare")):
                    continue
                if node.module == "modelshare.codecs.tensorrt":
                    continue  # needs NVIDIA's libraries
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        try:
                            importlib.import_module(f"{node.module}.{alias.name}")
                        except ImportError:
                            missing.append(f"{path.relative_to(ROOT)}: {node.module}.{alias.name}")
    assert missing == []

"""The project's layering, read from the modules' own import statements (parsed with ast: nothing is imported here).

The core a learner reads: the library (dwt, waveft, sdxl) and the scripts (train_dreambooth, evaluate; and sample,
their shortest use). The support layer: one job per module. The library imports nothing of the support layer (waveft
only dwt, dwt nothing, sdxl nothing of the project); a support module imports the library and other support modules,
never a script; the scripts import both; no module imports itself through others. pyproject.toml installs every
importable module."""
import ast

import pytest

from conftest import REPO

LIBRARY = {"dwt", "waveft", "sdxl"}
SUPPORT = {"cli", "distributed", "eval_images", "files", "hub", "interop", "metric_models", "peft_methods", "pictures",
           "runs"}
SCRIPTS = {"train_dreambooth", "evaluate", "sample"}
MODULES = LIBRARY | SUPPORT | SCRIPTS


def project_imports(module):
    """The project modules `module`.py imports anywhere in it (at the top or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse((REPO / f"{module}.py").read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & MODULES


def test_every_top_level_module_has_its_place():
    assert {path.stem for path in REPO.glob("*.py")} == MODULES


def test_the_library_imports_nothing_of_the_support_layer():
    assert project_imports("dwt") == set()
    assert project_imports("waveft") == {"dwt"}
    assert project_imports("sdxl") == set()


@pytest.mark.parametrize("module", sorted(SUPPORT))
def test_a_support_module_imports_the_library_and_support_never_a_script(module):
    assert project_imports(module) <= LIBRARY | SUPPORT - {module}, module


def test_no_module_imports_itself_through_others():
    graph = {module: project_imports(module) for module in MODULES}
    for start in MODULES:
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            assert module != start, f"{start} imports itself through {sorted(seen)}"
            if module not in seen:
                seen.add(module)
                todo += graph[module]


def test_pyproject_installs_every_importable_module():
    tomllib = pytest.importorskip("tomllib")  # python >= 3.11
    modules = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["py-modules"]
    assert sorted(modules) == sorted(LIBRARY | SUPPORT)  # the scripts stay in the checkout


def peft_imports(module, inside_functions):
    """The lines where `module`.py imports peft: at its top level (outside every function), or (True) anywhere."""
    def walk(node):
        for child in ast.iter_child_nodes(node):
            if inside_functions or not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield child
                yield from walk(child)
    return [node.lineno for node in walk(ast.parse((REPO / f"{module}.py").read_text()))
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "peft" for a in node.names)
            or isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "peft"]


def test_peft_is_imported_only_by_the_functions_that_use_it_and_never_by_the_library():
    """peft is optional at run time, as LPIPS is: only --method vera|loha|lokr|adalora (and such adapters) need it."""
    assert peft_imports("peft_methods", inside_functions=True), "peft_methods.py imports peft (the test sees it)"
    for module in sorted(MODULES):
        assert peft_imports(module, inside_functions=False) == [], f"{module}.py imports peft at its top level"
    for module in sorted(LIBRARY):
        assert peft_imports(module, inside_functions=True) == [], f"{module}.py imports peft"

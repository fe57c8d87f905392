"""README.md tells the truth: every ```python block runs as written, and the numbers and test names it states hold.

Each block runs in a fresh namespace, from an empty folder, with the DreamBooth dataset where the README's Tests
section puts it ($DREAMBOOTH_DIR), as a newcomer runs it; it may write only under outputs/ (gitignored). A block that
cannot run here (it needs a GPU or the hub) starts with the line `# test_readme: skip, <why>`; keep those few."""
import re
from pathlib import Path

import pytest
import torch

from conftest import need


REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
SKIP = "# test_readme: skip"


def python_blocks(text):
    """[(line number of the first code line, code)] of every ```python block."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1))
            for m in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, re.M | re.S)]


BLOCKS = python_blocks(README)


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs(line, code, tmp_path, monkeypatch, dreambooth_dir):
    if code.startswith(SKIP):
        pytest.skip(code.splitlines()[0])
    if re.search(r"^\s*(from|import) peft\b", code, re.M):
        need("peft")  # the PEFT side of an example: skipped without peft, as other tests that use it (conftest.need)
    monkeypatch.setenv("DREAMBOOTH_DIR", str(dreambooth_dir))
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__main__"})
    left = sorted(path.name for path in tmp_path.iterdir())
    assert left in ([], ["outputs"]), f"README.md:{line} leaves {left} in the current folder: write under outputs/"


def test_the_largest_k_the_readme_states_for_the_tiny_model_is_the_true_one():
    import sdxl
    import waveft
    largest = int(re.search(r"k=2592 on SDXL \(here at most ([\d,]+)", README).group(1).replace(",", ""))
    unet = sdxl.build_tiny_pipeline().unet
    waveft.inject(unet, k=largest)  # every adapted layer takes it
    waveft.remove(unet)
    with pytest.raises(ValueError, match=rf"k={largest + 1} is invalid for layer .*need 1 <= k <= {largest}"):
        waveft.inject(unet, k=largest + 1)  # and one more is refused


def test_readme_blocks_are_found_and_skips_are_few_and_explained():
    assert python_blocks("a\n```python\nx = 1\n```\nb\n```bash\nls\n```\n") == [(3, "x = 1\n")]
    assert len(BLOCKS) >= 3  # dwt.py, waveft.py, sdxl.py
    skipped = [code.splitlines()[0] for _, code in BLOCKS if code.startswith(SKIP)]
    assert len(skipped) <= 2, skipped
    assert all(len(first[len(SKIP):].strip(" ,:-")) > 5 for first in skipped), "say why the block cannot run here"


def test_every_test_the_readme_names_exists():
    """The reading guide points at tests by name: a renamed or deleted test must not leave it pointing nowhere."""
    sources = {path.name: path.read_text() for path in (REPO / "tests").glob("test_*.py")}
    named = set(re.findall(r"\b(test_\w+?)(\.py)?\b", README))
    assert len(named) > 10
    for name, is_file in named:
        if is_file:
            assert f"{name}.py" in sources, f"README names tests/{name}.py, which does not exist"
        else:
            assert any(re.search(rf"^def {name}\(", text, re.M) for text in sources.values()), \
                f"README names the test {name}, which no file in tests/ defines"


def test_pyproject_installs_the_modules_with_the_pinned_requirements():
    """`pip install .` must install every module that dwt/waveft/sdxl import from the checkout, and exactly the pins
    of requirements.txt (requirements-dev.txt as the `dev` extra): this fails when one changes without the other."""
    tomllib = pytest.importorskip("tomllib")  # python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())

    def pins(name):
        lines = (REPO / name).read_text().splitlines()
        return sorted(line.split("#")[0].strip() for line in lines if line.split("#")[0].strip())

    assert sorted(project["project"]["dependencies"]) == pins("requirements.txt")
    assert sorted(project["project"]["optional-dependencies"]["dev"]) == pins("requirements-dev.txt")
    modules = project["tool"]["setuptools"]["py-modules"]
    assert {"dwt", "waveft", "sdxl"} <= set(modules)
    local = {path.stem for path in REPO.glob("*.py")}
    for module in modules:
        source = (REPO / f"{module}.py").read_text()
        imported = set(re.findall(r"^\s*(?:import|from)\s+(\w+)", source, re.M))
        assert imported & local <= set(modules), f"{module}.py imports {sorted(imported & local)} from the checkout"

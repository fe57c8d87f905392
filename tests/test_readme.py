"""README.md and docs/*.md tell the truth: every ```python block runs as written, every relative link resolves, and
the numbers and test names they state hold.

Each block runs in a fresh namespace, from an empty folder, with the DreamBooth dataset where the README's Tests
section puts it ($DREAMBOOTH_DIR), as a newcomer runs it; it may write only under outputs/ (gitignored). A block that
cannot run here (it needs a GPU or the hub) starts with the line `# test_readme: skip, <why>`; keep those few."""
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import need


REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))  # the README and its reference pages
TEXTS = {page.relative_to(REPO).as_posix(): page.read_text() for page in PAGES}
README = TEXTS["README.md"]
SKIP = "# test_readme: skip"


def python_blocks(text):
    """[(line number of the first code line, code)] of every ```python block."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1))
            for m in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, re.M | re.S)]


def prose(text):
    """The text outside fenced code blocks (a `# comment` in a bash block is no heading, `[x](y)` there no link)."""
    return re.sub(r"^```.*?^```[ \t]*$", "", text, flags=re.M | re.S)


def anchors(text):
    """The #anchors GitHub gives the headings of a markdown text: lower case, punctuation dropped (letters, digits,
    `_`, `-` and spaces kept), spaces as `-`; a repeated heading gets -1, -2, ..."""
    seen, found = {}, set()
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", prose(text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


def links(text):
    """Every [text](target) and ![alt](target) of a markdown text, outside code (fenced blocks and `spans`)."""
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", re.sub(r"`[^`\n]*`", "", prose(text)))


BLOCKS = [(name, line, code) for name, text in TEXTS.items() for line, code in python_blocks(text)]


@pytest.mark.parametrize("name, line, code", BLOCKS, ids=[f"{name}:{line}" for name, line, _ in BLOCKS])
def test_python_block_runs(name, line, code, tmp_path, monkeypatch, dreambooth_dir):
    if code.startswith(SKIP):
        pytest.skip(code.splitlines()[0])
    if re.search(r"^\s*(from|import) peft\b", code, re.M):
        need("peft")  # the PEFT side of an example: skipped without peft, as other tests that use it (conftest.need)
    monkeypatch.setenv("DREAMBOOTH_DIR", str(dreambooth_dir))
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(code, f"{name}:{line}", "exec"), {"__name__": "__main__"})
    left = sorted(path.name for path in tmp_path.iterdir())
    assert left in ([], ["outputs"]), f"{name}:{line} leaves {left} in the current folder: write under outputs/"


def shell_commands(block):
    """The commands of a ```bash block, one a line (a line ending in a backslash goes on), comment lines left out."""
    lines = block.replace("\\\n", " ").splitlines()
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_the_quick_start_of_your_own_subject_runs_as_written(tmp_path, monkeypatch, dreambooth_dir):
    """Your photos -> a run -> sample -> images: each command of the quick start's first block as written, from a
    checkout beside the dataset (../shared/dreambooth, where "Tests" puts it), a shell line in bash, a script
    in-process (its main(argv): the same code without a python start-up per command). What the text after the block
    names is there."""
    import sample
    import train_dreambooth
    section = README.split("\n## CPU quick start\n", 1)[1].split("\n## ", 1)[0]
    block, after = re.search(r"^```bash\n(.*?)^```\n\n(.*?)\n\n", section, re.M | re.S).groups()
    assert "--images" in block and "sample.py" in block
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "dreambooth").symlink_to(dreambooth_dir.resolve())
    checkout = tmp_path / "waveft"
    checkout.mkdir()
    monkeypatch.chdir(checkout)
    scripts = {"train_dreambooth.py": train_dreambooth.main, "sample.py": sample.main}
    for command in shell_commands(block):
        words = shlex.split(command, comments=True)
        if words[0] == "python":
            scripts[words[1]](words[2:])
        else:  # mkdir, cp
            subprocess.run(["bash", "-c", command], check=True)
    named = re.findall(r"`((?:outputs|samples)/[^`]+)`", after)
    assert len(named) == 2 and all((checkout / path).is_dir() for path in named), named
    images = sorted(checkout.glob("samples/*/*/seed*.png"))
    assert len(images) == 8 and {Image.open(path).size for path in images} == {(64, 64)}


def test_blocks_are_found_and_skips_are_few_and_explained():
    assert python_blocks("a\n```python\nx = 1\n```\nb\n```bash\nls\n```\n") == [(3, "x = 1\n")]
    assert python_blocks(README), "the README shows the definition in a block that runs"
    assert len(BLOCKS) >= 5  # README, dwt, waveft, sdxl, interop
    skipped = [code.splitlines()[0] for _, _, code in BLOCKS if code.startswith(SKIP)]
    assert len(skipped) <= 2, skipped
    assert all(len(first[len(SKIP):].strip(" ,:-")) > 5 for first in skipped), "say why the block cannot run here"


def test_links_and_anchors_are_read_as_github_reads_them():
    text = "# A `dwt.py` page\n## Why k = 2592\n## PEFT's format, both ways\n## Notes\n## Notes\n```bash\n# x\n```\n"
    assert anchors(text) == {"a-dwtpy-page", "why-k--2592", "pefts-format-both-ways", "notes", "notes-1"}
    text = "see [a](docs/a.md#b), ![p](p.png), `[not](a link)`\n```bash\n[nor](this)\n```\n[c](https://x.org)"
    assert links(text) == ["docs/a.md#b", "p.png", "https://x.org"]


@pytest.mark.parametrize("name", TEXTS)
def test_every_relative_link_resolves(name):
    """A file link names a file or folder of the checkout; a #anchor names a heading of the page it points to."""
    page = REPO / name
    for target in links(TEXTS[name]):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ... are not checked (no network here)
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{name} links to {target}: {linked.relative_to(REPO.resolve())} does not exist"
        if anchor:
            assert linked.suffix == ".md", f"{name} links to {target}: an anchor in a file that is not markdown"
            assert anchor in anchors(linked.read_text()), \
                f"{name} links to {target}: {linked.name} has no heading with that anchor"


def test_the_readme_links_every_docs_page():
    linked = {(REPO / target.partition("#")[0]).resolve() for target in links(README)}
    for page in PAGES[1:]:
        assert page.resolve() in linked, f"README.md does not link {page.relative_to(REPO)}"


def test_the_largest_k_the_docs_state_for_the_tiny_model_is_the_true_one():
    import sdxl
    import waveft
    stated = [m.group(1) for text in TEXTS.values()
              for m in re.finditer(r"k=2592 on SDXL \(here at most ([\d,]+)", text)]
    assert stated, "no page states the tiny model's largest k"
    largest = int(stated[0].replace(",", ""))
    unet = sdxl.build_tiny_pipeline().unet
    waveft.inject(unet, k=largest)  # every adapted layer takes it
    waveft.remove(unet)
    with pytest.raises(ValueError, match=rf"k={largest + 1} is invalid for layer .*need 1 <= k <= {largest}"):
        waveft.inject(unet, k=largest + 1)  # and one more is refused
    assert all(int(k.replace(",", "")) == largest for k in stated), stated


def test_every_test_the_docs_name_exists():
    """The reading guide points at tests by name: a renamed or deleted test must not leave it pointing nowhere."""
    sources = {path.name: path.read_text() for path in (REPO / "tests").glob("test_*.py")}
    named = {(name, is_file, page) for page, text in TEXTS.items()
             for name, is_file in re.findall(r"\b(test_\w+?)(\.py)?\b", text)}
    assert len({name for name, _, _ in named}) > 10
    for name, is_file, page in named:
        if is_file:
            assert f"{name}.py" in sources, f"{page} names tests/{name}.py, which does not exist"
        else:
            assert any(re.search(rf"^def {name}\(", text, re.M) for text in sources.values()), \
                f"{page} names the test {name}, which no file in tests/ defines"


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


def test_the_line_counts_the_readme_states_are_the_files_own():
    """"Reading the code" gives each core file's and support module's length: a file that grows or shrinks must
    take its number in the README along (the core's budget is part of what the README promises a learner)."""
    stated = dict(re.findall(r"^\| (?:\[)?`(\w+\.py)`(?:\]\([^)]*\))? \|(?: [\d,]+ \|)? ([\d,]+) \|", README, re.M))
    assert {"dwt.py", "waveft.py", "sdxl.py", "train_dreambooth.py", "evaluate.py", "files.py"} <= set(stated)
    for name, lines in stated.items():
        actual = len((REPO / name).read_text().splitlines())
        assert int(lines.replace(",", "")) == actual, f"README says {name} has {lines} lines; it has {actual}"
    core = ["dwt.py", "waveft.py", "sdxl.py", "train_dreambooth.py", "evaluate.py"]
    total = re.search(r"^\| \*\*the core\*\* \| \*\*[\d,]+\*\* \| \*\*([\d,]+)\*\* \|", README, re.M).group(1)
    assert int(total.replace(",", "")) == sum(int(stated[name].replace(",", "")) for name in core)

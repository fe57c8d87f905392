"""The suite's own rules (tests/conftest.py): a missing development requirement (PyWavelets, peft) skips only the tests
that use it, and fails them where CI is set; .ci/run runs README's test command with CI=1."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import need

REPO = Path(__file__).resolve().parent.parent
# A handful of tests from the four files that use a development requirement: each file's tests that need neither
# PyWavelets nor peft, and some that need one of them.
NEITHER = ["test_filters_are_cached_per_dtype_and_device", "test_load_uses_saved_positions",
           "test_save_peft_writes_a_regex_when_a_name_would_match_more_layers"]
NEEDS_ONE = ["test_pywavelets_symlet_tables_are_less_exact", "test_weight_domain_baseline_equals_peft",
             "test_peft_reductions_are_filter_length_minus_two"]
FILES = ["tests/test_dwt.py", "tests/test_waveft.py", "tests/test_interop.py", "tests/test_wavelets_peft.py"]


def pytest_without_pywt_and_peft(tmp_path, files, tests, ci):
    """Start `python -m pytest` on `tests` of `files` in a python where `import pywt` and `import peft` fail
    (sitecustomize puts None into sys.modules, which is how python marks a module as not importable)."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['pywt'] = sys.modules['peft'] = None\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "CI": ci, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # none needed; hypothesis' alone imports for 1-2 s
    argv = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *files, "-k", " or ".join(tests)]
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_missing_pywt_or_peft_skips_only_the_tests_that_use_them_and_fails_under_ci(tmp_path):
    # Both runs at once (each is mostly python and torch starting up). The CI run takes the two files that do not
    # import diffusers: it only has to show that a missing requirement fails there.
    local = pytest_without_pywt_and_peft(tmp_path, FILES, NEITHER + NEEDS_ONE, ci="")
    ci = pytest_without_pywt_and_peft(tmp_path, FILES[::3], NEITHER[:1] + NEEDS_ONE[::2], ci="1")
    out, ci_out = local.communicate(timeout=120)[0], ci.communicate(timeout=120)[0]
    assert local.returncode == 0 and re.search(r"\b3 passed, 3 skipped\b", out), out
    assert "pywt is not installed" in out and "peft is not installed" in out, out  # the skip reasons (-rs)
    assert ci.returncode == 1 and re.search(r"\b1 passed, .*\b2 errors\b", ci_out), ci_out  # the fixtures fail
    assert "pywt is not installed and CI='1'" in ci_out and "peft is not installed and CI='1'" in ci_out, ci_out


@pytest.mark.parametrize("ci, outcome", [("", pytest.skip.Exception), ("0", pytest.skip.Exception),
                                         ("False", pytest.skip.Exception), ("1", pytest.fail.Exception),
                                         ("true", pytest.fail.Exception)])
def test_which_ci_values_turn_a_skip_into_a_failure(monkeypatch, ci, outcome):
    monkeypatch.setitem(sys.modules, "pywt", None)  # as in the runs above: `import pywt` fails
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="pywt is not installed"):
        need("pywt")


def test_ci_script_runs_the_readme_test_command_with_ci_set():
    command = re.search(r"## Tests\n+```bash\n(.*)\n```", (REPO / "README.md").read_text()).group(1)
    assert command == "python -m pytest -q"
    assert (REPO / ".ci" / "run").read_text().splitlines()[-1] == f"CI=1 {command}"

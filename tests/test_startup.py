"""Start-up stays light: the package and the CLI load neither torch nor transformers."""

import subprocess
import sys

import pytest

import gradspec


def run_python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, check=True, timeout=120
    )


@pytest.mark.parametrize(
    "modules",
    [
        "gradspec, gradspec.cli",
        # what `report`, `score`, `flag` and `select` run on
        "gradspec.report, gradspec.quality, gradspec.selection",
    ],
)
def test_importing_loads_no_torch(modules):
    code = (
        f"import sys, {modules}; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    assert run_python("-c", code).stdout.strip() == "[]"


def test_module_help_runs():
    result = run_python("-m", "gradspec", "--help")
    assert "profile" in result.stdout


def test_public_names_resolve_on_first_access():
    from gradspec.engine import profile

    assert gradspec.profile is profile
    assert set(gradspec.__all__) <= set(dir(gradspec))
    assert gradspec.__version__

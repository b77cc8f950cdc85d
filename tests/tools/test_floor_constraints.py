"""tools/floor_constraints.py: setup.py's '>=' floors as exact pins for `make test-floors`."""
from __future__ import annotations

import importlib.util
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from helpers import run_command

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "floor_constraints.py"
_spec = importlib.util.spec_from_file_location("floor_constraints", TOOL)
fc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fc)

SETUP = '''
from setuptools import setup
import sys  # anything else in the file is never run
sys.exit("setup.py was executed")
setup(
    name="x",
    install_requires=[
        "torch>=2.10",
        "transformers>=4.56.2,<6",
        "PyYAML>=6.0",
        "pytest_timeout >= 2.3.1",
        "numpy>=1.26; python_version >= '3.11'",
        "peft[extra]>=0.16,!=0.17.0,<0.22",
    ],
    extras_require={"test": ["pytest>=8"], "other": ["never-read>=1"]},
)
'''


def write_setup(tmp_path, text=SETUP):
    path = tmp_path / "setup.py"
    path.write_text(text, encoding="utf-8")
    return path


def test_each_floor_becomes_one_exact_pin_without_running_setup_py(tmp_path):
    setup = write_setup(tmp_path)
    pins = fc.floor_pins(fc.read_requirements(setup, ["test"]))
    assert pins == {
        "torch": "2.10", "transformers": "4.56.2", "pyyaml": "6.0", "pytest-timeout": "2.3.1",
        "numpy": "1.26", "peft": "0.16", "pytest": "8",
    }
    text = fc.render(pins, "setup.py", transitive=[("numpy<2.4", "a reason")])
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines == ["torch==2.10", "transformers==4.56.2", "pyyaml==6.0", "pytest-timeout==2.3.1",
                     "numpy==1.26", "peft==0.16", "pytest==8", "numpy<2.4"]
    assert "# not required by setup.py, constrained for the floors run: a reason" in text


@pytest.mark.parametrize("requirement, message", [
    ("click", "has no '>=' floor"),
    ("click<9", "has no '>=' floor"),
    ("click>=8.1,>=8.2", "more than one '>=' floor"),
    ("click==8.1", "'==' is not supported"),
    ("click~=8.1", "'~=' is not supported"),
    ("click @ https://example.org/click.whl", "cannot parse requirement"),
])
def test_a_requirement_without_exactly_one_floor_is_refused_by_name(requirement, message):
    with pytest.raises(fc.FloorError, match=re.escape(message)) as error:
        fc.floor_pins([requirement])
    assert repr(requirement) in str(error.value)


def test_one_package_with_two_floors_is_refused():
    with pytest.raises(fc.FloorError, match=r"pytest is required twice with different floors \(8 and 7\.4\)"):
        fc.floor_pins(["pytest>=8", "pytest>=7.4"])


def test_unreadable_setup_py_says_what_to_change(tmp_path):
    setup = write_setup(tmp_path, "from setuptools import setup\nREQS = ['a>=1']\nsetup(install_requires=REQS)\n")
    with pytest.raises(fc.FloorError, match=r"setup.py:3: install_requires must be a literal"):
        fc.read_requirements(setup, [])
    with pytest.raises(fc.FloorError, match=r"no extra 'tests'; setup.py defines \['other', 'test'\]"):
        fc.read_requirements(write_setup(tmp_path), ["tests"])


def test_the_repositorys_setup_py_has_a_floor_for_everything_ci_installs():
    result = run_command([sys.executable, str(TOOL), "--extra", "test", "--extra", "triton"], cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    pinned = {line.split("==")[0] for line in result.stdout.splitlines() if "==" in line and not line.startswith("#")}
    assert {"torch", "transformers", "peft", "pytest", "triton"} <= pinned
    assert "numpy<2.4" in result.stdout.splitlines()


def test_python_requires_admits_the_python_ci_runs():
    # setup.py states only the Python versions CI runs; CI runs this interpreter.
    text = (ROOT / "setup.py").read_text(encoding="utf-8")
    spec = re.search(r'python_requires="([^"]+)"', text).group(1)
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert spec == ">=3.11,<3.12", spec
    assert running == "3.11", f"CI ran Python {running}, which python_requires {spec} does not state"


def test_check_passes_the_installed_versions_and_names_each_one_that_differs(tmp_path, capsys):
    pytest_version = metadata.version("pytest")
    good = tmp_path / "good.txt"
    good.write_text(f"# comment\npytest=={pytest_version}\nnot-a-real-dist<1\n", encoding="utf-8")
    assert fc.main(["--check", str(good)]) == 0
    bad = tmp_path / "bad.txt"
    bad.write_text(f"pytest==0.1\nnot-a-real-dist==1.0\npytest<{pytest_version}\n", encoding="utf-8")
    assert fc.main(["--check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"pytest: {pytest_version} installed, ==0.1 wanted" in err
    assert "not-a-real-dist: not installed, 1.0 pinned" in err
    assert f"pytest: {pytest_version} installed, <{pytest_version} wanted" in err
    assert "make clean-floors test-floors" in err


def test_release_comparison_ignores_trailing_zeros_and_local_labels():
    assert fc._release("2.10") == fc._release("2.10.0+cu128") == fc._release("2.10.0")
    assert fc._release("8") == fc._release("8.0.0")
    assert fc._release("2.3.5") < fc._release("2.4")

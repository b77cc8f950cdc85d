"""Pin every ``>=`` floor of setup.py exactly, for ``make test-floors``.

    python tools/floor_constraints.py [--setup setup.py] [--extra test ...] > constraints.txt
    python tools/floor_constraints.py --check constraints.txt   # in the floors venv

setup.py is read with ``ast``, never executed: ``install_requires`` and the
named extras must be literal lists of strings. Each requirement must have a
``>=`` floor (a range without one is a promise CI cannot test), and the output
has one ``name==floor`` line per requirement, for ``pip install -c``.
Pins on packages setup.py does not name go in ``TRANSITIVE`` below, each with
its reason; they shape the floors run only. ``--check`` compares the installed distributions with such a file and exits 1
naming each one that differs, so a venv left over from other versions cannot
pass as the floors run.

Standard library only: it runs before any venv exists.
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

# name [extras] specifiers [; marker]  (PEP 508 without URLs)
_REQ = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(?P<spec>[^;]*?)\s*(?:;(?P<marker>.*))?$"
)
_CLAUSE = re.compile(r"^\s*(?P<op>~=|===|==|!=|<=|>=|<|>)\s*(?P<version>[^\s,]+)\s*$")


# (constraint, why): for packages setup.py does not require itself.
TRANSITIVE = [
    ("numpy<2.4",
     "triton 3.6 (the one torch 2.10 pins) runs the Triton tests on CPU in its interpreter, which calls "
     "int() on 1-element arrays; numpy 2.4 raises TypeError there. GPUs do not use the interpreter, and "
     "`make test` runs the newest numpy with the newest triton."),
]


class FloorError(ValueError):
    """setup.py's requirements cannot be turned into floor pins; the message says why and the fix."""


def canonical(name: str) -> str:
    """PEP 503 name: ``PyYAML`` -> ``pyyaml``, ``pytest_timeout`` -> ``pytest-timeout``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(setup_path: Path, extras: list[str]) -> list[str]:
    """``install_requires`` plus the named extras, from setup.py's ``setup(...)`` call, unexecuted."""
    tree = ast.parse(setup_path.read_text(encoding="utf-8"), filename=str(setup_path))
    calls = [
        node for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (getattr(node.func, "id", None) == "setup" or getattr(node.func, "attr", None) == "setup")
    ]
    if len(calls) != 1:
        raise FloorError(f"{setup_path}: expected exactly one setup(...) call, found {len(calls)}")
    keywords = {kw.arg: kw.value for kw in calls[0].keywords if kw.arg}

    def literal(key: str):
        if key not in keywords:
            return None
        try:
            return ast.literal_eval(keywords[key])
        except ValueError:
            raise FloorError(
                f"{setup_path}:{keywords[key].lineno}: {key} must be a literal (a list of strings) "
                "so that tools/floor_constraints.py can read it without running setup.py"
            ) from None

    requirements = list(literal("install_requires") or [])
    extras_require = literal("extras_require") or {}
    for extra in extras:
        if extra not in extras_require:
            raise FloorError(f"{setup_path}: no extra {extra!r}; setup.py defines {sorted(extras_require)}")
        requirements += list(extras_require[extra])
    if not all(isinstance(r, str) for r in requirements):
        raise FloorError(f"{setup_path}: requirements must be strings, got {requirements!r}")
    return requirements


def floor_pins(requirements: list[str]) -> dict[str, str]:
    """``{canonical name: floor}``, one per requirement; raises FloorError naming the requirement to fix."""
    pins: dict[str, str] = {}
    for requirement in requirements:
        match = _REQ.match(requirement)
        if not match or "@" in requirement:
            raise FloorError(f"cannot parse requirement {requirement!r} (expected 'name>=floor[,<cap]')")
        name = canonical(match["name"])
        floors = []
        for clause in filter(None, (c.strip() for c in match["spec"].split(","))):
            part = _CLAUSE.match(clause)
            if not part:
                raise FloorError(f"{requirement!r}: cannot parse the version clause {clause!r}")
            if part["op"] == ">=":
                floors.append(part["version"])
            elif part["op"] in ("==", "===", "~=", ">"):
                raise FloorError(
                    f"{requirement!r}: {part['op']!r} is not supported here; state the lowest tested "
                    "version as '>=floor' (and a cap with '<' if needed)"
                )
        if len(floors) != 1:
            raise FloorError(
                f"{requirement!r} has {'no' if not floors else 'more than one'} '>=' floor: give it exactly "
                "one, the lowest version `make test-floors` passes with, since CI tests only that and the newest"
            )
        if name in pins and pins[name] != floors[0]:
            raise FloorError(f"{name} is required twice with different floors ({pins[name]} and {floors[0]})")
        pins[name] = floors[0]
    return pins


def render(pins: dict[str, str], source: str, transitive=TRANSITIVE) -> str:
    lines = [
        f"# Generated from {source} by tools/floor_constraints.py: each '>=' floor, pinned.",
        "# Do not edit; change the floor in setup.py.",
    ]
    lines += [f"{name}=={version}" for name, version in pins.items()]
    for constraint, why in transitive:
        lines += [f"# not required by {source}, constrained for the floors run: {why}", constraint]
    return "\n".join(lines) + "\n"


def _release(version: str) -> tuple:
    """Leading numeric release of a version, zero-padded to compare ``2.10`` with ``2.10.0+cu128``."""
    numbers = [int(n) for n in re.match(r"^\d+(?:\.\d+)*", version).group(0).split(".")]
    while numbers and numbers[-1] == 0:
        numbers.pop()
    return tuple(numbers)


def check_installed(constraints: Path) -> list[str]:
    """Problems (empty when every pin and cap of the file holds here), e.g. 'torch: 2.13.0 installed, ==2.10 wanted'.

    A capped package that is not installed is fine; a pinned one is not."""
    from importlib import metadata

    problems = []
    for line in constraints.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(==|<)\s*(\S+)", line)
        if not match:
            problems.append(f"{constraints}: cannot check {line!r} (only 'name==version' and 'name<version')")
            continue
        name, op, version = match.groups()
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            if op == "==":
                problems.append(f"{name}: not installed, {version} pinned")
            continue
        ok = _release(installed) == _release(version) if op == "==" else _release(installed) < _release(version)
        if not ok:
            problems.append(f"{name}: {installed} installed, {op}{version} wanted")
        else:
            print(f"  {name} {installed} ({op}{version})")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", type=Path, default=Path(__file__).resolve().parents[1] / "setup.py")
    parser.add_argument("--extra", action="append", default=None,
                        help="an extra whose requirements to include; repeat for several (default: test)")
    parser.add_argument("--check", type=Path, metavar="CONSTRAINTS",
                        help="verify this interpreter's installed versions against a generated file")
    args = parser.parse_args(argv)
    if args.check:
        print(f"installed floors ({args.check}):")
        problems = check_installed(args.check)
        for problem in problems:
            print(f"error: {problem}; rebuild the floors venv (make clean-floors test-floors)", file=sys.stderr)
        return 1 if problems else 0
    try:
        pins = floor_pins(read_requirements(args.setup, args.extra or ["test"]))
    except FloorError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    sys.stdout.write(render(pins, args.setup.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Check ``torch_npu_api``'s calls into torch_npu against a torch_npu wheel,
without importing torch_npu (it cannot import without CANN).

The wheel is read as files, from its unpacked folder:

- operators (``torch_npu.<op>``, exported from ``torch.ops.npu``): their schemas,
  the ``custom`` entries of ``torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml``
  (``npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor)``);
- the Python API (``torch_npu.npu.set_device``, ``torch_npu.profiler.profile``, ...):
  the ``def``/``class`` it names, found by following the package's ``__init__``
  imports (``from .utils import set_device``, ``from .npu_config import *``) through
  its ``.py`` files with ``ast``. A name bound from the C extension
  (``from torch_npu._C._profiler import ProfilerActivity``) has no Python source:
  a member of it (``ProfilerActivity.NPU``) counts as present only where the
  wheel's own Python code uses that member too.

A call site is any expression in the checked source rooted at ``_torch_npu()``
(``torch_npu_api``'s convention): ``_torch_npu().npu.set_device(index)``,
``_torch_npu().npu_rms_norm(x, gamma, epsilon=epsilon)``, or an attribute read
(``_torch_npu().__version__``, ``hasattr(_torch_npu(), "npu_swiglu")``). For each:

- the name exists;
- calls: no more positional arguments than the callee takes positionally, every
  keyword is one of its parameters (not positional-only), none given twice, and
  every parameter without a default is given;
- operators: the outputs used match the schema's outputs. A tuple-returning
  operator's result must be unpacked into exactly as many names as it returns,
  indexed within range, or sliced (``[:k]``, ``k`` at most the count, and an
  unpacking of the slice must take ``k`` names); a single-Tensor operator's result
  must not be indexed or unpacked (that would index the tensor, not pick an output).

``check_source(source, wheel)`` returns the problems (empty when all is well);
``call_sites(source)`` lists what was found.
"""
from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

ROOT_CALL = "_torch_npu"
SCHEMA_FILE = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"

# ----------------------------------------------------------------- signatures


@dataclass(frozen=True)
class Param:
    name: str
    kind: str              # "positional_only" | "positional" (or keyword) | "keyword_only"
    has_default: bool
    default: object = None
    type: str = ""         # schema type ("Tensor", "float", "int[]", "Tensor?") or ""


@dataclass(frozen=True)
class Signature:
    name: str
    params: Tuple[Param, ...]
    varargs: bool = False
    varkw: bool = False
    outputs: Optional[int] = None   # operators: how many outputs; 1 for a single Tensor; None: not an operator
    tuple_return: bool = False      # operators: returns a tuple
    where: str = ""                 # "schema" or "path/to/file.py:line"

    def check_call(self, n_positional: int, keywords: Sequence[str], starred: bool) -> List[str]:
        """What is wrong with calling this with ``n_positional`` positional
        arguments and these keyword names (nothing about types)."""
        problems = []
        positional = [p for p in self.params if p.kind in ("positional_only", "positional")]
        if n_positional > len(positional) and not self.varargs and not starred:
            problems.append(f"{n_positional} positional arguments, but {self.name} takes at most "
                            f"{len(positional)} ({', '.join(p.name for p in positional)})")
        by_name = {p.name: p for p in self.params}
        bound = {p.name for p in positional[:n_positional]}
        for kw in keywords:
            param = by_name.get(kw)
            if param is None or param.kind == "positional_only":
                if not self.varkw:
                    names = [p.name for p in self.params if p.kind != "positional_only"]
                    problems.append(f"keyword {kw!r} is not a parameter of {self.name} "
                                    f"(keyword parameters: {', '.join(names) or 'none'})")
                continue
            if kw in bound:
                problems.append(f"{kw!r} is given both by position and by keyword")
            bound.add(kw)
        if not starred:
            missing = [p.name for p in self.params if not p.has_default and p.name not in bound]
            if missing:
                problems.append(f"{self.name} needs {', '.join(missing)}, which the call does not give")
        return problems

    def bind(self, args: Sequence[object], kwargs: Dict[str, object]) -> Dict[str, object]:
        """``{parameter: value}`` with defaults filled, as the real operator
        binds a call; TypeError for what it would refuse."""
        problems = self.check_call(len(args), list(kwargs), starred=False)
        if problems:
            raise TypeError(f"{self.name}(): " + "; ".join(problems))
        positional = [p for p in self.params if p.kind in ("positional_only", "positional")]
        out = {p.name: a for p, a in zip(positional, args)}
        out.update(kwargs)
        for p in self.params:
            out.setdefault(p.name, p.default)
        return out


def _split_top(text: str) -> List[str]:
    """Split at commas outside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur).strip())
    return parts


def _default(text: str) -> object:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a schema constant such as Mean or contiguous_format


_SCHEMA = re.compile(r"^\s*(?P<name>[\w.]+)\((?P<args>.*)\)\s*->\s*(?P<ret>.+?)\s*$")


def parse_schema(schema: str) -> Signature:
    """A native-functions schema line as a :class:`Signature` (the overload
    suffix is dropped from the name)."""
    match = _SCHEMA.match(schema)
    if not match:
        raise ValueError(f"not an operator schema: {schema!r}")
    params, keyword_only = [], False
    for part in _split_top(match.group("args")):
        if part == "*":
            keyword_only = True
            continue
        decl, sep, default = part.partition("=")
        type_, _, name = decl.strip().rpartition(" ")
        params.append(Param(name, "keyword_only" if keyword_only else "positional", bool(sep),
                            _default(default.strip()) if sep else None, type_.strip()))
    ret = match.group("ret").strip()
    if ret.startswith("(") and ret.endswith(")"):
        outputs, tuple_return = len(_split_top(ret[1:-1])), True
    else:
        outputs, tuple_return = 1, False
    return Signature(match.group("name").split(".")[0], tuple(params), outputs=outputs,
                     tuple_return=tuple_return, where="schema")


def _python_signature(name: str, fn: ast.AST, where: str, drop_self: bool) -> Signature:
    args = fn.args  # type: ignore[attr-defined]
    positional = [(a, "positional_only") for a in args.posonlyargs] + [(a, "positional") for a in args.args]
    if drop_self and positional:
        positional = positional[1:]
    n_defaults = len(args.defaults)
    params = []
    for i, (arg, kind) in enumerate(positional):
        has_default = i >= len(positional) - n_defaults
        params.append(Param(arg.arg, kind, has_default))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        params.append(Param(arg.arg, "keyword_only", default is not None))
    return Signature(name, tuple(params), varargs=args.vararg is not None, varkw=args.kwarg is not None, where=where)


# ----------------------------------------------------------------- the wheel


@dataclass(frozen=True)
class Found:
    """What a dotted name resolves to in the wheel."""

    kind: str                       # "operator" | "function" | "class" | "value" | "module" | "c_extension"
    where: str
    signature: Optional[Signature] = None


class Wheel:
    """An unpacked torch_npu wheel (the folder holding ``torch_npu/``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.package = self.root / "torch_npu"
        if not (self.root / SCHEMA_FILE).is_file():
            raise FileNotFoundError(f"{self.root} holds no {SCHEMA_FILE}: not an unpacked torch_npu wheel")
        self.schemas = self._load_schemas()
        self._trees: Dict[Path, ast.Module] = {}

    def _load_schemas(self) -> Dict[str, Signature]:
        import yaml

        data = yaml.safe_load((self.root / SCHEMA_FILE).read_text(encoding="utf-8"))
        schemas: Dict[str, Signature] = {}
        for entry in data["custom"]:  # the torch.ops.npu namespace, which torch_npu exports as torch_npu.<op>
            func = entry["func"] if isinstance(entry, dict) else entry
            name = func.split("(")[0]
            if "." in name:
                continue  # an overload (npu_format_cast.Tensor); calls resolve to the base overload
            schemas[name] = parse_schema(func)
        return schemas

    def schema_line(self, op: str) -> Optional[str]:
        """The schema text of operator ``op``, as the yaml has it."""
        for line in (self.root / SCHEMA_FILE).read_text(encoding="utf-8").splitlines():
            stripped = line.strip().removeprefix("- ").removeprefix("func: ")
            if stripped.startswith(op + "("):
                return stripped
        return None

    def _tree(self, path: Path) -> ast.Module:
        if path not in self._trees:
            self._trees[path] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        return self._trees[path]

    def _module_file(self, dotted: str) -> Optional[Path]:
        base = self.root.joinpath(*dotted.split("."))
        if (base / "__init__.py").is_file():
            return base / "__init__.py"
        if base.with_suffix(".py").is_file():
            return base.with_suffix(".py")
        return None

    def _rel(self, path: Path, node: ast.AST) -> str:
        return f"{path.relative_to(self.root)}:{getattr(node, 'lineno', 0)}"

    def resolve(self, path: Sequence[str]) -> Optional[Found]:
        """``torch_npu.<path>``, or None when the wheel has no such name."""
        if len(path) == 1 and path[0] in self.schemas:
            return Found("operator", "schema", self.schemas[path[0]])
        self._asked = tuple(path)
        return self._resolve_in_module("torch_npu", list(path), depth=0)

    def _resolve_in_module(self, module: str, path: List[str], depth: int) -> Optional[Found]:
        if depth > 20:
            return None
        if not path:
            return Found("module", module)
        file = self._module_file(module)
        if file is None:
            return None
        name, rest = path[0], path[1:]
        tree = self._tree(file)
        star_modules: List[str] = []
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                if rest:
                    return None
                return Found("function", self._rel(file, node), _python_signature(name, node, self._rel(file, node), False))
            if isinstance(node, ast.ClassDef) and node.name == name:
                return self._resolve_in_class(file, node, rest)
            if isinstance(node, ast.ImportFrom):
                source = self._absolute(module, file, node)
                for alias in node.names:
                    if alias.name == "*":
                        star_modules.append(source)
                    elif (alias.asname or alias.name) == name:
                        if source.startswith("torch_npu._C"):
                            return self._c_extension(rest, self._rel(file, node))
                        if self._module_file(f"{source}.{alias.name}") is not None:
                            return self._resolve_in_module(f"{source}.{alias.name}", rest, depth + 1)
                        return self._resolve_in_module(source, [alias.name] + rest, depth + 1)
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets) and not rest:
                    return Found("value", self._rel(file, node))
        for source in star_modules:
            found = self._resolve_in_module(source, [name] + rest, depth + 1)
            if found is not None:
                return found
        if self._module_file(f"{module}.{name}") is not None and file.name == "__init__.py":
            return self._resolve_in_module(f"{module}.{name}", rest, depth + 1)
        return None

    def _absolute(self, module: str, file: Path, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        package = module.split(".") if file.name == "__init__.py" else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        return ".".join(package + ([node.module] if node.module else []))

    def _resolve_in_class(self, file: Path, cls: ast.ClassDef, rest: List[str]) -> Optional[Found]:
        where = self._rel(file, cls)
        if not rest:
            init = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
            signature = _python_signature(cls.name, init, self._rel(file, init), True) if init is not None else None
            return Found("class", where, signature)
        if len(rest) == 1:
            for node in cls.body:
                if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == rest[0] for t in node.targets):
                    return Found("value", self._rel(file, node))
                if isinstance(node, ast.FunctionDef) and node.name == rest[0]:
                    return Found("function", self._rel(file, node), _python_signature(rest[0], node, self._rel(file, node), True))
        return None

    def _c_extension(self, rest: List[str], where: str) -> Optional[Found]:
        """A name bound from the C extension: a member of it counts as present only
        where the wheel's own Python code reads it by the same full name
        (``torch_npu.profiler.ProfilerActivity.NPU``)."""
        if not rest:
            return Found("c_extension", where)
        needle = ".".join(("torch_npu",) + self._asked)
        for py in sorted(self.package.rglob("*.py")):
            text = py.read_text(encoding="utf-8", errors="replace")
            index = text.find(needle)
            if index >= 0 and not text[index + len(needle): index + len(needle) + 1].isidentifier():
                line = text.count("\n", 0, index) + 1
                return Found("c_extension", f"{py.relative_to(self.root)}:{line} (used there; defined in the C extension)")
        return None


# ----------------------------------------------------------------- call sites


@dataclass(frozen=True)
class CallSite:
    path: Tuple[str, ...]                 # ("npu", "set_device")
    line: int
    text: str                             # the source of the expression
    is_call: bool
    n_positional: int = 0
    keywords: Tuple[str, ...] = ()
    starred: bool = False
    # how the result is used: ("whole",) | ("index", k) | ("slice", k) | ("unpack", m) | ("slice_unpack", k, m)
    use: Tuple = ("whole",)

    @property
    def name(self) -> str:
        return "torch_npu." + ".".join(self.path)


def _chain(node: ast.AST) -> Optional[List[str]]:
    """``_torch_npu().a.b`` -> ["a", "b"]; None when ``node`` is not rooted at ``_torch_npu()``."""
    names: List[str] = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == ROOT_CALL and not node.args:
        return names[::-1]
    return None


def _parents(tree: ast.AST) -> Dict[ast.AST, ast.AST]:
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    return parents


def _use(call: ast.Call, parents: Dict[ast.AST, ast.AST]) -> Tuple:
    parent = parents.get(call)
    if isinstance(parent, ast.Subscript) and parent.value is call:
        sl = parent.slice
        if isinstance(sl, ast.Constant) and isinstance(sl.value, int):
            return ("index", sl.value)
        if isinstance(sl, ast.UnaryOp) and isinstance(sl.op, ast.USub) and isinstance(sl.operand, ast.Constant):
            return ("index", -sl.operand.value)
        if (isinstance(sl, ast.Slice) and sl.step is None and isinstance(sl.upper, ast.Constant)
                and (sl.lower is None or (isinstance(sl.lower, ast.Constant) and sl.lower.value == 0))):
            grand = parents.get(parent)
            if isinstance(grand, ast.Assign) and isinstance(grand.targets[0], ast.Tuple):
                return ("slice_unpack", sl.upper.value, len(grand.targets[0].elts))
            return ("slice", sl.upper.value)
        return ("subscript", ast.unparse(sl))
    if isinstance(parent, ast.Assign) and len(parent.targets) == 1 and isinstance(parent.targets[0], ast.Tuple):
        return ("unpack", len(parent.targets[0].elts))
    return ("whole",)


def call_sites(source: str) -> List[CallSite]:
    """Every use of ``_torch_npu()`` in ``source``, outermost expression first."""
    tree = ast.parse(source)
    parents = _parents(tree)
    sites: List[CallSite] = []
    for node in ast.walk(tree):
        # hasattr(_torch_npu().x, "name") / getattr(..., "name"[, default])
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr")
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
            base = _chain(node.args[0])
            if base is not None:
                sites.append(CallSite(tuple(base + [node.args[1].value]), node.lineno, ast.unparse(node), False))
            continue
        if not isinstance(node, ast.Attribute):
            continue
        path = _chain(node)
        parent = parents.get(node)
        if path is None or isinstance(parent, ast.Attribute):
            continue  # not rooted at _torch_npu(), or not the outermost attribute of its chain
        if isinstance(parent, ast.Call) and parent.func is node:
            positional = [a for a in parent.args if not isinstance(a, ast.Starred)]
            starred = len(positional) != len(parent.args) or any(k.arg is None for k in parent.keywords)
            sites.append(CallSite(tuple(path), node.lineno, ast.unparse(parent), True, len(positional),
                                  tuple(k.arg for k in parent.keywords if k.arg is not None), starred,
                                  _use(parent, parents)))
        elif isinstance(parent, ast.Call) and node in parent.args and isinstance(parent.func, ast.Name) \
                and parent.func.id in ("hasattr", "getattr"):
            continue  # the base of hasattr/getattr, reported with its name above
        else:
            sites.append(CallSite(tuple(path), node.lineno, ast.unparse(node), False))
    return sorted(sites, key=lambda s: (s.line, s.text))


def torch_npu_imports(source: str) -> List[Tuple[int, str]]:
    """``(line, code)`` of every way ``source`` could get hold of the torch_npu
    module itself: ``import torch_npu``, ``from torch_npu... import``, or the string
    ``"torch_npu"`` (``importlib.import_module("torch_npu")``,
    ``sys.modules["torch_npu"]``, ``__import__``). Outside ``torch_npu_api`` this
    list must be empty, which is what keeps the call sites a closed list."""
    def names_module(node: ast.AST) -> bool:
        return (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and (node.value == "torch_npu" or node.value.startswith("torch_npu.")))

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "torch_npu" for a in node.names):
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch_npu" and not node.level:
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Call) and any(names_module(a) for a in node.args):
            func = ast.unparse(node.func)  # import_module, __import__, find_spec, sys.modules.get, ...
            if any(word in func for word in ("import", "find_spec", "modules")):
                found.append((node.lineno, ast.unparse(node)))
        elif (isinstance(node, ast.Subscript) and names_module(node.slice)
              and ast.unparse(node.value).endswith("modules")):  # sys.modules["torch_npu"]
            found.append((node.lineno, ast.unparse(node)))
    return found


# ----------------------------------------------------------------- checking


@dataclass(frozen=True)
class Problem:
    site: CallSite
    message: str

    def __str__(self) -> str:
        return f"line {self.site.line}: {self.site.text}: {self.message}"


def _check_outputs(site: CallSite, sig: Signature) -> List[str]:
    n, use = sig.outputs, site.use
    assert n is not None
    kind = use[0]
    if not sig.tuple_return:
        if kind != "whole":
            return [f"{sig.name} returns one Tensor, but the call's result is used as {use}: that indexes "
                    f"the tensor, not an output"]
        return []
    if kind == "whole":
        return [f"{sig.name} returns {n} outputs; the call uses its result whole: unpack it or index it, "
                f"so that the outputs used can be checked"]
    if kind == "index" and not -n <= use[1] < n:
        return [f"output [{use[1]}] of {sig.name}, which returns {n} outputs"]
    if kind == "unpack" and use[1] != n:
        return [f"unpacks {use[1]} outputs of {sig.name}, which returns {n}"]
    if kind in ("slice", "slice_unpack") and use[1] > n:
        return [f"takes outputs [:{use[1]}] of {sig.name}, which returns {n}"]
    if kind == "slice_unpack" and use[2] != min(use[1], n):
        return [f"unpacks {use[2]} names from outputs [:{use[1]}] of {sig.name}"]
    if kind == "subscript":
        return [f"indexes the outputs of {sig.name} with {use[1]!r}, which cannot be checked"]
    return []


def check_site(site: CallSite, wheel: Wheel) -> List[str]:
    found = wheel.resolve(site.path)
    if found is None:
        return [f"{site.name} is not in this torch_npu (neither an operator schema nor a Python name)"]
    if not site.is_call:
        return []
    if found.kind in ("module", "value"):
        return [f"{site.name} is a {found.kind} ({found.where}), not something to call"]
    if found.signature is None:
        return [f"{site.name} ({found.kind} at {found.where}): its parameters cannot be read from the wheel's "
                f"Python sources"]
    problems = found.signature.check_call(site.n_positional, site.keywords, site.starred)
    if found.kind == "operator":
        problems += _check_outputs(site, found.signature)
    return problems


def check_source(source: str, wheel: Wheel) -> List[Problem]:
    """Every problem of every call site in ``source`` (empty: all agree with the wheel)."""
    return [Problem(site, message) for site in call_sites(source) for message in check_site(site, wheel)]


def report(source: str, wheel: Wheel) -> Iterable[str]:
    for site in call_sites(source):
        found = wheel.resolve(site.path)
        problems = check_site(site, wheel)
        status = "ok" if not problems else "FAIL"
        where = f"{found.kind} {found.where}" if found else "missing"
        yield f"{status:4} line {site.line:3} {site.name} [{where}]" + ("".join(f"\n       {p}" for p in problems))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m npu_rft_kernels.torch_npu_check UNPACKED_WHEEL_DIR``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print(main.__doc__)
        return 2
    from npu_rft_kernels import torch_npu_api

    wheel = Wheel(Path(args[0]))
    source = Path(torch_npu_api.__file__).read_text(encoding="utf-8")
    lines = list(report(source, wheel))
    print("\n".join(lines))
    return 0 if not check_source(source, wheel) else 1


if __name__ == "__main__":
    raise SystemExit(main())

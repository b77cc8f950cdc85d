"""``npu-rft doctor``: check that this machine can run npu-rft, and say how to fix what is wrong.

``run_doctor()`` returns a :class:`Report` of :class:`Check` s, each with a
status: ``ok``, ``info`` (a fact, nothing to do), ``warn`` (works, but not as
well as it could) or ``error`` (a run would fail). Only errors make the command
exit non-zero.

torch is not imported at module level. Where torch_npu is installed without a
working CANN, torch's device-backend autoload makes ``import torch`` itself
raise; doctor first imports torch in a child process, and only when that works
imports it here. Everything that does not need torch (versions from package
metadata, CANN files, the triton installation) is reported either way.

What is read:

- package versions: ``importlib.metadata`` (no import of the package);
- the CANN version: ``<root>/<arch>-linux/ascend_toolkit_install.info`` (its
  ``version=`` line), else ``<root>/version.cfg`` (the CANN version after the
  colon of ``toolkit_running_version=[inner:cann]``), where ``<root>`` is
  ``$ASCEND_TOOLKIT_HOME``, ``$ASCEND_HOME_PATH``, then the default install
  paths ``/usr/local/Ascend/ascend-toolkit/latest`` and ``/usr/local/Ascend/cann``;
- triton: the installed distributions ``triton`` and ``triton-ascend``, and
  whether the ``triton`` package on disk has the Ascend backend
  (``triton/backends/ascend``).
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

STATUSES = ("ok", "info", "warn", "error")

AUTOLOAD_ENV = "TORCH_DEVICE_BACKEND_AUTOLOAD"
CANN_ROOT_ENVS = ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH")
CANN_DEFAULT_ROOTS = ("/usr/local/Ascend/ascend-toolkit/latest", "/usr/local/Ascend/cann")
SET_ENV_HINT = "source /usr/local/Ascend/ascend-toolkit/set_env.sh (or <install path>/set_env.sh)"

# Environment variables worth showing in a report when they are set.
REPORTED_ENV = (
    "NPU_RFT_DEVICE", AUTOLOAD_ENV, "ASCEND_RT_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES",
    "PYTORCH_NPU_ALLOC_CONF", "ASCEND_LAUNCH_BLOCKING", "HCCL_DETERMINISTIC", "HCCL_CONNECT_TIMEOUT",
    "HCCL_EXEC_TIMEOUT", "HCCL_IF_IP", "HCCL_SOCKET_IFNAME", "TRITON_INTERPRET",
)


@dataclass(frozen=True)
class Check:
    name: str
    status: str            # ok | info | warn | error
    detail: str
    fix: Optional[str] = None
    trace: Optional[str] = None   # the full exception chain behind an error (shown with --verbose)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"check {self.name!r}: status {self.status!r} is not one of {STATUSES}")


@dataclass
class Report:
    checks: List[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True unless some check is an error."""
        return all(c.status != "error" for c in self.checks)

    def to_dict(self) -> Dict[str, Any]:
        checks = [{k: v for k, v in dataclasses.asdict(c).items() if k != "trace" or v is not None}
                  for c in self.checks]
        return {"ok": self.ok, "checks": checks}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format_text(self, verbose: bool = False) -> str:
        """The report; ``verbose`` adds the full exception chain behind each error
        that has one (else a line says that ``--verbose`` shows it)."""
        lines = []
        for c in self.checks:
            lines.append(f"[{c.status:^5}] {c.name}: {c.detail}")
            if c.fix:
                lines.append(f"        fix: {c.fix}")
            if c.trace and verbose:
                lines.append("        the full exception chain:")
                lines.extend(f"        | {line}" for line in c.trace.rstrip().splitlines())
            elif c.trace:
                lines.append("        (`npu-rft doctor --verbose` shows the full exception chain)")
        errors = sum(c.status == "error" for c in self.checks)
        warnings = sum(c.status == "warn" for c in self.checks)
        lines.append(f"{errors} error(s), {warnings} warning(s)")
        return "\n".join(lines)


# ----------------------------------------------------------------- versions


def base_version(version: str) -> Tuple[int, int, int]:
    """The leading ``major.minor.patch`` of a version string, as ints.

    ``"2.12.0.post3" -> (2, 12, 0)``, ``"2.13.0+cpu" -> (2, 13, 0)``,
    ``"2.1.0rc1" -> (2, 1, 0)``, ``"2.5" -> (2, 5, 0)``.
    """
    match = re.match(r"\d+(?:\.\d+)*", version.strip())
    if not match:
        raise ValueError(f"cannot read a version number from {version!r}")
    parts = [int(p) for p in match.group(0).split(".")][:3]
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]


def versions_match(torch_version: str, torch_npu_version: str) -> bool:
    """torch_npu is built for one torch release: the base versions must be equal
    (torch-npu ``2.12.0.post3`` goes with torch ``2.12.0``)."""
    return base_version(torch_version) == base_version(torch_npu_version)


def installed_distributions() -> Dict[str, str]:
    """``{normalised name: version}`` of installed distributions (``torch_npu`` -> ``torch-npu``)."""
    found: Dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(re.sub(r"[-_.]+", "-", name).lower(), dist.version)
    return found


def find_cann(env: Mapping[str, str] = os.environ) -> Tuple[Optional[str], Optional[str], List[str]]:
    """``(version, file it was read from, roots searched)``; version None when not found."""
    roots = [env[name] for name in CANN_ROOT_ENVS if env.get(name)] + list(CANN_DEFAULT_ROOTS)
    searched: List[str] = []
    for root in dict.fromkeys(roots):
        searched.append(root)
        for info in sorted(glob.glob(os.path.join(root, "*-linux", "ascend_toolkit_install.info"))):
            version = _read_key(info, "version")
            if version:
                return version, info, searched
        cfg = os.path.join(root, "version.cfg")
        running = _read_key(cfg, "toolkit_running_version")
        if running:
            # "[7.6.0.1.220:8.0.0]": inner version, colon, CANN version
            return running.strip("[]").split(":")[-1], cfg, searched
    return None, None, searched


def _read_key(path: str, key: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                name, sep, value = line.partition("=")
                if sep and name.strip() == key:
                    return value.strip()
    except OSError:
        return None
    return None


# ----------------------------------------------------------------- importing torch


@dataclass(frozen=True)
class TorchImport:
    ok: bool
    version: Optional[str] = None
    error: Optional[str] = None
    # the exception and what caused it, outermost first: ((type name, message), ...)
    chain: Tuple[Tuple[str, str], ...] = ()
    traceback: Optional[str] = None  # the formatted exception chain


_PROBE_CODE = """
import json, traceback
try:
    import torch
except BaseException as exc:
    chain, seen = [], exc
    while seen is not None and len(chain) < 20:
        chain.append([type(seen).__name__, str(seen)])
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}", "chain": chain,
                      "traceback": "".join(traceback.format_exception(exc))}))
else:
    print(json.dumps({"ok": True, "version": torch.__version__}))
"""


def probe_torch_import(python: str = sys.executable, extra_env: Optional[Mapping[str, str]] = None,
                       timeout_s: float = 300.0) -> TorchImport:
    """Import torch in a child process (so a failing import leaves this one clean)."""
    env = dict(os.environ, **(extra_env or {}))
    try:
        proc = subprocess.run([python, "-c", _PROBE_CODE], env=env, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return TorchImport(False, error=f"`import torch` did not finish in {timeout_s:.0f} s")
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        try:
            result = json.loads(lines[-1])
            return TorchImport(result["ok"], result.get("version"), result.get("error"),
                               tuple(tuple(link) for link in result.get("chain", ())), result.get("traceback"))
        except (ValueError, KeyError):
            pass
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return TorchImport(False, error=f"`import torch` exited with code {proc.returncode}: {' | '.join(tail)}")


# torch_npu 2.13.0's own words (torch_npu/__init__.py, _check_device_conflict) when
# torch is a build for another accelerator: "Two accelerators cannot be used at the
# same time in PyTorch: npu and cuda. You can install the cpu version of PyTorch ..."
TWO_ACCELERATORS = "Two accelerators cannot be used at the same time"
_TWO_ACCELERATORS_RE = re.compile(TWO_ACCELERATORS + r" in PyTorch: npu and (\w+)")
# A shared library the loader could not find: "libhccl.so: cannot open shared object file"
_MISSING_LIBRARY_RE = re.compile(r"(lib[\w.+-]+?\.so(?:\.[\d.]+)?): cannot open shared object file")
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _sentence(text: str) -> str:
    """``text``'s first line, ending in a full stop."""
    line = _first_line(text).rstrip()
    return line if line.endswith((".", "!", "?")) else line + "."


def explain_torch_npu_failure(chain: Sequence[Tuple[str, str]], dists: Mapping[str, str]
                              ) -> Optional[Tuple[str, str]]:
    """``(root cause, fix)`` for a failed ``import torch``/``import torch_npu`` whose
    exception chain (outermost first) shows one of torch_npu's known failures, else None:

    - torch_npu's "Two accelerators cannot be used at the same time ... npu and cuda":
      torch is a CUDA (or other accelerator) build; the CPU build must come first;
    - an ``ImportError`` for a missing shared library (``libhccl.so``, ``libascendcl.so``,
      ...): the CANN libraries that torch_npu's extension links against are not
      found (CANN not installed, or its set_env.sh not sourced).
    """
    npu_version = dists.get("torch-npu")
    torch_version = dists.get("torch")
    for type_name, message in chain:
        match = _TWO_ACCELERATORS_RE.search(message)
        if match or TWO_ACCELERATORS in message:
            other = match.group(1) if match else "another accelerator"
            wanted = ".".join(map(str, base_version(npu_version))) if npu_version else "<torch_npu's torch version>"
            cause = (f"{type_name}: {_sentence(message)} This torch ({torch_version or 'installed'}) is a build for "
                     f"{other}, and torch_npu refuses to load beside a second accelerator")
            fix = (f"install the CPU build of torch before torch_npu: `pip uninstall -y torch && pip install "
                   f"torch=={wanted} --index-url {CPU_TORCH_INDEX} && pip install torch-npu=={npu_version or wanted}` "
                   f"(a plain `pip install torch torch-npu` on x86 gives the CUDA build). To use the {other} device "
                   f"here instead: `pip uninstall torch-npu`, or {AUTOLOAD_ENV}=0")
            return cause, fix
    for type_name, message in chain:
        match = _MISSING_LIBRARY_RE.search(message)
        if match:
            library = match.group(1)
            cause = (f"{type_name}: {_sentence(message)} {library} is a CANN library that torch_npu's extension "
                     f"needs: CANN is not installed, or its set_env.sh was not sourced in this shell")
            fix = (f"install the CANN toolkit matching torch_npu {npu_version or ''} and `{SET_ENV_HINT}` in every "
                   f"shell that runs npu-rft; if this machine has no NPU, `pip uninstall torch-npu`. Meanwhile "
                   f"{AUTOLOAD_ENV}=0 lets torch import without the NPU backend").replace("  ", " ")
            return cause, fix
    return None


def check_torch_import(result: TorchImport, dists: Mapping[str, str],
                       probe: Callable[..., TorchImport]) -> Check:
    """The torch import, explained when it fails (``probe`` retries without autoload).
    The detail names the root cause (the innermost exception, which torch's
    "Failed to load the backend extension" wraps) and the fix; the full chain
    goes to ``trace`` (``--verbose``)."""
    if result.ok:
        return Check("torch import", "ok", f"torch {result.version} imports")
    detail = f"`import torch` fails: {_sentence(result.error or '')}"
    chain = list(result.chain) or ([tuple(result.error.split(": ", 1))] if result.error and ": " in result.error else [])
    explained = explain_torch_npu_failure(chain, dists) if "torch-npu" in dists else None
    if explained is not None:
        detail += f" Root cause: {explained[0]}."
    elif len(chain) > 1:
        detail += f" Root cause: {chain[-1][0]}: {_sentence(chain[-1][1])}"
    if "torch-npu" in dists:
        without_autoload = probe(extra_env={AUTOLOAD_ENV: "0"})
        if without_autoload.ok:
            detail += (f" With {AUTOLOAD_ENV}=0 torch imports, so the failure comes from the "
                       f"torch_npu {dists['torch-npu']} backend that torch loads automatically.")
        fix = explained[1] if explained is not None else (
            f"torch_npu is installed and fails to load; if CANN is missing or not set up: install CANN and "
            f"`{SET_ENV_HINT}`, or `pip uninstall torch-npu`. Meanwhile {AUTOLOAD_ENV}=0 lets "
            f"torch import without the NPU backend")
    else:
        fix = "reinstall torch (`pip install --force-reinstall torch==<version>`); see the error above"
    return Check("torch import", "error", detail, fix, trace=result.traceback)


def exception_chain(exc: BaseException) -> Tuple[Tuple[str, str], ...]:
    """``((type name, message), ...)`` of ``exc`` and what caused it, outermost first."""
    chain: List[Tuple[str, str]] = []
    seen: Optional[BaseException] = exc
    while seen is not None and len(chain) < 20:
        chain.append((type(seen).__name__, str(seen)))
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return tuple(chain)


def check_torch_npu_import(dists: Mapping[str, str]) -> Check:
    """``import torch_npu`` in this process, once torch imports (through
    ``npu_rft_kernels.torch_npu_api``): where autoload is off
    (TORCH_DEVICE_BACKEND_AUTOLOAD=0), torch imports and torch_npu's own failure
    shows only here; explained like the torch import."""
    import traceback

    from npu_rft_kernels import torch_npu_api

    _, exc = torch_npu_api.try_import()
    if exc is None:
        return Check("torch_npu import", "ok", f"torch_npu {torch_npu_api.version()} imports")
    chain = exception_chain(exc)
    explained = explain_torch_npu_failure(chain, dists)
    if explained is not None and len(chain) == 1:  # the failure itself is the root cause
        detail = f"`import torch_npu` fails: {explained[0]}."
    else:
        detail = f"`import torch_npu` fails: {type(exc).__name__}: {_sentence(str(exc))}"
    if explained is not None and len(chain) > 1:
        detail += f" Root cause: {explained[0]}."
    elif explained is None and len(chain) > 1:
        detail += f" Root cause: {chain[-1][0]}: {_sentence(chain[-1][1])}"
    fix = explained[1] if explained is not None else (
        "reinstall torch_npu built for this torch, with the CANN its release notes name; the full chain shows "
        "what failed")
    return Check("torch_npu import", "error", detail, fix, trace="".join(traceback.format_exception(exc)))


# ----------------------------------------------------------------- checks without torch


def check_python() -> Check:
    return Check("python", "info", f"{platform.python_version()} ({sys.executable})")


def check_torch_npu_versions(dists: Mapping[str, str]) -> List[Check]:
    if "torch-npu" not in dists:
        return [Check("torch_npu", "info", "not installed (needed only for Ascend NPUs)")]
    npu_version = dists["torch-npu"]
    checks = [Check("torch_npu", "info", npu_version)]
    torch_version = dists.get("torch")
    if torch_version is None:
        checks.append(Check("torch/torch_npu match", "error", f"torch_npu {npu_version} is installed without torch",
                            f"pip install torch=={'.'.join(map(str, base_version(npu_version)))}"))
    elif versions_match(torch_version, npu_version):
        checks.append(Check("torch/torch_npu match", "ok", f"torch {torch_version} with torch_npu {npu_version}"))
    else:
        wanted = ".".join(map(str, base_version(npu_version)))
        checks.append(Check(
            "torch/torch_npu match", "error",
            f"torch {torch_version} with torch_npu {npu_version}: torch_npu is built for torch {wanted}",
            f"pip install torch=={wanted}, or the torch-npu release built for torch {torch_version}",
        ))
    return checks


def check_cann(dists: Mapping[str, str], env: Mapping[str, str] = os.environ) -> Check:
    version, source, searched = find_cann(env)
    if version is not None:
        return Check("CANN", "ok", f"{version} (from {source})")
    if "torch-npu" not in dists:
        return Check("CANN", "info", "not found (needed only for Ascend NPUs)")
    return Check("CANN", "error", f"torch_npu is installed but no CANN toolkit was found in {', '.join(searched)}",
                 f"install the CANN toolkit matching torch_npu and `{SET_ENV_HINT}`")


def check_triton(dists: Mapping[str, str], triton_dir: Optional[Path], npu_expected: bool) -> Check:
    """Community triton and triton-ascend both install the package ``triton``;
    the one installed last overwrites the other, so they cannot coexist."""
    community, ascend = dists.get("triton"), dists.get("triton-ascend")
    has_ascend_backend = triton_dir is not None and (triton_dir / "backends" / "ascend").is_dir()
    reinstall = f"pip uninstall -y triton triton-ascend && pip install triton-ascend=={ascend}"
    if ascend and community:
        return Check("triton", "error",
                     f"triton {community} and triton-ascend {ascend} are both installed; they write the same "
                     f"`triton` package, so one has overwritten the other", reinstall)
    if ascend and not has_ascend_backend:
        return Check("triton", "error",
                     f"triton-ascend {ascend} is installed but the `triton` package has no Ascend backend "
                     f"(overwritten by another triton install)", reinstall)
    if ascend:
        return Check("triton", "ok", f"triton-ascend {ascend}")
    if community and npu_expected:
        return Check("triton", "warn", f"community triton {community} cannot compile for Ascend NPUs",
                     "pip uninstall -y triton && pip install triton-ascend (matching your CANN)")
    if community:
        return Check("triton", "ok", f"triton {community}")
    return Check("triton", "info", "not installed (optional: kernel backends that need it are skipped)")


def check_mindspeed(dists: Mapping[str, str]) -> Optional[Check]:
    """MindSpeed adapts Megatron-LM to Ascend; npu-rft trains HF models and does not use it."""
    if "mindspeed" not in dists:
        return None
    return Check("mindspeed", "info",
                 f"MindSpeed {dists['mindspeed']} is installed: it accelerates Megatron-LM models and is not used "
                 f"by npu-rft, whose HF models get torch_npu's fused operators with model.npu_fused_ops (docs/ascend.md)")


def _triton_dir() -> Optional[Path]:
    spec = importlib.util.find_spec("triton")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def check_environment(env: Mapping[str, str] = os.environ) -> Check:
    shown = [f"{name}={env[name]}" for name in REPORTED_ENV if name in env]
    return Check("environment", "info", ", ".join(shown) if shown else "no device-related variables set")


# ----------------------------------------------------------------- checks with torch


def check_devices(dists: Mapping[str, str]) -> Tuple[List[Check], Any]:
    """Accelerator, memory, bf16, distributed backend; also returns the Device (or None)."""
    from npu_rft.device import DeviceError, get_device, probe_all

    probes = probe_all()
    found = "; ".join(f"{p.type}: {p.detail}" for p in probes if p.type != "cpu")
    try:
        device = get_device(os.environ.get("NPU_RFT_DEVICE", "").strip() or "auto")
    except (DeviceError, ValueError) as exc:
        return [Check("accelerator", "error", str(exc), "see the message; unset NPU_RFT_DEVICE to auto-detect")], None
    checks: List[Check] = []
    if device.type == "cpu":
        if "torch-npu" in dists:
            checks.append(Check("accelerator", "warn", f"no accelerator: running on CPU ({found})",
                                "check `npu-smi info` and ASCEND_RT_VISIBLE_DEVICES"))
        else:
            checks.append(Check("accelerator", "info", f"no accelerator: running on CPU ({found})"))
    else:
        checks.append(Check("accelerator", "ok", f"{device.type}: {device.count} x {device.name}"))

    stats = device.memory_stats()
    checks.append(Check("memory", "info", f"{device.total_memory() / 2**30:.1f} GiB total on {device.type}:{device.index}; "
                                          f"{stats['allocated'] / 2**20:.0f} MiB in use by this process"))
    dtype = str(device.compute_dtype).replace("torch.", "")
    if device.type == "cpu":
        checks.append(Check("bf16", "info", f"CPU: training computes in {dtype}"))
    elif device.supports_bf16:
        checks.append(Check("bf16", "ok", f"supported: training computes in {dtype}"))
    else:
        checks.append(Check("bf16", "warn", f"{device.name} has no bf16: training computes in {dtype} with loss scaling",
                            "expect fp16 overflow risk; a 910B (or a bf16-capable GPU) avoids it"))
    checks.append(_check_dist_backend(device))
    return checks, device


def _check_dist_backend(device: Any) -> Check:
    import torch.distributed as dist

    name = device.dist_backend
    if not dist.is_available():
        return Check(f"distributed ({name})", "error", "torch.distributed is not available in this torch build",
                     "install a torch build with distributed support")
    # is_gloo_available / is_nccl_available; torch_npu adds is_hccl_available and registers "hccl"
    checker = getattr(dist, f"is_{name}_available", None)
    available = bool(checker()) if checker is not None else name in dist.Backend.backend_list
    if available:
        return Check(f"distributed ({name})", "ok", f"{name} backend available")
    return Check(f"distributed ({name})", "error", f"{name} backend is not available for {device.type}",
                 "multi-process runs need it: reinstall torch_npu/CANN (hccl) or a CUDA torch build (nccl)")


def self_test_dtypes(device: Any) -> List[Any]:
    """The kernel self-test's dtypes: fp32 on CPU; on an accelerator also its
    compute dtype (bf16, or fp16 without bf16), the one in which the ``npu``
    backend reaches torch_npu's fused op (it takes bf16/fp16 only)."""
    import torch

    if device.type == "cpu":
        return [torch.float32]
    return [torch.float32, device.compute_dtype]


def check_kernels(device: Any, dtypes: Optional[Sequence[Any]] = None) -> List[Check]:
    """Run each kernel backend available on ``device`` on a tiny case (5 tokens, H=16,
    V=37, one ignored target) and compare it with ``naive``.

    fp32: log-probs and entropies, within 1e-4. bf16/fp16 (``self_test_dtypes``: on
    an accelerator): log-probs only, without gradient, the case in which the ``npu``
    backend uses torch_npu's fused op; compared with naive's fp32 result on the same
    rounded inputs, and allowed twice naive's own low-precision error plus 1e-3."""
    try:
        import npu_rft_kernels as kernels
    except Exception as exc:
        return [Check("kernels", "info", f"npu_rft_kernels does not import ({type(exc).__name__}: {exc}); "
                                         f"self-test skipped")]
    import torch

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 16, generator=generator).to(device.torch_device)
    weight = torch.randn(37, 16, generator=generator).to(device.torch_device)
    targets = torch.tensor([0, 36, 5, -100, 12], device=device.torch_device)
    fix = "report it, and pass another kernel backend meanwhile"
    checks = []
    for dtype in (self_test_dtypes(device) if dtypes is None else dtypes):
        label = str(dtype).replace("torch.", "")
        low = dtype != torch.float32
        h, w = hidden.to(dtype), weight.to(dtype)
        with torch.no_grad():
            if low:
                reference = (kernels.fused_logprob(h.float(), w.float(), targets, backend="naive"),)
                naive = (kernels.fused_logprob(h, w, targets, backend="naive"),)
                bound = 2 * _max_diff(naive, reference) + 1e-3
            else:
                reference = kernels.fused_logprob(h, w, targets, return_entropy=True, backend="naive")
                bound = 1e-4
            for backend in kernels.available_backends(h):
                if backend == "naive":
                    continue
                name = f"kernel fused_logprob[{backend}, {label}]"
                try:
                    if low:
                        out = (kernels.fused_logprob(h, w, targets, backend=backend),)
                    else:
                        out = kernels.fused_logprob(h, w, targets, return_entropy=True, backend=backend)
                    error = _max_diff(out, reference)
                except Exception as exc:
                    checks.append(Check(name, "error", f"raised {type(exc).__name__}: {exc}", fix))
                    continue
                path = _npu_path(h) if backend == "npu" and low else ""
                if error <= bound:
                    checks.append(Check(name, "ok", f"matches naive (max |diff| {error:.1e}, bound {bound:.1e}){path}"))
                else:
                    checks.append(Check(name, "error", f"differs from naive by {error:.3e} (> {bound:.1e}) on a "
                                                       f"5x16x37 case{path}", fix))
    if not checks:
        checks.append(Check("kernels", "info", f"only the naive backend is available on {device.type}"))
    return checks


def _max_diff(out: Sequence[Any], reference: Sequence[Any]) -> float:
    return max((o.float() - r.float()).abs().max().item() for o, r in zip(out, reference))


def _npu_path(tensor: Any) -> str:
    """Whether the npu backend ran torch_npu's fused op here, and why not."""
    from npu_rft_kernels import dispatch

    why = dispatch.npu_online_max_sum_problem(tensor)
    return "; ran torch_npu's fused online max-sum op" if why is None else f"; ran the tiled path: {why}"


# ----------------------------------------------------------------- the report


def run_doctor(probe: Optional[Callable[..., TorchImport]] = None) -> Report:
    """Run every check. ``probe`` imports torch in a child process (default
    :func:`probe_torch_import`; replaceable in tests)."""
    probe = probe or probe_torch_import
    dists = installed_distributions()
    report = Report([check_python()])
    torch_import = probe()
    report.checks.append(check_torch_import(torch_import, dists, probe))
    report.checks.extend(check_torch_npu_versions(dists))
    report.checks.append(check_cann(dists))
    report.checks.append(check_triton(dists, _triton_dir(), npu_expected="torch-npu" in dists))
    mindspeed = check_mindspeed(dists)
    if mindspeed is not None:
        report.checks.append(mindspeed)
    report.checks.append(check_environment())
    if not torch_import.ok:
        report.checks.append(Check("devices", "info", "skipped: torch does not import"))
        return report
    if "torch-npu" in dists:
        report.checks.append(check_torch_npu_import(dists))
    device_checks, device = check_devices(dists)
    report.checks.extend(device_checks)
    if device is not None:
        report.checks.extend(check_kernels(device))
    return report

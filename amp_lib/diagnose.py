"""Why a precision is (not) faster than fp32: one profiled training step, the machine facts that decide
the answer, and a ranked, plain-language list of causes.

`profile_step` runs one step under torch.profiler (opt-in per run: `RunConfig.profile_step`) and keeps a
small summary in the result JSON: where the step's time went (matrix multiplies, element-wise work,
normalisation, the optimizer, data movement, host overhead or idle device) and the shapes of the GEMMs
that ran in a reduced precision. `explain` turns the summaries of a precision and of fp32, the measured
speed-up and the machine facts into causes; it reads only data, so a test can feed it a recorded profile.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from amp_lib.headroom import way_out
from amp_lib.precision import Capabilities, cpu_isa

CATEGORIES = ("matmul", "elementwise", "norm", "optimizer", "data_movement", "communication")
# Collectives as the profiler names them (DDP/FSDP gradient reduction, parameter all-gathers).
_COMMUNICATION = re.compile(r"^(c10d::|gloo:|nccl:|record_param_comms)|nccl|all_?reduce|all_?gather|reduce_?scatter", re.IGNORECASE)
_PATTERNS = (  # first match wins, on the op's name
    ("communication", _COMMUNICATION),
    ("optimizer", re.compile(r"adam|_foreach_|Optimizer\.", re.IGNORECASE)),
    ("matmul", re.compile(r"aten::(mm|addmm|bmm|baddbmm|matmul|linear|_scaled_mm|conv|cudnn_conv|_convolution|mkldnn_conv)|"
                          r"scaled_dot_product|flash|efficient_attention|gemm|cutlass|sm\d+_xmma", re.IGNORECASE)),
    ("norm", re.compile(r"norm", re.IGNORECASE)),
    ("data_movement", re.compile(r"aten::(copy_|_to_copy|to|contiguous|clone|cat|index|gather|embedding)\b|memcpy|Memcpy", re.IGNORECASE)),
)
_GEMMS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm")
REDUCED = ("c10::Half", "c10::BFloat16", "c10::Float8_e4m3fn", "c10::Float8_e5m2")


def categorize(name: str) -> str:
    for category, pattern in _PATTERNS:
        if pattern.search(name):
            return category
    return "elementwise"


@dataclass(frozen=True)
class StepProfile:
    """Where one training step's time went, in ms, and the GEMMs that ran in a reduced precision."""

    wall_ms: float
    busy_ms: dict[str, float]  # by category: self time of the ops (device time on a GPU)
    gemms: tuple[tuple[int, int, int, str], ...] = ()  # (m, k, n, dtype) of reduced-precision GEMMs
    device_type: str = "cpu"

    @property
    def busy_total_ms(self) -> float:
        return sum(self.busy_ms.values())

    @property
    def idle_ms(self) -> float:
        """Host overhead, or a device waiting for the host: the step's wall time not spent in any op."""
        return max(0.0, self.wall_ms - self.busy_total_ms)

    def share(self, category: str) -> float:
        return self.busy_ms.get(category, 0.0) / self.wall_ms if self.wall_ms > 0 else 0.0

    @property
    def misaligned_gemms(self) -> list[tuple[int, int, int, str]]:
        """GEMMs with a dimension that is not a multiple of 8 (fp16/bf16 tensor cores) or 16 (fp8)."""
        def aligned(g: tuple[int, int, int, str]) -> bool:
            multiple = 16 if "Float8" in g[3] else 8
            return all(d % multiple == 0 for d in g[:3])

        return [g for g in self.gemms if not aligned(g)]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gemms"] = [list(g) for g in self.gemms]
        d["idle_ms"] = self.idle_ms
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepProfile:
        gemms = tuple((int(g[0]), int(g[1]), int(g[2]), str(g[3])) for g in d.get("gemms", []))
        return cls(float(d["wall_ms"]), dict(d["busy_ms"]), gemms, d.get("device_type", "cpu"))


def summarize(events: Any, wall_ms: float, device_type: str) -> StepProfile:
    """A StepProfile from torch.profiler's events (self times, so nested ops are not counted twice)."""
    busy = dict.fromkeys(CATEGORIES, 0.0)
    gemms = []
    for event in events:
        self_us = event.self_device_time_total if device_type == "cuda" else event.self_cpu_time_total
        counted = device_type == "cuda" or event.name.startswith(("aten::", "Optimizer.")) or _COMMUNICATION.search(event.name)
        if self_us > 0 and counted:
            busy[categorize(event.name)] += self_us / 1e3
        if event.name in _GEMMS:
            gemm = _gemm(event.input_shapes, list(getattr(event, "input_dtypes", []) or []))
            if gemm is not None and gemm[3] in REDUCED:
                gemms.append(gemm)
    return StepProfile(wall_ms=wall_ms, busy_ms=busy, gemms=tuple(sorted(set(gemms))), device_type=device_type)


def _gemm(shapes: list[list[int]], dtypes: list[str]) -> tuple[int, int, int, str] | None:
    mats = [(s, dtypes[i] if i < len(dtypes) else "") for i, s in enumerate(shapes) if isinstance(s, list) and len(s) >= 2]
    if len(mats) < 2:
        return None
    (a, dtype), (b, _) = mats[-2], mats[-1]
    return int(a[-2]), int(a[-1]), int(b[-1]), str(dtype)


class StepProfiler:
    """torch.profiler around one training step: `start()` before it, `stop()` after it gives the summary."""

    def __init__(self, device: torch.device) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.device, self._prof = device, torch.profiler.profile(activities=activities, record_shapes=True)
        self._began = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        with _quiet_stderr():  # kineto prints "USDT ... profiler_start" straight to the process's stderr
            self._prof.start()
        self._sync()
        self._began = time.perf_counter()

    def stop(self) -> StepProfile:
        self._sync()
        wall_ms = (time.perf_counter() - self._began) * 1e3
        with _quiet_stderr():
            self._prof.stop()
        return summarize(self._prof.events(), wall_ms, self.device.type)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 sent to /dev/null for the duration: what C++ libraries print there is not ours to show."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class ProfileProbe:
    """One profiled step as a probe of the training loop: step `step` runs under torch.profiler, and `record()`
    is its summary with the machine facts and the causes this run alone can tell (the report adds fp32's)."""

    def __init__(self, device: torch.device, step: int, precision: str, caps: Capabilities) -> None:
        self.device, self.step, self.precision, self.caps = device, step, precision, caps
        self._profiler: StepProfiler | None = None
        self._record: dict[str, Any] | None = None

    def begin_step(self, step: int) -> None:
        if step == self.step:
            self._profiler = StepProfiler(self.device)
            self._profiler.start()

    def end_step(self, step: int) -> None:
        if self._profiler is None:
            return
        profile, facts = self._profiler.stop(), machine_facts(self.caps)
        self._profiler = None
        family = self.precision.split("-")[0]
        causes = [c.text for c in explain(self.precision, profile, None, facts)] if family != "fp32" else []
        self._record = {"step": step, **profile.to_dict(), "facts": facts, "causes": causes}

    def flush(self, rows: Sequence[Any]) -> None:
        pass

    def close(self) -> None:
        pass

    def record(self) -> dict[str, Any] | None:
        return self._record


def tf32_for_fp32() -> bool:
    """Whether fp32 matmuls on CUDA may run in TF32. torch >= 2.9 keeps a per-backend `fp32_precision`
    ("none": the global one decides); its legacy global getter raises once a program has mixed the two
    APIs (`set_float32_matmul_precision("high")`, then `allow_tf32 = False`), so the backend's own
    setting is read where it exists."""
    setting = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if setting is None:  # torch < 2.9: the legacy flags are the only ones
        return bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"
    if setting == "none":
        setting = getattr(torch.backends, "fp32_precision", "none")
    return setting == "tf32"


def machine_facts(caps: Capabilities) -> dict[str, Any]:
    """The facts that decide whether a reduced precision can be fast here."""
    facts: dict[str, Any] = {"device_type": caps.device_type, "device_name": caps.device_name}
    if caps.device_type == "cuda":
        facts["compute_capability"] = list(caps.compute_capability or ())
        facts["tf32_for_fp32"] = tf32_for_fp32()
    else:
        facts["cpu_isa"] = sorted(cpu_isa())
    return facts


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The CPU's model name, as /proc/cpuinfo gives it (None where there is none)."""
    with contextlib.suppress(OSError), open(cpuinfo, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def source_commit() -> str | None:
    """The git commit amp_lib was loaded from (with "+dirty" when its files differ from it); None outside a checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "--", "amp_lib"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head or None


def machine_context(caps: Capabilities) -> dict[str, Any]:
    """Where a run ran, for a report's header: the machine facts, the CPU model, the torch, CUDA and amp-workbook
    versions and the source commit."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        workbook = version("amp-workbook")
    except PackageNotFoundError:
        workbook = None
    return {
        **machine_facts(caps),
        "cpu_model": cpu_model(),
        "cpu_isa": sorted(cpu_isa()),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "amp_workbook": workbook,
        "commit": source_commit(),
    }


@dataclass(frozen=True)
class Cause:
    weight: float  # how much of the missing speed-up it plausibly explains (ranking only)
    text: str


def explain(
    precision: str, profile: StepProfile | None, fp32: StepProfile | None, facts: dict[str, Any]
) -> list[Cause]:
    """Ranked causes, most likely first, for `precision` not being (much) faster than fp32; the caller asks
    only when it is not. Computed from the profiles and the machine facts, not from the device's name."""
    family = precision.split("-")[0]
    causes: list[Cause] = []
    isa = set(facts.get("cpu_isa", []))
    if facts.get("device_type") == "cpu":
        if family == "bf16" and not isa & {"avx512_bf16", "amx_bf16"}:
            causes.append(Cause(1.0, "this CPU has no bf16 instructions (avx512_bf16/amx_bf16): bf16 matmuls are emulated"))
        if family == "fp16" and not isa & {"avx512_fp16", "amx_fp16"}:
            causes.append(Cause(1.0, "this CPU has no fp16 instructions (avx512_fp16/amx_fp16): fp16 matmuls are emulated"))
    elif facts.get("device_type") == "cuda":
        cc = tuple(facts.get("compute_capability") or (0, 0))
        if family == "bf16" and cc < (8, 0):
            causes.append(Cause(1.0, f"compute capability {cc[0]}.{cc[1]} has no bf16 tensor cores"))
        if family == "fp16" and cc < (7, 0):
            causes.append(Cause(1.0, f"compute capability {cc[0]}.{cc[1]} has no fp16 tensor cores"))
        if facts.get("tf32_for_fp32") and family in ("fp16", "bf16", "fp8"):
            causes.append(Cause(0.5, "fp32 already ran its matmuls on TF32 tensor cores: the baseline is fast"))
    if profile is not None:
        outside = 1.0 - profile.share("matmul")
        if outside > 0.5:
            causes.append(Cause(outside * 0.8, f"{outside:.0%} of the step is outside matmuls: the model is too small to gain"))
        idle = profile.idle_ms / profile.wall_ms if profile.wall_ms else 0.0
        if idle > 0.3:
            where = "the device is idle" if profile.device_type == "cuda" else "the host runs Python/dispatch, not ops,"
            causes.append(Cause(idle * 0.9, f"launch-bound: {where} {idle:.0%} of the step — try a bigger batch or compile"))
        opt = profile.share("optimizer")
        if opt > 0.2:
            causes.append(Cause(opt * 0.6, f"the optimizer takes {opt:.0%} of the step: it updates fp32 weights whatever the precision"))
        if fp32 is not None:
            extra = profile.busy_ms.get("data_movement", 0.0) - fp32.busy_ms.get("data_movement", 0.0)
            if profile.wall_ms and extra / profile.wall_ms > 0.1:
                causes.append(Cause(extra / profile.wall_ms, f"dtype casts add {extra / profile.wall_ms:.0%} of the step (autocast copies)"))
        bad = profile.misaligned_gemms
        if bad:
            m, k, n, _ = bad[0]
            causes.append(Cause(0.3, f"{len(bad)} of {len(profile.gemms)} reduced-precision GEMMs have a dimension that is not a "
                                     f"multiple of 8 (e.g. {m}x{k}x{n}): pad vocabulary/hidden sizes"))
    return sorted(causes, key=lambda c: c.weight, reverse=True)


@dataclass(frozen=True)
class Diagnosis:
    """Why one precision failed or did not pay on one setting, in words."""

    setting: str
    precision: str
    causes: tuple[str, ...]  # ranked, from its profiled step, fp32's and the machine facts
    overflows: tuple[str, ...]  # per run that skipped steps or diverged: the first module to overflow, the way out


def _profile(results: Sequence[Any]) -> tuple[StepProfile | None, dict[str, Any]]:
    for result in results:
        if result.profile:
            return StepProfile.from_dict(result.profile), dict(result.profile.get("facts", {}))
    return None, {}


def diagnose(setting: str, label: str, effective: str, results: Sequence[Any], fp32: Sequence[Any], *,
             explain_speed: bool) -> Diagnosis | None:  # fmt: skip
    """The causes of one precision's runs (`results`) not paying, from their profiled step, fp32's and the machine
    facts (when `explain_speed`), and the way out of each run's first fp16 overflow; None with nothing to say."""
    causes: list[str] = []
    if explain_speed:
        profile, facts = _profile([r for r in results if r.ok])
        if profile is not None or facts:
            causes = [c.text for c in explain(effective, profile, _profile(fp32)[0], facts)]
    overflows = []
    for result in results:
        events = (result.headroom or {}).get("first_overflow", [])
        if events and (result.metrics.skipped_steps or result.status == "diverged"):
            overflows.append(f"seed {result.seed}: {way_out(events[0], result.bf16_capable)}")
    return Diagnosis(setting, label, tuple(causes), tuple(overflows)) if causes or overflows else None

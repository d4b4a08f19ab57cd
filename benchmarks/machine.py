"""What ran the benchmark: CPU, load, library versions, device, and the FMA peak we compare to.

The CPU's FP32 FMA peak is derived, not looked up: cores x frequency x FLOPs per cycle, where
FLOPs per cycle come from the instruction-set flags (``/proc/cpuinfo``) and the vector width of
the FMA units of that micro-architecture (two FMA pipes per core on every x86 server core since
Haswell; 512 bits wide with AVX-512 on Intel Xeon and AMD Zen 5, while Zen 4 runs AVX-512 on
256-bit units). The frequency is the TSC's (``cpu MHz`` under a hypervisor, which hides the
boost clock), so the peak is a lower bound of the true one. A large measured matmul is given
beside it as the peak a real kernel reaches here.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .timing import interleave, median_s


def loadavg() -> list[float] | None:
    """1, 5 and 15-minute load averages (other processes on a shared machine show up here)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux/macOS
        return None


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            info[k.strip()] = v.strip()
    return info


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def fp32_flops_per_cycle(flags: set[str], vendor: str, family: int | None) -> tuple[int, str]:
    """FP32 FLOPs per cycle per core (2 FMA pipes x lanes x 2 FLOPs) and the reasoning."""
    if "avx512f" in flags:
        if vendor == "AuthenticAMD" and family is not None and family < 26:
            return 32, "AVX-512 on Zen 4 (family 25): 2 FMA pipes x 256 bit (8 fp32) x 2"
        return 64, "AVX-512: 2 FMA pipes x 512 bit (16 fp32 lanes) x 2 FLOPs"
    if "fma" in flags and "avx2" in flags:
        return 32, "AVX2+FMA: 2 FMA pipes x 256 bit (8 fp32 lanes) x 2 FLOPs"
    if "avx" in flags:
        return 16, "AVX without FMA: 1 add + 1 mul pipe x 256 bit"
    return 8, "SSE: 1 add + 1 mul pipe x 128 bit (or an unknown CPU)"


def fma_peak(threads: int | None = None) -> dict[str, Any]:
    """Theoretical FP32 peak of the cores this process uses (``threads`` of them, if fewer)."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    vendor = info.get("vendor_id", "")
    family = int(info["cpu family"]) if info.get("cpu family", "").isdigit() else None
    per_cycle, why = fp32_flops_per_cycle(flags, vendor, family)
    mhz = float(info.get("cpu MHz", 0) or 0)
    cores = min(threads, available_cores()) if threads else available_cores()
    return {
        "gflops": cores * per_cycle * mhz / 1e3 if mhz else None,
        "cores": cores,
        "ghz": mhz / 1e3 if mhz else None,
        "flops_per_cycle_per_core": per_cycle,
        "derivation": f"{cores} cores x {mhz / 1e3:.3f} GHz (cpu MHz, the TSC under a "
        f"hypervisor; boost unknown) x {per_cycle} FLOPs/cycle ({why})",
    }


def fma_fractions(
    gflop: float, wall_s: float, cpu_s: float | None, peak: dict[str, Any]
) -> tuple[float | None, float | None]:
    """Shares of the FMA ``peak`` (:func:`fma_peak`) that ``gflop`` of work reached: per
    wall-second against the peak of all the peak's cores, and per CPU-second against one core's
    (CPU time adds up over the cores, so on 2 busy cores it runs twice as fast as the clock)."""
    total = peak.get("gflops")
    if not total:
        return None, None
    per_core = total / max(int(peak.get("cores") or 1), 1)
    return gflop / wall_s / total, (gflop / cpu_s / per_core if cpu_s else None)


def matmul_peak(n: int = 2048, rounds: int = 5, device: torch.device | None = None) -> dict:
    """Measured FP32 GFLOP/s of an n x n matmul (2 n^3 FLOPs): what a dense kernel reaches."""
    device = device or torch.device("cpu")
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    cpu: dict[str, list[float]] = {}
    samples = interleave({"mm": lambda: torch.mm(a, b)}, rounds, warmup=1, sync=sync, cpu=cpu)
    t, c = median_s(samples["mm"]), median_s(cpu["mm"])
    return {
        "n": n,
        "gflops": 2 * n**3 / t / 1e9,
        "gflops_per_cpu_s": 2 * n**3 / c / 1e9 if device.type == "cpu" else None,
        "median_ms": t * 1e3,
        "samples_s": samples["mm"],
        "cpu_samples_s": cpu["mm"],
    }


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def versions(root: Path) -> dict[str, Any]:
    ort = None
    try:
        import onnxruntime

        ort = {
            "version": onnxruntime.__version__,
            "providers": onnxruntime.get_available_providers(),
        }
    except ImportError:
        pass
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "onnxruntime": ort,
        "onnx": _version("onnx"),
        "numpy": _version("numpy"),
        "dymu": _version("dymu"),
        "git_commit": git_commit(root),
    }


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
        )
    return info


def machine_info() -> dict[str, Any]:
    info = _cpuinfo()
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": info.get("model name") or platform.processor(),
        "cpu_vendor": info.get("vendor_id"),
        "cpu_family": info.get("cpu family"),
        "cpu_mhz": info.get("cpu MHz"),
        "cpu_count": os.cpu_count(),
        "cores_available": available_cores(),
        "memory_gib": _memory_gib(),
        "loadavg": loadavg(),
        "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None

"""dymu's benchmark harness (``dymu bench``): compute that follows the preference, measured
side by side. See docs/benchmarks.md.

    from benchmarks import preset, run_bench
    report = run_bench(preset("quick"), "bench-results")
"""

from .config import BenchConfig, preset
from .harness import run_bench
from .registry import CASES, register_case

__all__ = ["CASES", "BenchConfig", "preset", "register_case", "run_bench"]

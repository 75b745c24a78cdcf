"""Shared helpers of the benchmark scripts: data location, device description, result files."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
HER2ST = Path(os.environ.get("GENEDML_SD_HER2ST", ROOT.parent / "shared" / "data" / "her2st"))


def device_info() -> dict:
    """Where the benchmark ran: CPU model and cores, CUDA device if any, library versions."""
    import torch

    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _anon_rss_mb() -> float | None:
    """Anonymous resident memory of this process (Linux ``RssAnon``), MB; ``None`` elsewhere."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class AnonPeak:
    """Peak anonymous resident memory while the ``with`` block runs, sampled every ``interval`` s.

    ``ru_maxrss`` also counts file-backed pages of memory-mapped files (page cache that the kernel
    drops under pressure), so for code that streams a memory-mapped feature file it says little about
    the memory the process really needs; ``RssAnon`` is that part. ``peak_mb`` is ``None`` off Linux.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak_mb = _anon_rss_mb()
        self._stop = threading.Event()

    def _sample(self) -> None:
        now = _anon_rss_mb()
        if now is not None and (self.peak_mb is None or now > self.peak_mb):
            self.peak_mb = now

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> AnonPeak:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def save(name: str, payload: dict) -> Path:
    """Write ``benchmarks/results/<name>.json`` and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=float))
    return path


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub-markdown table of ``rows`` restricted to ``columns``."""

    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)

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


def image_sections(root: str | Path = HER2ST) -> list[str]:
    """Names of the HER2ST sections with an H&E image in ``root`` (its ``sections.csv`` index), in file order."""
    import pandas as pd

    index = pd.read_csv(Path(root) / "sections.csv")
    return [str(s) for s in index.loc[index["has_image"].astype(bool), "section"]]


def read_image_sections(root: str | Path = HER2ST) -> tuple[list[str], list]:
    """The HER2ST sections with an image: their names and one SpatialData each (``gd.io.her2st``)."""
    import genedml_sd as gd

    sections = image_sections(root)
    return sections, [gd.io.her2st(root, s) for s in sections]


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


# --------------------------------------------------------------------------------------------- stages in a child
def proc_status_mb(field: str) -> float | None:
    """A memory field of ``/proc/self/status`` (``"VmHWM"``, ``"RssAnon"``, ``"VmRSS"``, ...), MB; ``None`` off Linux."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Stages:
    """Wall time and peak anonymous RSS of named stages run one after the other in this process.

    ``with stages("read"): ...`` records ``seconds``, ``peak_anon_mb`` (``RssAnon`` sampled every
    ``interval`` s while the stage runs), ``anon_after_mb`` and ``vm_hwm_mb`` (the kernel's peak resident
    size of the process so far, file-backed pages included) in ``stages.rows``; CUDA is synchronised
    before the clock stops when it is in use.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.rows: list[dict] = []

    @staticmethod
    def _sync() -> None:
        if "torch" in sys.modules:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()

    def __call__(self, name: str) -> _Stage:
        return _Stage(self, name)

    @property
    def peak_anon_mb(self) -> float | None:
        """Largest sampled anonymous RSS over all stages so far."""
        peaks = [r["peak_anon_mb"] for r in self.rows if r["peak_anon_mb"] is not None]
        return max(peaks) if peaks else None


class _Stage:
    def __init__(self, owner: Stages, name: str):
        self.owner, self.name = owner, name

    def __enter__(self) -> _Stage:
        import time

        self._anon = AnonPeak(self.owner.interval).__enter__()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        import time

        self.owner._sync()
        seconds = time.perf_counter() - self._t0
        self._anon.__exit__(exc_type, *exc)
        if exc_type is None:
            self.owner.rows.append(
                {
                    "stage": self.name,
                    "seconds": seconds,
                    "peak_anon_mb": self._anon.peak_mb,
                    "anon_after_mb": _anon_rss_mb(),
                    "vm_hwm_mb": proc_status_mb("VmHWM"),
                }
            )
            print(f"stage {self.name}: {seconds:.2f} s, peak anon {self._anon.peak_mb} MB", file=sys.stderr, flush=True)


def run_child(argv: list[str], *, marker: str = "RESULT ") -> dict:
    """Run ``python argv...`` in a fresh process; return the JSON it printed after ``marker`` on its last such line.

    Raises ``SystemExit`` with the tail of the child's output when it fails or prints no result.
    """
    import subprocess

    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(marker)]
    if proc.returncode or not lines:
        raise SystemExit(
            f"child {' '.join(argv)} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
        )
    return json.loads(lines[-1][len(marker) :])


def reflect_indices(start: int, length: int, lo: int, hi: int):
    """Indices ``start .. start + length - 1`` folded into ``[lo, hi)`` by mirroring at both ends (int64 array).

    Used to tile an image by mirrored copies of its region ``[lo, hi)``: inside the region the
    indices are unchanged, beyond it they run back (``hi - 1, hi - 2, ...``), and so on.
    """
    import numpy as np

    n = hi - lo
    if n <= 0:
        raise ValueError(f"empty region [{lo}, {hi}).")
    j = np.mod(np.arange(start, start + length, dtype=np.int64) - lo, 2 * n)
    return lo + np.where(j < n, j, 2 * n - 1 - j)


def sparse_umi_counts(library, level, cdf, rng, chunk: int = 50_000):
    """Sparse counts: ``library[i]`` UMIs of row ``i``, each a gene drawn from the profile ``cdf[level[i]]``.

    Parameters
    ----------
    library
        UMIs per row (n,), non-negative integers.
    level
        Profile of each row (n,), integers in ``[0, K)``.
    cdf
        Cumulative gene probabilities of the K profiles, (K, G), each row increasing to 1.
    rng
        ``numpy.random.Generator``.
    chunk
        Rows simulated at once (memory is about 40 bytes per UMI of a chunk).

    Returns
    -------
    CSR int32 (n, G) with sorted indices; nothing dense of size n x G is ever made.
    """
    import numpy as np
    import scipy.sparse as sp

    library = np.asarray(library, dtype=np.int64)
    level = np.asarray(level, dtype=np.int64)
    k, g = cdf.shape
    flat = (np.asarray(cdf, dtype=np.float64) + np.arange(k)[:, None]).ravel()  # increasing across profiles
    n = len(library)
    counts_per_row = np.zeros(n, dtype=np.int64)
    data, indices = [], []
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        rows = np.repeat(np.arange(b - a, dtype=np.int64), library[a:b])
        lv = level[a:b][rows]
        genes = (np.searchsorted(flat, lv + rng.random(len(rows)), side="right") - lv * g).clip(0, g - 1)
        key, cnt = np.unique(rows * g + genes, return_counts=True)
        counts_per_row[a:b] = np.bincount(key // g, minlength=b - a)
        indices.append((key % g).astype(np.int32))
        data.append(cnt.astype(np.int32))
    indptr = np.concatenate([[0], np.cumsum(counts_per_row)])
    return sp.csr_matrix((np.concatenate(data), np.concatenate(indices), indptr), shape=(n, g))

"""The on-disk feature cache: one folder per key, verified when read, published atomically when written.

An entry ``<root>/<key>/`` holds ``local.npy`` (n_spots, D) float32, optionally the neighbour
tokens, either per spot, ``neighbour.npy`` (n_spots, grid**2, D) float32, or, in the dense feature
mode, as lattice-tile features ``tokens.npy`` (n_tokens, D) float32 and their rows
``token_index.npy`` (n_spots, grid**2) int64, and ``meta.json``, which records the size in bytes and the
SHA-256 of each array file, computed once when the entry is written. Reading checks the metadata,
the sizes, the hashes, the ``.npy`` headers and the shapes; an entry that fails any check
(truncated, zeroed or replaced in place, unreadable) is logged as a warning naming the file and
treated as missing, so the features are recomputed and the entry rewritten.

Hashing costs one sequential read of the file: about 1.1 s per GB on one core of a shared 2-core
VM with the file in the page cache (plus the disk read otherwise). It is done once per file and process: a file whose size, inode,
modification and status-change times have not changed since it was verified (and that had not
been touched for 2 s then) is not hashed again.

Writers fill a private temporary folder ``.<key>.<pid>.<random>.<host>.tmp`` and rename it to
``<key>`` (atomic on POSIX file systems), so several processes can fill the same cache at once: the
first rename wins and the others reuse its entry. Temporary folders left by killed runs are removed
when their process is dead (same host) or, for other hosts, when untouched for
:data:`STALE_TMP_SECONDS`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2
"""Version of the entry layout; 2 added the file sizes and hashes (format-1 entries are recomputed)."""

HASH = "sha256"
"""Hash of the array files recorded in ``meta.json``."""

STALE_TMP_SECONDS = 3600.0
"""A temporary folder whose writer cannot be checked (another host) is stale after this long untouched."""

ARRAYS = ("local.npy", "neighbour.npy", "tokens.npy", "token_index.npy")

_VERIFIED: dict[tuple, str] = {}  # (path, size, inode, mtime_ns, ctime_ns) -> digest, for files hashed in this process
_MAX_VERIFIED = 4096
_SETTLED_NS = 2_000_000_000


@dataclass
class CacheEntry:
    """A verified cache entry: its folder, metadata and arrays (all but ``local`` memory-mapped read-only).

    ``tokens`` (n_tokens, D) and ``token_index`` (n_spots, grid**2) are set for dense neighbour entries,
    ``neighbour`` (n_spots, grid**2, D) for the others.
    """

    folder: Path
    meta: dict
    local: np.ndarray
    neighbour: np.ndarray | None
    tokens: np.ndarray | None = None
    token_index: np.ndarray | None = None


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's content, read in 4 MiB chunks."""
    h = hashlib.new(HASH)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _stat_key(path: Path, st: os.stat_result) -> tuple:
    return (str(path.resolve()), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


def _digest_once(path: Path, st: os.stat_result) -> str:
    key = _stat_key(path, st)
    digest = _VERIFIED.get(key)
    if digest is None:
        digest = file_digest(path)
        # file times tick coarsely (a few ms): a file changed within a tick of this look would keep its
        # times, so only files untouched for a while are remembered (the "racy timestamp" rule)
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _SETTLED_NS:
            if len(_VERIFIED) >= _MAX_VERIFIED:
                _VERIFIED.clear()
            _VERIFIED[key] = digest
    return digest


def _bad(path: Path, why: str) -> None:
    logger.warning("Feature cache file %s %s; recomputing the entry.", path, why)


# ------------------------------------------------------------------------------------------------- reading
def read_entry(
    root: Path, key: str, *, n_spots: int, dim: int, n_neighbours: int | None, dense: bool = False
) -> CacheEntry | None:
    """The cache entry ``root / key`` if it exists and passes every check, else ``None``.

    Parameters
    ----------
    root
        Cache root.
    key
        Entry key (folder name).
    n_spots, dim
        Expected number of spots and feature width D.
    n_neighbours
        Expected neighbour tokens per spot; ``None`` to read (and verify) only the local features.
    dense
        The neighbour tokens are ``tokens.npy`` (``meta["n_tokens"]`` rows) gathered through
        ``token_index.npy`` (every index in ``[0, n_tokens)``), not ``neighbour.npy``.

    Returns
    -------
    The entry, or ``None`` when it is missing, of another format or size (logged at info level), or
    damaged (logged as a warning naming the file).
    """
    folder = root / key
    meta_file = folder / "meta.json"
    if not meta_file.exists():
        return None
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        _bad(meta_file, f"is truncated or unreadable ({type(err).__name__}: {err})")
        return None
    if not isinstance(meta, dict):
        _bad(meta_file, f"does not hold a JSON object (found {type(meta).__name__})")
        return None
    if meta.get("format") != CACHE_FORMAT:
        logger.info(
            "Feature cache entry %s has format %r, not %d; recomputing it.", folder, meta.get("format"), CACHE_FORMAT
        )
        return None
    if meta.get("n_spots") != n_spots:
        logger.info(
            "Feature cache entry %s holds %r spots, not %d; recomputing it.", folder, meta.get("n_spots"), n_spots
        )
        return None
    files = meta.get("files")
    if not isinstance(files, dict):
        _bad(meta_file, "lists no array files")
        return None
    local = _load_verified(folder / "local.npy", files, (n_spots, dim), mmap=False)
    if local is None:
        return None
    if n_neighbours is not None and dense:
        return _read_dense(folder, meta, files, local, n_spots=n_spots, dim=dim, n_neighbours=n_neighbours)
    neighbour = None
    if n_neighbours is not None:
        # memory-mapped: (N, 25, D) float32 is 10 GB for 10^5 spots at D=1024; pages are read as used
        neighbour = _load_verified(folder / "neighbour.npy", files, (n_spots, n_neighbours, dim), mmap=True)
        if neighbour is None:
            return None
    return CacheEntry(folder, meta, local, neighbour)


def _read_dense(
    folder: Path, meta: dict, files: dict, local: np.ndarray, *, n_spots: int, dim: int, n_neighbours: int
) -> CacheEntry | None:
    n_tokens = meta.get("n_tokens")
    if not isinstance(n_tokens, int) or n_tokens < 0:
        _bad(folder / "meta.json", f"records no valid n_tokens (found {n_tokens!r})")
        return None
    tokens = _load_verified(folder / "tokens.npy", files, (n_tokens, dim), mmap=True)
    if tokens is None:
        return None
    index_file = folder / "token_index.npy"
    token_index = _load_verified(index_file, files, (n_spots, n_neighbours), mmap=True, dtype=np.int64)
    if token_index is None:
        return None
    if token_index.size and (int(token_index.min()) < 0 or int(token_index.max()) >= n_tokens):
        _bad(index_file, f"holds rows outside [0, {n_tokens})")
        return None
    return CacheEntry(folder, meta, local, None, tokens, token_index)


def _load_verified(
    path: Path, files: dict, shape: tuple[int, ...], *, mmap: bool, dtype: type = np.float32
) -> np.ndarray | None:
    record = files.get(path.name)
    if not isinstance(record, dict) or not isinstance(record.get("bytes"), int) or not record.get(HASH):
        _bad(path, "has no size and hash in meta.json")
        return None
    try:
        st = path.stat()
    except OSError as err:
        _bad(path, f"cannot be read ({type(err).__name__})")
        return None
    if st.st_size != record["bytes"]:
        what = "is truncated" if st.st_size < record["bytes"] else "was replaced"
        _bad(path, f"{what}: {st.st_size} bytes, {record['bytes']} when written")
        return None
    if _digest_once(path, st) != record[HASH]:
        _bad(path, f"does not match the {HASH} recorded when it was written (zeroed or replaced in place)")
        return None
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None)
    except (OSError, ValueError, EOFError) as err:
        _bad(path, f"is not a readable .npy file ({type(err).__name__}: {err})")
        return None
    if arr.shape != shape or arr.dtype != dtype:
        _bad(path, f"holds {arr.dtype} {arr.shape}, expected {np.dtype(dtype)} {shape}")
        return None
    return arr


# ------------------------------------------------------------------------------------------------- writing
class EntryWriter:
    """Writes one cache entry into a private temporary folder, then publishes it atomically.

    Parameters
    ----------
    root
        Cache root (created if needed).
    key
        Entry key.
    """

    def __init__(self, root: Path, key: str) -> None:
        self.root, self.key = Path(root), key
        self.root.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.root)
        self.tmp = self.root / f".{key}.{_owner_tag()}.tmp"
        self.tmp.mkdir()
        self._n_neighbours: int | None = None
        self._dense = False

    @property
    def folder(self) -> Path:
        """The entry's final folder."""
        return self.root / self.key

    def open_neighbour(self, shape: tuple[int, ...]) -> np.memmap:
        """A writable float32 ``neighbour.npy`` memory map of ``shape`` in the temporary folder.

        Fill it, flush it and drop every reference to it before :meth:`commit` (with ``neighbour=None``).
        """
        self._n_neighbours = int(shape[1])
        return np.lib.format.open_memmap(self.tmp / "neighbour.npy", mode="w+", dtype=np.float32, shape=shape)

    def commit(
        self,
        local: np.ndarray,
        neighbour: np.ndarray | None,
        meta: dict,
        *,
        tokens: np.ndarray | None = None,
        token_index: np.ndarray | None = None,
    ) -> bool:
        """Write the arrays and ``meta.json`` (with sizes and hashes) and publish the entry.

        Parameters
        ----------
        local
            Local features (n_spots, D).
        neighbour
            Neighbour features (n_spots, grid**2, D), or ``None`` (no neighbours, or written
            through :meth:`open_neighbour`).
        meta
            Metadata to store; ``format`` and ``files`` are added (and ``n_tokens`` with ``tokens``).
        tokens, token_index
            Dense-mode neighbour tokens: lattice-tile features float32 (n_tokens, D) and the rows of
            each spot's tokens int64 (n_spots, grid**2); both or neither, and then ``neighbour=None``.

        Returns
        -------
        ``True`` if this entry was published, ``False`` if another process published a valid
        entry under the same key first (this one is then discarded; read the other).
        """
        if (tokens is None) != (token_index is None) or (tokens is not None and neighbour is not None):
            raise ValueError("Pass tokens and token_index together, and then no neighbour array.")
        np.save(self.tmp / "local.npy", local)
        if neighbour is not None:
            np.save(self.tmp / "neighbour.npy", neighbour)
            self._n_neighbours = int(neighbour.shape[1])
        if tokens is not None and token_index is not None:
            np.save(self.tmp / "tokens.npy", np.asarray(tokens, dtype=np.float32))
            np.save(self.tmp / "token_index.npy", np.asarray(token_index, dtype=np.int64))
            self._n_neighbours, self._dense = int(token_index.shape[1]), True
            meta = {**meta, "n_tokens": int(tokens.shape[0])}
        files = {}
        for name in ARRAYS:
            path = self.tmp / name
            if path.exists():
                files[name] = {"bytes": path.stat().st_size, HASH: file_digest(path)}
        (self.tmp / "meta.json").write_text(json.dumps({**meta, "format": CACHE_FORMAT, "files": files}, indent=1))
        return self._publish(n_spots=len(local), dim=int(local.shape[1]), n_neighbours=self._n_neighbours)

    def _publish(self, *, n_spots: int, dim: int, n_neighbours: int | None) -> bool:
        for _ in range(10):
            try:
                os.rename(self.tmp, self.folder)
                return True
            except OSError:  # the key exists: another writer won, or an old or damaged entry is there
                if not self.tmp.exists():
                    raise
            entry = read_entry(
                self.root, self.key, n_spots=n_spots, dim=dim, n_neighbours=n_neighbours, dense=self._dense
            )
            if entry is not None:
                logger.info("Feature cache entry %s was written by another process; using it.", self.folder)
                self.discard()
                return False
            trash = self.root / f".{self.key}.{_owner_tag()}.old"
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.folder, trash)  # move the bad entry aside, then retry the rename
            shutil.rmtree(trash, ignore_errors=True)
        raise RuntimeError(f"Could not publish feature cache entry {self.folder}: it keeps being replaced.")

    def discard(self) -> None:
        """Remove the temporary folder."""
        shutil.rmtree(self.tmp, ignore_errors=True)


def _owner_tag() -> str:
    return f"{os.getpid()}.{secrets.token_hex(4)}.{socket.gethostname()}"


def _pid_alive(pid: int) -> bool | None:
    """Whether process ``pid`` of this host runs; ``None`` when that cannot be told."""
    if pid == os.getpid():
        return True
    if os.name != "posix":  # os.kill(pid, 0) is not a liveness probe on Windows
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, another user's
    return True


def _newest_mtime(folder: Path) -> float:
    times = [folder.stat().st_mtime]
    with contextlib.suppress(OSError):
        times += [p.stat().st_mtime for p in folder.iterdir()]
    return max(times)


def remove_stale_temps(root: Path, *, max_age: float = STALE_TMP_SECONDS) -> list[Path]:
    """Remove temporary folders of writers that died (``.<key>.<pid>.<random>.<host>.tmp`` / ``.old``).

    A folder is stale when its writer ran on this host and is dead, or, when that cannot be checked
    (another host, or a name without a process id as written by earlier versions), when nothing in
    it changed for ``max_age`` seconds.

    Parameters
    ----------
    root
        Cache root.
    max_age
        Seconds.

    Returns
    -------
    The folders removed.
    """
    removed: list[Path] = []
    host = socket.gethostname()
    now = time.time()
    try:
        candidates = [
            p for p in root.iterdir() if p.name.startswith(".") and p.name.endswith((".tmp", ".old")) and p.is_dir()
        ]
    except OSError:
        return removed
    for path in candidates:
        parts = path.name[1:].rsplit(".", 1)[0].split(".", 3)  # key, pid, random, host (may hold dots)
        alive = _pid_alive(int(parts[1])) if len(parts) == 4 and parts[3] == host and parts[1].isdigit() else None
        try:
            stale = not alive if alive is not None else now - _newest_mtime(path) > max_age
        except OSError:
            continue  # vanished meanwhile
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                logger.info("Removed the temporary feature-cache folder %s left by a stopped run.", path)
                removed.append(path)
    return removed

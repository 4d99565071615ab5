"""Parking: a preempted sequence's compressed cache written to disk and read back as it was.

When the caches' real bytes outgrow the KV budget, the engine preempts its newest request. Rather
than freeing the cache and recomputing the sequence later (vLLM's default), it parks it: the
cache object is pickled to a file, and on readmission it is read back and the sequence continues
from the token it had reached, with the same codes, so its output is what it would have been.

Only the cache's payload goes to the file: the tensors its layers hold (`layer.tensors()`, the
bytes the cache reports). Whatever else it refers to (codecs' rotation matrices, a calibrated
model's projections, a worker thread) is kept by reference in memory, so a resumed cache shares
them as it did before and the file holds the compressed bytes and little more.

The same pickling, with every tensor kept by reference, makes `fork`: the structural copy that
prefix reuse (prefix.py) hands a request whose prompt starts with a finished sequence's tokens.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import tempfile

import torch

from ..errors import KvshrinkError


class RefPickler(pickle.Pickler):
    """Pickles an object graph, keeping by reference (in `kept`) every tensor whose storage is not in
    `payload` (None: every tensor) and every thread, lock or executor."""

    def __init__(self, file, payload: set | None, kept: list):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.payload, self.kept = payload, kept

    def persistent_id(self, obj):
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if self.payload is not None and (storage.data_ptr() in self.payload or not storage.nbytes()):
                return None
        elif not _unpicklable(obj):
            return None
        self.kept.append(obj)
        return len(self.kept) - 1


def _unpicklable(obj) -> bool:
    # threads, locks and executors cannot be written; they stay in memory with the parked entry
    return type(obj).__module__ in ("concurrent.futures.thread", "threading", "_thread", "queue")


class RefUnpickler(pickle.Unpickler):
    def __init__(self, file, kept: list):
        super().__init__(file)
        self.kept = kept

    def persistent_load(self, pid):
        return self.kept[pid]


def fork(cache, share: bool = True):
    """A copy of `cache` that shares every tensor with it (its layers, stores and records are new
    objects): for a cache whose stored tensors are never written in place (`forkable`), the two
    then grow apart without touching each other's tokens. With `share`, their coded blocks are frozen
    first (KVCache.share), so neither copies them as it grows: each adds blocks of its own after them.
    Without, the copy holds the blocks as they are and the original copies them into its next body
    (one body, no more parts for its kernel to read)."""
    if not getattr(cache, "forkable", False):
        raise KvshrinkError(f"{type(cache).__name__} writes its tensors in place and cannot be forked")
    if share:
        cache.share()
    else:
        cache.settle()
    buf, kept = io.BytesIO(), []
    RefPickler(buf, None, kept).dump(cache)
    buf.seek(0)
    return RefUnpickler(buf, kept).load()


class Parking:
    """Parked caches, one file each, in `folder` (a fresh temporary folder when None, removed by
    `close`)."""

    def __init__(self, folder: str | None = None):
        self.folder, self.own = folder, folder is None
        self.entries: dict = {}  # key -> (path, bytes written, objects kept by reference)

    def park(self, key: str, cache) -> int:
        """Write `cache` (a kvshrink cache: its `payload()`) under `key`; returns the bytes written."""
        if self.folder is None:
            self.folder = tempfile.mkdtemp(prefix="kvshrink-park-")
        os.makedirs(self.folder, exist_ok=True)
        payload = {t.untyped_storage().data_ptr() for t in cache.payload()}
        kept: list = []
        path = os.path.join(self.folder, f"{key}.pkl")
        with open(path, "wb") as f:
            RefPickler(f, payload, kept).dump(cache)
        size = os.path.getsize(path)
        self.entries[key] = (path, size, kept)
        return size

    def resume(self, key: str):
        """The cache parked under `key`, as it was; its file is removed."""
        path, _, kept = self.entries.pop(key)
        with open(path, "rb") as f:
            cache = RefUnpickler(f, kept).load()
        os.remove(path)
        return cache

    def discard(self, key: str) -> None:
        if key in self.entries:
            os.remove(self.entries.pop(key)[0])

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def nbytes(self) -> int:
        """Bytes of the parked files together."""
        return sum(size for _, size, _ in list(self.entries.values()))  # read by the metrics thread too

    def close(self) -> None:
        for key in list(self.entries):
            self.discard(key)
        if self.own and self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


"""Freed host memory handed back to the system after a long cache update.

glibc's malloc serves a block above its mmap threshold with mmap and unmaps it when freed, but it
raises the threshold to the size of each such block freed (up to 32 MB). After a prompt's first
large temporaries, the rest (a layer's keys at 8k tokens are 6 MB) come from the heap, where the
cache's new tensors land between them and keep the freed memory from going back. An 8,176-token
prefill through `int4` grew the process by 1,446 MB for a 53 MB cache, through `kvcomp-eb0.1` by
1,558 MB. `malloc_trim` after a long update, once the process has grown by GROWTH since the last
time, brought both to about 450 MB (docs/protocol.md, "Memory"). A fixed mmap threshold would too, but
every large temporary then faults in anew: decode at 8k ran 2-4x slower."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

LONG_UPDATE = 1024  # tokens (times the batch) in one update after which the process's growth is checked
# growth of the resident set since the last release that triggers one: a release costs more than the
# call (freed pages fault in again when reused): one at every layer made a 4k prefill 19% slower
GROWTH = 128 << 20
_since = [0]  # resident bytes after the last release

try:
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _TRIM = getattr(_LIBC, "malloc_trim", None)  # glibc only
except OSError:
    _TRIM = None
AVAILABLE = _TRIM is not None  # glibc's malloc_trim found


def release() -> bool:
    """Hand the allocator's free memory back to the system; False where there is no malloc_trim."""
    if not AVAILABLE:
        return False
    _TRIM(0)
    _since[0] = resident()
    return True


def resident() -> int:
    """The process's resident set in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * 4096
    except OSError:
        return 0


def release_if_grown() -> bool:
    """`release` when the resident set grew by GROWTH since the last one: what a long update calls."""
    if not AVAILABLE or resident() - _since[0] < GROWTH:
        return False
    release()
    return True


def after_update(states) -> bool:
    """What a cache calls after storing `states` (B, H, n, D) in a layer: `release_if_grown` when they were
    a long update on the CPU (at least LONG_UPDATE tokens times the batch)."""
    if states.device.type != "cpu" or states.shape[0] * states.shape[-2] < LONG_UPDATE:
        return False
    return release_if_grown()


def collect_and_release() -> bool:
    """Python's garbage first (cycles keep tensors alive), then `release`: before measuring memory."""
    gc.collect()
    return release()

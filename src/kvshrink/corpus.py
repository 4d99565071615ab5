"""The evaluation corpus: WikiText-2 test (or a user's file), cut into segments (tensors in, no torch import)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .errors import KvshrinkError

if TYPE_CHECKING:  # annotations only: the CLI checks corpora before torch loads
    import torch

DEFAULT_CORPUS_ENV = "KVSHRINK_CORPUS"
_CANDIDATES = ("../shared/data/wikitext-2-raw/wiki.test.raw", "shared/data/wikitext-2-raw/wiki.test.raw")
_WORKPLACE_SHARED = "/work/shared/data/wikitext-2-raw/wiki.test.raw"  # for clones made away from shared/


def default_corpus() -> str:
    """$KVSHRINK_CORPUS, else the shared WikiText-2 test file next to the checkout (or the
    workplace's shared folder, for a clone made elsewhere)."""
    if os.environ.get(DEFAULT_CORPUS_ENV):
        return os.environ[DEFAULT_CORPUS_ENV]
    here = os.path.dirname(os.path.abspath(__file__))
    roots = [os.getcwd(), os.path.join(here, "..", "..", "..")]
    for root in roots:
        for rel in _CANDIDATES:
            path = os.path.normpath(os.path.join(root, rel))
            if os.path.isfile(path):
                return path
    if os.path.isfile(_WORKPLACE_SHARED):
        return _WORKPLACE_SHARED
    raise KvshrinkError("no corpus found: pass --corpus PATH (e.g. WikiText-2's wiki.test.raw)")


def check_corpus(path: str | None = None) -> str:
    """The corpus path, refusing a missing or empty file in one line (no torch: the CLI checks it
    before any model loads)."""
    path = path or default_corpus()
    if not os.path.isfile(path):
        why = "is not a regular file" if os.path.exists(path) else "does not exist"
        raise KvshrinkError(f"corpus {path!r} {why}")
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        if not fh.read(1 << 16).strip():
            raise KvshrinkError(f"corpus {path!r} is empty")
    return path


def load_corpus_ids(tokenizer, path: str | None = None, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids (1-D) of the corpus file; a clear error if it is missing or empty."""
    path = check_corpus(path)
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        # only as much text as needed: about 4 characters a token, with margin
        text = fh.read(max_tokens * 8 if max_tokens else -1)
    if not text.strip():
        raise KvshrinkError(f"corpus {path!r} is empty")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids[:max_tokens] if max_tokens else ids


def segments(ids: torch.Tensor, length: int, count: int) -> list[torch.Tensor]:
    """The first `count` non-overlapping segments of `length` tokens."""
    available = ids.numel() // length
    if available == 0:
        raise KvshrinkError(f"the corpus has {ids.numel()} tokens, fewer than one segment of {length}")
    if available < count:
        raise KvshrinkError(f"the corpus holds {available} segments of {length} tokens, {count} were asked for")
    return [ids[i * length:(i + 1) * length] for i in range(count)]

"""Prefix reuse: compressed caches kept under the tokens they hold, handed to later requests whose
prompts start with those tokens.

Two kinds of entries:
- **prompt chunks**: while a prompt is prefilled, its cache after each whole chunk (at the engine's
  fixed offsets, multiples of `--step-tokens`) is kept. A later prompt that starts with those
  tokens (a long system prompt, a shared document) gets exactly the cache a cold prefill of them
  would have built, so its output is what it would have been.
- **finished sequences**: a request that ends keeps its cache (its prompt and output but the last
  token). A chat's next turn, whose prompt is that history plus a new message, continues from it:
  none of the history is recomputed or coded again. For a compressed method its tokens can differ
  from a cold start's (the history was coded as it was generated, not in prompt chunks), as for any
  cache kept across a chat's turns; `fp16` is unchanged up to float32 rounding.

An entry is used only whole (its tokens a prefix of the new prompt, at least one prompt token
left to feed), never cut. The request gets a fork (park.fork: new layer and store objects, the
same tensors). Sharing is copy-on-write by block: the fork first freezes the entry's coded blocks
(core/store.py's `share`), and the request codes its own blocks after them, so the shared blocks
are held once however long both live (the engine counts every storage once across running caches
and entries). Only the small float16 and staged parts a store replaces as it grows (sink aside)
are the request's own from its first step. A prompt chunk's entry freezes the running request's
blocks too, at chunks 1, 2, 4, 8... (log2 of the chunks, since the int kernel reads each frozen
part separately); at the other chunk ends the entry holds the blocks as they are and the request
copies them into its next body, as before.

The int family (and the budget family built on it) reads frozen parts where they are, in the
server's one-call kernel and when decoding a long call; other families join a store's parts into
one body the first time they read it (one copy, after which the request holds its own).

Admission counts a request that will fork an entry for its own bytes only: what it needs less the
entry's shareable bytes (`KVCache.shareable_nbytes`), which stay counted as the entry's. Should
that entry be dropped while the request runs, its whole need counts again.

Entries live in the room the running requests leave in the KV budget: the engine drops the least
recently used first when an admission needs the room (never the one the admitted request forks).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from ..codecs.base import tensor_nbytes
from .park import fork

MIN_SHARED = 16  # fewer shared tokens are not worth a fork


@dataclass
class Entry:
    tokens: tuple
    cache: object
    finished: bool  # a finished sequence's cache, else a prompt chunk's (see the module's text)


class PrefixStore:
    def __init__(self, enabled: bool = True, max_entries: int = 256):
        self.enabled, self.max_entries = enabled, max_entries
        self.entries: OrderedDict = OrderedDict()  # tokens -> Entry, least recently used first
        self.hits = self.reused_tokens = 0

    def add(self, tokens: list, cache, finished: bool, share: bool = True) -> None:
        """Keep `cache`, which holds exactly `tokens` (a fork of it while its request runs on:
        `finished` False, a prompt chunk's end; `share`: its blocks frozen and shared with the request,
        see the module's text)."""
        if not self.enabled or len(tokens) < MIN_SHARED or not getattr(cache, "forkable", False):
            return
        key = tuple(tokens)
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        if finished:  # the previous turn of the same chat: this entry serves every prompt it did and more
            for old in [k for k, e in self.entries.items() if e.finished and key[:len(k)] == k]:
                del self.entries[old]
        self.entries[key] = Entry(key, cache if finished else fork(cache, share), finished)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)

    def match(self, prompt: list):
        """The key of the longest entry whose tokens begin `prompt` and leave at least its last token to
        feed, or None."""
        return max((k for k in self.entries if MIN_SHARED <= len(k) < len(prompt) and tuple(prompt[:len(k)]) == k),
                   key=len, default=None)

    def shareable(self, key) -> int:
        """Bytes a fork of the entry under `key` would share with it (0 for no key)."""
        return self.entries[key].cache.shareable_nbytes() if key is not None else 0

    def take(self, prompt: list):
        """(a fork of the entry `match(prompt)` names, its token count, whether it is a prompt chunk's:
        what a cold prefill would have built, the entry's key), or (None, 0, True, None)."""
        best = self.match(prompt)
        if best is None:
            return None, 0, True, None
        self.entries.move_to_end(best)
        self.hits += 1
        self.reused_tokens += len(best)
        entry = self.entries[best]
        return fork(entry.cache), len(best), not entry.finished, best

    def drop_oldest(self, keep=None) -> int:
        """Drop the least recently used entry but `keep`; returns the bytes it held (shared ones
        included: at most what dropping it frees), 0 when there is none."""
        key = next((k for k in self.entries if k != keep), None)
        if key is None:
            return 0
        entry = self.entries.pop(key)
        return max(1, tensor_nbytes(entry.cache.payload()))

    def __contains__(self, key) -> bool:
        return key in self.entries

    def payload(self) -> list:
        return [t for e in list(self.entries.values()) for t in e.cache.payload()]

    def __len__(self) -> int:
        return len(self.entries)

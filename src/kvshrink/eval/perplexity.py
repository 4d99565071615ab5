"""Perplexity and agreement with a compressed cache (DESIGN.md protocol).

Each segment is fed in chunks with the cache as `past_key_values`, so every
token is predicted from the compressed cache of everything before its chunk.
The reference (an uncompressed float32 DynamicCache) and every method run in
lockstep on the same chunks, so KL(reference || method) and top-1 agreement
are computed on the same positions without storing reference logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..compat import with_cache
from ..core.cache import cache_nbytes

REFERENCE = "dynamic-fp32"


@dataclass
class QualityTally:
    nll: float = 0.0
    kl: float = 0.0
    top1: int = 0
    tokens: int = 0
    ratios: list = field(default_factory=list)
    nbytes: list = field(default_factory=list)
    coding: dict = field(default_factory=dict)  # entropy-coded caches: bits per symbol vs the Shannon limit

    def result(self) -> dict:
        out = {"tokens": self.tokens, "nll": self.nll / self.tokens, "ppl": math.exp(self.nll / self.tokens)}
        if self.ratios:
            out.update(
                kl=self.kl / self.tokens,
                top1=self.top1 / self.tokens,
                ratio=sum(self.ratios) / len(self.ratios),
                cache_bytes=sum(self.nbytes) / len(self.nbytes),
            )
        if self.coding:
            out["coding"] = self.coding
        return out


def fp16_nbytes(spec, batch: int, tokens: int) -> int:
    return spec.fp16_bytes(tokens, batch)


def _add_coding(total: dict, stats: dict) -> None:
    """Symbol-weighted means over segments."""
    for part, st in stats.items():
        acc = total.setdefault(part, {"symbols": 0, "bits_per_symbol": 0.0, "entropy_bits_per_symbol": 0.0})
        n = acc["symbols"] + st["symbols"]
        for k in ("bits_per_symbol", "entropy_bits_per_symbol"):
            acc[k] = (acc[k] * acc["symbols"] + st[k] * st["symbols"]) / n
        acc["symbols"] = n


@torch.no_grad()
def evaluate_quality(model, spec, make_cache: dict, segs: list[torch.Tensor], chunk: int = 64, progress=None,
                     models: dict | None = None) -> dict:
    """{name: metrics} for the reference and each `make_cache[name]()`, over `segs`;
    `models[name]` runs that method where given (a transformed copy), else `model`."""
    models = models or {}
    tallies = {REFERENCE: QualityTally(), **{n: QualityTally() for n in make_cache}}
    for seg in segs:
        ids = seg.unsqueeze(0)
        caches = {REFERENCE: DynamicCache(config=model.config), **{n: f() for n, f in make_cache.items()}}
        for start in range(0, ids.shape[1], chunk):
            piece = ids[:, start:start + chunk]
            targets = ids[0, start + 1:start + chunk + 1]
            n = targets.numel()
            ref_logp = None
            for name, cache in caches.items():
                out = models.get(name, model)(piece, **with_cache(model, cache), use_cache=True)
                logits = out.logits[0, :n].float()
                logp = torch.log_softmax(logits, -1)
                t = tallies[name]
                t.nll -= logp.gather(1, targets[:, None]).sum().item()
                t.tokens += n
                if ref_logp is None:
                    ref_logp = logp
                    continue
                t.kl += (ref_logp.exp() * (ref_logp - logp)).sum().item()
                t.top1 += (logp.argmax(-1) == ref_logp.argmax(-1)).sum().item()
            if progress is not None:
                progress()
        for name, cache in caches.items():
            if name != REFERENCE:
                held = cache_nbytes(cache)
                tallies[name].nbytes.append(held)
                tallies[name].ratios.append(fp16_nbytes(spec, 1, seg.numel()) / held)
                if hasattr(cache, "coding_stats"):
                    _add_coding(tallies[name].coding, cache.coding_stats())
    results = {name: t.result() for name, t in tallies.items()}
    base = results[REFERENCE]["ppl"]
    for r in results.values():
        r["ppl_change"] = r["ppl"] / base - 1
    return results

"""The front of the library: prepare a model for a method, make its cache, load a saved one.

    model = kvshrink.prepare(model, "int4", tokenizer)     # once: attention, ZDC transform, calibration
    cache = kvshrink.from_method("int4", model)            # changes nothing on the model
    model.generate(**inputs, cache=cache)                  # past_key_values= before transformers renamed it

`FAMILIES` maps each family (a config's `family`) to the module that builds its caches: one line
here per family, beside its folder and its line in `families/__init__.py`.
"""

from __future__ import annotations

import dataclasses

from . import families  # noqa: F401  (registers every family's presets)
from .core import saved
from .core.cache import KVCache
from .core.calibfile import model_header
from .errors import KvshrinkError
from .families.budget import cache as budget
from .families.evict import cache as evict
from .families.kvcomp import cache as kvcomp
from .families.lowrank import cache as lowrank
from .families.mixed import methods as mixed
from .families.peers import cache as peers
from .families.quant import cache as quant
from .families.rvq import cache as rvq
from .registry import Method, get_method
from .spec import spec_from_config

FAMILIES = {"quant": quant, "lowrank": lowrank, "evict": evict, "rvq": rvq, "kvcomp": kvcomp, "budget": budget,
            "mixed": mixed, "peer": peers}


def _method(method: str | Method) -> Method:
    return get_method(method) if isinstance(method, str) else method


def prepare(model, method: str | Method, tokenizer=None, corpus: str | None = None):
    """The model `method` runs on, made ready: the int, eviction, RVQ and KVComp methods switch
    `model` to the "kvshrink" attention in place (plain SDPA for any other cache) and RVQ loads or
    learns its codebooks; ZDC methods return a transformed copy (calibrated first if no file
    exists; that needs `tokenizer`). Peers change nothing."""
    m = _method(method)
    spec_from_config(model.config)  # an unsupported model is refused for what it is, before any method looks
    return FAMILIES[m.family].prepare(m.config, model, tokenizer, corpus)


def from_method(method: str | Method, target, **options):
    """A fresh cache for a registered method name ("int4", "kvc-8x:window=32", ...).
    target: the (prepared) model, or its config for methods that need only the config.
    options: the config's fields, typed (`from_method("int4", model, window=16)`)."""
    m = _method(method)
    spec_from_config(getattr(target, "config", target))  # the model first, as in prepare
    config = m.config
    if options:
        unknown = set(options) - {f.name for f in dataclasses.fields(config)}
        if unknown:
            raise KvshrinkError(f"unknown option(s) {', '.join(sorted(unknown))} for method {m.name!r}")
        config = dataclasses.replace(config, **options)
    cache = FAMILIES[m.family].build(config, target, m.name)
    if isinstance(cache, KVCache):  # what cache.save writes beside its tokens (core/saved.py)
        cache.options = dict(options)
        if hasattr(target, "parameters"):
            cache.model_header = model_header(target)
    return cache


def saved_method(path: str) -> str | None:
    """The method a cache file was saved with: what to `prepare` the model for before `load_cache` (None for a
    missing file or one of neither format)."""
    return saved.method_of(path) or kvcomp.method_of(path)


def load_cache(path: str, model):
    """A cache saved with `cache.save(path)`, checked against `model` (prepared for `saved_method(path)`): the
    int, budget, ZDC and RVQ methods' file (core/saved.py) or KVComp's own."""
    if saved.method_of(path) is None:
        return kvcomp.load(path, model)
    tensors, info, layers = saved.read(path, model)
    cache = from_method(info["method"], model, **info["options"])
    saved.fill(cache, tensors, layers, next(model.parameters()).device)
    return cache

"""Registered compression methods: one name -> how to build its cache.

`kvshrink bench --methods int4,int2-rot` and `CompressedCache.from_method`
look names up here. A method is a small record around a factory; the codecs
themselves are classes in `kvshrink.codecs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .codecs.base import Fp16
from .codecs.quant import IntQuant
from .errors import KvshrinkError

# Layout defaults, chosen by measurement (README, "Choosing the defaults").
SINK = 4
WINDOW = 0
BLOCK = 128


@dataclass
class Method:
    """A named way to build a cache. `factory(config, **overrides)` returns the Cache."""

    name: str
    description: str
    factory: Callable
    family: str = "kvshrink"  # "kvshrink" or "peer" (another library, same table)
    options: dict = field(default_factory=dict)
    tunable: tuple = ()  # options a name may override: "int4:window=16:block=64"
    prepare: Callable | None = None  # (model, tokenizer, corpus, **options) -> the model this method runs on
    default: bool = True  # run by a plain `kvshrink bench`

    def make_cache(self, target, **overrides):
        """target: the model (or its config, for methods that need only the config)."""
        if self.prepare is None:
            target = getattr(target, "config", target)
        return self.factory(target, **{**self.options, **overrides})

    def prepare_model(self, model, tokenizer, corpus=None):
        return model if self.prepare is None else self.prepare(model, tokenizer, corpus, **self.options)


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} registered twice")
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    """A registered method, or a variant with options: "int4:window=16:block=64"."""
    _load_peers()
    base, *opts = name.split(":")
    if base not in REGISTRY:
        raise KvshrinkError(f"unknown method {base!r}; known: {', '.join(method_names(all_families=True))}")
    method = REGISTRY[base]
    if not opts:
        return method
    overrides = {}
    for opt in opts:
        key, _, value = opt.partition("=")
        if key not in method.tunable:
            allowed = ", ".join(method.tunable) or "none"
            raise KvshrinkError(f"unknown option {key!r} for method {base!r} (options: {allowed})")
        overrides[key] = (value if key in _TEXT_OPTIONS else _float_option(key, value) if key in _FLOAT_OPTIONS
                          else _int_option(key, value))
    options = {**method.options, **overrides, "method": name}
    return Method(name, f"{method.description} [{', '.join(opts)}]", method.factory, method.family, options,
                  method.tunable, method.prepare, default=False)


_TEXT_OPTIONS = ("key_axis", "alloc", "score", "norm", "pooling", "key_grouping", "value_grouping", "attend")


_FLOAT_OPTIONS = ("eb", "keb", "veb", "drift")


def _float_option(key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise KvshrinkError(f"option {key} needs a number, got {value!r}") from None


def _int_option(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise KvshrinkError(f"option {key} needs an integer, got {value!r}") from None


def method_names(all_families: bool = False) -> list[str]:
    _load_peers()
    return [n for n, m in REGISTRY.items() if all_families or m.family == "kvshrink"]


def _load_peers() -> None:
    from .eval import peers  # noqa: F401  (registers hf-* methods on import)


def _fused_target(target, attend: str):
    """(config, attend): given the model, switch it to the "kvshrink" attention so decode steps can
    read the codes in place; given only a config, the cache decodes and attends (it says so in
    `describe()`)."""
    if not hasattr(target, "set_attn_implementation"):
        return target, "decode"
    if attend == "fused":
        from .attention.paged import use_kvshrink_attention

        use_kvshrink_attention(target)
    return target.config, attend


def int_quant_cache(target, bits: int, rotate: bool = False, sink=SINK, window=WINDOW, block=BLOCK,
                    key_axis: str = "channel", value_group: int | None = None, attend: str = "fused",
                    splits: int = 4, background: int = 0, method: str | None = None):
    """KIVI layout: keys per channel over `block` tokens, values per token over `value_group` channels.
    target: the model (fused decode attention) or its config (decode-then-attend). background=0: a
    filled block is coded on the decode step itself; a worker thread made that step slower on
    2 cores (README, "Zero-delay decode"), unlike KVComp's heavier Huffman coding."""
    from .cache import CompressedCache

    config, attend = _fused_target(target, attend)
    key_group = block if key_axis == "channel" else None
    keys = IntQuant(bits, key_axis, key_group, rotate=rotate, seed=1)
    values = IntQuant(bits, "token", value_group, rotate=rotate, seed=2)
    cache = CompressedCache(config, key_codec=keys, value_codec=values, sink=sink, window=window, block=block,
                            attend=attend, splits=splits, background=bool(background))
    cache.method = method
    return cache


def _use_model(model, tokenizer=None, corpus=None, **_):
    """The int methods build their cache from the model itself (see `_fused_target`)."""
    return model


def _fp16_cache(config, block=BLOCK, method="fp16", **_):
    from .cache import CompressedCache

    cache = CompressedCache(config, key_codec=Fp16(), sink=0, window=0, block=block)
    cache.method = method
    return cache


_INT_OPTIONS = ("sink", "window", "block", "value_group", "key_axis", "attend", "splits", "background")
register(Method("fp16", "uncompressed reference: keys and values stored as float16", _fp16_cache, tunable=("block",)))
for _bits in (8, 4, 3, 2):
    register(Method(
        f"int{_bits}",
        f"{_bits}-bit KIVI layout: keys per channel over {BLOCK} tokens, values per token; fp16 sink {SINK}",
        int_quant_cache,
        options={"bits": _bits, "method": f"int{_bits}"},
        tunable=_INT_OPTIONS,
        prepare=_use_model,
    ))
    register(Method(
        f"int{_bits}-rot",
        f"int{_bits} after a randomized Hadamard rotation of each head vector",
        int_quant_cache,
        options={"bits": _bits, "rotate": True, "method": f"int{_bits}-rot"},
        tunable=_INT_OPTIONS,
        prepare=_use_model,
    ))


from . import kvc_methods, kvcomp_methods, rvq_methods, zdc_methods  # noqa: E402,F401  (register the families)

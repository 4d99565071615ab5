"""Save a cache whose layers keep their tokens in TokenStores (core/store.py) and read it back: a chat resumed
without recomputing its prompt, for the int, budget (`auto-*`), ZDC and RVQ methods (KVComp has its own file,
families/kvcomp/io.py).

The file is safetensors: every store's parts as they are in memory (the float16 sink, decode-step and window
tokens; the tensors of the coded window, stage and body), the token ids when given, and a JSON header naming the
model (shape and weight fingerprint, as calibration files do), the method and options the cache was built with,
and each store's codec as its `describe()` words it. Its size is the bytes the cache reports and a few kilobytes
of header: codecs, bases, codebooks and code tables are not in it. A layer that keeps tokens beside its stores (the
importance-aware window and high class, core/importance.py) hands them over as `saved_parts()`: tensors or packed
codes, and a few numbers (its share, how many tokens left its window), written beside its stores and given back by
`restore_parts`. Loading (api.load_cache) builds a fresh cache of
the saved method for the model, so they come from the method and its calibration files, then `fill` checks that
every store codes as the saved one did (another calibration gives another allocation: refused in one line) and
puts the saved parts in place. Nothing in the file is executed (no pickle).
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors.torch import save_file

from ..codecs.base import Packed
from ..codecs.jointcoded import StreamPacked
from ..errors import KvshrinkError
from .calibfile import check_header, metadata_of, read_safetensors

FORMAT = "kvshrink-stores-1"
KIND = "cache file"
_DENSE = ("sink", "fresh", "tail")  # float16 parts (tail: a coded window's decode tokens, else None)
_CODED = ("window", "stage", "body")  # coded parts, or None (window: float16 where the store does not code it)


def saveable(cache) -> bool:
    """Whether every layer of `cache` holds all its tokens in its stores (what this file can hold)."""
    return bool(cache.layers) and all(getattr(layer, "saved_by_stores", False) for layer in cache.layers)


def _put(tensors: dict, prefix: str, part) -> dict | None:
    """Write one part's tensors under `prefix`; returns how to rebuild it."""
    if part is None:
        return None
    if isinstance(part, torch.Tensor):
        tensors[prefix] = part
        return {"kind": "tensor"}
    if type(part) not in (Packed, StreamPacked):
        raise KvshrinkError(f"a store part of type {type(part).__name__} cannot be saved")
    meta = getattr(part, "meta", {})
    if json.loads(json.dumps(meta)) != meta:
        raise KvshrinkError(f"a coded part's layout {meta!r} cannot be written as JSON")
    for name, t in part.tensors.items():
        tensors[f"{prefix}.{name}"] = t
    return {"kind": "stream" if isinstance(part, StreamPacked) else "packed", "block": part.block,
            "head_dim": part.head_dim, "meta": meta, "names": list(part.tensors)}


def _get(tensors: dict, prefix: str, how: dict | None, device):
    if how is None:
        return None
    if how["kind"] == "tensor":
        return tensors[prefix].to(device)
    t = {n: tensors[f"{prefix}.{n}"].to(device) for n in how["names"]}
    if how["kind"] == "stream":
        return StreamPacked(t["stream"], t["starts"], t["min"], t["scale"], how["block"], how["head_dim"])
    return Packed(t, how["block"], how["head_dim"], how["meta"])


def _words(codec) -> str | None:
    return None if codec is None else codec.describe()


def digest(layer) -> str:
    """A layer's calibrated tensors (its own and its stores' codecs', `calibrated()`), hashed: two calibrations
    that describe their codecs in the same words still differ here."""
    h = hashlib.sha256()
    tensors = list(layer.calibrated())
    for store in layer.stores():
        for codec in (store.codec, store.stage_codec, store.window_codec):
            tensors += codec.calibrated() if codec is not None else []
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def token_ids(cache, ids) -> dict:
    """{"ids": the token ids a cache file keeps (1, n)}, checked against the tokens the cache holds; {} for none."""
    if ids is None:
        return {}
    if ids.shape[-1] != cache.get_seq_length():
        raise KvshrinkError(f"{ids.shape[-1]} token ids for a cache of {cache.get_seq_length()} tokens")
    return {"ids": ids.reshape(1, -1).long()}


def save(cache, path: str, header: dict, ids=None) -> int:
    """Write `cache` to `path` with the token ids it holds when given (so that a chat can continue from them);
    header: the model's (KVCache.file_header). Returns the file's size in bytes."""
    if not cache.method:
        raise KvshrinkError("a cache built without a method (its class called directly) cannot be read back: build "
                            "it with kvshrink.from_method(name, model) to save it")
    if not saveable(cache):
        raise KvshrinkError(f"{cache.method or type(cache).__name__} caches keep tokens outside their stores and "
                            "cannot be saved")
    cache.settle()
    tensors, layers = token_ids(cache, ids), []
    for i, layer in enumerate(cache.layers):
        if not layer.is_initialized:
            layers.append(None)
            continue
        stores = []
        for j, store in enumerate(layer.stores()):
            p = f"{i}.{j}."
            for name in _DENSE:
                if getattr(store, name) is not None:
                    tensors[p + name] = getattr(store, name)
            parts = {"window": store.window, "stage": store.stage, "body": store.joined()}
            stores.append({"codec": _words(store.codec), "stage_codec": _words(store.stage_codec),
                           "window_codec": _words(store.window_codec),
                           "parts": {name: _put(tensors, p + name, parts[name]) for name in _CODED}})
        entry = {"dropped": layer.dropped, "kv_shape": list(layer.kv_shape), "dtype": str(layer.dtype),
                 "calibrated": digest(layer), "stores": stores}
        if hasattr(layer, "saved_parts"):
            parts, numbers = layer.saved_parts()
            entry["beside"] = {"parts": {name: _put(tensors, f"{i}.x.{name}", part) for name, part in parts.items()},
                               "numbers": numbers}
        layers.append(entry)
    cache_info = {"method": cache.method, "options": cache.options}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path,
              metadata={"format": FORMAT, "header": json.dumps(header), "cache": json.dumps(cache_info),
                        "layers": json.dumps(layers)})
    return os.path.getsize(path)


def read(path: str, model) -> tuple[dict, dict, list]:
    """(tensors, {"method", "options"}, per layer its parts' layout or None) of a file written by `save`, checked
    against `model`."""
    tensors, meta = read_safetensors(path, FORMAT, KIND, "a kvshrink cache")
    check_header(json.loads(meta["header"]), model, "", what=f"{KIND} {path!r}")
    return tensors, json.loads(meta["cache"]), json.loads(meta["layers"])


def method_of(path: str) -> str | None:
    """The method a cache file of this format was saved with; None for a file of another format, or none."""
    meta = metadata_of(path)
    return json.loads(meta["cache"])["method"] if meta.get("format") == FORMAT else None


def fill(cache, tensors: dict, layers: list, device) -> None:
    """Put the saved parts into `cache`, a fresh cache of the saved method, refusing one whose layers or codecs
    differ from the saved ones."""
    if len(layers) != len(cache.layers):
        raise KvshrinkError(f"{KIND} has {len(layers)} layers, the model {len(cache.layers)}")
    for i, (layer, saved) in enumerate(zip(cache.layers, layers)):
        if saved is None:
            continue
        b, h, d = saved["kv_shape"]
        like = torch.empty(b, h, 0, d, dtype=getattr(torch, saved["dtype"].removeprefix("torch.")), device=device)
        layer.lazy_initialization(like, like)  # what a first update fixes: the kernel's choices, empty stores
        stores = layer.stores()
        if len(stores) != len(saved["stores"]):
            raise KvshrinkError(f"{KIND} layer {i} has {len(saved['stores'])} stores, this method's {len(stores)}")
        for j, (store, s) in enumerate(zip(stores, saved["stores"])):
            have = (_words(store.codec), _words(store.stage_codec), _words(store.window_codec))
            if have != (s["codec"], s["stage_codec"], s["window_codec"]):
                raise KvshrinkError(f"{KIND} layer {i} was coded with {s['codec']!r}, this method and calibration "
                                    f"code it with {have[0]!r}: load it where it was saved, with the same "
                                    "calibration files")
            p = f"{i}.{j}."
            for name in _DENSE:
                setattr(store, name, tensors[p + name].to(device) if p + name in tensors else None)
            for name in _CODED:
                part = _get(tensors, p + name, s["parts"][name], device)
                if name == "body":
                    store.body = part
                else:
                    setattr(store, name, part)
        if digest(layer) != saved["calibrated"]:
            raise KvshrinkError(f"{KIND} layer {i} was coded with other calibrated bases, codebooks or widths than "
                                "this method's calibration files give: load it with the files it was saved with")
        if ("beside" in saved) != hasattr(layer, "restore_parts"):
            raise KvshrinkError(f"{KIND} layer {i} {'holds' if 'beside' in saved else 'lacks'} tokens beside its "
                                "stores, this method's layer does not: load it with the method it was saved with")
        if "beside" in saved:
            beside = saved["beside"]
            layer.restore_parts({name: _get(tensors, f"{i}.x.{name}", how, device)
                                 for name, how in beside["parts"].items()}, beside["numbers"])
        layer.dropped = saved["dropped"]
        if len({len(s) for s in stores}) != 1:
            raise KvshrinkError(f"{KIND} layer {i}'s stores hold different token counts")
    cache.ids = tensors.get("ids")

"""Save a KVComp cache to disk and read it back: a chat resumed without recomputing its prompt.

The file is safetensors holding each store's parts as they are in memory (float16 sink, window,
decode-step and unfinished-block tokens; the entropy-coded stream, offsets, table ids, minimums
and steps of the body) and the code lengths of each Huffman table (the codes and decoding lookups
are rebuilt on load), with a JSON header naming the model (shape and weight fingerprint, as
calibration files do) and the cache's settings. Loading checks the header against the model and
refuses another one in one line.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from ...codecs.base import Packed
from ...codecs.huffman import Table
from ...core.calibfile import check_header, metadata_of, read_safetensors
from ...core.saved import token_ids
from ...kernels.backend import kernels_on
from .codec import EntropyPacked

FORMAT = "kvshrink-cache-3"  # 3: codes over tuples of symbols; bound 0.3 has 4 symbols
SETTINGS = ("key_bound", "value_bound", "key_block", "value_block", "sink", "window", "entropy", "drift",
            "attend", "splits", "method")
_BODY = ("stream", "starts", "table_of", "mn", "step")
_STATS = ("symbols", "payload_bits", "entropy_total")


def save(cache, path: str, header: dict, ids=None) -> int:
    """Write `cache` (a settled KVCompCache) to `path`, with the model's header (KVCache.file_header) and the
    token ids it holds when given (so a chat can continue from them); returns the file's size in bytes."""
    tensors, layers = token_ids(cache, ids), []
    for i, layer in enumerate(cache.layers):
        if not layer.is_initialized:
            layers.append(None)
            continue
        meta = {}
        for name in ("k", "v"):
            store, p = getattr(layer, name), f"{i}.{name}."
            tensors.update({p + "sink": store.sink, p + "window": store.window, p + "fresh": store.fresh})
            if store.stage is not None:
                tensors[p + "stage"] = store.stage.tensors["x"]
            if store.body is not None:
                tensors.update({p + f: t for f, t in store.body.tensors.items()})
            if store.codec.n_tables:
                tensors[p + "lengths"] = store.codec.lengths
            meta[name] = {s: getattr(store.codec, s) for s in _STATS}
        layers.append(meta)
    settings = {k: getattr(cache, k) for k in SETTINGS}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path,
              metadata={"format": FORMAT, "header": json.dumps(header), "settings": json.dumps(settings),
                        "layers": json.dumps(layers)})
    return os.path.getsize(path)


def method_of(path: str) -> str | None:
    """The method a KVComp cache file was saved with (older files name none: KVComp's default); None for a file of
    another format or none at all."""
    meta = metadata_of(path)
    if meta.get("format") != FORMAT:
        return None
    return json.loads(meta.get("settings", "{}")).get("method") or "kvcomp-eb0.1"


def read(path: str, model) -> tuple[dict, list, torch.Tensor | None]:
    """(settings, per layer {store: {part: tensor, "stats": {...}}} or None, token ids) of a cache file."""
    tensors, meta = read_safetensors(path, FORMAT, "cache file", "a kvshrink cache")
    check_header(json.loads(meta["header"]), model, "", what=f"cache file {path!r}")
    layers = []
    dev = next(model.parameters()).device  # the cache lives where the model does
    for i, lm in enumerate(json.loads(meta["layers"])):
        if lm is None:
            layers.append(None)
            continue
        stores = {}
        for name in ("k", "v"):
            p = f"{i}.{name}."
            stores[name] = {k[len(p):]: t.to(dev) for k, t in tensors.items() if k.startswith(p)}
            stores[name]["stats"] = lm[name]
        layers.append(stores)
    return json.loads(meta["settings"]), layers, tensors.get("ids")


def fill(layer, stores: dict) -> None:
    """Put one layer's saved parts into its (new) stores, as they were."""
    for name, parts in stores.items():
        store = getattr(layer, name)
        codec = store.codec
        store.sink, store.window, store.fresh = parts["sink"], parts["window"], parts["fresh"]
        if not store.window_size and store.window.shape[-2]:  # a crop's tokens, where older files kept them
            store.fresh, store.window = torch.cat([store.fresh, store.window], -2), store.window[..., :0, :].clone()
        b, h, _, d = store.sink.shape
        store.stage = Packed({"x": parts["stage"]}, 1, d) if "stage" in parts else None
        for row in parts["lengths"].cpu().numpy() if "lengths" in parts else ():
            codec.add_table(Table(row, n_symbols=codec.quant.symbols))
        for s in _STATS:
            setattr(codec, s, parts["stats"][s])
        store.body = (EntropyPacked(codec, *(parts[f] for f in _BODY), store.block, d)
                      if "stream" in parts else None)
    layer.kv_shape = (b, h, d)
    layer.dtype, layer.device = torch.float32, layer.k.sink.device
    # what lazy_initialization fixes at a first update
    layer.kernel_reads = layer.fused and kernels_on(layer.device, layer.layout, layer.gpu_kernel)
    layer.is_initialized = True

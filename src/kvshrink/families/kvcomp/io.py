"""Save a KVComp cache to disk (cache.py loads it back): a chat resumed without recomputing its prompt.

The file is safetensors holding the cache's coded form as it is in memory
(entropy-coded streams, offsets, minimums, steps, float16 sink and recent
tokens) and the code lengths of each Huffman table (the decoding lookups are
rebuilt on load), with a JSON header naming the model (shape and weight
fingerprint, as calibration files do) and the cache's settings. Loading checks
the header against the model and refuses another one in one line.
"""

from __future__ import annotations

import json
import os

from safetensors.torch import save_file

from ...core.calibfile import model_header
from ...errors import KvshrinkError

FORMAT = "kvshrink-cache-1"
SETTINGS = ("key_bound", "value_bound", "key_block", "value_block", "sink", "window", "entropy", "drift",
            "attend", "splits", "method")


def save(cache, path: str, model=None, ids=None) -> int:
    """Write `cache` (a KVCompCache) to `path`, with the token ids it holds when given (so a chat
    can continue from them); returns the file's size in bytes."""
    header = model_header(model) if model is not None else getattr(cache, "model_header", None)
    if header is None:
        raise KvshrinkError("this cache was not built from a model: pass it, cache.save(path, model)")
    tensors, layers = {}, []
    if ids is not None:
        if ids.shape[-1] != cache.get_seq_length():
            raise KvshrinkError(f"{ids.shape[-1]} token ids for a cache of {cache.get_seq_length()} tokens")
        tensors["ids"] = ids.reshape(1, -1).long()
    for i, layer in enumerate(cache.layers):
        if not layer.is_initialized:
            layers.append(None)
            continue
        layer.settle()  # blocks still being coded in the background
        p = f"{i}."
        tensors.update({p + "sink.k": layer.sink[0], p + "sink.v": layer.sink[1],
                        p + "recent.k": layer.recent[0], p + "recent.v": layer.recent[1]})
        meta = {}
        for name, body in (("kb", layer.kb), ("vb", layer.vb)):
            meta[name] = {"head_dim": body.head_dim, "payload_bits": body.payload_bits, "entropy": body.entropy_total,
                          "symbols": body.symbols}
            if body.num_tokens:
                for field in ("stream", "starts", "table_of", "mn", "step", "lengths"):
                    tensors[f"{p}{name}.{field}"] = getattr(body, field)
        layers.append(meta)
    settings = {k: getattr(cache, k) for k in SETTINGS}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path,
              metadata={"format": FORMAT, "header": json.dumps(header), "settings": json.dumps(settings),
                        "layers": json.dumps(layers)})
    return os.path.getsize(path)

"""What every calibration file shares: the header naming the model it was made for,
the check that refuses another model, the calibration tokens (disjoint from the
evaluation segments) and where calibrations are kept by default."""

from __future__ import annotations

import hashlib
import json
import os

from safetensors import safe_open
from safetensors.torch import save_file

from ..corpus import default_corpus, load_corpus_ids
from ..errors import KvshrinkError
from ..spec import spec_from_config


def model_fingerprint(model) -> str:
    """A short hash of the first layer's key projection (never changed by a transform): two models
    with the same shape but different weights get different fingerprints."""
    attn = model.model.layers[0].self_attn
    if hasattr(attn, "k_proj"):
        w = attn.k_proj.weight
    else:  # a fused projection (Phi-3's qkv_proj): the key rows
        spec = spec_from_config(model.config)
        q, k = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        w = attn.qkv_proj.weight[q:q + k]
    return hashlib.sha256(w.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def model_header(model) -> dict:
    spec = spec_from_config(model.config)
    return {
        "model": getattr(model.config, "_name_or_path", "") or spec.model_type,
        "model_type": spec.model_type,
        "shape": [spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim],
        "fingerprint": model_fingerprint(model),
    }


def check_header(have: dict, model, method: str, what: str = "calibration file") -> None:
    """Refuse a header made for another model, naming the difference."""
    want = model_header(model)
    if have.get("shape") != want["shape"] or have.get("model_type") != want["model_type"]:
        raise KvshrinkError(
            f"{what} is for {have.get('model')!r} ({have.get('model_type')}, layers/heads/kv heads/"
            f"head_dim {have.get('shape')}), not for this model ({want['model_type']}, {want['shape']})"
        )
    if have.get("fingerprint") != want["fingerprint"]:
        fix = (f"calibrate this model with `kvshrink calibrate --method {method}`" if what == "calibration file"
               else "load it with the model that wrote it")
        raise KvshrinkError(
            f"{what} is for other weights (fingerprint {have.get('fingerprint')}, this model {want['fingerprint']}): {fix}"
        )


def calibration_dir() -> str:
    return os.environ.get("KVSHRINK_CALIB_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvshrink")


_EVALUATED: dict = {}  # corpus path -> tokens from its start that a running bench evaluates


def evaluating(corpus: str | None, tokens: int) -> None:
    """Say that the first `tokens` of `corpus` are being evaluated (0: no longer): a calibration
    that would take any of them refuses (`calibration_ids`)."""
    path = os.path.abspath(corpus or default_corpus())
    if tokens:
        _EVALUATED[path] = tokens
    else:
        _EVALUATED.pop(path, None)


def calibration_ids(tokenizer, corpus: str | None = None, sequences: int = 4, length: int = 512):
    """(ids (sequences, length), description): the last tokens of the corpus, so they are
    disjoint from the evaluation segments, which are taken from its start."""

    path = corpus or default_corpus()
    ids = load_corpus_ids(tokenizer, path)
    need = sequences * length
    if ids.numel() < 2 * need:
        raise KvshrinkError(f"the corpus has {ids.numel()} tokens; calibration needs at least {2 * need}")
    with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()[:16]
    start = ids.numel() - need
    evaluated = _EVALUATED.get(os.path.abspath(path), 0)
    if start < evaluated:
        raise KvshrinkError(f"calibrating on the last {need} tokens of {os.path.basename(path)} would reuse "
                            f"{evaluated - start} of the {evaluated} tokens being evaluated; use a longer corpus, "
                            "fewer segments, or a calibration made ahead (kvshrink calibrate --corpus ...)")
    desc = {"corpus": os.path.basename(path), "corpus_sha256": digest, "tokens": [int(start), int(ids.numel())],
            "sequences": sequences, "length": length,
            "note": "the last tokens of the corpus; evaluation segments come from its start"}
    return ids[start:].reshape(sequences, length), desc


def spread_offsets(sequences: int, length: int, context: int | None) -> list[int]:
    """First positions of `sequences` calibration sequences of `length` tokens, evenly spread so the
    last one ends at the model's context (all at 0 when it has no limit or no room). Calibrations of
    post-RoPE keys use them: keys turn with their position, and statistics from positions 0..511 alone
    missed the later ones (ZDC: perplexity x9 at positions 3,000-4,000, docs/lowrank.md)."""
    room = (context or 0) - length
    if room <= 0 or sequences < 2:
        return [0] * sequences
    return [round(j * room / (sequences - 1)) for j in range(sequences)]


def save_tensors(path: str, tensors: dict, fmt: str, header: dict) -> None:
    """A calibration file: safetensors with the format name and a JSON header in its metadata."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path,
              metadata={"format": fmt, "header": json.dumps(header)})


def read_safetensors(path: str, fmt: str, kind: str = "calibration file", what: str | None = None) -> tuple[dict, dict]:
    """(tensors, metadata) of a kvshrink safetensors file of format `fmt`, refusing a missing file,
    a file that is not safetensors and one of another format, in one line."""

    if not os.path.isfile(path):
        raise KvshrinkError(f"{kind} {path!r} does not exist")
    try:
        with safe_open(path, "pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:  # not a safetensors file at all
        raise KvshrinkError(f"{kind} {path!r} is not a safetensors file: {str(err).splitlines()[0]}") from None
    if meta.get("format") != fmt:
        raise KvshrinkError(f"{kind} {path!r} is not {what or 'a kvshrink file'} ({fmt})")
    return tensors, meta


def metadata_of(path: str) -> dict:
    """A safetensors file's metadata; {} for a missing file or one that is not safetensors (read_safetensors says
    which, in one line, where the file must be read)."""
    try:
        with safe_open(path, "pt") as fh:
            return fh.metadata() or {}
    except Exception:  # noqa: BLE001
        return {}


def load_tensors(path: str, fmt: str, names, what: str) -> tuple[dict, dict]:
    """(tensors, header) of a calibration file written by `save_tensors`; also refuses one with other tensors."""
    tensors, meta = read_safetensors(path, fmt, what=what)
    if set(tensors) != set(names):
        raise KvshrinkError(f"calibration file {path!r} is not {what} ({fmt})")
    return tensors, json.loads(meta["header"])


def beside(path: str, suffix: str) -> str:
    """The path of a calibration kept beside the one at `path`: its name with `suffix` before the extension."""
    end = ".safetensors"
    return path[:-len(end)] + suffix + end if path.endswith(end) else path + suffix

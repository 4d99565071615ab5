"""`kvshrink serve` put together: the model prepared for the method, the bytes its caches hold
measured, the engine, the app, and uvicorn on a loopback (or given) address."""

from __future__ import annotations

import re
import signal

import torch
import uvicorn

from ..api import from_method, prepare
from ..attention.function import use_kvshrink_attention
from ..corpus import default_corpus, load_corpus_ids
from ..errors import KvshrinkError
from ..models import DEFAULT_MODEL, load_model
from ..registry import get_method
from ..spec import spec_from_config
from .app import create_app
from .budget import decode_span, measure
from .engine import Engine
from .metrics import Metrics
from .prefix import PrefixStore

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
PROBE_TOKENS = 1024  # the prompt whose cache bytes are measured before serving


def parse_bytes(text: str) -> int:
    """'256MB' (10^6), '1GiB' (2^30), '5000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmg]i?b|b)?\s*", str(text).lower())
    if not m or float(m.group(1)) <= 0:
        raise KvshrinkError(f"cannot read KV budget {text!r}: use a size such as 256MB or 1GiB")
    return int(float(m.group(1)) * UNITS[m.group(2) or ""])


def probe_ids(tokenizer, tokens: int, log=print) -> torch.Tensor:
    """Text the cache bytes are measured on: the default corpus if there is one (entropy-coded caches'
    bytes depend on the text), else random token ids, said so."""
    try:
        ids = load_corpus_ids(tokenizer, default_corpus(), max_tokens=tokens)[:tokens]
        if ids.numel() >= tokens:
            return ids[None]
    except KvshrinkError:
        pass
    log(f"serve: no corpus found; cache bytes measured on {tokens} random token ids")
    return torch.randint(0, len(tokenizer), (1, tokens), generator=torch.Generator().manual_seed(0))


def make_engine(model, tok, method: str, kv_budget: int, max_running: int = 64, step_tokens: int = 256,
                queue_limit: int = 256, probe: int = PROBE_TOKENS, log=print, prefix: bool = True, park: bool = True,
                decode_steps: int | None = None):
    """(model prepared for `method`, a factory of fresh engines on it). The bytes a cache of the method
    holds are measured once, on a `probe`-token prompt, and over `decode_steps` decode steps (None: two
    blocks, a full cycle of float16 decode tokens; fewer, as tests do to save time, may measure less
    than a request can hold: budget.py).
    prefix: reuse kept caches for prompts that start with their tokens (prefix.py); park: park
    preempted caches on disk rather than recompute them."""
    spec = spec_from_config(model.config)
    model = prepare(model, method, tok)
    use_kvshrink_attention(model)  # the packed batch attends through RaggedStates, for every method
    probe = min(probe, spec.max_context or probe)
    span = decode_span(from_method(method, model))
    span = span if decode_steps is None else min(span, decode_steps)
    need = measure(model, lambda: from_method(method, model), probe_ids(tok, probe, log), decode=span)
    fp16 = spec.fp16_bytes_per_token()
    log(f"serve: {method} holds {need.per_token():.0f} bytes per token at {need.lengths[-1]} tokens "
        f"({fp16 / need.per_token():.2f}x float16), and decoding up to {need.extra / 1e6:.2f} MB more a request; "
        f"KV budget {kv_budget / 1e6:.1f} MB, about {kv_budget / need.per_token():.0f} tokens")

    def fresh(metrics=None) -> Engine:
        return Engine(model, tok, lambda: from_method(method, model), need, kv_budget, max_running=max_running,
                      step_tokens=step_tokens, queue_limit=queue_limit, max_context=spec.max_context,
                      metrics=metrics, prefix=PrefixStore(enabled=prefix), park=park)
    return model, fresh


def build(model_name: str | None, method: str, kv_budget: int, max_running: int = 64, step_tokens: int = 256,
          queue_limit: int = 256, probe: int = PROBE_TOKENS, log=print, loaded=None, prefix: bool = True,
          park: bool = True, decode_steps: int | None = None):
    """(app, engine, metrics). loaded: (model, tokenizer) already loaded (tests share one model)."""
    get_method(method)
    model, tok = loaded or load_model(model_name)
    model, fresh = make_engine(model, tok, method, kv_budget, max_running, step_tokens, queue_limit, probe, log,
                               prefix, park, decode_steps)
    metrics = Metrics(method, spec_from_config(model.config).fp16_bytes_per_token())
    engine = fresh(metrics)
    app = create_app(engine, tok, model_name or DEFAULT_MODEL, metrics)
    return app, engine, metrics


def run(app, host: str = "127.0.0.1", port: int = 8000) -> list:
    """Serve until Ctrl-C or SIGTERM; running requests finish first (30 s at most). Returns the signals
    received: uvicorn raises them again once it has shut down, and they land here, so that the process
    exits cleanly instead of by the signal."""
    got: list = []
    signals = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.signal(s, lambda sig, frame: got.append(sig)) for s in signals}
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    return got

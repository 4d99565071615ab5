"""What every kvshrink layer shares: the transformers layer API around stores of tensors.

`StoreLayer` gives a full-attention layer crop (transformers' negative count), beam and batch
reordering mapped over every tensor and packed block it holds (`_batch_map`), and byte
accounting from the tensors themselves (`tensors()`). `stage_codec` and `check_layout` are the
layout rules every store-based family uses.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from transformers.cache_utils import CacheLayerMixin

from ..codecs.base import Codec, tensor_nbytes
from ..codecs.quant import IntQuant
from ..errors import KvshrinkError

FP16_BYTES = 2
FUSED_QUERIES = 8  # longer calls (prefill, perplexity chunks) decode once and attend
ATTENDS = ("fused", "decode")
STAGE_SEED = 3  # the stage's rotation, apart from the int keys' (1) and values' (2)


def coder_pool():
    """The one worker thread a cache hands its filled blocks to (background coding)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvshrink-coder")


def stage_codec(codec: Codec) -> Codec:
    """Per-token codes for a block still filling: two bits more than the block codec's, at most 8,
    Hadamard-rotated below 8 (spread over the head, a key's outlier channels no longer set every
    channel's step). Re-coding the finished block then adds 15-22% to its own error at 2 to 4 bits (docs/quant.md):
    where int4 staged at 8 bits, it stages at 6, a quarter fewer bytes at a request's peak."""
    bits = min(8, getattr(codec, "bits", 4) + 2)
    return IntQuant(bits, "token", rotate=bits < 8, seed=STAGE_SEED)


def stage_for(codec: Codec) -> Codec | None:
    # per-token codecs stage their own codes; only whole-block codecs need a stage codec
    return stage_codec(codec) if codec.block_tokens > 1 else None


def check_layout(key_codec: Codec, value_codec: Codec, sink, window, block) -> None:
    for name, val in (("sink", sink), ("window", window)):
        if not isinstance(val, int) or val < 0:
            raise KvshrinkError(f"{name} must be a non-negative integer, got {val!r}")
    if not isinstance(block, int) or block < 1:
        raise KvshrinkError(f"block must be a positive integer, got {block!r}")
    for codec in (key_codec, value_codec):
        if block % codec.block_tokens:
            raise KvshrinkError(f"block {block} is not a multiple of {codec.describe()}'s {codec.block_tokens} tokens")


class StoreLayer(CacheLayerMixin):
    """What every kvshrink layer shares: a full-attention or sliding-window layer whose batch
    operations map over the tensors and packed blocks it holds (`_batch_map`).

    A sliding layer (`slide(window)`) frees the oldest whole body blocks of its token stores once
    no later query can see them (it holds the last window - 1 tokens and at most two blocks more),
    so its memory stays bounded however long the context; `dropped` counts the freed tokens, the
    mask sizes tell transformers where the held ones start (as its DynamicSlidingWindowLayer does)."""

    is_sliding = False
    is_croppable = True
    sliding_window: int | None = None
    dropped = 0  # tokens a sliding layer no longer holds
    saved_by_stores = False  # every token it holds is in its stores, or in `saved_parts()` (core/saved.py writes it)

    def stores(self) -> list:
        """The layer's TokenStores (core/store.py), all with the same token layout; none for a layer
        that keeps its tokens otherwise."""
        return []

    def held(self) -> int:
        """Tokens the layer holds now."""
        raise NotImplementedError

    def layer_parts(self) -> list:
        """The layers that hold this layer's tokens: itself, or its parts where its KV heads are in groups
        (core/heads.py)."""
        return [self]

    def calibrated(self) -> list[torch.Tensor]:
        """What a calibration gave the layer beyond its codecs (a basis its stores' coordinates are in): a saved
        cache is read back only by a layer with the same (core/saved.py)."""
        return []

    def slide(self, window: int) -> None:
        """Make this a sliding-window layer (before its first update): no sink tokens (the window
        leaves them behind), the oldest blocks freed as they leave the window."""
        if not self.stores():
            raise KvshrinkError(f"{type(self).__name__} cannot hold a sliding-window layer")
        self.is_sliding, self.sliding_window = True, window
        for s in self.stores():
            s.sink_size = 0

    def _slide(self) -> None:
        """After an update: free the whole body blocks no later query sees."""
        if not self.is_sliding:
            return
        extra = self.held() - (self.sliding_window - 1)
        stores = self.stores()
        if extra < stores[0].block:
            return
        gone = {s.drop_first(extra) for s in stores}
        if len(gone) != 1:
            raise KvshrinkError(f"the stores of a sliding layer freed different token counts {sorted(gone)}")
        self.dropped += gone.pop()

    def get_seq_length(self) -> int:
        return self.dropped + self.held() if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # early transformers 5.x pass the cache positions
            query_length = query_length.shape[0]
        return (self.held() if self.is_initialized else 0) + query_length, self.dropped

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # the same, under its name in early transformers 5.x
        return -1

    def offload(self):  # the stores live where they were computed
        pass

    def prefetch(self):
        pass

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` tokens (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise KvshrinkError("crop takes a negative number of tokens to remove, as DynamicCache does")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        keep = self.held() + tokens_to_remove
        if self.dropped and keep < self.sliding_window - 1:
            raise KvshrinkError(f"a sliding layer holds the last {self.held()} tokens: it can drop at most "
                                f"{self.held() - self.sliding_window + 1} of them, not {-tokens_to_remove}")
        self._keep_first(max(keep, 0))

    def _keep_first(self, keep: int) -> None:
        """Keep the first `keep` of the tokens held."""
        raise NotImplementedError

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._batch_map(lambda t: t.index_select(0, beam_idx.to(t.device)), lambda p: p.select_batch(beam_idx))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        self._batch_map(lambda t: t.index_select(0, idx.to(t.device)), lambda p: p.select_batch(idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch_map(lambda t: t.repeat_interleave(repeats, 0), lambda p: p.repeat_batch(repeats))

    def _batch_map(self, on_tensor, on_packed) -> None:
        raise NotImplementedError

    # --- accounting: from the tensors themselves ------------------------------------------
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer holds (payload, scales, minimums, tables, float16 tokens)."""
        raise NotImplementedError

    def nbytes(self) -> int:
        return tensor_nbytes(self.tensors())

    def fp16_nbytes(self) -> int:
        """What a float16 cache would hold for the same tokens (keys and values): for a sliding layer
        the last window - 1 tokens, what transformers' own sliding layer keeps."""
        if not self.is_initialized:
            return 0
        b, h, d = self.kv_shape
        n = self.get_seq_length()
        if self.is_sliding:
            n = min(n, self.sliding_window - 1)
        return 2 * b * h * n * d * FP16_BYTES

    def _init_shape(self, key_states: torch.Tensor) -> None:
        self.kv_shape = (key_states.shape[0], key_states.shape[1], key_states.shape[3])
        self.dtype, self.device = key_states.dtype, key_states.device

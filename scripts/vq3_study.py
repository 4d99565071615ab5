"""Would 3-bit vector levels for values (runs of 4 rotated coordinates to one of 4,096 codewords, 12-bit codes) move
the budget's allocation? Measured before any codec, packing or kernel is written for them.

The codec is emulated (codes held as int16, which the bytes below do not count): the menu's rotated Gaussian-level
value codec with its 3-bit scalar levels replaced by a k-means codebook of N(0, I) in 4 dimensions (faiss), the same
mean and deviation bytes. Each layer's KL per token is measured as the vector calibration measures its 1- and 2-bit
books (core/sensitivity.Perturbed on the budget calibration's first sequence), its bytes are the menu's 3-bit
choice's. The allocator then runs with and without the `3v` choice, its 64 KB codebook counted as fixed bytes as the
shipped books are, for `auto-6x` and `auto-8x` with vector levels, alone and with entropy-coded keys.

    .venv/bin/python scripts/vq3_study.py    (about 2 minutes, the calibrations of `kvshrink calibrate --method auto`)
"""

import faiss
import numpy as np
import torch

from kvshrink.codecs.levels import GAUSS
from kvshrink.codecs.quant import IntQuant
from kvshrink.core.sensitivity import Perturbed, body_round_trip
from kvshrink.families.budget import allocate, vector
from kvshrink.families.budget.cache import calibration_for, joint_for, tables_for, vector_for
from kvshrink.families.budget.config import RECENT
from kvshrink.models import load_model
from kvshrink.spec import spec_from_config

SINK, BLOCK, CONTEXT = 4, 128, 2048


class Vector3(IntQuant):
    """The emulated 3-bit vector codec: a codeword index (int16) per run of 4 normalized coordinates."""

    def __init__(self, book: torch.Tensor):
        super().__init__(3, "token", None, rotate=True, seed=vector.VALUE_SEED, levels=GAUSS, scales="8bit")
        self.book = book

    def _fast(self, x):
        return False

    def _fast_decode(self, packed):
        return False

    def _level_codes(self, z):
        runs = z.reshape(*z.shape[:-1], z.shape[-1] // 4, 4)
        flat = runs.reshape(-1, 4)
        norms = (self.book * self.book).sum(1)
        out = torch.empty(flat.shape[0], dtype=torch.int16)  # codecs/vector.py's nearest() gives uint8 indices
        for a in range(0, flat.shape[0], 4096):
            out[a:a + 4096] = torch.addmm(norms, flat[a:a + 4096], self.book.T, alpha=-2.0).argmin(1)
        return out.reshape(runs.shape[:-1]), runs.shape[-2]

    def _levels_of(self, packed):
        c = packed.tensors["codes"]
        return self.book[c.long()].reshape(*c.shape[:-1], packed.head_dim)


def book3() -> torch.Tensor:
    x = np.random.default_rng(0).standard_normal((4096 * 256, 4)).astype(np.float32)
    km = faiss.Kmeans(4, 4096, niter=40, seed=1, max_points_per_centroid=256)
    km.train(x)
    return torch.from_numpy(np.ascontiguousarray(km.centroids))


def main():
    model, tok = load_model()
    spec = spec_from_config(model.config)
    calib, path = calibration_for(model, BLOCK, tok)
    found = joint_for(model, BLOCK, path, tok)
    tables = tables_for(model, BLOCK, found, tok)[0]
    vc = vector_for(model, BLOCK, path, tok)[0]
    ids, _ = allocate.calibration_ids(tok, None, *allocate.calibration_shape(spec))
    book = book3()
    perturbed = Perturbed(model, ids[:1], recent=RECENT)
    p3 = torch.tensor([max(perturbed.kl(i, "value", body_round_trip(Vector3(book), SINK, BLOCK)), 0.0)
                       for i in range(spec.num_layers)], dtype=torch.float64)
    j3 = allocate.VALUE_MENU.index((3, True, None, GAUSS))
    scalar = calib.proxy_v[:, j3]
    print(f"3-bit values, vector against scalar levels, KL per layer: median {float((p3 / scalar).median()):.3f}x "
          f"(layers 0 and 1: {float(p3[0] / scalar[0]):.2f}x, {float(p3[1] / scalar[1]):.2f}x)")
    two = (vc.proxy.clone(), vc.bytes.clone())
    three = (torch.cat([two[0], p3[:, None]], 1), torch.cat([two[1], calib.bytes_v[:, j3, None]], 1))
    vc.book3 = book
    print("| budget | keys | proxy, 1v and 2v offered | with 3v too | layers taking 3v |\n|---|---|---|---|---|")
    for ratio in (6, 8):
        for coded in (False, True):
            got = []
            for choices, (proxy, nbytes) in (((1, 2), two), ((1, 2, 3), three)):
                vector.CHOICES, vc.proxy, vc.bytes = choices, proxy, nbytes
                got.append(allocate.choose(calib, spec, ratio, CONTEXT, SINK, BLOCK, found[0], 16,
                                           allocate.window_codec(8),
                                           tables if coded else None, coded, vc))
            vector.CHOICES, vc.proxy, vc.bytes = (1, 2), *two
            n3 = sum(v == (vector.VECTOR, 3) for v in got[1].values)
            print(f"| {ratio}x | {'entropy-coded, joint1' if coded else 'joint'} | {got[0].proxy:.5f} | "
                  f"{got[1].proxy:.5f} | {n3} |", flush=True)


if __name__ == "__main__":
    main()

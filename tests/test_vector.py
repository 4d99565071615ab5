"""Vector levels for values (codecs/vector.py): codebooks, round trips, error bounds, byte accounting."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshrink.codecs.hadamard import rotation
from kvshrink.codecs.levels import gauss
from kvshrink.codecs.quant import IntQuant
from kvshrink.codecs.scales import unpack as unpack_scales
from kvshrink.codecs.vector import CODEWORDS, RUN, VectorQuant, gauss_book, nearest
from kvshrink.errors import KvshrinkError


@pytest.fixture(scope="module")
def books():
    return {b: gauss_book(b) for b in RUN}


def _scalar(bits):
    """The menu's value codec at the same bytes: rotated Gaussian levels over the whole head, 8-bit scales."""
    return IntQuant(bits, "token", None, rotate=True, seed=2, levels="gauss", scales="8bit")


@pytest.mark.parametrize("bits", sorted(RUN))
def test_codebooks_beat_the_scalar_lloyd_max_levels_on_fresh_gaussian_samples(books, bits):
    """11% (1 bit, 8 coordinates a codeword) and 17% (2 bits, 4) less squared error than the Lloyd-Max levels, on
    samples the k-means never saw; every codeword finite and distinct."""
    book = books[bits]
    assert book.shape == (CODEWORDS, RUN[bits]) and torch.isfinite(book).all()
    assert torch.cdist(book, book).add(torch.eye(CODEWORDS)).min() > 0
    x = torch.randn(50_000, RUN[bits], generator=torch.Generator().manual_seed(7))
    err = (book[nearest(x, book).long()] - x).pow(2).mean()
    lv = gauss(bits)
    scalar = (x.flatten()[:, None] - lv).abs().min(1).values.pow(2).mean()
    assert err < {1: 0.92, 2: 0.86}[bits] * scalar


def test_nearest_is_the_closest_codeword():
    g = torch.Generator().manual_seed(0)
    book = torch.randn(CODEWORDS, 4, generator=g)
    z = torch.randn(3, 700, 4, generator=g) * 2
    idx = nearest(z, book)
    assert idx.dtype == torch.uint8 and idx.shape == (3, 700)
    dist = torch.cdist(z.reshape(-1, 4), book)
    chosen = dist.gather(1, idx.reshape(-1, 1).long())[:, 0]
    torch.testing.assert_close(chosen, dist.min(1).values)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from(sorted(RUN)), tokens=st.integers(1, 40), block=st.sampled_from([1, 8]),
       scale=st.floats(1e-3, 100), shift=st.floats(-50, 50), seed=st.integers(0, 2**16))
def test_each_run_decodes_to_a_codeword_under_the_stored_mean_and_deviation(books, bits, tokens, block, scale, shift,
                                                                          seed):
    """Undo the rotation and the stored 8-bit mean and deviation: every run of a decoded token is a codeword, the one
    nearest to the token's normalized run; the bytes are a byte a run and two for the scales, exactly."""
    tokens = tokens // block * block or block
    codec = VectorQuant(bits, books[bits])
    x = torch.randn(2, 3, tokens, 64, generator=torch.Generator().manual_seed(seed)) * scale + shift
    packed = codec.encode(x, block)
    assert packed.nbytes() == codec.nbytes(packed) == 2 * 3 * tokens * (64 * bits // 8 + 2)
    assert packed.tensors["codes"].dtype == torch.uint8
    y = codec.decode(packed)
    assert y.shape == x.shape
    mean, dev = unpack_scales(packed.tensors["scale"], packed.tensors["min"])
    mean, dev = mean.reshape(2, 3, tokens, 1), dev.reshape(2, 3, tokens, 1)
    r = rotation(64, 2).double()
    z = ((y.double() @ r) - mean.double()) / dev.double()
    runs = z.reshape(-1, RUN[bits])
    idx = packed.tensors["codes"].reshape(-1).long()
    torch.testing.assert_close(runs.float(), books[bits][idx], rtol=1e-3, atol=1e-3)
    zx = (((x.double() @ r) - mean.double()) / dev.double()).float().reshape(-1, RUN[bits])
    dist = torch.cdist(zx, books[bits])  # the codeword chosen is the nearest (up to float32 rounding at ties)
    chosen = dist.gather(1, idx[:, None])[:, 0]
    assert (chosen <= dist.min(1).values + 1e-3 * (1 + dist.min(1).values)).all()


@pytest.mark.parametrize("bits", sorted(RUN))
def test_same_bytes_as_the_scalar_codes_and_less_error_on_rotated_heads(books, bits):
    """Heads of unequal channels, tokens of unequal norms: a quarter (2 bits) to a tenth (1 bit) less squared error
    than the scalar Gaussian levels, in exactly their bytes."""
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(1, 3, 512, 64, generator=g) * torch.linspace(0.1, 3, 64) * torch.rand(1, 3, 512, 1, generator=g)
    codec, scalar = VectorQuant(bits, books[bits]), _scalar(bits)
    p, s = codec.encode(x, 128), scalar.encode(x, 128)
    assert p.nbytes() == s.nbytes()
    err, ref = (codec.decode(p) - x).pow(2).mean(), (scalar.decode(s) - x).pow(2).mean()
    assert err < {1: 0.93, 2: 0.88}[bits] * ref


def test_zero_tokens_decode_exactly_and_other_dtypes_and_out(books):
    codec = VectorQuant(2, books[2])
    x = torch.randn(1, 2, 16, 64)
    x[0, 1, 3] = 0.0
    packed = codec.encode(x, 16)
    y = codec.decode(packed)
    assert torch.equal(y[0, 1, 3], torch.zeros(64))
    buf = torch.full((1, 2, 20, 64), 7.0)
    codec.decode(packed, torch.float32, out=buf[:, :, 2:18])
    assert torch.equal(buf[:, :, 2:18], y) and (buf[:, :, :2] == 7).all()
    assert codec.decode(packed, torch.float16).dtype == torch.float16


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_and_out_of_range_states_are_refused(books, bad):
    codec = VectorQuant(1, books[1])
    x = torch.randn(1, 2, 4, 64)
    x[0, 1, 2, 5] = bad
    with pytest.raises(KvshrinkError, match="NaN or infinite"):
        codec.encode(x, 1)
    x[0, 1, 2, 5] = 1e8
    with pytest.raises(KvshrinkError, match="range of 8-bit scales"):
        codec.encode(x, 1)


def test_bad_widths_books_and_heads_are_refused(books):
    with pytest.raises(KvshrinkError, match="vector levels have 1 or 2 bits a value, not 3"):
        VectorQuant(3, books[2])
    with pytest.raises(KvshrinkError, match=r"a 1-bit vector codebook is \(256, 8\), not \(256, 4\)"):
        VectorQuant(1, books[2])
    bad = books[2].clone()
    bad[3, 1] = float("nan")
    with pytest.raises(KvshrinkError, match="NaN or infinite codewords"):
        VectorQuant(2, bad)
    with pytest.raises(KvshrinkError, match="not a multiple of the vector codebook's 8 coordinates"):
        VectorQuant(1, books[1]).encode(torch.randn(1, 1, 2, 20), 1)
    with pytest.raises(KvshrinkError, match="not 3"):
        gauss_book(3)


def test_the_codebook_is_counted_by_the_codec(books):
    codec = VectorQuant(2, books[2])
    assert [t.data_ptr() for t in codec.shared_tensors()] == [codec.book.data_ptr()]
    assert codec.book.nbytes == CODEWORDS * 4 * 4

"""Joint-basis keys (codecs/joint.py): round trips within half a step per axis, exact bytes, class packing,
and the int kernel reading them in place as decode-then-attend does."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshrink import CompressedCache
from kvshrink.attention.split import SplitStates
from kvshrink.codecs.joint import JointKeys
from kvshrink.codecs.packing import unpack
from kvshrink.codecs.quant import IntQuant
from kvshrink.codecs.spin import turn
from kvshrink.errors import KvshrinkError

TURN = tuple(10000.0 ** (-i / 8) for i in range(8))  # RoPE frequencies of a 16-wide head
D = 16


def _widths(bits: float, seed: int) -> list:
    """Not rising, summing to at most bits * D, some axes uncoded where bits allow."""
    g = torch.Generator().manual_seed(seed)
    left, out = int(bits * D), []
    for j in range(D):
        w = min(8, left, int(torch.randint(0, int(bits) + 3, (1,), generator=g)))
        w = min(w, out[-1]) if out else w
        out.append(w)
        left -= w
    return sorted(out, reverse=True)


def _codec(bits, seed, heads=2, group=16, turn=TURN):
    g = torch.Generator().manual_seed(seed)
    inverse = torch.eye(D) + 0.2 * torch.randn(heads, D, D, generator=g)
    return JointKeys(inverse, _widths(bits, seed), group, turn, bits)


@settings(max_examples=30, deadline=None)
@given(halves=st.integers(1, 12), seed=st.integers(0, 999), blocks=st.integers(1, 4))
def test_round_trip_within_half_a_step_per_axis_and_bytes_exact(halves, seed, blocks):
    bits = halves / 2  # rates in halves: J0.5, J1.5 ... as the budget offers them
    c = _codec(bits, seed)
    assert c.bits == -(-halves // 2) and f"{bits:g} bits a channel" in c.describe()
    x = torch.randn(2, 2, 16 * blocks, D, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.1, 4, D)
    p = c.encode(x, 16)
    y = turn(x, TURN, 16, -1) @ c.basis(x.device)[None]  # the coordinates the codes stand for
    y_hat = turn(c.decode(p), TURN, 16, -1) @ c.basis(x.device)[None]
    yb, yhb = (t.reshape(2, 2, blocks, 16, D) for t in (y, y_hat))
    step = p.tensors["scale"].float()[:, :, :, None]
    err = (yb - yhb).abs()
    w = torch.tensor(c.widths)
    coded = err[..., w > 0]
    assert (coded <= step / 2 * 1.01 + 1e-4).all()  # steps held for the coded axes only: the first ones
    mean = yb.mean(3, keepdim=True).expand_as(yb)
    torch.testing.assert_close(yhb[..., w == 0], mean[..., w == 0], atol=2e-2, rtol=2e-3)  # float16 means
    # bytes: the widths' bits a token, nothing padded, a float16 min per axis and step per coded axis and block;
    # nothing else
    assert sum(c.widths) <= bits * D and p.tensors["scale"].shape[-1] == c.coded == int((w > 0).sum())
    assert p.nbytes() == 2 * 2 * blocks * (16 * sum(c.widths) // 8 + 2 * D + 2 * c.coded)
    rows, scale = c.shared_tensors()  # the map back to keys: int8 rows, a float16 scale each
    assert rows.dtype == torch.int8 and rows.shape == (2, D, D) and scale.dtype == torch.float16 and scale.shape == (2, D, 1)


def test_the_stored_map_is_within_int8_rounding_of_the_given_one():
    g = torch.Generator().manual_seed(4)
    inverse = torch.randn(2, D, D, generator=g)
    c = JointKeys(inverse, [2] * D, 16, TURN, 2)
    err = (c.inverse() - inverse).abs()
    assert (err <= inverse.abs().amax(-1, keepdim=True) / 127 / 2 * 1.01 + 1e-6).all() and err.max() > 0


def test_each_width_class_is_packed_axis_major_at_its_width():
    c = JointKeys(torch.eye(D).expand(1, D, D), [4] * 3 + [2] * 5 + [0] * 8, 16, TURN, 2)
    assert c.classes == [(0, 3, 4), (3, 5, 2)]
    x = torch.randn(1, 1, 16, D, generator=torch.Generator().manual_seed(3))
    p = c.encode(x, 16)
    y = turn(x, TURN, 16, -1)[0, 0]  # identity basis
    mn, st_ = p.tensors["min"][0, 0, 0].float(), p.tensors["scale"][0, 0, 0].float()
    first = unpack(p.tensors["codes"][0, 0, 0, :16 * 3 * 4 // 8], 4, 16 * 3).reshape(3, 16).T  # axis by axis
    want = ((y[:, :3] - mn[:3]) / st_[:3]).round().clamp(0, 15)
    assert torch.equal(first.float(), want)
    assert p.tensors["codes"].shape[-1] == 16 * (4 * 3 + 2 * 5) // 8  # 16 x 4 x 3 + 16 x 2 x 5 bits, nothing padded


@pytest.mark.parametrize("widths, bits", [([9] + [0] * 15, 2), ([1, 2] + [0] * 14, 2), ([3] * 16, 2),
                                          ([2] * 8 + [0] * 8, 0.75), ([2] * 8 + [0] * 8, 0), ([2] * 8 + [0] * 8, True)])
def test_bad_widths_are_refused(widths, bits):
    with pytest.raises(KvshrinkError):
        JointKeys(torch.eye(D).expand(2, D, D), widths, 16, TURN, bits)


def _states(kc, vc, n, t, seed, batch=2, group=3):
    g = torch.Generator().manual_seed(seed)
    cache = CompressedCache(num_layers=1, key_codec=kc, value_codec=vc, sink=4, window=0, block=16, attend="fused")
    layer = cache.layers[0]
    layer.update(torch.randn(batch, 2, n, D, generator=g) * torch.linspace(0.2, 3, D),
                 torch.randn(batch, 2, n, D, generator=g))
    states, _ = layer.update(torch.randn(batch, 2, t, D, generator=g), torch.randn(batch, 2, t, D, generator=g))
    return layer, states, torch.randn(batch, 2 * group, t, D, generator=g)


@settings(max_examples=25, deadline=None)
@given(halves=st.integers(1, 10), seed=st.integers(0, 999), n=st.integers(40, 150), t=st.sampled_from([1, 3]),
       vbits=st.sampled_from([2, 4]), group=st.sampled_from([3, 1, 2, 4]))
def test_kernel_reads_joint_keys_as_decode_then_attend(halves, seed, n, t, vbits, group):
    """group: query heads per KV head (rows read three at a time where they can, the rest one by one). Rates in
    halves, widths often summing to less than rate x D: a block's codes are its classes' bits, found by the class
    table."""
    layer, states, q = _states(_codec(halves / 2, seed), IntQuant(vbits, "token", rotate=True, seed=2), n, t, seed,
                               group=group)
    assert isinstance(states.body.key_codec, JointKeys) and states.body.body_tokens >= 16
    total = layer.get_seq_length()
    mask = torch.ones(2, 1, t, total, dtype=torch.bool).tril(total - t)
    fused = states.attend(None, q, mask, None)[0]
    want = dataclasses.replace(states, fused=False).attend(None, q, mask, None)[0]
    torch.testing.assert_close(fused, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits, seed", [(2, 11), (3, 12), (4, 13)])
def test_kernel_reads_joint_keys_of_a_partial_rotary_head(bits, seed):
    """RoPE on 12 of 16 channels: the per-offset queries turn the pairs and leave the rest as they are."""
    layer, states, q = _states(_codec(bits, seed, turn=TURN[:6]), IntQuant(4, "token"), 70, 1, seed)
    fused = states.attend(None, q, None, None)[0]
    want = dataclasses.replace(states, fused=False).attend(None, q, None, None)[0]
    torch.testing.assert_close(fused, want, rtol=1e-4, atol=1e-4)


def test_many_sequences_with_joint_keys_get_what_each_gets_alone(monkeypatch):
    kc, vc = _codec(1.5, 7), IntQuant(2, "token", rotate=True, seed=2)
    made = [_states(kc, vc, n, 1, n, batch=1) for n in (50, 83, 130)]
    alone = [s.attend(None, q, None)[0] for _, s, q in made]
    many = SplitStates.attend_many([s for _, s, _ in made], torch.cat([q for _, _, q in made]))
    for i in range(len(made)):
        assert torch.equal(many[i:i + 1], alone[i])

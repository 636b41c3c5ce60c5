"""The batch KV cache: in-place appends equal concatenation (through regrowth), joins right-align rows, selects drop
rows and leading padding columns."""

from __future__ import annotations

import torch

from tuneforge.inference import kv


def _states(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, length, 4, generator=g), torch.randn(batch, 2, length, 3, generator=g)


def test_appends_equal_concatenation_through_regrowth():
    layer = kv.SlabLayer()
    ks, vs = [], []
    for step in range(300):
        k, v = _states(3, 7 if step == 0 else 1, step)
        ks.append(k)
        vs.append(v)
        keys, values = layer.update(k, v)
    assert layer.get_seq_length() == 306 and layer._k.shape[2] > 306
    torch.testing.assert_close(keys, torch.cat(ks, dim=2), rtol=0, atol=0)
    torch.testing.assert_close(values, torch.cat(vs, dim=2), rtol=0, atol=0)


def test_join_right_aligns_and_select_drops_rows_and_padding():
    a = kv.cache_from_tensors([_states(2, 5, 0)])
    b = kv.cache_from_tensors([_states(1, 9, 1)])
    joined = kv.join(a, b)
    (k, _), = kv.tensors_of(joined)
    assert k.shape == (3, 2, 9, 4)
    torch.testing.assert_close(k[:2, :, 4:], kv.tensors_of(a)[0][0])  # shorter rows end at the same column
    torch.testing.assert_close(k[2:], kv.tensors_of(b)[0][0])
    kept = kv.select(joined, torch.tensor([0, 1]), drop_columns=4)
    torch.testing.assert_close(kv.tensors_of(kept)[0][0], kv.tensors_of(a)[0][0])
    kept.layers[0].update(*_states(2, 1, 5))  # still appendable after a rebuild
    assert kept.get_seq_length() == 6

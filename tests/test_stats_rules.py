"""``GramStats.update`` and merging around the sums: every refusal with its exact message, the Gram matrix against
a float64 reference whatever the chunking and the sample layout, and what a merge into empty statistics takes over.

tests/test_stats_lstsq.py checks the fits on the statistics; this file is what a mutation of the accumulation or of
its checks must not get past (benchmarks/RESULTS.md, "Mutation testing")."""
from __future__ import annotations

import pytest
import torch

from olss_fast.core import stats as stats_module
from olss_fast.core.ranges import MAX_ITEMS
from olss_fast.core.stats import GramStats
from helpers import random_paths
from helpers import raises_exactly as _refused

T = 3


def _stats(**kw) -> GramStats:
    return GramStats([900, 600, 300], teacher="ddim", model="m", prediction_type="epsilon", **kw)


def _paths(batch: int = 2, shape=(2, 3), seed: int = 0, dtype=torch.float32):
    return tuple(p.to(dtype) for p in random_paths(T, batch, shape, seed))


def _reference_gram(x: torch.Tensor, e: torch.Tensor, channels: int) -> torch.Tensor:
    """[C, 2T+1, 2T+1] float64: inner products of the vectors [x_0..x_T, e_0..e_{T-1}] per channel (dim 2)."""
    v = torch.cat([x, e]).double()  # [M, B, ...]
    if channels == 1 and v.dim() == 3:
        v = v.unsqueeze(2)
    v = v.reshape(v.shape[0], v.shape[1], channels, -1)
    return torch.einsum("mbcp,nbcp->cmn", v, v)


def test_update_refusals_have_their_own_messages():
    s = _stats()
    x, e = _paths()
    with _refused("x_path and e_path must be torch tensors"):
        s.update(x.tolist(), e)
    with _refused("x_path and e_path must be torch tensors"):
        s.update(x, e.tolist())
    for xs, es in ((x[:, 0, 0], e), (x, e[:, 0, 0])):
        with _refused(f"x_path must be [T+1, B, ...] and e_path [T, B, ...]; got shapes {list(xs.shape)} and "
                      f"{list(es.shape)}"):
            s.update(xs, es)
    for xs, es in ((torch.cat([x, x[:1]]), e), (x, e[:2])):
        with _refused(f"these statistics are for a 3-step teacher: x_path needs 4 latents and e_path 3 model "
                      f"outputs, got {xs.shape[0]} and {es.shape[0]}"):
            s.update(xs, es)
    with _refused("x_path and e_path disagree on batch/sample shape: [2, 2, 3] vs [2, 2, 4]"):
        s.update(x, torch.randn(T, 2, 2, 4))
    bad = e.clone()
    bad[1, 0, 0, 0] = float("nan")
    with _refused("trajectories contain NaN or Inf (did the model diverge, or fp16 overflow?)"):
        s.update(x, bad)
    assert s.num_samples == 0 and s.gram is None  # nothing of a refused batch is kept
    s.update(x, e)
    with _refused("sample shape [2, 4] differs from the [2, 3] recorded so far"):
        s.update(*_paths(shape=(2, 4)))
    with _refused("these statistics hold float32 trajectories, this batch is float64: one recording has one dtype"):
        s.update(*_paths(dtype=torch.float64))


def test_update_item_rules():
    """Items: one distinct non-negative index per sample below MAX_ITEMS (tensor indices allowed); an index already
    in the statistics is refused, index 0 included."""
    x, e = _paths(batch=2)
    s = _stats()
    s.update(x, e, items=[torch.tensor(0), MAX_ITEMS - 1])
    assert s.items == [[0, 1], [MAX_ITEMS - 1, MAX_ITEMS]]
    with _refused("these work items are already in the statistics: a sample would count twice"):
        s.update(x, e, items=[0, 5])
    for items in ([3], [3, 3], [3, 4, 5]):
        with _refused(f"items must list 2 distinct non-negative work-item indices, got {items}"):
            _stats().update(x, e, items=items)
    long = list(range(1000))
    with _refused(f"items must list 2 distinct non-negative work-item indices, got {str(long)[:200]}"):
        _stats().update(x, e, items=long)
    for bad in (-1, MAX_ITEMS):
        with pytest.raises(ValueError, match=r"^items must be "):
            _stats().update(x, e, items=[0, bad])


@pytest.mark.parametrize("shape, channels", [((2, 3), 2), ((3, 2, 2), 3), ((5,), 1)])
def test_gram_is_the_float64_sum_of_inner_products_in_any_chunking(monkeypatch, shape, channels):
    """Per-channel Gram matrices (channel = first sample dimension; one channel for 1-D samples), accumulated over
    batches and over chunks of a batch exactly as over the whole."""
    x1, e1 = _paths(batch=5, shape=shape, seed=1)
    x2, e2 = _paths(batch=3, shape=shape, seed=2)
    ref = _reference_gram(torch.cat([x1, x2], 1), torch.cat([e1, e2], 1), channels)
    whole = _stats().update(x1, e1).update(x2, e2)
    assert whole.gram.dtype == torch.float64 and whole.gram.shape == ref.shape
    torch.testing.assert_close(whole.gram, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(whole.global_gram(), ref.sum(0), rtol=1e-12, atol=1e-12)  # [M, M], channels summed
    per_sample = (2 * T + 1) * torch.Size(shape).numel() * 8
    monkeypatch.setattr(stats_module, "_UPDATE_CHUNK_BYTES", 2 * per_sample)  # chunks of 2 samples
    chunked = _stats().update(x1, e1).update(x2, e2)
    torch.testing.assert_close(chunked.gram, ref, rtol=1e-12, atol=1e-12)
    assert chunked.num_samples == 8 and chunked.sample_shape == tuple(shape) and chunked.dtype == "float32"


def test_merging_into_empty_statistics_takes_over_shape_and_dtype():
    x, e = _paths()
    full = _stats().update(x, e, items=[0, 1])
    empty = _stats()
    empty.merge_(full)
    assert (empty.sample_shape, empty.dtype, empty.num_samples, empty.items) == ((2, 3), "float32", 2, [[0, 2]])
    assert torch.equal(empty.gram, full.gram) and empty.gram is not full.gram
    assert empty.elements_per_sample == 6


def test_statistics_of_other_teacher_timesteps_never_merge():
    a = GramStats([900, 700, 500, 300, 100], teacher="ddim", prediction_type="epsilon")
    b = GramStats([950, 700, 500, 300, 100], teacher="ddim", prediction_type="epsilon")
    with _refused("cannot merge statistics recorded with different teacher timesteps: [900, 700, 500, 300, '...'] vs "
                  "[950, 700, 500, 300, '...']"):
        a.merge_(b)

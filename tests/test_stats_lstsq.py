"""Gram-statistics fits equal least squares on the raw trajectories; merging equals concatenation."""
import pytest
import torch

from olss_fast import GramStats, search_schedule
from olss_fast.core.lstsq import gram_lstsq
from olss_fast.models.gmm import make_gmm
from olss_fast.fit.recording import RecordingScheduler, record_trajectories
from helpers import random_paths


def lstsq_reference(x, e, indices, per_channel):
    """Direct OLSS fit as published: least squares on the flattened raw vectors, one step at a time."""
    T = e.shape[0]
    targets = list(indices[1:]) + [T]
    coefs, errs = [], []
    for j, tgt in enumerate(targets):
        cols = [x[0]] + [e[i] for i in indices[: j + 1]]
        if per_channel:
            c = x.shape[2]
            cs, sse = [], 0.0
            for ch in range(c):
                A = torch.stack([v[:, ch].reshape(-1) for v in cols], 1).double()
                y = x[tgt][:, ch].reshape(-1).double()
                sol = torch.linalg.lstsq(A, y.unsqueeze(1), driver="gelsd").solution.squeeze(1)
                cs.append(sol)
                sse += float(((A @ sol - y) ** 2).sum())
            coefs.append(torch.stack(cs))
        else:
            A = torch.stack([v.reshape(-1) for v in cols], 1).double()
            y = x[tgt].reshape(-1).double()
            sol = torch.linalg.lstsq(A, y.unsqueeze(1), driver="gelsd").solution.squeeze(1)
            coefs.append(sol)
            sse = float(((A @ sol - y) ** 2).sum())
        errs.append(sse / x[0].numel())
    return coefs, errs


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("granularity", ["global", "channel"])
def test_gram_fit_equals_lstsq_on_random_trajectories(granularity):
    T, B, shape = 12, 5, (3, 4, 5)
    x, e = random_paths(T, B, shape, seed=1)
    stats = GramStats(list(range(990, 990 - 10 * T, -10)), prediction_type="epsilon")
    stats.update(x, e)
    for n in (1, 3, 6):
        sched = search_schedule(stats, n, path="uniform", granularity=granularity)
        coefs, errs = lstsq_reference(x, e, sched.indices, granularity == "channel")
        for j in range(n):
            got = sched.coeffs[..., j, : j + 2]
            assert rel(got, coefs[j]) <= 1e-6
            assert abs(sched.errors[j] - errs[j]) <= 1e-6 * errs[j]


def test_gram_fit_equals_lstsq_on_recorded_trajectories():
    pipe = make_gmm((2, 4, 4), num_components=3, seed=3)
    kept = []
    stats = record_trajectories(pipe, [None] * 12, teacher_steps=15, batch_size=5, progress=False,
                                on_batch=lambda items, x, e: kept.append((x.clone(), e.clone())))
    x = torch.cat([k[0] for k in kept], 1)
    e = torch.cat([k[1] for k in kept], 1)
    assert stats.num_samples == 12 and x.shape == (16, 12, 2, 4, 4)
    for n in (4, 7):
        sched = search_schedule(stats, n, path="uniform")
        coefs, errs = lstsq_reference(x, e, sched.indices, False)
        for j in range(n):
            assert rel(sched.coeffs[j, : j + 2], coefs[j]) <= 1e-6
            assert sched.errors[j] == pytest.approx(errs[j], rel=1e-6)


def test_merge_equals_concatenation():
    T = 6
    ts = list(range(900, 900 - 100 * T, -100))
    x1, e1 = random_paths(T, 3, (2, 3), seed=4)
    x2, e2 = random_paths(T, 4, (2, 3), seed=5)
    a, b, both = (GramStats(ts, prediction_type="epsilon") for _ in range(3))
    a.update(x1, e1, items=[0, 1, 2])
    b.update(x2, e2, items=[3, 4, 5, 6])
    both.update(torch.cat([x1, x2], 1), torch.cat([e1, e2], 1))
    merged = a + b
    assert merged.items == [[0, 7]]
    assert merged.num_samples == 7
    torch.testing.assert_close(merged.gram, both.gram, rtol=1e-12, atol=1e-12)
    # direct Gram matrix of the concatenated raw vectors
    v = torch.cat([torch.cat([x1, x2], 1), torch.cat([e1, e2], 1)]).double()  # [M, B, C, P]
    direct = torch.einsum("mbcp,nbcp->cmn", v, v)
    torch.testing.assert_close(merged.gram, direct, rtol=1e-12, atol=1e-10)
    a += b
    torch.testing.assert_close(a.gram, both.gram, rtol=1e-12, atol=1e-12)
    # statistics that record no work items merge only when the caller states that they are disjoint
    c, d = (GramStats(ts, prediction_type="epsilon") for _ in range(2))
    c.update(x1, e1)
    d.update(x2, e2)
    with pytest.raises(ValueError, match="disjoint=True"):
        c + d
    torch.testing.assert_close(c.merge_(d, disjoint=True).gram, both.gram, rtol=1e-12, atol=1e-12)
    assert c.items is None and c.num_samples == 7


def test_update_memory_does_not_keep_trajectories():
    ts = list(range(10))[::-1]
    stats = GramStats(ts, prediction_type="epsilon")
    x, e = random_paths(10, 2, (3, 2), seed=6)
    for _ in range(5):
        stats.update(x, e)
    assert stats.gram.shape == (3, 21, 21) and stats.num_samples == 10
    assert [k for k, v in vars(stats).items() if isinstance(v, torch.Tensor)] == ["gram"]


def test_recording_wrapper_restores_scheduler_and_matches_teacher():
    pipe = make_gmm((2, 3, 3), seed=2)
    original = pipe.scheduler
    x0 = torch.randn(3, 2, 3, 3)
    rec = RecordingScheduler(original)
    pipe.scheduler = rec
    out = pipe(prompt=3, latents=x0.clone(), num_inference_steps=8).sample
    x, e = rec.trajectory()
    pipe.scheduler = original
    assert x.shape == (9, 3, 2, 3, 3) and e.shape == (8, 3, 2, 3, 3)
    torch.testing.assert_close(x[0], x0)
    torch.testing.assert_close(x[-1], out)
    # e[k] is the model output at x[k]
    t = original.timesteps[4]
    torch.testing.assert_close(e[4], pipe.unet(x[4], t).sample)


def test_ill_conditioned_solve_matches_min_norm_lstsq():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(200, 4, generator=g, dtype=torch.float64)
    A = torch.cat([A, A[:, :1] * 2.0 + A[:, 1:2]], 1)  # exactly collinear 5th column
    y = torch.randn(200, generator=g, dtype=torch.float64)
    V = torch.cat([A, y.unsqueeze(1)], 1)
    G = (V.T @ V).unsqueeze(0)
    coef, sse = gram_lstsq(G, [0, 1, 2, 3, 4], 5)
    ref = torch.linalg.lstsq(A, y.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    # same fitted values and residual as LAPACK (the min-norm solution is unique)
    assert rel(A @ coef[0], A @ ref) < 1e-8
    assert float(sse) == pytest.approx(float(((A @ ref - y) ** 2).sum()), rel=1e-8)
    assert rel(coef[0], ref) < 1e-6

"""Assertions and file-tampering helpers of the test suite (scaled tolerances, least-squares fits compared within
their conditioning, re-signed files that reach the checks behind a digest)."""
from __future__ import annotations

import base64
import json
import re
import zlib
from typing import Any, Sequence

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from olss_fast.core.files import digest
from olss_fast.core.schedule import OLSSSchedule
from olss_fast.core.search import coefficient_errors
from olss_fast.core.stats import DIGEST_KEY, stats_digest


def raises_exactly(message: str) -> Any:
    """``pytest.raises(ValueError)`` whose message must be ``message``, whole and literally."""
    return pytest.raises(ValueError, match=f"^{re.escape(message)}$")


def ddim_config(**kw: Any) -> dict:
    """The Stable Diffusion 1.x DDIM config (scaled-linear betas, trailing spacing, no clipping), changed by ``kw``."""
    cfg = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
               clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")
    cfg.update(kw)
    return cfg


def random_paths(T: int, B: int, shape: Sequence[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random teacher trajectories ``x [T+1, B, *shape]`` and model outputs ``e [T, B, *shape]`` correlated with the
    latents like real outputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T + 1, B, *shape, generator=g)
    e = torch.randn(T, B, *shape, generator=g) + 0.5 * x[:-1]
    return x, e


def perturbed(schedule: Any, seed: int, channels: int | None = None, scale: float = 0.05) -> Any:
    """The same path with randomly perturbed (optionally per-channel) lower-triangular coefficients (for tests)."""
    gen = torch.Generator().manual_seed(seed)
    c = schedule.coeffs
    if channels is not None:
        c = c.expand(channels, *c.shape).clone()
    mask = torch.ones(c.shape[-2:], dtype=torch.float64).tril(1)
    noise = torch.randn(c.shape, generator=gen, dtype=torch.float64) * scale * c.abs().clamp(min=0.1)
    return OLSSSchedule(timesteps=schedule.timesteps, indices=schedule.indices, coeffs=c + noise * mask,
                        teacher_steps=schedule.teacher_steps, prediction_type=schedule.prediction_type, path="test",
                        fitted_for=schedule.fitted_for)


# ---------------------------------------------------------------------------------------------------- comparisons
def assert_close_scaled(actual: Any, expected: Any, rel: float, what: str = "values") -> None:
    """``max|actual − expected| ≤ rel · max|expected|``: a tolerance that scales with the values compared.

    For unnormalised quantities (latents of magnitude 20, coefficients of magnitude 1e3) an absolute tolerance is
    either meaningless or flaky across machines; elementwise relative tolerances break down near zero. This is the
    normwise (max-norm) relative error, the quantity float rounding actually bounds.
    """
    a = torch.as_tensor(np.asarray(actual) if not isinstance(actual, torch.Tensor) else actual).double()
    b = torch.as_tensor(np.asarray(expected) if not isinstance(expected, torch.Tensor) else expected).double()
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shapes differ, {list(a.shape)} vs {list(b.shape)}")
    scale = float(b.abs().max()) if b.numel() else 0.0
    err = float((a - b).abs().max()) if b.numel() else 0.0
    if not err <= rel * scale:
        raise AssertionError(
            f"{what}: max |difference| {err:.3g} exceeds {rel:g} × max |expected| ({scale:.3g}) = {rel * scale:.3g}"
        )


def _path_basis(stats: Any, indices: Sequence[int], j: int) -> tuple[list[int], int]:
    targets = list(indices[1:]) + [stats.num_teacher_steps]
    basis = [stats.x_index(0)] + [stats.e_index(i) for i in indices[: j + 1]]
    return basis, stats.x_index(targets[j])


def fit_conditions(stats: Any, indices: Sequence[int]) -> list[float]:
    """Condition number of each step's Jacobi-scaled normal matrix ``G[S, S]`` on a path (global Gram matrix)."""
    g = stats.global_gram()
    out = []
    for j in range(len(indices)):
        basis, _ = _path_basis(stats, indices, j)
        a = g[basis][:, basis]
        d = a.diagonal().clamp_min(1e-300).rsqrt()
        ev = torch.linalg.eigvalsh(a * d[:, None] * d[None])
        out.append(float(ev.max() / ev.min().clamp_min(1e-300)))
    return out


def assert_same_fit(stats: Any, got: Any, want: Any, gram_rel_diff: float, safety: float = 100.0) -> None:
    """Two schedules fitted on statistics that agree to ``gram_rel_diff`` (relative, max-norm) are the same fit.

    Same path; each row's coefficients agree within the first-order perturbation bound of least squares,
    ``|Δc| / |c| ≤ κ_j · δ`` (κ_j: condition number of step j's scaled normal matrix, δ: the relative perturbation
    of the Gram matrix, at least float64's epsilon), times ``safety``. A tiny isotropic test problem can have κ ~ 1e8,
    so the coefficients legitimately differ in the 9th digit while the statistics agree to the 16th.
    """
    if list(got.indices) != list(want.indices):
        raise AssertionError(f"paths differ: {got.indices} vs {want.indices}")
    delta = max(float(gram_rel_diff), float(torch.finfo(torch.float64).eps))
    for j, kappa in enumerate(fit_conditions(stats, want.indices)):
        assert_close_scaled(got.coeffs[..., j, : j + 2], want.coeffs[..., j, : j + 2], safety * kappa * delta,
                            what=f"coefficients of step {j} (κ = {kappa:.3g})")


def assert_fit_errors_optimal(stats: Any, indices: Sequence[int], coeffs: torch.Tensor, optimal: Sequence[float],
                              ulps: float = 512.0) -> None:
    """``coeffs`` reach the least-squares fit errors ``optimal`` on ``stats``, up to the rounding of evaluating them.

    The error of given coefficients is ``(G_yy − 2 c·G_Sy + cᵀ G_SS c) / (B·D)``: a difference of large terms whose
    float64 rounding is ``≈ ε · (G_yy + 2|c|·|G_Sy| + |c|ᵀ|G_SS||c|) / (B·D)``; that (times ``ulps``) is the tolerance.
    """
    g = stats.global_gram()
    denom = stats.num_samples * stats.elements_per_sample
    errors = coefficient_errors(stats, indices, coeffs)
    eps = float(torch.finfo(torch.float64).eps)
    for j, (e, o) in enumerate(zip(errors, optimal)):
        basis, y = _path_basis(stats, indices, j)
        c = coeffs[j, : j + 2].to(torch.float64).abs()
        idx = torch.tensor(basis)
        size = float(g[y, y] + 2 * (c * g[idx, y].abs()).sum() + c @ g[idx][:, idx].abs() @ c) / denom
        tol = ulps * eps * size
        if not abs(e - o) <= tol:
            raise AssertionError(f"step {j}: fit error {e:.6g} vs optimal {o:.6g} differs by {abs(e - o):.3g} > "
                                 f"rounding bound {tol:.3g}")


# ---------------------------------------------------------------------------------------------- hostile files
def rewrite_stats_file(path: Any, header: Any = None, gram: Any = None, resign: bool = True) -> None:
    """Rewrite a statistics file with a new header (a dict, or a function of the old one) and/or Gram tensor, and
    — with ``resign`` — a digest that matches, as a careless tool (or an attacker who knows the format) would. For
    testing the checks behind the digest."""
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
        old_gram = fh.get_tensor("gram")
    old_header = json.loads(meta["olss_fast"])
    new_header = header(old_header) if callable(header) else (header if header is not None else old_header)
    new_gram = gram(old_gram) if callable(gram) else (gram if gram is not None else old_gram)
    text = json.dumps(new_header)
    meta["olss_fast"] = text
    if resign:
        meta[DIGEST_KEY] = stats_digest(text, new_gram.contiguous())
    save_file({"gram": new_gram.contiguous()}, str(path), metadata=meta)


def resign_schedule_dict(d: dict) -> dict:
    """A schedule dict with its ``sha256`` recomputed after an edit (see :func:`rewrite_stats_file`)."""
    d = {k: v for k, v in d.items() if k != "sha256"}
    d["sha256"] = digest(d)
    return d


def artifact_payload(artifacts: Sequence[tuple[str, str, bytes]]) -> bytes:
    """A ``torch.compiler.save_cache_artifacts`` payload holding ``(type, key, content)`` artefacts, written here from
    the format's description (CRC-32, uint64 version 1, per type: name, count, then key and content per artefact;
    big-endian integers, names and keys as length-prefixed base64) so that tests can plant any key or content."""
    def u64(i: int) -> bytes:
        return i.to_bytes(8, "big")

    def blob(b: bytes) -> bytes:
        return u64(len(b)) + b

    def text(t: str) -> bytes:
        return blob(base64.b64encode(t.encode()))

    body = u64(1)
    by_type: dict[str, list[tuple[str, bytes]]] = {}
    for kind, key, content in artifacts:
        by_type.setdefault(kind, []).append((key, content))
    for kind, items in by_type.items():
        body += text(kind) + u64(len(items)) + b"".join(text(k) + blob(c) for k, c in items)
    return zlib.crc32(body).to_bytes(4, "big") + body


# ---------------------------------------------------------------------------------------------- resources
def peak_rss_growth(fn: Any) -> tuple[Any, int]:
    """``(fn(), bytes)``: how far the process's peak resident memory rose above its resident memory before the call
    (the kernel's high-water mark is reset first by writing 5 to ``/proc/self/clear_refs``; Linux only, else the
    test is skipped). Counts every allocation, torch's and file mappings included, unlike tracemalloc."""
    import pytest

    def status(key: str) -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    try:
        before = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except (OSError, KeyError):
        pytest.skip("peak memory needs Linux's /proc/self/clear_refs")
    result = fn()
    return result, status("VmHWM") - before

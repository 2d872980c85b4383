"""The fused OLSS sampler step: classifier-free guidance + history write + OLSS linear combination + next input.

One student step j of an OLSS sampler (Duan et al., CIKM 2023, arXiv 2305.14677, Eq. 8) is

    e_j     = e_u + g · (e_c − e_u)                       (classifier-free guidance, as diffusers pipelines do:
                                                           ``noise_pred_uncond + guidance_scale * (noise_pred_text
                                                           - noise_pred_uncond)``, uncond half first)
    x_{j+1} = w_j · x_0 + Σ_{l ≤ j} v_{j,l} · e_l          (OLSS Eq. 8, the linear combination)

Un-fused this is ~2j+6 elementwise torch kernels (chunk, sub, mul, add, copy into the history, j+1 multiply-adds,
cast, ``torch.cat`` for the next CFG batch). :func:`fused_olss_step` does it in ONE kernel launch that

* reads the two guidance halves of the model output ``[2B, ...]`` (or ``[B, ...]`` without guidance),
* writes ``e_j`` (float32) into slot j of a preallocated history ``[n, B, ...]`` float32,
* evaluates the combination in float32 from ``x0`` (float32 ``[B, ...]``) and history slots ``0..j-1``,
* casts and writes the next model input straight into an output buffer ``[2B, ...]`` (both halves, so the next
  UNet call needs no ``torch.cat``) or ``[B, ...]``.

Coefficients are read from a device tensor (float32 ``[n, n+1]`` global, or ``[C, n, n+1]`` per channel with
channel = dim 1 of the latents) and the guidance scale may be a device scalar, so a CUDA graph that captured the
launches can be re-used with another schedule of the same length by copying new coefficients into that tensor.

Dispatch rules (:func:`select_backend`): Triton for CUDA tensors when ``triton`` imports, the pure torch reference
(:func:`olss_step_reference`) otherwise. ``OLSS_FAST_FORCE_REFERENCE=1`` forces the reference;
``OLSS_FAST_FORCE_TRITON=1`` forces Triton (on CPU tensors that needs ``TRITON_INTERPRET=1`` set before ``triton``
is first imported — that is how the tests run the kernel without a GPU). An explicit ``backend=`` argument wins
over both environment variables.
"""
from __future__ import annotations

import logging
from typing import Optional, Union

import torch

from olss_fast.core.dispatch import FORCE_REFERENCE_ENV, env_flag
from olss_fast.core.step import olss_combine

logger = logging.getLogger(__name__)

try:  # Triton is optional: the reference covers every device.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False

__all__ = [
    "BACKENDS",
    "DEFAULT_BLOCK_SIZE",
    "HAS_TRITON",
    "fused_olss_step",
    "olss_step_reference",
    "olss_step_triton",
    "select_backend",
    "unfused_olss_step",
]

BACKENDS = ("auto", "triton", "reference")
DEFAULT_BLOCK_SIZE = 1024
FORCE_TRITON_ENV = "OLSS_FAST_FORCE_TRITON"
# offsets switch to int64 when an index can reach this (module constant so that tests can lower it)
INT64_THRESHOLD = 2**31

GuidanceScale = Optional[Union[float, torch.Tensor]]


def _interpreting() -> bool:
    return env_flag("TRITON_INTERPRET")


# ---------------------------------------------------------------------------------------------------- validation
def _check_args(
    model_output: torch.Tensor,
    coeffs: torch.Tensor,
    step: int,
    x0: torch.Tensor,
    history: torch.Tensor,
    out: torch.Tensor,
    guidance_scale: GuidanceScale,
) -> tuple[bool, bool]:
    """Validate shapes/dtypes/devices (Python-only checks, safe inside CUDA-graph capture).

    Returns ``(guided, out_both_halves)``.
    """
    if x0.dtype != torch.float32:
        raise ValueError(f"x0 must be float32, got {x0.dtype}")
    if x0.dim() < 1 or x0.shape[0] < 1:
        raise ValueError(f"x0 must be [B, ...] with B >= 1, got shape {list(x0.shape)}")
    b, rest = x0.shape[0], tuple(x0.shape[1:])
    guided = guidance_scale is not None
    expect_mo = (2 * b if guided else b,) + rest
    if tuple(model_output.shape) != expect_mo:
        what = "[2B, ...] (uncond half first) with guidance" if guided else "[B, ...] without guidance"
        raise ValueError(
            f"model_output must be {what} = {list(expect_mo)} for x0 of shape {list(x0.shape)}, "
            f"got {list(model_output.shape)}"
        )
    if coeffs.dtype != torch.float32:
        raise ValueError(f"coeffs must be a float32 tensor, got {coeffs.dtype}")
    if coeffs.dim() not in (2, 3) or coeffs.shape[-1] != coeffs.shape[-2] + 1:
        raise ValueError(f"coeffs must be [n, n+1] or [C, n, n+1], got shape {list(coeffs.shape)}")
    n = int(coeffs.shape[-2])
    if coeffs.dim() == 3 and (x0.dim() < 2 or x0.shape[1] != coeffs.shape[0]):
        raise ValueError(
            f"per-channel coeffs for {coeffs.shape[0]} channels, but the latents have shape {list(x0.shape)} "
            "(channel = dim 1)"
        )
    if not 0 <= int(step) < n:
        raise ValueError(f"step {step} is out of range for a {n}-step schedule")
    if history.dtype != torch.float32 or tuple(history.shape) != (n, b) + rest:
        raise ValueError(
            f"history must be float32 [n, B, ...] = {[n, b, *rest]}, got {history.dtype} {list(history.shape)}"
        )
    if tuple(out.shape) == (2 * b,) + rest:
        both = True
    elif tuple(out.shape) == (b,) + rest:
        both = False
    else:
        raise ValueError(f"out must be [2B, ...] or [B, ...] for x0 of shape {list(x0.shape)}, got {list(out.shape)}")
    if not out.dtype.is_floating_point:
        raise ValueError(f"out must be a floating-point tensor, got {out.dtype}")
    devices = {t.device for t in (model_output, coeffs, x0, history, out)}
    if isinstance(guidance_scale, torch.Tensor):
        if guidance_scale.numel() != 1:
            raise ValueError(f"a tensor guidance_scale must hold one value, got shape {list(guidance_scale.shape)}")
        devices.add(guidance_scale.device)
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    return guided, both


# ---------------------------------------------------------------------------------------------------- reference
def olss_step_reference(
    model_output: torch.Tensor,
    coeffs: torch.Tensor,
    step: int,
    x0: torch.Tensor,
    history: torch.Tensor,
    out: torch.Tensor,
    guidance_scale: GuidanceScale = None,
) -> torch.Tensor:
    """Pure torch version of :func:`fused_olss_step` (same arguments, same side effects, float32 arithmetic).

    ``e_j = e_u + g (e_c − e_u)`` (diffusers CFG, uncond half first) is written to ``history[step]``; then
    ``x_{j+1} = w_j x0 + Σ_{l≤j} v_{j,l} e_l`` (OLSS Eq. 8, :func:`olss_fast.core.step.olss_combine`) is cast to
    ``out.dtype`` and written to ``out`` (both halves when ``out`` is ``[2B, ...]``). Returns ``out``.
    Contains no host synchronisation, so it can be captured in a CUDA graph too.
    """
    _, both = _check_args(model_output, coeffs, step, x0, history, out, guidance_scale)
    e = model_output.to(torch.float32)
    if guidance_scale is not None:
        e_u, e_c = e.chunk(2)
        g = guidance_scale.to(torch.float32) if isinstance(guidance_scale, torch.Tensor) else float(guidance_scale)
        e = e_u + g * (e_c - e_u)
    history[step].copy_(e)
    x_next = olss_combine(coeffs, step, x0, history[: step + 1])
    if both:
        b = x0.shape[0]
        out[:b].copy_(x_next)
        out[b:].copy_(x_next)
    else:
        out.copy_(x_next)
    return out


def unfused_olss_step(
    model_output: torch.Tensor,
    coeffs: torch.Tensor,
    step: int,
    x0: torch.Tensor,
    history: list[torch.Tensor],
    guidance_scale: Optional[float] = None,
) -> torch.Tensor:
    """The plain torch expression a hand-written loop would use (benchmark baseline, allocates its results).

    Returns the next model input (``torch.cat``-ed for CFG) in ``model_output.dtype``; appends ``e_j`` to ``history``.
    """
    if guidance_scale is not None:
        e_u, e_c = model_output.chunk(2)
        e = e_u + guidance_scale * (e_c - e_u)
    else:
        e = model_output
    history.append(e.float())
    x_next = olss_combine(coeffs, step, x0, history).to(model_output.dtype)
    return torch.cat([x_next, x_next]) if guidance_scale is not None else x_next


# ---------------------------------------------------------------------------------------------------- triton
if HAS_TRITON:

    # Only N keeps Triton's integer specialisation (divisibility by 16 enables vectorised loads); the step index and the
    # index-arithmetic integers do not, so one compiled variant serves every step and every latent shape class.
    @triton.jit(do_not_specialize=["step", "inner", "C", "coeff_stride_c", "coeff_stride_row"])
    def _olss_step_kernel(
        mo_ptr,  # model output [2B, ...] (uncond first) or [B, ...], any float dtype
        x0_ptr,  # float32 [B, ...]
        hist_ptr,  # float32 [n, B, ...]
        out_ptr,  # [2B, ...] or [B, ...], any float dtype
        coeff_ptr,  # float32 [n, n+1] or [C, n, n+1]
        g_ptr,  # float32 device scalar (read when G_FROM_PTR)
        g_value,  # python float guidance scale (used when not G_FROM_PTR)
        step,  # j
        N,  # B * prod(shape[1:]), elements per half
        inner,  # prod(shape[2:]) (per-channel only)
        C,  # channels (per-channel only)
        coeff_stride_c,  # n * (n+1) (per-channel only)
        coeff_stride_row,  # n + 1
        GUIDED: tl.constexpr,
        G_FROM_PTR: tl.constexpr,
        PER_CHANNEL: tl.constexpr,
        OUT_BOTH: tl.constexpr,
        INT64: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if INT64:
            pid = pid.to(tl.int64)
            N = N.to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N

        # classifier-free guidance, in float32 (diffusers: uncond + g * (text - uncond))
        if GUIDED:
            e_u = tl.load(mo_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            e_c = tl.load(mo_ptr + N + offs, mask=mask, other=0.0).to(tl.float32)
            if G_FROM_PTR:
                g = tl.load(g_ptr).to(tl.float32)
            else:
                g = g_value
            e = e_u + g * (e_c - e_u)
        else:
            e = tl.load(mo_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(hist_ptr + step * N + offs, e, mask=mask)

        # OLSS Eq. 8: x_{j+1} = w_j x0 + sum_{l<=j} v_{j,l} e_l, float32 accumulation
        x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0)
        row = step * coeff_stride_row
        if PER_CHANNEL:
            cbase = ((offs // inner) % C) * coeff_stride_c + row
            acc = tl.load(coeff_ptr + cbase, mask=mask, other=0.0) * x0
            for i in range(0, step):
                e_i = tl.load(hist_ptr + i * N + offs, mask=mask, other=0.0)
                acc += tl.load(coeff_ptr + cbase + 1 + i, mask=mask, other=0.0) * e_i
            acc += tl.load(coeff_ptr + cbase + 1 + step, mask=mask, other=0.0) * e
        else:
            acc = tl.load(coeff_ptr + row) * x0
            for i in range(0, step):
                e_i = tl.load(hist_ptr + i * N + offs, mask=mask, other=0.0)
                acc += tl.load(coeff_ptr + row + 1 + i) * e_i
            acc += tl.load(coeff_ptr + row + 1 + step) * e

        out = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs, out, mask=mask)
        if OUT_BOTH:
            tl.store(out_ptr + N + offs, out, mask=mask)


def olss_step_triton(
    model_output: torch.Tensor,
    coeffs: torch.Tensor,
    step: int,
    x0: torch.Tensor,
    history: torch.Tensor,
    out: torch.Tensor,
    guidance_scale: GuidanceScale = None,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    num_warps: int = 4,
) -> torch.Tensor:
    """The Triton kernel behind :func:`fused_olss_step` (one launch; same arguments and effects).

    ``block_size`` (a power of two) is exposed so that tests can exercise several programs with tiny tensors.
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not importable; use backend='reference'")
    _, both = _check_args(model_output, coeffs, step, x0, history, out, guidance_scale)
    if x0.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"the Triton OLSS step needs CUDA tensors (got {x0.device}); to run it on the CPU set "
            "TRITON_INTERPRET=1 before triton is imported"
        )
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    for name, t in (("x0", x0), ("history", history), ("out", out), ("coeffs", coeffs)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous for the Triton OLSS step")
    if not model_output.is_contiguous():  # e.g. a channels_last UNet; one extra copy, still graph-safe
        model_output = model_output.contiguous()
    n_elem = x0.numel()
    n_steps = int(coeffs.shape[-2])
    per_channel = coeffs.dim() == 3
    channels = int(x0.shape[1]) if per_channel else 1
    inner = n_elem // (x0.shape[0] * channels) if per_channel else 1
    g_from_ptr = isinstance(guidance_scale, torch.Tensor)
    g_ptr = guidance_scale if g_from_ptr else coeffs  # any valid pointer when unused
    g_value = float(guidance_scale) if (guidance_scale is not None and not g_from_ptr) else 1.0
    largest = max(n_steps * n_elem, 2 * n_elem, coeffs.numel()) + block_size
    grid = (triton.cdiv(n_elem, block_size),)
    _olss_step_kernel[grid](
        model_output,
        x0,
        history,
        out,
        coeffs,
        g_ptr,
        g_value,
        int(step),
        n_elem,
        inner,
        channels,
        n_steps * (n_steps + 1),
        n_steps + 1,
        GUIDED=guidance_scale is not None,
        G_FROM_PTR=g_from_ptr,
        PER_CHANNEL=per_channel,
        OUT_BOTH=both,
        INT64=largest >= INT64_THRESHOLD,
        BLOCK=block_size,
        num_warps=num_warps,
    )
    return out


# ---------------------------------------------------------------------------------------------------- dispatch
def select_backend(device: torch.device, backend: str = "auto") -> str:
    """Which implementation :func:`fused_olss_step` uses for tensors on ``device``: ``"triton"`` or ``"reference"``.

    ``backend="auto"``: ``OLSS_FAST_FORCE_REFERENCE=1`` → reference; ``OLSS_FAST_FORCE_TRITON=1`` → Triton (if
    importable); else Triton for CUDA tensors when triton imports, the reference otherwise. An explicit
    ``"triton"`` / ``"reference"`` is honoured as given (``"triton"`` raises if triton is missing).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown fused-step backend {backend!r}; expected one of {BACKENDS}")
    if backend == "triton":
        if not HAS_TRITON:
            raise ValueError("backend='triton' requested but triton is not importable")
        return "triton"
    if backend == "reference":
        return "reference"
    if env_flag(FORCE_REFERENCE_ENV):
        return "reference"
    if env_flag(FORCE_TRITON_ENV) and HAS_TRITON:
        return "triton"
    if HAS_TRITON and torch.device(device).type == "cuda":
        return "triton"
    return "reference"


def fused_olss_step(
    model_output: torch.Tensor,
    coeffs: torch.Tensor,
    step: int,
    x0: torch.Tensor,
    history: torch.Tensor,
    out: torch.Tensor,
    guidance_scale: GuidanceScale = None,
    *,
    backend: str = "auto",
    block_size: Optional[int] = None,
) -> torch.Tensor:
    """One OLSS student step, fused: CFG → ``history[step]`` → OLSS Eq. 8 → next model input in ``out``.

    Args:
        model_output: the UNet output, ``[2B, ...]`` with the unconditional half first (diffusers' CFG batch
            order) when ``guidance_scale`` is given, else ``[B, ...]``. Any float dtype; read in float32.
        coeffs: float32 device tensor ``[n, n+1]`` (global) or ``[C, n, n+1]`` (per channel, channel = dim 1 of
            the latents); row j = ``[w_j, v_{j,0}, …, v_{j,j}, 0, …]``. Only entries ``0..j+1`` of row j are read.
        step: j, the index of the student step whose model output this is (``0 <= j < n``).
        x0: float32 ``[B, ...]``, the initial noise of the sampler.
        history: float32 ``[n, B, ...]``; slots ``0..j-1`` hold the previous guided outputs, slot j is written.
        out: ``[2B, ...]`` (both CFG halves get ``x_{j+1}``, so the next UNet call needs no ``torch.cat``) or
            ``[B, ...]``; ``x_{j+1}`` is computed in float32 and cast to ``out.dtype``.
        guidance_scale: ``None`` for no guidance, a float, or a one-element float device tensor (so a captured
            CUDA graph can change it without re-capture). ``e = e_u + g (e_c − e_u)`` as in diffusers' pipelines.
        backend: ``"auto"`` (see :func:`select_backend`), ``"triton"`` or ``"reference"``.
        block_size: Triton block size override (tests); ignored by the reference.

    Returns:
        ``out``.
    """
    chosen = select_backend(x0.device, backend)
    if chosen == "triton":
        return olss_step_triton(
            model_output, coeffs, step, x0, history, out, guidance_scale,
            block_size=block_size or DEFAULT_BLOCK_SIZE,
        )
    return olss_step_reference(model_output, coeffs, step, x0, history, out, guidance_scale)

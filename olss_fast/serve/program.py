"""The fixed OLSS sampling program, defined once: n × (denoiser → classifier-free guidance → OLSS step).

Every backend runs this loop: eager, inside one CUDA graph (the runtime captures a call of it), and on TensorRT
engines (whose denoiser is an engine call); the ONNX export encodes the same loop as one ONNX ``Loop``
(:func:`olss_fast.export.onnx_export.build_denoise_model`). One step is

    e_j     = e_u + g · (e_c − e_u)                        (classifier-free guidance, unconditional half first;
                                                            optionally diffusers' guidance_rescale, Lin et al. 2023)
    x_{j+1} = w_j · x_0 + Σ_{l ≤ j} v_{j,l} · e_l           (OLSS, Duan et al. 2023, Eq. 8)

in float32, done by one fused kernel launch (:func:`olss_fast.kernels.fused_step.fused_olss_step`) that also writes
the next denoiser input (both CFG halves) in place. Buffers are preallocated, so the loop is capturable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from olss_fast.kernels.fused_step import fused_olss_step

__all__ = ["ProgramBuffers", "allocate_buffers", "rescaled_guidance", "run_loop"]


@dataclass
class ProgramBuffers:
    """The loop's work tensors (fixed addresses, so a captured graph can reuse them).

    Attributes:
        x0: float32 ``[B, ...]``, the initial noise.
        history: float32 ``[n, B, ...]``, the guided model outputs e_0 … e_{n-1}.
        x_in: model dtype ``[2B or B, ...]``, the denoiser's input (both CFG halves).
        final: model dtype ``[B, ...]``, the last step's output.
    """

    x0: torch.Tensor
    history: torch.Tensor
    x_in: torch.Tensor
    final: torch.Tensor

    @property
    def guided(self) -> bool:
        return self.x_in.shape[0] == 2 * self.x0.shape[0]


def allocate_buffers(latent_shape: tuple[int, ...], num_steps: int, dtype: torch.dtype, guided: bool,
                     device: Union[str, torch.device]) -> ProgramBuffers:
    b, rest = int(latent_shape[0]), tuple(int(v) for v in latent_shape[1:])
    return ProgramBuffers(
        x0=torch.empty((b, *rest), dtype=torch.float32, device=device),
        history=torch.empty((num_steps, b, *rest), dtype=torch.float32, device=device),
        x_in=torch.empty(((2 * b) if guided else b, *rest), dtype=dtype, device=device),
        final=torch.empty((b, *rest), dtype=dtype, device=device),
    )


def rescaled_guidance(model_output: torch.Tensor, guidance: Union[float, torch.Tensor],
                      rescale: float) -> torch.Tensor:
    """CFG with diffusers' ``guidance_rescale`` (``rescale_noise_cfg``: match the guided output's per-sample std to
    the text-conditioned one's, blended by ``rescale``), in float32."""
    e_u, e_c = model_output.float().chunk(2)
    e = e_u + guidance * (e_c - e_u)
    dims = list(range(1, e.dim()))
    rescaled = e * (e_c.std(dim=dims, keepdim=True) / e.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1 - rescale) * e


def run_loop(
    denoise_step: Callable[[int, torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    buffers: ProgramBuffers,
    coeffs: torch.Tensor,
    guidance: Optional[Union[float, torch.Tensor]],
    *,
    step_backend: str = "auto",
    guidance_rescale: float = 0.0,
    on_step: Optional[Callable[[int, torch.Tensor], None]] = None,
) -> torch.Tensor:
    """Run the n-step OLSS loop from ``latents``; returns ``buffers.final`` (overwritten by the next run).

    Args:
        denoise_step: ``(j, x_in) -> model output`` (``[2B, ...]`` uncond half first with guidance, else
            ``[B, ...]``): the denoiser at the schedule's j-th timestep.
        latents: ``[B, ...]`` initial noise.
        buffers: from :func:`allocate_buffers` (guided iff ``guidance`` is not None).
        coeffs: float32 ``[n, n+1]`` or ``[C, n, n+1]`` on the device.
        guidance: the guidance scale (a float or a one-element device tensor), None without guidance.
        guidance_rescale: diffusers' ``guidance_rescale`` (> 0 adds the rescale, computed before the fused step).
        on_step: called eagerly after step j with the new latents ``[B, ...]`` (not capturable).
    """
    n = int(coeffs.shape[-2])
    b = latents.shape[0]
    if buffers.guided != (guidance is not None):
        raise ValueError("the buffers were allocated for another guidance mode")
    buffers.x0.copy_(latents)
    if buffers.guided:
        buffers.x_in[:b].copy_(latents)
        buffers.x_in[b:].copy_(latents)
    else:
        buffers.x_in.copy_(latents)
    for j in range(n):
        out = denoise_step(j, buffers.x_in)
        target = buffers.x_in if j < n - 1 else buffers.final
        if guidance is not None and guidance_rescale > 0:
            e = rescaled_guidance(out, guidance, guidance_rescale)
            fused_olss_step(e, coeffs, j, buffers.x0, buffers.history, target, None, backend=step_backend)
        else:
            fused_olss_step(out, coeffs, j, buffers.x0, buffers.history, target, guidance, backend=step_backend)
        if on_step is not None:
            on_step(j, target[:b])
    return buffers.final

"""The analytic test model: the exact denoiser of a Gaussian mixture under a VP noise schedule.

Data ``x ~ Σ_k π_k N(μ_k, s_k² I)``; the VP forward process ``x_t = √ᾱ_t x + √(1−ᾱ_t) ε`` keeps it a mixture,
``x_t ~ Σ_k π_k N(√ᾱ μ_k, (ᾱ s_k² + 1 − ᾱ) I)``, so the score and the exact epsilon-prediction
``ε(x_t, t) = −√(1−ᾱ) ∇ log p_t(x_t)`` are closed-form. :class:`GMMDenoiser` wraps it like a diffusers
``UNet2DModel`` (``model(sample, t, class_labels=...).sample``); :class:`GMMPipeline` is a diffusers pipeline around it
with classifier-free guidance (class k = component k alone, the null class = the whole mixture).
:func:`ode_solution` integrates the probability-flow ODE to high precision for ground truth.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from diffusers.utils import BaseOutput

NULL_CLASS = -1


@dataclass
class GMMOutput(BaseOutput):
    sample: torch.Tensor


class GMMDenoiser(torch.nn.Module):
    """Exact epsilon-prediction of a Gaussian mixture, shaped like a diffusers UNet.

    Args:
        means: ``[K, *sample_shape]`` component means.
        stds: ``[K]`` isotropic component standard deviations.
        weights: ``[K]`` mixture weights (normalised internally).
        alphas_cumprod: ``[num_train_timesteps]`` ᾱ of the VP schedule (a diffusers scheduler's ``alphas_cumprod``).
    """

    def __init__(
        self,
        means: torch.Tensor,
        stds: torch.Tensor,
        weights: torch.Tensor,
        alphas_cumprod: torch.Tensor | None = None,
        prediction: str = "epsilon",
        num_train_timesteps: int = 1000,
    ) -> None:
        super().__init__()
        if prediction not in ("epsilon", "flow"):
            raise ValueError(f"prediction must be 'epsilon' (VP) or 'flow' (rectified flow), got {prediction!r}")
        if prediction == "epsilon" and alphas_cumprod is None:
            raise ValueError("the VP (epsilon) model needs the schedule's alphas_cumprod")
        self.prediction = prediction
        self.num_train_timesteps = int(num_train_timesteps)
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() < 2:
            raise ValueError("means must be [K, *sample_shape]")
        k = means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float64).reshape(-1)
        weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if stds.numel() != k or weights.numel() != k:
            raise ValueError(f"{k} means need {k} stds and {k} weights")
        if (stds <= 0).any() or (weights <= 0).any():
            raise ValueError("stds and weights must be positive")
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("weights", weights / weights.sum())
        ac = torch.ones(1) if alphas_cumprod is None else alphas_cumprod
        self.register_buffer("alphas_cumprod", torch.as_tensor(ac, dtype=torch.float64))
        self.sample_shape = tuple(means.shape[1:])
        self.dtype_ = torch.float32

    @property
    def dtype(self) -> torch.dtype:
        return self.dtype_

    @property
    def device(self) -> torch.device:
        return self.means.device

    @property
    def config(self):  # pipelines read unet.config.in_channels / sample_size
        c = self.sample_shape[0]
        size = self.sample_shape[-1] if len(self.sample_shape) >= 2 else 1
        return _Config(in_channels=c, out_channels=c, sample_size=size)

    def alpha_bar(self, timestep: torch.Tensor | float, batch: int) -> torch.Tensor:
        """ᾱ at (possibly fractional) timesteps, linear interpolation between training timesteps."""
        t = torch.as_tensor(timestep, dtype=torch.float64, device=self.means.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        n = self.alphas_cumprod.numel()
        t = t.clamp(0, n - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=n - 1)
        frac = t - lo
        return self.alphas_cumprod[lo] * (1 - frac) + self.alphas_cumprod[hi] * frac

    def posterior_mean(
        self, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Exact E[x_data | x_t] for ``x_t = a·x_data + s·ε`` (per-sample ``a``, ``s`` ``[B]``), in float64.

        ``class_labels[b] >= 0`` restricts sample b to component ``class_labels[b]`` (the conditional model).
        """
        x = x.to(torch.float64)
        b = x.shape[0]
        a = a.reshape(b, 1).to(torch.float64)
        s = s.reshape(b, 1).to(torch.float64)
        xf = x.reshape(b, 1, -1)  # [B, 1, D]
        means = self.means.reshape(1, self.means.shape[0], -1)  # [1, K, D]
        s2k = self.stds.pow(2).reshape(1, -1)  # [1, K]
        var = a * a * s2k + s * s  # [B, K] variance of x_t under component k
        d = xf.shape[-1]
        resid = xf - means * a.unsqueeze(-1)  # [B, K, D]
        logp = torch.log(self.weights).reshape(1, -1) - 0.5 * resid.pow(2).sum(-1) / var - 0.5 * d * torch.log(var)
        if class_labels is not None:
            labels = torch.as_tensor(class_labels, device=x.device).reshape(-1).long()
            if labels.numel() == 1:
                labels = labels.expand(b)
            mask = torch.nn.functional.one_hot(labels.clamp_min(0), self.means.shape[0]).bool()
            mask = torch.where((labels >= 0).unsqueeze(-1), mask, torch.ones_like(mask))
            logp = logp.masked_fill(~mask, float("-inf"))
        r = torch.softmax(logp, dim=-1)  # responsibilities [B, K]
        m_k = means + (a * s2k / var).unsqueeze(-1) * resid  # per-component posterior means [B, K, D]
        return (r.unsqueeze(-1) * m_k).sum(1).reshape(x.shape)

    def epsilon(self, x: torch.Tensor, alpha_bar: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Exact ε(x, ᾱ) = (x − √ᾱ·E[x_data|x]) / √(1−ᾱ) in float64 (VP)."""
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        m = self.posterior_mean(x, a, s, class_labels)
        view = [-1] + [1] * (x.dim() - 1)
        return (x.to(torch.float64) - a.view(view) * m) / s.view(view)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Exact flow-matching velocity E[ε − x_data | x_σ] for ``x_σ = (1−σ)·x_data + σ·ε`` (rectified flow)."""
        m = self.posterior_mean(x, 1 - sigma, sigma, class_labels)
        view = [-1] + [1] * (x.dim() - 1)
        eps = (x.to(torch.float64) - (1 - sigma).view(view) * m) / sigma.view(view)
        return eps - m

    def forward(self, sample: torch.Tensor, timestep, class_labels=None, return_dict: bool = True, **_):
        if self.prediction == "flow":  # diffusers' flow-matching timesteps are σ·num_train_timesteps
            t = torch.as_tensor(timestep, dtype=torch.float64, device=self.means.device).reshape(-1)
            sigma = (t / self.num_train_timesteps).clamp(1e-6, 1.0).expand(sample.shape[0])
            out = self.velocity(sample, sigma, class_labels)
        else:
            out = self.epsilon(sample, self.alpha_bar(timestep, sample.shape[0]), class_labels)
        out = out.to(sample.dtype)
        return GMMOutput(sample=out) if return_dict else (out,)


@dataclass
class _Config:
    in_channels: int
    out_channels: int
    sample_size: int


def make_gmm(
    sample_shape: Sequence[int] = (3, 6, 6),
    num_components: int = 4,
    seed: int = 0,
    spread: float = 1.0,
    std_range: tuple[float, float] = (0.05, 0.3),
    scheduler: DDIMScheduler | None = None,
    flow: bool = False,
) -> "GMMPipeline":
    """A random Gaussian mixture test pipeline (deterministic in ``seed``).

    ``flow=True``: a rectified-flow model (velocity prediction) with diffusers' ``FlowMatchEulerDiscreteScheduler``.
    """
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_components, *sample_shape, generator=g, dtype=torch.float64) * spread
    lo, hi = std_range
    stds = lo + (hi - lo) * torch.rand(num_components, generator=g, dtype=torch.float64)
    weights = 0.5 + torch.rand(num_components, generator=g, dtype=torch.float64)
    if flow:
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = scheduler or FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
        unet = GMMDenoiser(means, stds, weights, prediction="flow", num_train_timesteps=1000)
        return GMMPipeline(unet=unet, scheduler=scheduler)
    if scheduler is None:
        scheduler = DDIMScheduler(
            num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
            clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing",
        )
    unet = GMMDenoiser(means, stds, weights, scheduler.alphas_cumprod)
    return GMMPipeline(unet=unet, scheduler=scheduler)


class GMMPipeline(DiffusionPipeline):
    """A diffusers pipeline around :class:`GMMDenoiser`, with the standard sampling loop.

    ``prompt`` is a list of component indices (class labels; ``None``/-1 = unconditional) or an int batch size.
    """

    def __init__(self, unet: GMMDenoiser, scheduler) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        prompt=1,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "latent",
        return_dict: bool = True,
        **_,
    ):
        if isinstance(prompt, int):
            labels = torch.full((prompt,), NULL_CLASS)
        else:
            labels = torch.tensor([NULL_CLASS if p is None else int(p) for p in prompt])
        batch = labels.numel()
        shape = (batch, *self.unet.sample_shape)
        if latents is None:
            latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.unet.device)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {list(shape)}, got {list(latents.shape)}")
        self.scheduler.set_timesteps(num_inference_steps, device=latents.device)
        latents = latents * getattr(self.scheduler, "init_noise_sigma", 1.0)
        guided = guidance_scale > 1.0 and bool((labels >= 0).any())
        null = torch.full_like(labels, NULL_CLASS)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([latents] * 2) if guided else latents
            if hasattr(self.scheduler, "scale_model_input"):
                model_in = self.scheduler.scale_model_input(model_in, t)
            cls = torch.cat([null, labels]) if guided else labels
            out = self.unet(model_in, t, class_labels=cls).sample
            if guided:
                e_u, e_c = out.chunk(2)
                out = e_u + guidance_scale * (e_c - e_u)
            latents = self.scheduler.step(out, t, latents).prev_sample
        images = latents
        return GMMOutput(sample=images) if return_dict else (images,)


@torch.no_grad()
def ode_solution(
    denoiser: GMMDenoiser,
    x_start: torch.Tensor,
    alpha_bar_start: float,
    alpha_bar_end: float,
    num_steps: int = 2000,
    class_labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Integrate the probability-flow ODE from ᾱ_start to ᾱ_end with RK4 in float64 (ground truth).

    In DDIM's variables ``x̄ = x/√ᾱ``, ``σ = √((1−ᾱ)/ᾱ)`` the ODE is ``dx̄/dσ = ε(x, ᾱ(σ))`` (Song et al. 2021,
    Eq. 14); steps are uniform in log σ. ``alpha_bar_end = 1`` integrates to clean data (σ = 0).
    """
    x = x_start.to(torch.float64)
    b = x.shape[0]

    def sigma_of(ab: float) -> float:
        return math.sqrt((1 - ab) / ab)

    def eps(xbar: torch.Tensor, sigma: float) -> torch.Tensor:
        if sigma == 0.0:
            # the limit at clean data: ε = σ·Σ_k r_k (x − μ_k)/(s_k² + σ²) → 0 (the closed form divides 0 by 0)
            return torch.zeros_like(xbar)
        ab = 1.0 / (1.0 + sigma * sigma)
        xt = xbar * math.sqrt(ab)
        abt = torch.full((b,), ab, dtype=torch.float64, device=x.device)
        if class_labels is None or guidance_scale == 1.0:
            return denoiser.epsilon(xt, abt, class_labels)
        e_u = denoiser.epsilon(xt, abt, None)
        e_c = denoiser.epsilon(xt, abt, class_labels)
        return e_u + guidance_scale * (e_c - e_u)

    s0, s1 = sigma_of(alpha_bar_start), sigma_of(alpha_bar_end)
    # uniform in log σ down to s1 (or to 1e-4·s0 when s1 = 0, then one last step to σ = 0)
    end = s1 if s1 > 0 else s0 * 1e-4
    logs = torch.linspace(math.log(s0), math.log(end), num_steps + 1, dtype=torch.float64)
    sig = logs.exp().tolist() + ([0.0] if s1 == 0 else [])
    xbar = x / math.sqrt(alpha_bar_start)
    for a, c in zip(sig[:-1], sig[1:]):
        h = c - a
        k1 = eps(xbar, a)
        k2 = eps(xbar + 0.5 * h * k1, a + 0.5 * h)
        k3 = eps(xbar + 0.5 * h * k2, a + 0.5 * h)
        k4 = eps(xbar + h * k3, c)
        xbar = xbar + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return xbar * math.sqrt(alpha_bar_end)

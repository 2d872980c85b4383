"""`OLSSScheduler`: a diffusers scheduler that runs searched OLSS schedules.

It holds one or several :class:`~olss_fast.schedule.OLSSSchedule` keyed by step count; ``set_timesteps(n)`` picks the
n-step one. Built without schedules, it runs DDIM's own coefficients (written in OLSS form) and reproduces
``DDIMScheduler`` with ``eta=0``. The schedules live in the scheduler config, so ``save_pretrained`` writes plain JSON.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from diffusers import DDIMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from .schedule import OLSSSchedule, stack_schedules_by_steps
from .step import ddim_coefficients, olss_combine

logger = logging.getLogger(__name__)


class OLSSScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler for OLSS few-step sampling (Duan et al., CIKM 2023).

    The noise-schedule arguments are DDIM's (so ``OLSSScheduler.from_config(pipe.scheduler.config)`` works); they set
    ``alphas_cumprod`` for ``add_noise`` and for the DDIM default used when no schedule was searched.

    Args:
        schedules: searched schedules as dicts (``OLSSSchedule.to_dict()``); use :meth:`from_schedules` to build
            from ``OLSSSchedule`` objects.
    """

    _compatibles = [
        "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
        "DEISMultistepScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler",
    ]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | None = None,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "trailing",
        rescale_betas_zero_snr: bool = False,
        schedules: list[dict] | None = None,
    ) -> None:
        # DDIM's noise schedule, built by diffusers itself (no re-implementation of the beta schedules)
        self._ddim = DDIMScheduler(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, clip_sample=False,
            set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset, prediction_type=prediction_type,
            timestep_spacing=timestep_spacing, rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        self.alphas_cumprod = self._ddim.alphas_cumprod
        self.final_alpha_cumprod = self._ddim.final_alpha_cumprod
        self._schedules: dict[int, OLSSSchedule] = stack_schedules_by_steps(
            [s if isinstance(s, OLSSSchedule) else OLSSSchedule.from_dict(s) for s in (schedules or [])]
        )
        for s in self._schedules.values():
            if s.prediction_type != prediction_type:
                logger.warning(
                    "the %d-step schedule was fitted for prediction_type=%r but the scheduler says %r",
                    s.num_steps, s.prediction_type, prediction_type,
                )
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.zeros(0, dtype=torch.long)
        self.schedule: OLSSSchedule | None = None
        self._coeffs = torch.zeros(0, 0, dtype=torch.float64)
        self._coeffs_cache: dict[tuple, torch.Tensor] = {}
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._x0: torch.Tensor | None = None
        self._history: list[torch.Tensor] = []

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_schedules(
        cls, schedules: OLSSSchedule | Sequence[OLSSSchedule], config: dict | None = None, **kwargs: Any
    ) -> "OLSSScheduler":
        """Build from searched schedules; ``config`` (e.g. ``pipe.scheduler.config``) supplies the noise schedule."""
        if isinstance(schedules, OLSSSchedule):
            schedules = [schedules]
        schedules = list(schedules)
        stack_schedules_by_steps(schedules)  # duplicate / type check with a clear message
        base = dict(config or {})
        base.update(kwargs)
        accepted = set(cls._get_init_keys(cls)) - {"self", "schedules"}
        init = {k: v for k, v in base.items() if k in accepted}
        if schedules and "prediction_type" not in init:
            init["prediction_type"] = schedules[0].prediction_type
        return cls(schedules=[s.to_dict() for s in schedules], **init)

    @property
    def schedules(self) -> dict[int, OLSSSchedule]:
        """The searched schedules keyed by step count (a copy of the mapping)."""
        return dict(self._schedules)

    @property
    def available_steps(self) -> list[int]:
        return sorted(self._schedules)

    # ------------------------------------------------------------------ diffusers API
    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        if begin_index != 0:
            raise ValueError(
                "OLSS schedules start from pure noise (x0 is the initial noise); starting at a later step "
                "(img2img with strength < 1) is not supported"
            )
        self._begin_index = begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[int] | None = None,
        sigmas: Sequence[float] | None = None,
        **_: Any,
    ) -> None:
        """Pick the schedule with ``num_inference_steps`` steps (or the one whose timesteps equal ``timesteps``)."""
        if timesteps is not None:
            wanted = [float(t) for t in timesteps]
            match = [s for s in self._schedules.values() if [float(t) for t in s.timesteps] == wanted]
            if not match:
                raise ValueError(
                    f"no OLSS schedule has timesteps {list(timesteps)}; available: "
                    f"{ {n: s.timesteps for n, s in self._schedules.items()} }"
                )
            num_inference_steps = match[0].num_steps
        if sigmas is not None:
            logger.warning("OLSSScheduler ignores custom sigmas; it uses the searched schedule's timesteps")
        if num_inference_steps is None or isinstance(num_inference_steps, bool) or int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        n = int(num_inference_steps)
        if self._schedules:
            if n not in self._schedules:
                raise ValueError(
                    f"this OLSSScheduler holds schedules for {self.available_steps} steps, not {n}: pass "
                    f"num_inference_steps={self.available_steps[0] if len(self._schedules) == 1 else self.available_steps}"
                    " or search a schedule for that count"
                )
            sched = self._schedules[n]
        else:
            sched = self.ddim_schedule(n)
        self.schedule = sched
        self.num_inference_steps = n
        is_int = all(isinstance(t, int) for t in sched.timesteps)
        self.timesteps = torch.tensor(sched.timesteps, dtype=torch.long if is_int else torch.float32, device=device)
        self._coeffs = sched.coeffs
        self._coeffs_cache = {}
        self._reset()

    def ddim_schedule(self, num_inference_steps: int) -> OLSSSchedule:
        """DDIM's update at its own timesteps for n steps, written as an OLSS schedule (no search)."""
        self._ddim.set_timesteps(num_inference_steps)
        ts = [int(t) for t in self._ddim.timesteps]
        ratio = self.config.num_train_timesteps // num_inference_steps
        prev = [t - ratio for t in ts]
        coeffs = ddim_coefficients(
            self.alphas_cumprod, ts, prev, float(self.final_alpha_cumprod), self.config.prediction_type
        )
        return OLSSSchedule(
            timesteps=ts, indices=list(range(len(ts))), coeffs=coeffs, teacher_steps=len(ts),
            prediction_type=self.config.prediction_type, path="ddim", teacher="DDIMScheduler (own coefficients)",
        )

    def _reset(self) -> None:
        self._step_index = None
        self._x0 = None
        self._history = []

    def _device_coeffs(self, device: torch.device) -> torch.Tensor:
        key = (device.type, device.index)
        c = self._coeffs_cache.get(key)
        if c is None:
            c = self._coeffs.to(device=device, dtype=torch.float32)
            self._coeffs_cache[key] = c
        return c

    def _index_for_timestep(self, timestep: Any) -> int:
        t = float(timestep.item() if isinstance(timestep, torch.Tensor) else timestep)
        hits = [i for i, s in enumerate(self.timesteps.tolist()) if float(s) == t]
        if not hits:
            raise ValueError(f"timestep {t} is not in this schedule's timesteps {self.timesteps.tolist()}")
        return hits[0]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        **_: Any,
    ) -> SchedulerOutput | tuple:
        """Advance one student step: ``x_{j+1} = w_j x_0 + Σ_{l≤j} v_{j,l} e_l`` (OLSS Eq. 8), computed in float32.

        ``sample`` at the first step is taken as the initial noise x_0; ``model_output`` is e_j (after guidance).
        """
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        if self._step_index is None or self._step_index >= self.num_inference_steps:
            j = self._index_for_timestep(timestep)
            if j != 0:
                raise ValueError(
                    f"OLSS sampling must start at the first timestep {self.timesteps[0].item()}, got {timestep} "
                    "(the scheduler needs the initial noise to combine the model outputs)"
                )
            self._reset()
            self._step_index = 0
        j = self._step_index
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model_output shape {list(model_output.shape)} differs from sample shape {list(sample.shape)} "
                "(combine the classifier-free guidance halves before calling step)"
            )
        if j == 0:
            self._x0 = sample.detach().to(torch.float32)
        elif self._x0.shape != sample.shape:
            raise ValueError(f"sample shape changed mid-sampling: {list(self._x0.shape)} -> {list(sample.shape)}")
        self._history.append(model_output.detach().to(torch.float32))
        prev = olss_combine(self._device_coeffs(sample.device), j, self._x0, self._history)
        prev = prev.to(sample.dtype)
        self._step_index = j + 1
        if self._step_index == self.num_inference_steps:
            self._history = []  # free memory; the next call starts a new trajectory
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """VP forward process ``√ᾱ_t x + √(1−ᾱ_t) ε`` (the same as DDPM/DDIM's ``add_noise``)."""
        return self._ddim.add_noise(original_samples, noise, timesteps)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

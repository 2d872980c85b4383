"""`OLSSScheduler`: a diffusers scheduler that runs searched OLSS schedules, and is DDIM (or FlowMatchEuler) otherwise.

It holds searched :class:`~olss_fast.core.schedule.OLSSSchedule` objects keyed by step count. ``set_timesteps(n)`` with a
searched n-step schedule runs it (OLSS, Duan et al. 2023, Eq. 8); any other n runs the scheduler it extends, built by
diffusers itself from the same config: ``DDIMScheduler`` for VP models, ``FlowMatchEulerDiscreteScheduler`` for flow
matching (``prediction_type="flow"``). In that mode every call — ``step`` at any timestep with ``eta``, clipping,
thresholding, a generator, img2img's ``set_begin_index`` — is the extended scheduler's own, so
``OLSSScheduler(**DDIMScheduler(...).config)`` is a drop-in replacement for that ``DDIMScheduler``.

A searched schedule computes every latent from the initial noise and the model outputs, so it cannot honour what DDIM
does on the side: ``eta > 0``, a start after the first timestep, latents edited between steps (callbacks,
inpainting blends) raise ``ValueError``; ``clip_sample``/``thresholding`` in a VP config are not applied (one
warning); custom ``timesteps``/``sigmas`` must be the schedule's own (``ValueError`` otherwise). The schedules live in
the scheduler config, so ``save_pretrained`` writes plain JSON (atomically).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from olss_fast.core import checks
from olss_fast.core.checks import warn_once
from olss_fast.core.files import atomic_write_text, exclusive_lock, read_json
from olss_fast.core.provenance import check_allow, compare, is_flow
from olss_fast.core.schedule import OLSSSchedule, stack_schedules_by_steps
from olss_fast.core.step import ddim_coefficients, olss_combine
from olss_fast.pipelines.facts import DDIM_KEYS, FLOW_KEYS, noise_schedule_id
from olss_fast.pipelines.provenance import check_schedule, scheduler_usage
from olss_fast.serve.scheduler_config import (CONFIG_DIGEST_KEY, MAX_CONFIG_BYTES, MAX_CONFIG_VALUES,
                                              check_alphas_cumprod, check_config_data, config_digest,
                                              validate_config)

logger = logging.getLogger(__name__)


class OLSSScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler for OLSS few-step sampling (Duan et al., CIKM 2023); DDIM / FlowMatchEuler otherwise.

    Args: every ``DDIMScheduler`` config key (the VP noise schedule, clipping, thresholding, spacing, ...) and every
    ``FlowMatchEulerDiscreteScheduler`` config key (``shift``, dynamic shifting, ...; used when
    ``prediction_type="flow"``), plus

        schedules: searched schedules as dicts (``OLSSSchedule.to_dict()``); use :meth:`from_schedules` to build
            from ``OLSSSchedule`` objects.

    The defaults are ``DDIMScheduler``'s (searched schedules carry their own timesteps and never clip), so
    ``OLSSScheduler(**partial_ddim_config)`` is that ``DDIMScheduler``. ``OLSSScheduler.from_config(config)`` of a
    ``FlowMatch*`` scheduler's config sets ``prediction_type="flow"`` (see :func:`olss_fast.core.provenance.is_flow`).

    **What it checks by itself** when a pipeline runs a searched schedule: the pipeline's ``set_timesteps`` arguments
    (``sigmas``/``mu`` only for flow matching), custom timesteps, the first step's latents against the latent shape
    the schedule was fitted for (another layout or channel count is refused; another image size warns once), the
    order of steps and edits of the latents between steps. What it cannot see — the model's weights, its prediction
    type once this scheduler replaced the pipeline's, the guidance scale — is checked by
    :func:`olss_fast.serve.schedules.use_olss_scheduler`, the checked way to put it into a pipeline; put in directly
    (``pipe.scheduler = ...``), it says so once per scheduler at WARNING.
    """

    _compatibles = [
        "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
        "DEISMultistepScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler",
        "FlowMatchEulerDiscreteScheduler",
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
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
        schedules: list[dict] | None = None,
    ) -> None:
        cfg = dict(self.config)
        if isinstance(trained_betas, (torch.Tensor, np.ndarray)):
            cfg["trained_betas"] = trained_betas = [float(b) for b in trained_betas.tolist()]
        validate_config(cfg)
        self.is_flow = prediction_type == "flow"
        # the extended scheduler, built by diffusers itself from the same config (no re-implemented beta schedules)
        base = FlowMatchEulerDiscreteScheduler if self.is_flow else DDIMScheduler
        known = set(base._get_init_keys(base))  # keys this diffusers version's class takes
        self._fallback: Any = base(**{k: cfg[k] for k in (FLOW_KEYS if self.is_flow else DDIM_KEYS) if k in known})
        if not self.is_flow:
            check_alphas_cumprod(self._fallback.alphas_cumprod, prediction_type)
            for name in ("betas", "alphas", "alphas_cumprod", "final_alpha_cumprod"):
                setattr(self, name, getattr(self._fallback, name))
        if not isinstance(schedules, (list, tuple)) and schedules is not None:
            raise ValueError(f"OLSSScheduler config schedules must be a list of schedules, got {type(schedules).__name__}")
        self._schedules: dict[int, OLSSSchedule] = stack_schedules_by_steps(
            [s if isinstance(s, OLSSSchedule) else OLSSSchedule.from_dict(s) for s in (schedules or [])]
        )
        usage = {"prediction_type": prediction_type, "noise_schedule": noise_schedule_id(cfg)}
        for s in self._schedules.values():  # the schedules must fit this config (accepted mismatches aside)
            check_schedule(s, usage, where="with this scheduler config")
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.zeros(0, dtype=torch.long)
        self.sigmas: torch.Tensor | None = None
        self.schedule: OLSSSchedule | None = None
        self._mode: str | None = None  # "olss" | "fallback"
        self._coeffs = torch.zeros(0, 0, dtype=torch.float64)
        self._coeffs_cache: dict[tuple, torch.Tensor] = {}
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._x0: torch.Tensor | None = None
        self._history: list[torch.Tensor] = []
        self._last_out: torch.Tensor | None = None
        self._last_version = 0
        #: set by :func:`olss_fast.serve.schedules.use_olss_scheduler` once the schedules were checked against a pipeline
        self.checked_for: str | None = None
        self._said_unchecked = False

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """diffusers' ``from_config``; a ``FlowMatch*`` scheduler's config gives ``prediction_type="flow"``."""
        if isinstance(config, dict) and "prediction_type" not in kwargs and "prediction_type" not in config \
                and is_flow(config):
            kwargs["prediction_type"] = "flow"
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def from_schedules(
        cls, schedules: OLSSSchedule | Sequence[OLSSSchedule], config: dict | None = None, *,
        allow_mismatch: Iterable[str] = (), **kwargs: Any,
    ) -> "OLSSScheduler":
        """Build from searched schedules; ``config`` (e.g. ``pipe.scheduler.config``) supplies the noise schedule.

        Each schedule's prediction type and noise schedule must be this config's; ``allow_mismatch`` (names from
        ``("noise_schedule", "prediction_type")``) accepts a difference explicitly, and the acceptance is recorded in
        the schedule (so that saving and loading the scheduler keeps it).
        """
        allow = check_allow(allow_mismatch)
        if isinstance(schedules, OLSSSchedule):
            schedules = [schedules]
        schedules = list(schedules)
        stack_schedules_by_steps(schedules)  # duplicate / type check with a clear message
        base = dict(config or {})
        flow_source = is_flow(base)
        base.update(kwargs)
        accepted = set(cls._get_init_keys(cls)) - {"self", "schedules"}
        init = {k: v for k, v in base.items() if k in accepted}
        if "prediction_type" not in init:
            if schedules:
                init["prediction_type"] = schedules[0].prediction_type
            elif flow_source:
                init["prediction_type"] = "flow"
        dicts = []
        used = scheduler_usage(dict(init, prediction_type=init.get("prediction_type", "epsilon")))
        for s in schedules:
            if allow:  # the acceptance, naming what it accepted, is recorded in the schedule (and so in its digest)
                accepted = dict(s.fitted_for.get("accepted_mismatch") or {})
                accepted.update({name: used[name] for name in allow if name in used})
                s = dataclasses.replace(s, fitted_for=dict(s.fitted_for, accepted_mismatch=accepted))
            dicts.append(s.to_dict())
        return cls(schedules=dicts, **init)

    @property
    def schedules(self) -> dict[int, OLSSSchedule]:
        """The searched schedules keyed by step count (a copy of the mapping)."""
        return dict(self._schedules)

    @property
    def available_steps(self) -> list[int]:
        return sorted(self._schedules)

    @property
    def running_searched_schedule(self) -> bool:
        """Whether the current ``set_timesteps`` selected a searched schedule (False: DDIM / FlowMatchEuler)."""
        return self._mode == "olss"

    def noise_schedule_id(self) -> dict[str, Any]:
        """This config's noise schedule (see :func:`olss_fast.pipelines.facts.noise_schedule_id`)."""
        return noise_schedule_id(dict(self.config))

    # ------------------------------------------------------------------ diffusers API
    @property
    def step_index(self) -> int | None:
        if self._mode == "fallback":
            return getattr(self._fallback, "step_index", None)
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        if self._mode == "fallback":
            return getattr(self._fallback, "begin_index", self._begin_index)
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """img2img starts after the first timestep: fine for DDIM / FlowMatchEuler, refused by a searched schedule."""
        if self._mode == "olss" and begin_index != 0:
            raise ValueError(
                f"the searched {self.num_inference_steps}-step OLSS schedule starts from pure noise (each latent is "
                f"a combination of the initial noise and the model outputs), so it cannot start at step {begin_index} "
                "(img2img / inpainting with strength < 1); use a step count without a searched schedule (DDIM) for "
                "such pipelines, or strength=1.0"
            )
        self._begin_index = begin_index
        if self._mode == "fallback" and hasattr(self._fallback, "set_begin_index"):
            self._fallback.set_begin_index(begin_index)

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[int | float] | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """Select the searched schedule with ``num_inference_steps`` steps, or run DDIM / FlowMatchEuler for it.

        ``timesteps`` (or flow pipelines' ``sigmas``) may replace ``num_inference_steps``: their length is the step
        count. With a searched schedule they must be its own (or, for ``sigmas``, the pipeline's default grid
        ``linspace(1, 1/n, n)``); ``mu`` (flow resolution shift) is compared with the one the schedule was fitted
        at (a warning when it differs).
        """
        n = None if num_inference_steps is None else checks.integer(num_inference_steps, "num_inference_steps", 1)
        for name, custom in (("timesteps", timesteps), ("sigmas", sigmas)):
            if custom is None:
                continue
            length = len(custom)
            if n is not None and length != n:
                raise ValueError(f"{name} has {length} entries but num_inference_steps={n}; they must agree")
            n = checks.integer(length, f"the length of {name}", 1)
        if n is None:
            raise ValueError("set_timesteps needs num_inference_steps (or timesteps / sigmas)")
        if n > self.config.num_train_timesteps:
            raise ValueError(f"num_inference_steps={n} exceeds num_train_timesteps={self.config.num_train_timesteps}")
        if sigmas is not None and not self.is_flow:
            raise ValueError("sigmas are for flow-matching schedulers; this OLSSScheduler has a VP noise schedule "
                             f"(prediction_type={self.config.prediction_type!r})")
        if mu is not None and not self.is_flow:
            raise ValueError("mu is for flow-matching schedulers with dynamic shifting; this OLSSScheduler has a VP "
                             "noise schedule")
        self._reset()
        self.num_inference_steps = n
        if n in self._schedules:
            self._select_searched(self._schedules[n], device, timesteps, sigmas, mu)
        else:
            self._select_fallback(n, device, timesteps, sigmas, mu)

    def _select_searched(self, sched: OLSSSchedule, device: Any, timesteps: Any, sigmas: Any, mu: Any) -> None:
        n = sched.num_steps
        own = [float(t) for t in sched.timesteps]
        if timesteps is not None and [float(t) for t in timesteps] != own:
            raise ValueError(
                f"custom timesteps {list(timesteps)} cannot be honoured: the searched {n}-step schedule runs its "
                f"fitted timesteps {sched.timesteps}; pass no timesteps (or those)"
            )
        if sigmas is not None:
            given = np.asarray(sigmas, dtype=np.float64)
            default = np.linspace(1.0, 1.0 / n, n)
            own_sigmas = np.asarray(own) / self.config.num_train_timesteps
            if not (np.allclose(given, default, rtol=1e-5, atol=1e-6) or
                    np.allclose(given, own_sigmas, rtol=1e-5, atol=1e-6)):
                raise ValueError(
                    f"custom sigmas {given.round(4).tolist()} cannot be honoured: the searched {n}-step schedule runs "
                    f"its fitted sigmas {(own_sigmas).round(4).tolist()}; pass no sigmas (or the pipeline's default)"
                )
        fitted_mu = sched.fitted_for.get("mu")
        if mu is not None and fitted_mu is not None:
            compare({"mu": fitted_mu}, {"mu": float(mu)}, what=f"the {n}-step schedule", where="at this image size")
        if not self.is_flow and (self.config.clip_sample or self.config.thresholding):  # (DDIM's options)
            what = "thresholding" if self.config.thresholding else "clip_sample"
            warn_once(
                ("olss-clip", what, n),
                "%s=True in the scheduler config is not applied by the searched %d-step OLSS schedule: it runs the "
                "unclipped linear combination it was fitted on (step counts without a searched schedule run DDIM, "
                "which applies it)", what, n,
            )
        if self.checked_for is None and not self._said_unchecked:
            self._said_unchecked = True  # (once per scheduler)
            logger.warning("this OLSSScheduler was put into the pipeline without olss_fast.use_olss_scheduler(pipe, "
                           "...): it checks the latents and timesteps it is given, but cannot see whether its %d-step "
                           "schedule was fitted for this model's weights, prediction type and guidance scale (a "
                           "schedule used on another model gives wrong images without an error); use_olss_scheduler "
                           "checks them", n)
        self.schedule = sched
        self._mode = "olss"
        is_int = all(isinstance(t, int) for t in sched.timesteps)
        self.timesteps = torch.tensor(sched.timesteps, dtype=torch.long if is_int else torch.float32, device=device)
        if self.is_flow:
            s = torch.tensor(own, dtype=torch.float32) / self.config.num_train_timesteps
            self.sigmas = torch.cat([s, torch.zeros(1)]).to(device)
        self._coeffs = sched.coeffs
        self._coeffs_cache = {}

    def _select_fallback(self, n: int, device: Any, timesteps: Any, sigmas: Any, mu: Any) -> None:
        name = type(self._fallback).__name__
        if self._schedules:
            warn_once(
                ("olss-fallback", id(self), n),
                "OLSSScheduler holds searched schedules for %s steps, not %d: running %s for %d steps",
                self.available_steps, n, name, n,
            )
        if self.is_flow:
            if self.config.use_dynamic_shifting and mu is None:
                raise ValueError("this flow-matching scheduler uses dynamic shifting: pass mu to set_timesteps (as "
                                 "diffusers' flow pipelines do)")
            self._fallback.set_timesteps(num_inference_steps=n, device=device, sigmas=sigmas, mu=mu,
                                         timesteps=timesteps)
            self.sigmas = self._fallback.sigmas
        else:
            if timesteps is not None:
                raise ValueError(
                    f"custom timesteps need a searched schedule with exactly these timesteps (searched: "
                    f"{ {k: s.timesteps for k, s in self._schedules.items()} }); DDIMScheduler takes no custom "
                    "timesteps"
                )
            self._fallback.set_timesteps(n, device=device)
        self.timesteps = self._fallback.timesteps
        self.schedule = None
        self._mode = "fallback"

    def ddim_schedule(self, num_inference_steps: int) -> OLSSSchedule:
        """DDIM's update at its own timesteps for n steps, written as an OLSS schedule (VP configs)."""
        if self.is_flow:
            raise ValueError("ddim_schedule is for VP noise schedules; this scheduler is flow matching")
        n = checks.integer(num_inference_steps, "num_inference_steps", 1)
        ddim = DDIMScheduler.from_config(self._fallback.config)
        ddim.set_timesteps(n)
        ts = [int(t) for t in ddim.timesteps]
        ratio = self.config.num_train_timesteps // n
        prev = [t - ratio for t in ts]
        coeffs = ddim_coefficients(
            self.alphas_cumprod, ts, prev, float(self.final_alpha_cumprod), self.config.prediction_type
        )
        return OLSSSchedule(
            timesteps=ts, indices=list(range(len(ts))), coeffs=coeffs, teacher_steps=len(ts),
            prediction_type=self.config.prediction_type, path="ddim", teacher="DDIMScheduler (own coefficients)",
            fitted_for={"noise_schedule": self.noise_schedule_id()},
        )

    def _reset(self) -> None:
        self._step_index = None
        self._x0 = None
        self._history = []
        self._last_out = None

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
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Any:
        """One step, with ``DDIMScheduler.step``'s signature.

        Without a searched schedule for the current step count this *is* the extended scheduler's ``step``
        (DDIM: every argument honoured; FlowMatchEuler: ``generator`` and ``return_dict``). With one it is the OLSS
        step ``x_{j+1} = w_j x_0 + Σ_{l≤j} v_{j,l} e_l`` (OLSS Eq. 8) in float32, cast back to the sample's dtype:
        ``sample`` at the first step is taken as the initial noise x_0, ``model_output`` is e_j (after guidance).
        """
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        checks.real(eta, "eta", 0.0)
        if self._mode == "fallback":
            if not self.is_flow:
                return self._fallback.step(model_output, timestep, sample, eta, use_clipped_model_output, generator,
                                           variance_noise, return_dict)
            if eta != 0 or variance_noise is not None:
                raise ValueError("eta / variance_noise are DDIM options; FlowMatchEulerDiscreteScheduler takes neither")
            return self._fallback.step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        return self._olss_step(model_output, timestep, sample, eta, return_dict)

    def _olss_step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, eta: float,
                   return_dict: bool) -> Any:
        n = self.num_inference_steps
        if eta > 0:
            raise ValueError(
                f"eta={eta} asks for DDIM's stochastic sampling, which the searched {n}-step OLSS schedule (a "
                "deterministic linear combination) cannot do; use eta=0, or a step count without a searched schedule"
            )
        if self._step_index is None or self._step_index >= n:
            j = self._index_for_timestep(timestep)
            if j != 0:
                raise ValueError(
                    f"OLSS sampling must start at the first timestep {self.timesteps[0].item()}, got {timestep} "
                    "(the scheduler needs the initial noise to combine the model outputs; img2img with strength < 1 "
                    "needs a step count without a searched schedule)"
                )
            self._reset()
            self._step_index = 0
        j = self._step_index
        t = float(timestep.item() if isinstance(timestep, torch.Tensor) else timestep)
        if t != float(self.timesteps[j]):
            if j > 0 and t == float(self.timesteps[0]):  # a new trajectory before the last one finished
                self._reset()
                self._step_index = j = 0
            else:
                raise ValueError(
                    f"step {j} of the searched {n}-step OLSS schedule runs at timestep {self.timesteps[j].item()}, "
                    f"got {timestep}: the steps must follow scheduler.timesteps in order"
                )
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model_output shape {list(model_output.shape)} differs from sample shape {list(sample.shape)} "
                "(combine the classifier-free guidance halves before calling step)"
            )
        if j == 0:
            self._check_latents(sample)
            self._x0 = sample.detach().to(torch.float32)
        else:
            if self._x0.shape != sample.shape:
                raise ValueError(f"sample shape changed mid-sampling: {list(self._x0.shape)} -> {list(sample.shape)}")
            self._check_unedited(sample, j)
        self._history.append(model_output.detach().to(torch.float32))
        prev = olss_combine(self._device_coeffs(sample.device), j, self._x0, self._history)
        prev = prev.to(sample.dtype)
        if not torch.isfinite(prev).all():
            raise ValueError(f"step {j} of the searched {n}-step OLSS schedule produced NaN or Inf latents (model "
                             f"output finite: {bool(torch.isfinite(model_output).all())}); the images would be noise")
        self._step_index = j + 1
        if self._step_index == n:
            self._history = []  # free memory; the next call starts a new trajectory
            self._last_out = None
        else:
            self._last_out = prev
            self._last_version = prev._version
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def _check_latents(self, sample: torch.Tensor) -> None:
        """The first step's latents against the per-sample latent shape the schedule was fitted for: another layout
        or number of channels (another model family, e.g. a Stable Diffusion schedule in SD3 or Flux) is refused,
        another image size warns once."""
        fitted = self.schedule.fitted_for.get("latent_shape") if self.schedule is not None else None
        if fitted is None:
            return
        got = [int(v) for v in sample.shape[1:]]
        channel = 0 if len(fitted) >= 3 else -1  # [C, H, W] latents; packed [tokens, features] latents
        if len(got) != len(fitted) or got[channel] != fitted[channel]:
            raise ValueError(
                f"the {self.num_inference_steps}-step schedule was fitted for latents of shape {fitted} per sample, "
                f"but this pipeline samples {got}: another model family or latent layout (a Stable Diffusion schedule "
                "in SD3 or Flux?). Search a schedule on this pipeline (fit_olss_scheduler)"
            )
        compare({"latent_shape": fitted}, {"latent_shape": got}, what=f"the {self.num_inference_steps}-step schedule",
                where="with these latents (another image size)")

    def _check_unedited(self, sample: torch.Tensor, j: int) -> None:
        """``ValueError`` when the latents passed to step j are not the ones step j−1 returned.

        Cheap: the same tensor object with an unchanged version counter needs no comparison; a different object
        (a cast, a copy) is compared by value.
        """
        last = self._last_out
        if last is None:
            return
        if sample is last and sample._version == self._last_version:
            return
        edited = last._version != self._last_version
        if not edited:
            try:
                edited = not torch.equal(sample, last.to(dtype=sample.dtype, device=sample.device))
            except RuntimeError:
                edited = True
        if edited:
            raise ValueError(
                f"the latents passed to step {j} differ from those step {j - 1} returned (edited by a callback, an "
                "inpainting mask blend or another hook): the searched OLSS schedule computes each latent from the "
                "initial noise and the model outputs and cannot take such edits into account. Use a step count "
                "without a searched schedule (DDIM) for this pipeline, or leave the latents unchanged"
            )

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """DDIM's ``add_noise`` (VP forward process ``√ᾱ_t x + √(1−ᾱ_t) ε``); flow matching uses :meth:`scale_noise`."""
        if self.is_flow:
            raise ValueError("add_noise is the VP forward process; a flow-matching scheduler uses scale_noise")
        return self._fallback.add_noise(original_samples, noise, timesteps)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """DDIM's ``get_velocity`` (the v-prediction target)."""
        if self.is_flow:
            raise ValueError("get_velocity is defined for VP noise schedules")
        return self._fallback.get_velocity(sample, noise, timesteps)

    def scale_noise(self, sample: torch.Tensor, timestep: Any, noise: torch.Tensor | None = None) -> torch.Tensor:
        """FlowMatchEuler's forward process ``σ ε + (1 − σ) x`` (flow-matching img2img, without a searched schedule)."""
        if not self.is_flow:
            raise ValueError("scale_noise is the flow-matching forward process; a VP scheduler uses add_noise")
        if self._mode == "olss":
            t = float(timestep.flatten()[0] if isinstance(timestep, torch.Tensor) else timestep)
            if noise is not None and t == float(self.timesteps[0]) and float(self.sigmas[0]) == 1.0:
                return noise  # strength 1.0: the forward process at sigma 1 is the noise itself
            raise ValueError("the searched OLSS schedule starts from pure noise: img2img (scale_noise) with "
                             "strength < 1 needs a step count without a searched schedule")
        return self._fallback.scale_noise(sample, timestep, noise)

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        """diffusers' ``save_pretrained``, plus a digest of the config (``_olss_sha256``, verified by
        :meth:`from_pretrained`), written atomically (never left half-written) under an exclusive lock."""
        if push_to_hub:
            raise ValueError("push_to_hub is not supported by OLSSScheduler.save_pretrained; save, then upload")
        folder = Path(save_directory)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"cannot save the scheduler to {folder}: it exists and is not a folder")
        with exclusive_lock(folder, "scheduler folder"):
            folder.mkdir(parents=True, exist_ok=True)
            data = json.loads(self.to_json_string())
            data[CONFIG_DIGEST_KEY] = config_digest(data)
            atomic_write_text(folder / self.config_name, json.dumps(data, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any = None, subfolder: str | None = None,
                        return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """diffusers' ``from_pretrained``; a local folder (or config file) is read strictly: bounded size, valid
        JSON, an ``OLSSScheduler`` config, its digest verified (``ValueError`` on any problem). Hub ids go through
        diffusers."""
        path = Path(str(pretrained_model_name_or_path)) / (subfolder or "")
        if not path.exists():
            try:
                return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder,
                                               return_unused_kwargs=return_unused_kwargs, **kwargs)
            except OSError as exc:  # diffusers' "not found on the Hub" / offline errors
                raise ValueError(f"no scheduler at {path}: not a local folder, and not loadable from the Hub "
                                 f"({str(exc).splitlines()[0][:200]})") from None
        config_file = path / cls.config_name if path.is_dir() else path
        data = read_json(config_file, MAX_CONFIG_BYTES, "scheduler config", MAX_CONFIG_VALUES)
        scheduler = cls.from_config_data(data, str(config_file), **kwargs)
        return (scheduler, {}) if return_unused_kwargs else scheduler

    @classmethod
    def from_config_data(cls, data: Any, source: str = "the scheduler config", **kwargs: Any) -> "OLSSScheduler":
        """An ``OLSSScheduler`` from a parsed ``scheduler_config.json``, checked strictly (see
        :meth:`from_pretrained`)."""
        data = check_config_data(data, cls.__name__, set(cls._get_init_keys(cls)) - {"self"}, source)
        try:
            return cls.from_config(data, **kwargs)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None
        except (TypeError, KeyError, AttributeError, RuntimeError, NotImplementedError, OverflowError) as exc:
            raise ValueError(f"{source} holds an invalid scheduler config: {exc!r}"[:500]) from None

    def __len__(self) -> int:
        return self.config.num_train_timesteps



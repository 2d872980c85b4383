"""Fair comparisons of samplers at the same number of model evaluations (docs/design.md, "Fair comparisons").

Every sampler runs through the same pipeline from the same initial noise, with trailing timesteps; quality is
measured on held-out noise/prompts against the teacher's final sample from that noise. Learned-step baselines
(OSS, :mod:`olss_fast.core.oss`) run as diffusers' own schedulers on the timesteps they chose
(:class:`CustomTimestepsScheduler`).
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from olss_fast.core import checks
from olss_fast.core.metrics import rmse  # noqa: F401  (re-exported for the comparison scripts)
from olss_fast.core.oss import OSSResult, oss_search
from olss_fast.core.provenance import scheduler_prediction_type
from olss_fast.fit.config import RecordConfig
from olss_fast.fit.probe import pipeline_denoiser
from olss_fast.fit.recording import quiet_progress, record_trajectories, swapped_scheduler
from olss_fast.fit.teacher import default_teacher, final_alpha_bar
from olss_fast.fit.work import make_work_items, spread_indices
from olss_fast.serve.scheduler import OLSSScheduler
from olss_fast.serve.schedules import use_olss_scheduler

logger = logging.getLogger(__name__)

#: diffusers baselines by name: (class name, extra config)
BASELINES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    # diffusers' PLMS arithmetic assumes its timesteps reach 0: with "trailing" (which stops at T/n - 1) PNDM's last
    # steps are wrong (RMSE 2.2 vs 0.47 at 5 NFE on the digits model), so it runs with "linspace", which also starts
    # at t = 999 like every other sampler here
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True, "timestep_spacing": "linspace"}),
    "euler": ("EulerDiscreteScheduler", {}),
}


def baseline_scheduler(name: str, config: dict[str, Any]) -> Any:
    """A diffusers scheduler by name, on the noise schedule of ``config``, with trailing timesteps (PNDM: linspace)."""
    import diffusers

    if name not in BASELINES:
        raise ValueError(f"unknown sampler {name!r}; choose from {sorted(BASELINES)} or 'olss'")
    cls_name, extra = BASELINES[name]
    base = {k: v for k, v in dict(config).items() if k != "schedules"}
    base["timestep_spacing"] = "trailing"
    base.update(extra)
    if cls_name == "DDIMScheduler":
        base["clip_sample"] = False
    return getattr(diffusers, cls_name).from_config(base)


def steps_for_nfe(scheduler: Any, nfe: int) -> int:
    """The ``num_inference_steps`` that makes ``scheduler`` evaluate the model exactly ``nfe`` times."""
    for steps in [nfe] + [s for s in range(max(1, nfe - 2), nfe + 2) if s != nfe]:
        try:
            scheduler.set_timesteps(steps)
        except ValueError:
            continue
        if len(scheduler.timesteps) == nfe:
            return steps
    raise ValueError(f"{type(scheduler).__name__} cannot run with exactly {nfe} model evaluations")


@torch.no_grad()
def sample(pipe: Any, scheduler: Any, prompts: Sequence[Any], latents: torch.Tensor, nfe: int,
           call_kwargs: dict[str, Any] | None = None, batch_size: int | None = None) -> torch.Tensor:
    """Final latents of ``pipe`` with ``scheduler`` at ``nfe`` model evaluations, from given initial latents.

    An ``OLSSScheduler`` not yet checked against a pipeline goes through :func:`use_olss_scheduler`'s checks first
    (against ``pipe`` as it is, at the guidance scale and size of ``call_kwargs``), as a user's would."""
    kwargs = dict(call_kwargs or {})
    kwargs.setdefault("output_type", "latent")
    if isinstance(scheduler, OLSSScheduler) and scheduler.checked_for is None:
        with swapped_scheduler(pipe, pipe.scheduler):  # the checks set pipe.scheduler; put the original back
            use_olss_scheduler(pipe, scheduler, guidance_scale=kwargs.get("guidance_scale"),
                               height=kwargs.get("height"), width=kwargs.get("width"))
    steps = steps_for_nfe(scheduler, nfe)
    bs = batch_size or latents.shape[0]
    outs = []
    with swapped_scheduler(pipe, scheduler), quiet_progress(pipe):
        for s in range(0, latents.shape[0], bs):
            out = pipe(prompt=list(prompts[s : s + bs]), latents=latents[s : s + bs].clone(),
                       num_inference_steps=steps, **kwargs)
            images = out[0] if isinstance(out, tuple) else getattr(out, "images", None)
            if images is None:
                images = out.sample
            outs.append(torch.as_tensor(images).to("cpu", torch.float32))
    return torch.cat(outs)



def compare_samplers(
    pipe: Any,
    samplers: dict[str, Any],
    nfes: Sequence[int],
    prompts: Sequence[Any],
    latents: torch.Tensor,
    quality: Any,
    call_kwargs: dict[str, Any] | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    keep: Any = None,
) -> dict[str, dict[str, Any]]:
    """Run every sampler at every NFE from the same latents; ``quality(samples) -> dict`` of metrics.

    ``samplers`` maps a name to a scheduler (OLSS schedulers must hold a schedule for each NFE; a name whose scheduler
    cannot run at some NFE gets ``None`` there). ``keep(name, nfe, samples)`` is called with every result.
    Returns ``{name: {str(nfe): metrics}}``.
    """
    from tqdm.auto import tqdm

    out: dict[str, dict[str, Any]] = {}
    runs = [(name, n) for name in samplers for n in nfes]
    for name, n in tqdm(runs, desc="evaluating samplers", disable=not progress):
        try:
            samples = sample(pipe, samplers[name], prompts, latents, n, call_kwargs, batch_size)
        except ValueError as exc:
            logger.info("%s cannot run at %d NFE: %s", name, n, exc)
            out.setdefault(name, {})[str(n)] = None
            continue
        out.setdefault(name, {})[str(n)] = quality(samples)
        if keep is not None:
            keep(name, n, samples)
    return out


#: the diffusers scheduler each OSS solver runs as, on the timesteps the dynamic programme chose (custom timesteps).
#: First-order DPM-Solver++ in data-prediction form *is* DDIM (eta = 0), in the VP space with init_noise_sigma = 1
#: and ending at σ = 0 like the DDIM teacher; diffusers' DDIMScheduler itself takes no custom timesteps.
OSS_RUNNERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 1}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}


class CustomTimestepsScheduler:
    """A diffusers scheduler run on given timesteps for each step count (``set_timesteps(timesteps=...)``).

    ``set_timesteps(n)`` (what pipelines call) sets the timesteps stored for n and refuses other step counts with a
    ``ValueError``; every other attribute is the wrapped scheduler's, so pipelines see its ``step``,
    ``scale_model_input``, ``init_noise_sigma``, ``order``, config.
    """

    def __init__(self, scheduler: Any, timesteps: dict[int, Sequence[int]]) -> None:
        if not timesteps:
            raise ValueError("no timesteps given: pass {num_steps: [t_0, ..., t_(n-1)]}")
        table = {}
        for n, ts in timesteps.items():
            ts = [int(t) for t in ts]
            if len(ts) != int(n) or any(a <= b for a, b in zip(ts, ts[1:])):
                raise ValueError(f"the timesteps for {n} steps must be {n} strictly decreasing integers, got {ts}")
            table[int(n)] = ts
        object.__setattr__(self, "scheduler", scheduler)
        object.__setattr__(self, "table", table)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.scheduler, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.scheduler, name, value)

    @property
    def available_steps(self) -> list[int]:
        return sorted(self.table)

    def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None, **kwargs: Any) -> None:
        if kwargs.get("timesteps") is not None or kwargs.get("sigmas") is not None:
            raise ValueError("this scheduler runs its own timesteps; do not pass timesteps/sigmas")
        if num_inference_steps not in self.table:
            raise ValueError(f"no timesteps for {num_inference_steps} steps; this sampler has {self.available_steps}")
        self.scheduler.set_timesteps(device=device, timesteps=list(self.table[num_inference_steps]))

    def __repr__(self) -> str:
        return f"CustomTimestepsScheduler({type(self.scheduler).__name__}, {self.table})"


def oss_scheduler(result: OSSResult, config: dict[str, Any]) -> CustomTimestepsScheduler:
    """The diffusers scheduler of ``result.solver`` (:data:`OSS_RUNNERS`) on the noise schedule of ``config``,
    running the timesteps OSS chose for each step count."""
    import diffusers

    if result.solver not in OSS_RUNNERS:
        raise ValueError(f"no runner for OSS solver {result.solver!r}; known: {sorted(OSS_RUNNERS)}")
    cls_name, extra = OSS_RUNNERS[result.solver]
    base = {k: v for k, v in dict(config).items() if k != "schedules"}
    base.update(extra, final_sigmas_type="zero", lower_order_final=True, euler_at_final=False,
                use_karras_sigmas=False, thresholding=False)
    return CustomTimestepsScheduler(getattr(diffusers, cls_name).from_config(base), result.timesteps)


def fit_oss_baselines(
    pipe: Any,
    prompts: Sequence[Any],
    solvers: Sequence[str] = ("ddim", "dpmsolver++"),
    num_steps: Sequence[int] = (5, 10),
    *,
    teacher: Any | None = None,
    teacher_steps: int = 100,
    seeds_per_prompt: int = 1,
    base_seed: int = 0,
    samples: int | None = None,
    batch_size: int = 4,
    guidance_scale: float | None = None,
    progress: bool = True,
) -> dict[str, tuple[OSSResult, CustomTimestepsScheduler]]:
    """OSS baselines (:func:`olss_fast.core.oss.oss_search`) for ``pipe``: record the teacher on the training work items
    (prompts × seeds; ``samples`` of them spread evenly, default all), run the dynamic programme along its
    trajectories for each solver, and wrap the chosen timesteps as diffusers schedulers. Returns
    ``{solver: (result, scheduler)}``.

    The teacher defaults to the one OLSS records (:func:`olss_fast.fit.teacher.default_teacher`), its grid being the
    teacher's timesteps plus its end, which must be clean data (σ = 0), where diffusers' DPM-Solver++ ends.
    """
    unknown = [s for s in solvers if s not in OSS_RUNNERS]
    if unknown or not solvers:
        raise ValueError(f"unknown OSS solver(s) {unknown or list(solvers)}; choose from {sorted(OSS_RUNNERS)}")
    items = make_work_items(prompts, seeds_per_prompt, base_seed)
    if samples is not None:
        checks.integer(samples, "samples", 1)
        items = [items[k] for k in spread_indices(len(items), samples)]  # spread over the prompts
    teacher = teacher if teacher is not None else default_teacher(pipe.scheduler)
    if scheduler_prediction_type(teacher) == "flow":
        raise ValueError("OSS baselines are implemented for VP (DDIM / DPM-Solver++) samplers, not flow matching")
    end = final_alpha_bar(teacher)
    if abs(end - 1.0) > 1e-12:
        raise ValueError(
            f"the teacher ends at ᾱ = {end:.6g}, not at clean data (σ = 0) where the OSS runners end: use a teacher "
            "with set_alpha_to_one=True (DDIM) or final_sigmas_type='zero'"
        )
    record = RecordConfig(teacher_steps=teacher_steps, batch_size=batch_size, guidance_scale=guidance_scale)
    kept: list[torch.Tensor] = []
    record_trajectories(pipe, [it.prompt for it in items], teacher=teacher, config=record, items=items,
                        on_batch=lambda its, x, e: kept.append(x.detach().to("cpu", torch.float32)),
                        progress=progress, distributed=False)
    reference = torch.cat(kept, dim=1)
    timesteps = [t.item() for t in teacher.timesteps]
    ac = teacher.alphas_cumprod.to(torch.float64)
    alpha_bars = [float(ac[int(t)]) for t in timesteps] + [end]
    denoise = pipeline_denoiser(pipe, items, record, distributed=False)
    cfg = dict(pipe.scheduler.config)
    out = {}
    for solver in solvers:
        res = oss_search(denoise, reference, timesteps, alpha_bars, list(num_steps), solver,
                         prediction_type=scheduler_prediction_type(teacher), progress=progress)
        out[solver] = (res, oss_scheduler(res, cfg))
    return out

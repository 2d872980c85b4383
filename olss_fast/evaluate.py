"""Fair comparisons of samplers at the same number of model evaluations (docs/design.md, "Fair comparisons").

Every sampler runs through the same pipeline from the same initial noise, with trailing timesteps; quality is
measured on held-out noise/prompts against the teacher's final sample from that noise.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from .metrics import rmse  # noqa: F401  (re-exported for the comparison scripts)
from .recording import _quiet_progress, swapped_scheduler

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
    """Final latents of ``pipe`` with ``scheduler`` at ``nfe`` model evaluations, from given initial latents."""
    kwargs = dict(call_kwargs or {})
    kwargs.setdefault("output_type", "latent")
    steps = steps_for_nfe(scheduler, nfe)
    bs = batch_size or latents.shape[0]
    outs = []
    with swapped_scheduler(pipe, scheduler), _quiet_progress(pipe):
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

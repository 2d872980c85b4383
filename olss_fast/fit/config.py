"""Options of the recording and of the one-call fit: the typed configs, and the one mapping of loose keyword
arguments onto them (:func:`fit_configs`)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from olss_fast.core import checks
from olss_fast.core.schedule import GRANULARITIES, MAX_TEACHER_STEPS
from olss_fast.core.search import DEFAULT_PATH, DEFAULT_STATS_PATH, PATHS, STATS_PATHS
from olss_fast.core.stats import GramStats
from olss_fast.pipelines.facts import NEGATIVE_PROMPTS

#: pipeline call arguments the recording sets itself
MANAGED_CALL_KWARGS = ("prompt", "latents", "num_inference_steps", "output_type", "generator", "num_images_per_prompt",
                       "return_dict", "timesteps", "sigmas")


def call_kwargs_for(pipe: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` keyword arguments checked against ``pipe.__call__`` (``ValueError`` naming unknown ones)."""
    if not extra:
        return {}
    try:
        params = inspect.signature(type(pipe).__call__).parameters
    except (TypeError, ValueError):
        return dict(extra)
    named = {k for k, p in params.items() if k != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    if not named:
        return dict(extra)  # a wrapper passing everything on: cannot tell
    # only named parameters: diffusers pipelines swallow **kwargs (deprecated arguments), which would hide typos
    unknown = sorted(k for k in extra if k not in named)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}: neither fit options (RecordConfig, FitConfig) nor arguments of "
                         f"{type(pipe).__name__}.__call__")
    return dict(extra)


@dataclass
class RecordConfig:
    """Options of :func:`record_trajectories`.

    Attributes:
        teacher_steps: T, the teacher's number of steps.
        batch_size: samples per pipeline call.
        seeds_per_prompt: initial noises per prompt.
        base_seed: seed from which every work item's noise is derived.
        guidance_scale: passed to the pipeline when not None.
        height, width: image size for latent-diffusion pipelines (default: the model's).
        call_kwargs: extra keyword arguments for every pipeline call.
    """

    teacher_steps: int = 100
    batch_size: int = 4
    seeds_per_prompt: int = 1
    base_seed: int = 0
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    call_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks.integer(self.teacher_steps, "teacher_steps", 1, MAX_TEACHER_STEPS)
        checks.integer(self.batch_size, "batch_size", 1, 2**20)
        checks.integer(self.seeds_per_prompt, "seeds_per_prompt", 1, 2**20)
        checks.integer(self.base_seed, "base_seed", -(2**63), 2**63 - 1)
        self.guidance_scale = checks.optional(checks.real, self.guidance_scale, "guidance_scale")
        for name in ("height", "width"):
            checks.optional(checks.integer, getattr(self, name), name, 1, 2**16)
        if not isinstance(self.call_kwargs, dict) or not all(isinstance(k, str) for k in self.call_kwargs):
            raise ValueError(f"call_kwargs must be a dict of keyword arguments, got {self.call_kwargs!r}")
        managed = sorted(set(self.call_kwargs) & set(MANAGED_CALL_KWARGS))
        if managed:
            raise ValueError(f"call_kwargs {managed} are set by the recording itself (prompts, noise, teacher steps); "
                             "remove them")
        moved = sorted(set(self.call_kwargs) & {"guidance_scale", "height", "width"})
        if moved:
            raise ValueError(f"pass {moved} as RecordConfig fields / fit options, not in call_kwargs")
        for key in NEGATIVE_PROMPTS:
            if key in self.call_kwargs and not isinstance(self.call_kwargs[key], str):
                raise ValueError(f"{key} must be one string used for every prompt (per-prompt negatives are not "
                                 f"supported by the recording), got {type(self.call_kwargs[key]).__name__}")

    def pipeline_kwargs(self) -> dict[str, Any]:
        kw = dict(self.call_kwargs)
        if self.guidance_scale is not None:
            kw["guidance_scale"] = self.guidance_scale
        if self.height is not None:
            kw["height"] = self.height
        if self.width is not None:
            kw["width"] = self.width
        return kw


@dataclass
class FitConfig:
    """Options of :func:`fit_olss_scheduler` beyond recording.

    Attributes:
        num_steps: student step counts to search (one schedule each): an int or a list of ints.
        path: "uniform", "minimax" (the paper's search on the statistics) or "refit" (the path judged by the final
            error after the re-fit: OSS's dynamic programme with the re-fit inside, then optional coordinate
            descent, :func:`olss_fast.core.refine.refit_path_search`; needs ``refine=True``). Default (None):
            ``search.DEFAULT_PATH`` with the re-fit, ``search.DEFAULT_STATS_PATH`` without it.
        granularity: "global" or "channel".
        bisection_iters: bisection steps of the paper's min-max path search (``path="minimax"``, and the min-max
            start that ``path="refit"`` judges).
        refine: run the student-in-the-loop re-fit after the search (recommended), with its held-out choice and
            guard (:func:`olss_fast.core.heldout.choose_on_heldout`).
        refine_samples: how many of the recorded samples the re-fit uses, held-out part included (default: all,
            up to 64; with ``path="refit"``, fewer where the ``evaluation_budget`` needs it).
        heldout_samples: how many of the re-fit samples (spread over them) are held out of the fit to judge the
            candidate paths and to guard the result against plain DDIM/Euler of the same NFE (default: a quarter,
            at least one when there are two or more; 0 turns the guard off, with a warning).
        search_samples: how many samples of the fit part (spread over them) the programme of ``path="refit"``
            runs on; its cost is :func:`olss_fast.core.grid.programme_states` model evaluations of each.
            Default (None): sized with ``search_stride`` to the ``evaluation_budget`` (:func:`plan_search`).
        search_stride: the programme of ``path="refit"`` places steps on every this-many-th teacher index only
            (1: all; 2 halves its cost). Default (None): sized to the ``evaluation_budget``.
        search_sweeps: coordinate-descent passes on the programme's proposal (same samples) before the held-out
            choice, in ``path="refit"`` (default 0: on held-out noise the descent's gains on the search samples did
            not carry over, benchmarks/RESULTS.md, learned-step baselines).
        timestep_shift: in ``path="refit"``, also judge the programme's proposal with a per-step timestep shift
            (:func:`olss_fast.core.shift.shift_timesteps`, fitted on up to 16 search samples), in the uniform
            path's place among the candidates: the model is evaluated at a timestep moved toward the next step's
            where that lowers the re-fitted student's final error, and the held-out choice keeps it only where it
            wins there too. VP models only (``ValueError`` for flow matching). Off by default: on the Gaussian
            mixture benchmark it lowered held-out error by a fifth on average, but on digits, judged on classes the
            fit never saw, it raised it by an eighth (benchmarks/RESULTS.md, "Per-step timestep shift").
        evaluation_budget: the model evaluations of the whole fit (recording, search, re-fit and held-out check)
            that ``path="refit"`` sizes its programme to, as a multiple of the teacher recording's (``T`` per
            recorded sample); it sizes whichever of ``search_samples``/``search_stride`` is not given (default 3.0).
            With a short teacher and a small recording (28 teacher steps for step counts 4, 5, 6, 8 and 10, every
            recorded sample re-fitted: the recording and the re-fit of three candidate paths come to about 4.3x)
            and none of ``refine_samples``, ``heldout_samples``, ``search_samples``, ``search_stride`` given, the
            fit drops the uniform candidate and re-fits on fewer samples (:func:`plan_fit`); where not even that
            fits, the cheapest of those plans runs over the budget (a lower budget never costs more) and the fit
            warns once.
    """

    num_steps: Sequence[int] = (5, 10)
    path: str | None = None
    granularity: str = "global"
    bisection_iters: int = 60
    refine: bool = True
    refine_samples: int | None = None
    heldout_samples: int | None = None
    search_samples: int | None = None
    search_stride: int | None = None
    search_sweeps: int = 0
    timestep_shift: bool = False
    evaluation_budget: float = 3.0

    def __post_init__(self) -> None:
        self.num_steps = checks.step_counts(self.num_steps, "num_steps", MAX_TEACHER_STEPS)
        checks.boolean(self.refine, "refine")
        if self.path is None:
            self.path = DEFAULT_PATH if self.refine else DEFAULT_STATS_PATH
        checks.choice(self.path, "path", PATHS)
        if self.path == "refit" and not self.refine:
            raise ValueError("path='refit' judges each path by the error after the re-fit: it cannot be combined "
                             f"with refine=False; without the re-fit choose a path of {STATS_PATHS}")
        checks.choice(self.granularity, "granularity", GRANULARITIES)
        checks.integer(self.bisection_iters, "bisection_iters", 1, 10_000)
        for name in ("refine_samples", "search_samples"):
            checks.optional(checks.integer, getattr(self, name), name, 1, 2**31)
        checks.optional(checks.integer, self.heldout_samples, "heldout_samples", 0, 2**31)
        checks.integer(self.search_sweeps, "search_sweeps", 0, 1000)
        checks.boolean(self.timestep_shift, "timestep_shift")
        checks.optional(checks.integer, self.search_stride, "search_stride", 1, MAX_TEACHER_STEPS)
        self.evaluation_budget = checks.real(self.evaluation_budget, "evaluation_budget", 1.0, 1e6)
        unused = [name for name, value, default in (("search_samples", self.search_samples, None),
                                                    ("search_stride", self.search_stride, None),
                                                    ("search_sweeps", self.search_sweeps, 0),
                                                    ("timestep_shift", self.timestep_shift, False),
                                                    ("evaluation_budget", self.evaluation_budget, 3.0))
                  if value != default]
        if unused and self.path != "refit":
            raise ValueError(f"{', '.join(unused)} only apply to path='refit' (the path search judged after the "
                             f"re-fit), not to path={self.path!r}: drop them or use path='refit'")
        if self.heldout_samples is not None and not self.refine:
            raise ValueError("heldout_samples only applies with the re-fit (refine=True)")


def fit_configs(pipe: Any, record: Optional[RecordConfig], fit: Optional[FitConfig], stats: Optional[GramStats],
                options: dict[str, Any]) -> tuple[RecordConfig, FitConfig]:
    """The one mapping of :func:`~olss_fast.fit.orchestration.fit_olss_scheduler`'s keyword arguments: names of
    :class:`RecordConfig` fields go there, names of :class:`FitConfig` fields there (each config given whole or by
    keywords, not both), any other name must be an argument of ``pipe.__call__`` and joins ``call_kwargs`` (passed to
    every pipeline call). Given statistics supply the default teacher steps and guidance scale."""
    rec_keys, fit_keys = set(RecordConfig.__dataclass_fields__), set(FitConfig.__dataclass_fields__)
    rec_kw = {k: v for k, v in options.items() if k in rec_keys}
    fit_kw = {k: v for k, v in options.items() if k in fit_keys}
    extra = {k: v for k, v in options.items() if k not in rec_keys and k not in fit_keys}
    if extra:  # the pipeline's own call arguments (negative_prompt, ...) pass through to every pipeline call
        if pipe is None:
            raise ValueError(f"unknown option(s) {sorted(extra)}; see RecordConfig and FitConfig")
        extra = call_kwargs_for(pipe, extra)
        if record is not None:
            raise ValueError(f"pass pipeline call arguments {sorted(extra)} in record.call_kwargs when giving record=")
        both = sorted(set(extra) & set(rec_kw.get("call_kwargs", {})))
        if both:
            raise ValueError(f"{both} given both as keywords and in call_kwargs; pass each once")
        rec_kw["call_kwargs"] = dict(rec_kw.get("call_kwargs", {}), **extra)
    if stats is not None and record is None:
        rec_kw.setdefault("teacher_steps", stats.num_teacher_steps)
        fitted_g = stats.context.get("guidance_scale")
        if "guidance_scale" not in rec_kw and fitted_g is not None:
            rec_kw["guidance_scale"] = fitted_g  # re-fit at the guidance the statistics were recorded at
    return checks.options(RecordConfig, record, rec_kw, "recording"), checks.options(FitConfig, fit, fit_kw, "fit")


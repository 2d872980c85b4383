"""``olss-fast demo``: OLSS on the bundled digits model against diffusers' samplers, on held-out classes and seeds.

Steps: load the bundled class-conditional digits model; record the default teacher (DPM-Solver++(2M), 100 trailing
steps) on the *training* classes and seeds; search and refine OLSS schedules for several step counts (the default
path search, judged after the re-fit, sized to the library's evaluation budget unless ``search_samples`` /
``search_stride`` are given); then, on
*held-out* classes and seeds, run OLSS and diffusers' DDIM, DPM-Solver++(2M), UniPC, DEIS, PNDM and Euler at the same
number of model evaluations (NFE), all with trailing timesteps, and measure RMSE/PSNR against the teacher's sample
from the same noise, the Fréchet distance to the real digits of the evaluated classes in the shipped classifier's
feature space, and the class accuracy. Optional samplers (not in the default set, to keep the demo at about four
minutes on two CPU cores): ``oss-ddim`` and ``oss-dpmsolver++`` (learned-timestep baselines, :mod:`olss_fast.core.oss`,
fitted on ``oss_samples`` of the training noises: about 1.5 min each on 2 cores) and ``olss-uniform`` (the re-fit on
the uniform path). Writes ``results.json`` (every number), ``grid.png`` and ``quality.png`` into the output folder.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from olss_fast.core import checks
from olss_fast.core.checks import any_int, finite_float, positive_int
from olss_fast.core.files import atomic_write_text, atomic_write_with, exclusive_lock
from olss_fast.core.metrics import feature_statistics, frechet_distance, psnr, rmse
from olss_fast.fit.baselines import baseline_scheduler, compare_samplers, fit_oss_baselines, sample
from olss_fast.fit.orchestration import fit_olss_scheduler
from olss_fast.fit.teacher import default_teacher
from olss_fast.fit.work import item_noise, make_work_items
from olss_fast.models.digit_metrics import class_accuracy, classifier_features
from olss_fast.models.digits import load_digits_classifier, load_digits_pipeline
from olss_fast.models.train_digits import load_digit_images
from olss_fast.pipelines.facts import latent_shape

logger = logging.getLogger(__name__)

SAMPLERS = ("olss", "ddim", "dpmsolver++", "unipc", "deis", "pndm", "euler")
#: samplers the demo can add (``--samplers``): learned-timestep baselines and OLSS on the uniform path
OPTIONAL_SAMPLERS = ("oss-ddim", "oss-dpmsolver++", "olss-uniform")


@dataclass
class DemoConfig:
    """Options of the demo (``olss-fast demo --help`` lists them with the same names)."""

    teacher_steps: int = 100
    steps: Sequence[int] = (4, 5, 6, 8, 10)
    samplers: Sequence[str] = SAMPLERS
    train_classes: Sequence[int] = (0, 1, 2, 3, 4)
    eval_classes: Sequence[int] = (5, 6, 7, 8, 9)
    train_seeds: int = 20
    eval_seeds: int = 30
    guidance_scale: float | None = None
    batch_size: int = 200
    device: str = "cpu"
    seed: int = 0
    grid_nfe: int | None = None  # default: the step count closest to 5
    grid_columns: int = 10
    # the path search's samples (of the training noises) and grid stride; None: the library's default, sized so
    # that the whole fit evaluates the model at most evaluation_budget=3 times as often as the teacher recording
    search_samples: int | None = None
    search_stride: int | None = None
    oss_samples: int | None = 25  # of the training noises, for the OSS baselines (None: all)
    out: str = "demo_out"
    model_path: str | None = None  # a copy of the bundled model folder (default: the package's own)

    def validate(self) -> None:
        unknown = [s for s in self.samplers if s not in SAMPLERS + OPTIONAL_SAMPLERS]
        if unknown:
            raise ValueError(f"unknown sampler(s) {unknown}; choose from {list(SAMPLERS + OPTIONAL_SAMPLERS)}")
        self.steps = checks.step_counts(self.steps, "steps", 10_000)
        checks.integer(self.teacher_steps, "teacher_steps", 1)
        if self.teacher_steps < max(self.steps):
            raise ValueError(f"teacher_steps ({self.teacher_steps}) must be >= the largest step count {max(self.steps)}")
        for name, classes in (("train_classes", self.train_classes), ("eval_classes", self.eval_classes)):
            if not classes:
                raise ValueError(f"{name} must be digits 0-9, got {list(classes)}")
            for c in classes:
                checks.integer(c, f"{name} (digits)", 0, 9)
        checks.integer(self.train_seeds, "train_seeds", 1)
        checks.integer(self.eval_seeds, "eval_seeds", 1)
        if self.grid_nfe is None:  # the step count closest to 5 (the grid shows one step count)
            self.grid_nfe = min(self.steps, key=lambda n: (abs(n - 5), n))
        if self.grid_nfe not in self.steps:
            raise ValueError(f"grid_nfe ({self.grid_nfe}) must be one of the step counts {list(self.steps)}")
        for name in ("search_samples", "oss_samples"):
            checks.optional(checks.integer, getattr(self, name), name, 1)
        checks.optional(checks.integer, self.search_stride, "search_stride", 1)
        if self.search_stride is not None and (self.teacher_steps - 1) // self.search_stride + 1 < max(self.steps):
            raise ValueError(f"search_stride {self.search_stride} leaves fewer than {max(self.steps)} of the "
                             f"{self.teacher_steps} teacher steps for the path search: use --search-stride 1")


def check_output_folder(out: Path) -> None:
    """``ValueError`` now, before any work, if ``out`` cannot be created or written."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a folder")
    target = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not target.is_dir():
        raise ValueError(f"output folder {out} cannot be created: {target} is a file, not a folder")
    if not os.access(target, os.W_OK):
        raise ValueError(f"output folder {out} is not writable ({target} is read-only); pass --out elsewhere")


def _real_feature_stats(classes: Sequence[int], classifier: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digit_images()
    keep = torch.isin(y, torch.tensor(list(classes)))
    return feature_statistics(classifier_features(x[keep], classifier))


def digits_quality(teacher: torch.Tensor, labels: torch.Tensor, classes: Sequence[int],
                   classifier: torch.nn.Module) -> Any:
    """``quality(samples) -> {"rmse", "psnr", "fd", "accuracy"}`` for digits samples from the teacher's noise.

    RMSE/PSNR against the teacher's samples; Fréchet distance to the real digits of ``classes`` in the classifier's
    feature space; accuracy against ``labels``.
    """
    mu_real, sigma_real = _real_feature_stats(classes, classifier)

    def quality(samples: torch.Tensor) -> dict[str, float]:
        mu, sigma = feature_statistics(classifier_features(samples, classifier))
        return {
            "rmse": rmse(samples, teacher),
            "psnr": psnr(samples, teacher),
            "fd": frechet_distance(mu, sigma, mu_real, sigma_real),
            "accuracy": class_accuracy(samples, labels, classifier),
        }

    return quality


def run_demo(config: DemoConfig, progress: bool = True) -> dict[str, Any]:
    """Run the whole demo; returns the results dict that is also written to ``results.json``. The output folder is
    locked for the run (a second demo writing into it gets a ``ValueError``)."""
    config.validate()
    check_output_folder(Path(config.out))
    with exclusive_lock(Path(config.out), "demo output folder"):
        return _run_demo(config, progress)


def _run_demo(config: DemoConfig, progress: bool) -> dict[str, Any]:
    out = Path(config.out)
    t_start = time.perf_counter()
    pipe = load_digits_pipeline(device=config.device, path=config.model_path)
    classifier = load_digits_classifier(device=config.device, path=config.model_path)
    call = {} if config.guidance_scale is None else {"guidance_scale": config.guidance_scale}
    steps = sorted({int(n) for n in config.steps})

    # 1. record + search + refine on the training classes and seeds
    train = dict(teacher_steps=config.teacher_steps, seeds_per_prompt=config.train_seeds, base_seed=config.seed,
                 batch_size=config.batch_size, guidance_scale=config.guidance_scale, progress=progress)
    fit = fit_olss_scheduler(
        pipe, list(config.train_classes), num_steps=tuple(steps),
        refine_samples=len(config.train_classes) * config.train_seeds, search_samples=config.search_samples,
        search_stride=config.search_stride, **train,
    )
    t_search = time.perf_counter() - t_start
    extra: dict[str, Any] = {}
    if "olss-uniform" in config.samplers:
        extra["olss-uniform"] = fit_olss_scheduler(
            pipe, list(config.train_classes), num_steps=tuple(steps), stats=fit.stats, path="uniform",
            refine_samples=len(config.train_classes) * config.train_seeds, **train).scheduler
    solvers = [s for s in ("ddim", "dpmsolver++") if f"oss-{s}" in config.samplers]
    if solvers:
        oss = fit_oss_baselines(pipe, list(config.train_classes), solvers, steps, samples=config.oss_samples,
                                **train)
        extra.update({f"oss-{s}": sched for s, (_, sched) in oss.items()})
    t_fit = time.perf_counter() - t_start

    # 2. held-out classes and seeds (a different base seed: no noise is shared with the search)
    items = make_work_items(list(config.eval_classes), config.eval_seeds, base_seed=config.seed + 1_000_003)
    prompts = [it.prompt for it in items]
    labels = torch.tensor(prompts)
    x0 = item_noise(items, latent_shape(pipe), "cpu")
    cfg = dict(pipe.scheduler.config)
    teacher_sched = default_teacher(pipe.scheduler)  # the teacher OLSS (and OSS) learnt from
    teacher = sample(pipe, teacher_sched, prompts, x0, config.teacher_steps, call, config.batch_size)
    quality = digits_quality(teacher, labels, config.eval_classes, classifier)

    results: dict[str, Any] = {
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
        "teacher": {"sampler": f"{type(teacher_sched).__name__}-{config.teacher_steps}", **quality(teacher)},
        "schedules": {str(n): {"timesteps": s.timesteps, "path": s.path, "coeffs": s.coeffs.tolist(),
                               "refit_errors": s.errors} for n, s in fit.schedules.items()},
        "nfe": steps,
    }
    grid_rows: dict[str, torch.Tensor] = {}
    # grid columns: the first seeds of every evaluated class in turn (items are ordered class by class)
    ncls = len(config.eval_classes)
    cols = [c * config.eval_seeds + s for s in range(config.eval_seeds) for c in range(ncls)][: config.grid_columns]

    def keep(name: str, n: int, samples: torch.Tensor) -> None:
        if n == config.grid_nfe:
            grid_rows[name] = samples[cols]

    samplers = {name: fit.scheduler if name == "olss" else extra[name] if name in extra
                else baseline_scheduler(name, cfg) for name in config.samplers}
    results["samplers"] = compare_samplers(pipe, samplers, steps, prompts, x0, quality, call, config.batch_size,
                                           progress, keep)
    results["time_s"] = {"search": round(t_search, 2), "fit_all": round(t_fit, 2),
                         "total": round(time.perf_counter() - t_start, 2)}

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    grid_rows = {f"teacher ({config.teacher_steps})": teacher[cols], **grid_rows}
    _save_grid(out / "grid.png", grid_rows, config.grid_nfe)
    _save_plot(out / "quality.png", results)
    return results


def format_table(results: dict[str, Any]) -> str:
    """The printed table, made from the results dict (so it shows exactly the numbers in results.json)."""
    steps = results["nfe"]
    lines = []
    for metric, label, fmt in (("rmse", "RMSE vs teacher (lower is better)", "{:8.4f}"),
                               ("psnr", "PSNR vs teacher, dB (higher is better)", "{:8.2f}"),
                               ("fd", "Fréchet distance to real digits (lower is better)", "{:8.3f}"),
                               ("accuracy", "class accuracy", "{:8.3f}")):
        lines.append(f"{label}; teacher: {fmt.format(results['teacher'][metric]).strip()}")
        lines.append(f"  {'NFE':14s}" + "".join(f"{n:>9d}" for n in steps))
        for name, per in results["samplers"].items():
            cells = [fmt.format(per[str(n)][metric]) if per.get(str(n)) else f"{'-':>8s}" for n in steps]
            lines.append(f"  {name:14s}" + "".join(" " + c for c in cells))
        lines.append("")
    return "\n".join(lines)


def _save_grid(path: Path, rows: dict[str, torch.Tensor], nfe: int) -> None:
    from PIL import Image, ImageDraw

    scale, label_w = 4, 150
    any_row = next(iter(rows.values()))
    cols, size = any_row.shape[0], any_row.shape[-1] * scale
    img = Image.new("L", (label_w + cols * size, len(rows) * size), color=255)
    draw = ImageDraw.Draw(img)
    for r, (name, samples) in enumerate(rows.items()):
        x = ((samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [B, 1, H, W]
        for c in range(x.shape[0]):
            tile = Image.fromarray(x[c, 0].numpy()).resize((size, size), Image.NEAREST)
            img.paste(tile, (label_w + c * size, r * size))
        text = name if name.startswith("teacher") else f"{name} ({nfe} NFE)"
        draw.text((4, r * size + size // 2 - 6), text, fill=0)
    atomic_write_with(path, lambda tmp: img.save(tmp, format="PNG"))


def _save_plot(path: Path, results: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency, but keep the demo usable without it
        logger.warning("matplotlib is not installed; skipping %s", path)
        return
    steps = results["nfe"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, per in results["samplers"].items():
        style = dict(linewidth=2.5, color="black") if name == "olss" else {}
        def col(metric: str) -> list[float]:
            return [per[str(n)][metric] if per.get(str(n)) else float("nan") for n in steps]

        axes[0].plot(steps, col("rmse"), marker="o", label=name, **style)
        axes[1].plot(steps, col("fd"), marker="o", label=name, **style)
    axes[1].axhline(results["teacher"]["fd"], linestyle="--", color="gray", label="teacher")
    axes[0].set(xlabel="model evaluations (NFE)", ylabel="RMSE vs teacher", yscale="log", title="Teacher RMSE")
    axes[1].set(xlabel="model evaluations (NFE)", ylabel="Fréchet distance", yscale="log",
                title="Fréchet distance to real digits")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def add_demo_parser(subparsers: Any) -> None:
    """The ``olss-fast demo`` subcommand."""
    d = DemoConfig()
    p = subparsers.add_parser("demo", help="OLSS vs diffusers' samplers on the bundled digits model (offline, CPU)")
    p.add_argument("--out", default=d.out, help="output folder (results.json, grid.png, quality.png)")
    p.add_argument("--device", default=d.device, help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--teacher-steps", type=positive_int, default=d.teacher_steps,
                   help=f"teacher (DPM-Solver++(2M)) steps (default {d.teacher_steps})")
    p.add_argument("--steps", type=positive_int, nargs="+", default=list(d.steps),
                   help=f"model evaluations (NFE) to compare at (default {' '.join(map(str, d.steps))})")
    p.add_argument("--samplers", nargs="+", default=list(d.samplers), choices=list(SAMPLERS + OPTIONAL_SAMPLERS),
                   help=f"samplers to compare (default: {' '.join(SAMPLERS)}; also {' '.join(OPTIONAL_SAMPLERS)}: "
                        "OSS learned-timestep baselines, about 1.5 min each on 2 CPU cores, and OLSS on the uniform "
                        "path)")
    p.add_argument("--train-classes", type=any_int, nargs="+", default=list(d.train_classes),
                   help="digit classes the search sees (default 0-4)")
    p.add_argument("--eval-classes", type=any_int, nargs="+", default=list(d.eval_classes),
                   help="held-out digit classes the comparison uses (default 5-9)")
    p.add_argument("--train-seeds", type=positive_int, default=d.train_seeds, help="noises per training class")
    p.add_argument("--eval-seeds", type=positive_int, default=d.eval_seeds,
                   help="held-out noises per evaluated class")
    p.add_argument("--guidance-scale", type=finite_float, default=None, help="default: the pipeline's")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help=f"samples per pipeline call (default {d.batch_size})")
    p.add_argument("--grid-nfe", type=positive_int, default=d.grid_nfe,
                   help="NFE of the samples shown in grid.png (default: the step count closest to 5)")
    p.add_argument("--seed", type=any_int, default=d.seed, help="base seed of the training and held-out noises")
    p.add_argument("--search-samples", type=positive_int, default=d.search_samples,
                   help="training noises the path search runs on (default: the library's, sized with the stride "
                        "so that the fit evaluates the model at most 3x as often as the teacher recording)")
    p.add_argument("--search-stride", type=positive_int, default=d.search_stride,
                   help="the path search's grid: every N-th teacher index (default: the library's, sized to the "
                        "budget)")
    p.add_argument("--oss-samples", type=positive_int, default=d.oss_samples,
                   help=f"training noises the OSS baselines are fitted on (default {d.oss_samples})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: Any) -> int:
    checks.device(args.device)
    config = DemoConfig(
        teacher_steps=args.teacher_steps, steps=tuple(args.steps), samplers=tuple(args.samplers),
        train_classes=tuple(args.train_classes), eval_classes=tuple(args.eval_classes),
        train_seeds=args.train_seeds, eval_seeds=args.eval_seeds, guidance_scale=args.guidance_scale,
        batch_size=args.batch_size, device=args.device, seed=args.seed, grid_nfe=args.grid_nfe, out=args.out,
        search_samples=args.search_samples, search_stride=args.search_stride, oss_samples=args.oss_samples,
    )
    results = run_demo(config, progress=not args.quiet)
    print(f"OLSS on the bundled digits model: searched on classes {list(config.train_classes)}, evaluated on "
          f"held-out classes {list(config.eval_classes)} x {config.eval_seeds} new seeds "
          f"(teacher {results['teacher']['sampler']}, trailing timesteps)\n")
    print(format_table(results))
    print(f"search {results['time_s']['search']} s, total {results['time_s']['total']} s; "
          f"wrote {config.out}/results.json, grid.png, quality.png")
    return 0

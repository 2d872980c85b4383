"""Command line: ``olss-fast search`` (record + search + refine for a diffusers pipeline), ``olss-fast demo`` and
``olss-fast export``."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
import contextlib
import re
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from diffusers import DiffusionPipeline

from olss_fast.core import checks
from olss_fast.core.checks import any_int, finite_float, positive_int
from olss_fast.core.files import atomic_write_text, exclusive_lock, parse_json, read_limited
from olss_fast.core.schedule import GRANULARITIES, OLSSSchedule
from olss_fast.core.search import DEFAULT_PATH, DEFAULT_STATS_PATH, PATHS
from olss_fast.core.stats import GramStats
from olss_fast.core.version import __version__
from olss_fast.demo import add_demo_parser
from olss_fast.export.onnx_export import export_onnx
from olss_fast.export.tensorrt import export_tensorrt, require_tensorrt
from olss_fast.fit.checkpoint import require_complete
from olss_fast.fit.config import FitConfig, RecordConfig
from olss_fast.fit.distributed import DistContext, agree_on_error, init_distributed, shutdown_distributed
from olss_fast.fit.orchestration import fit_olss_scheduler
from olss_fast.models.digits import load_digits_pipeline
from olss_fast.serve.schedules import load_schedule_source

logger = logging.getLogger(__name__)


MAX_PROMPTS_BYTES = 64 * 2**20

#: Python argument names → the CLI flags that set them (library errors are reworded for the command line)
FLAG_NAMES = {
    "teacher_steps": "--teacher-steps", "num_steps": "--steps", "guidance_scale": "--guidance-scale",
    "seeds_per_prompt": "--seeds-per-prompt", "base_seed": "--seed", "batch_size": "--batch-size",
    "refine_samples": "--refine-samples", "refine=False": "--no-refine", "allow_mismatch": "--allow-mismatch",
    "num_inference_steps": "--steps", "checkpoint_every": "--checkpoint-every", "resume=True": "--resume",
    "search_samples": "--search-samples", "search_sweeps": "--search-sweeps", "search_stride": "--search-stride",
    "path='refit'": "--path refit", "heldout_samples": "--heldout-samples", "evaluation_budget": "--evaluation-budget",
    "timestep_shift=True": "--timestep-shift", "timestep_shift": "--timestep-shift",
}


def cli_message(message: str) -> str:
    """A library error message with Python argument names replaced by the CLI flags that set them."""
    for name, flag in FLAG_NAMES.items():
        message = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w])", flag, message)
    return message


def _read_prompts(path: str) -> list[str]:
    """Prompts from a text file (every non-empty line is one prompt, verbatim apart from surrounding whitespace) or
    a JSON list of strings / class labels."""
    data = read_limited(path, MAX_PROMPTS_BYTES, "prompts file")
    if path.endswith(".json"):
        prompts = checks.listing(parse_json(data, f"prompts file {path}"), f"prompts file {path}", 10**7)
        for x in prompts:
            if not isinstance(x, str):
                checks.integer(x, f"a prompts file entry (a string or an integer class label) in {path}")
    else:
        try:
            prompts = [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise ValueError(f"prompts file {path} is not UTF-8 text") from None
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompts")
    return prompts


def _dtype_keyword() -> str:
    """diffusers' ``from_pretrained`` keyword for the dtype: ``dtype`` where it exists (``torch_dtype`` is deprecated
    there), ``torch_dtype`` in older releases."""
    try:
        from diffusers.utils import deprecation_utils
    except ImportError:  # pragma: no cover - older diffusers
        return "torch_dtype"
    return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


def load_pipeline(name: str, device: str = "cpu", dtype: str = "float32"):
    """A diffusers pipeline from a local folder or hub id; ``digits`` is the bundled model."""
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"unknown --dtype {dtype!r}; use float32, float16 or bfloat16")
    checks.device(device)
    if name == "digits":
        return load_digits_pipeline(device=device, dtype=torch_dtype)
    try:
        pipe = DiffusionPipeline.from_pretrained(name, **{_dtype_keyword(): torch_dtype})
    except (OSError, EnvironmentError, ValueError) as exc:
        raise ValueError(f"cannot load --pipeline {name!r}: {str(exc).splitlines()[0]}") from None
    return pipe.to(device)


def _check_out_dir(out: Path, force: bool) -> None:
    """Refuse a non-empty output folder (unless forced) or an unwritable location, before any work is done."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise ValueError(f"output folder {out} exists and is not empty; pass --force to overwrite its results")
    parent = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise ValueError(f"cannot write to {out}: {parent} is not writable")


def _make_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create output folder {out}: {exc}") from None


def cmd_search(args: argparse.Namespace) -> int:
    """``olss-fast search``; under ``torchrun`` every rank records its share and rank 0 writes the results."""
    had_group = dist.is_available() and dist.is_initialized()
    ctx = init_distributed()
    try:
        with contextlib.ExitStack() as stack:
            if ctx.is_main:  # the writing rank owns the output folder for the whole job
                stack.enter_context(exclusive_lock(Path(args.out), "output folder"))
            return _search(args, ctx)
    finally:
        if not had_group:  # destroy only a process group this command created
            shutdown_distributed()


def _search(args: argparse.Namespace, ctx: DistContext) -> int:
    """The body of ``olss-fast search`` (see :func:`cmd_search`)."""
    stats = None
    if args.stats:
        stats = GramStats.load(args.stats)
        require_complete(stats, args.stats)
        if args.resume or args.checkpoint or args.checkpoint_every is not None:
            raise ValueError("--stats searches finished statistics: it cannot be combined with --resume/--checkpoint")
    search_only = stats is not None and args.no_refine
    if not args.pipeline and not search_only:
        raise ValueError("--pipeline is required (it may be left out only with --stats and --no-refine)")
    if not args.prompts and not search_only:
        raise ValueError("--prompts is required (it may be left out only with --stats and --no-refine)")
    prompts = _read_prompts(args.prompts) if args.prompts else []
    out = Path(args.out)
    checkpoint = None
    if args.checkpoint or args.checkpoint_every is not None or args.resume:
        checkpoint = Path(args.checkpoint) if args.checkpoint else out / "stats.safetensors"
    error = None
    if ctx.is_main:  # file-system checks on the writing rank; every rank gets the same error
        try:
            _check_out_dir(out, args.force or args.resume)
            if checkpoint is not None and args.force and not args.resume:
                stale = [checkpoint] if checkpoint.is_file() else []
                if checkpoint.parent.is_dir():
                    stale += sorted(checkpoint.parent.glob(f"{checkpoint.stem}.rank*-of-*{checkpoint.suffix}"))
                for path in stale:
                    logger.warning("--force without --resume: discarding the existing checkpoint %s", path)
                    path.unlink()
        except ValueError as exc:
            error = str(exc)
    agree_on_error(error, ctx)
    if args.teacher_steps is not None:
        teacher_steps = args.teacher_steps
    else:
        teacher_steps = stats.num_teacher_steps if stats is not None else 100
    record = RecordConfig(
        teacher_steps=teacher_steps, batch_size=args.batch_size, seeds_per_prompt=args.seeds_per_prompt,
        base_seed=args.seed, guidance_scale=args.guidance_scale, height=args.height, width=args.width,
    )
    fit = FitConfig(num_steps=tuple(args.steps), path=args.path, granularity=args.granularity,
                    refine=not args.no_refine, refine_samples=args.refine_samples,
                    search_samples=args.search_samples, search_sweeps=args.search_sweeps,
                    search_stride=args.search_stride, bisection_iters=args.bisection_iters,
                    heldout_samples=args.heldout_samples, evaluation_budget=args.evaluation_budget,
                    timestep_shift=args.timestep_shift)
    pipe = None
    if args.pipeline:
        device = args.device
        if ctx.enabled and device == "cuda":  # one GPU per process under torchrun
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        pipe = load_pipeline(args.pipeline, device, args.dtype)
        pipe.set_progress_bar_config(disable=True)
    result = fit_olss_scheduler(
        pipe, prompts, record=record, fit=fit, stats=stats, progress=not args.quiet, checkpoint=checkpoint,
        checkpoint_every=10 if args.checkpoint_every is None else args.checkpoint_every, resume=args.resume,
        distributed=ctx,
    )
    if not ctx.is_main:  # only rank 0 writes results
        return 0
    _make_out_dir(out)  # only now: a failed search leaves nothing behind
    result.stats.save(out / "stats.safetensors")
    result.scheduler.save_pretrained(str(out / "scheduler"))
    for n, sched in result.schedules.items():
        sched.save(out / f"schedule_{n}.json")
    summary = {
        "pipeline": args.pipeline, "prompts": len(prompts), "samples": result.stats.num_samples,
        "teacher": result.stats.teacher, "processes": ctx.world_size,
        "schedules": {n: {"timesteps": s.timesteps, "final_error": s.errors[-1], "refined": s.refined,
                          "path": s.path}
                      for n, s in result.schedules.items()},
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    print(f"searched {sorted(result.schedules)}-step schedules from {result.stats.num_samples} teacher samples"
          + (f" ({ctx.world_size} processes)" if ctx.enabled else ""))
    for n, s in sorted(result.schedules.items()):
        print(f"  {n:3d} steps: timesteps {s.timesteps}  final-step MSE {s.errors[-1]:.3g}")
    print(f"wrote {out}/scheduler (OLSSScheduler.from_pretrained), {out}/stats.safetensors")
    return 0


# ---------------------------------------------------------------------------------------------- olss-fast export
EXPORT_HELP = """``olss-fast export``: write a searched OLSS sampler as static-shape ONNX (or ONNX + TensorRT engines).

Examples::

    olss-fast export --pipeline digits --scheduler runs/digits/scheduler --steps 5 --format onnx --out digits_onnx
    olss-fast export --pipeline path/to/sd15 --scheduler schedule_10.json --format tensorrt --out sd_trt \\
        --device cuda --dtype float16 --height 512 --width 512 --batch-size 1 --guidance-scale 7.5

``--scheduler`` is a folder written by ``OLSSScheduler.save_pretrained`` (``--steps`` picks one of its schedules)
or a schedule JSON (``OLSSSchedule.save``; ``--steps``, when given, must match it). 
"""


def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to ``olss-fast``'s subparsers; returns its parser."""
    p = subparsers.add_parser(
        "export", help="export a searched OLSS sampler to static-shape ONNX (or ONNX + TensorRT engines)",
        description=EXPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pipeline", required=True, help="local folder or hub id of a diffusers pipeline, or 'digits'")
    p.add_argument("--scheduler", required=True, metavar="PATH",
                   help="an OLSSScheduler folder (save_pretrained) or a schedule JSON file")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="which of the scheduler's schedules to export (not needed when it holds one)")
    p.add_argument("--format", default="onnx", choices=["onnx", "tensorrt"], dest="export_format",
                   help="onnx (default) or tensorrt (ONNX + fp16 engines; needs the tensorrt package and a GPU)")
    p.add_argument("--out", required=True, help="export folder (new or empty; an identical export is reused)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="static batch size (images per call)")
    p.add_argument("--height", type=positive_int, default=None, help="image height (default: the pipeline's)")
    p.add_argument("--width", type=positive_int, default=None, help="image width (default: the pipeline's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="export dtype")
    p.add_argument("--guidance-scale", type=finite_float, default=None,
                   help="baked-in classifier-free guidance scale (default: the pipeline's; <= 1 disables CFG)")
    p.add_argument("--device", default="cpu", help="where to trace the modules (cuda for --format tensorrt)")
    p.add_argument("--opset", type=positive_int, default=17, help="ONNX opset of the TorchScript exporter")
    p.add_argument("--no-fp16", action="store_true", help="TensorRT: build without BuilderFlag.FP16")
    p.add_argument("--allow-mismatch", nargs="+", default=[], choices=["model", "noise_schedule", "prediction_type"],
                   help="export a schedule fitted for another model / noise schedule / prediction type anyway")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an olss_fast export of something else in --out (other content is never replaced)")
    p.set_defaults(func=cmd_export)
    return p


def _export_source(path: "str | Path", steps: Optional[int] = None) -> Any:
    """An ``OLSSScheduler`` (folder or scheduler config JSON) or an ``OLSSSchedule`` (schedule JSON) from ``path``.

    ``ValueError`` when the path is missing or unreadable, or when ``steps`` does not match a schedule file.
    """
    source = load_schedule_source(path)
    if isinstance(source, OLSSSchedule) and steps is not None and int(steps) != source.num_steps:
        raise ValueError(f"--steps {steps} was requested but the schedule in {path} has {source.num_steps} steps")
    return source


def cmd_export(args: argparse.Namespace) -> int:
    """Run ``olss-fast export``; errors (bad input, missing tensorrt) print one line and return 2."""
    try:
        return _export(args)
    except (ValueError, RuntimeError) as exc:
        print(f"olss-fast export: error: {cli_message(str(exc))}", file=sys.stderr)
        return 2


def _export(args: argparse.Namespace) -> int:
    if args.export_format == "tensorrt":  # before loading anything heavy
        require_tensorrt()
    source = _export_source(args.scheduler, args.steps)
    pipe = load_pipeline(args.pipeline, args.device, args.dtype)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=args.steps, batch_size=args.batch_size, height=args.height, width=args.width,
                  guidance_scale=args.guidance_scale, dtype=args.dtype, opset=args.opset,
                  allow_mismatch=tuple(args.allow_mismatch))
    if args.export_format == "onnx":
        result = export_onnx(pipe, source, args.out, overwrite=args.overwrite, **kwargs)
        engines: dict = {}
    else:
        result, engines = export_tensorrt(pipe, source, args.out, fp16=not args.no_fp16, overwrite=args.overwrite,
                                          **kwargs)
    m = result.manifest
    state = "reused the identical export in" if result.reused else "wrote"
    print(f"{state} {result.path}: {m['num_inference_steps']}-step OLSS sampler of a {m['pipeline']}, batch "
          f"{m['batch_size']}, {m['height']}x{m['width']}, {m['dtype']}, guidance {m['guidance_scale']} "
          f"({m['exporter']})")
    for _, comp in sorted(m["components"].items()):
        print(f"  {comp['file']:<20s} {comp['bytes'] / 1e6:8.2f} MB")
    for _, path in sorted(engines.items()):
        print(f"  engines/{Path(path).name}")
    print(f"run it with numpy + onnxruntime only: sys.path.insert(0, {str(result.path)!r}); "
          "from olss_onnx_runner import OnnxOLSSRunner")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="olss-fast", description=__doc__)
    parser.add_argument("--version", action="version", version=f"olss-fast {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("search", help="record a teacher through a pipeline, search and refine OLSS schedules",
                       description="Record a many-step teacher through a diffusers pipeline, search OLSS schedules "
                                   "for the given step counts and re-fit them; writes OUT/scheduler, "
                                   "OUT/stats.safetensors, OUT/schedule_N.json and OUT/summary.json.")
    s.add_argument("--pipeline", default=None,
                   help="local folder or hub id of a diffusers pipeline, or 'digits' (not needed with --stats "
                        "and --no-refine)")
    s.add_argument("--prompts", default=None,
                   help="text file (every non-empty line is one prompt) or JSON list of prompts / class labels")
    s.add_argument("--out", required=True, help="output folder (scheduler/, stats.safetensors, schedule_N.json)")
    s.add_argument("--teacher-steps", type=positive_int, default=None,
                   help="teacher sampler steps T (default 100, or the --stats file's)")
    s.add_argument("--steps", type=positive_int, nargs="+", default=[5, 10],
                   help="student step counts to search, one schedule each (default: 5 10)")
    s.add_argument("--guidance-scale", type=finite_float, default=None,
                   help="classifier-free guidance scale of the recording (default: the pipeline's, or the --stats "
                        "file's)")
    s.add_argument("--seeds-per-prompt", type=positive_int, default=1, help="initial noises per prompt (default 1)")
    s.add_argument("--seed", type=any_int, default=0, help="base seed every sample's noise is derived from")
    s.add_argument("--batch-size", type=positive_int, default=4, help="samples per pipeline call (default 4)")
    s.add_argument("--height", type=positive_int, default=None, help="image height (default: the pipeline's)")
    s.add_argument("--width", type=positive_int, default=None, help="image width (default: the pipeline's)")
    s.add_argument("--path", default=None, choices=list(PATHS),
                   help=f"path search: uniform teacher indices, the paper's minimax search, or 'refit' (judged by "
                        f"the error after the re-fit; needs the re-fit). Default: {DEFAULT_PATH} "
                        f"({DEFAULT_STATS_PATH} with --no-refine)")
    s.add_argument("--granularity", default="global", choices=list(GRANULARITIES),
                   help="one coefficient set (global, the paper's) or one per latent channel")
    s.add_argument("--bisection-iters", type=positive_int, default=60,
                   help="bisection steps of the paper's min-max path search (default 60)")
    s.add_argument("--no-refine", action="store_true", help="skip the student-in-the-loop re-fit (paper's fit)")
    s.add_argument("--refine-samples", type=positive_int, default=None,
                   help="samples the re-fit and its held-out check use (default: all recorded, at most 64; fewer "
                        "where --evaluation-budget needs it, --path refit)")
    s.add_argument("--heldout-samples", type=checks.nonnegative_int, default=None,
                   help="re-fit samples held out to choose the path and to guard against plain DDIM/Euler "
                        "(default: a quarter of them; 0: no guard)")
    s.add_argument("--search-samples", type=positive_int, default=None,
                   help="--path refit: samples the programme runs on (default: sized to --evaluation-budget)")
    s.add_argument("--search-stride", type=positive_int, default=None,
                   help="--path refit: steps on every this-many-th teacher index only (default: sized to "
                        "--evaluation-budget; 1: all)")
    s.add_argument("--search-sweeps", type=checks.nonnegative_int, default=0,
                   help="--path refit: coordinate-descent passes after the programme (default 0)")
    s.add_argument("--timestep-shift", action="store_true",
                   help="--path refit, VP models: also judge the proposal with per-step shifted timesteps (off by "
                        "default; see FitConfig.timestep_shift)")
    s.add_argument("--evaluation-budget", type=checks.finite_float, default=3.0,
                   help="--path refit: model evaluations of the whole fit the search is sized to, in multiples of "
                        "the teacher recording's (default 3)")
    s.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    s.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype the pipeline is loaded in (default float32)")
    s.add_argument("--force", action="store_true",
                   help="write into a non-empty output folder (without --resume: discard an existing checkpoint)")
    s.add_argument("--stats", default=None, metavar="FILE",
                   help="search these finished statistics (a stats.safetensors / finished checkpoint) instead of "
                        "recording; with --no-refine the pipeline is never run")
    s.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="checkpoint the recording statistics to FILE (default OUT/stats.safetensors when "
                        "--checkpoint-every or --resume is given)")
    s.add_argument("--checkpoint-every", type=positive_int, default=None, metavar="M",
                   help="write the checkpoint every M batches (default 10 when checkpointing)")
    s.add_argument("--resume", action="store_true",
                   help="continue the recording from the checkpoint (after a crash or kill)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_search)
    add_demo_parser(sub)
    add_export_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"olss-fast {args.command}: error: {cli_message(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

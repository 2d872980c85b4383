"""Command line: ``olss-fast search`` (record + search + refine for a diffusers pipeline)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from .distributed import DistContext

logger = logging.getLogger(__name__)


def _read_prompts(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"prompts file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        prompts = json.loads(text)
        if not isinstance(prompts, list) or not all(isinstance(x, (str, int)) for x in prompts):
            raise ValueError(f"{p}: a JSON prompts file must hold a list of strings (or class labels)")
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"prompts file {p} holds no prompts")
    return prompts


def load_pipeline(name: str, device: str = "cpu", dtype: str = "float32"):
    """A diffusers pipeline from a local folder or hub id; ``digits`` is the bundled model."""
    import torch

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    if name == "digits":
        from .models.digits import load_digits_pipeline

        return load_digits_pipeline(device=device, dtype=torch_dtype)
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(name, torch_dtype=torch_dtype)
    except (OSError, EnvironmentError) as exc:
        raise ValueError(f"cannot load pipeline {name!r}: {exc}") from None
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
    import torch.distributed as dist

    from .distributed import init_distributed, shutdown_distributed

    had_group = dist.is_available() and dist.is_initialized()
    ctx = init_distributed()
    try:
        return _search(args, ctx)
    finally:
        if not had_group:  # destroy only a process group this command created
            shutdown_distributed()


def _search(args: argparse.Namespace, ctx: "DistContext") -> int:
    """The body of ``olss-fast search`` (see :func:`cmd_search`)."""
    from . import FitConfig, GramStats, RecordConfig, fit_olss_scheduler
    from ._io import atomic_write_text
    from .checkpoint import require_complete
    from .distributed import agree_on_error

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
    teacher_steps = args.teacher_steps or (stats.num_teacher_steps if stats is not None else 100)
    record = RecordConfig(
        teacher_steps=teacher_steps, batch_size=args.batch_size, seeds_per_prompt=args.seeds_per_prompt,
        base_seed=args.seed, guidance_scale=args.guidance_scale, height=args.height, width=args.width,
    )
    fit = FitConfig(num_steps=tuple(args.steps), path=args.path, granularity=args.granularity,
                    refine=not args.no_refine, refine_samples=args.refine_samples)
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
        "schedules": {n: {"timesteps": s.timesteps, "final_error": s.errors[-1], "refined": s.refined}
                      for n, s in result.schedules.items()},
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    print(f"searched {sorted(result.schedules)}-step schedules from {result.stats.num_samples} teacher samples"
          + (f" ({ctx.world_size} processes)" if ctx.enabled else ""))
    for n, s in sorted(result.schedules.items()):
        print(f"  {n:3d} steps: timesteps {s.timesteps}  final-step MSE {s.errors[-1]:.3g}")
    print(f"wrote {out}/scheduler (OLSSScheduler.from_pretrained), {out}/stats.safetensors")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="olss-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("search", help="record a teacher through a pipeline, search and refine OLSS schedules")
    s.add_argument("--pipeline", default=None,
                   help="local folder or hub id of a diffusers pipeline, or 'digits' (not needed with --stats "
                        "and --no-refine)")
    s.add_argument("--prompts", default=None, help="text file (one prompt per line) or JSON list")
    s.add_argument("--out", required=True, help="output folder (scheduler/, stats.safetensors, schedule_N.json)")
    s.add_argument("--teacher-steps", type=int, default=None, help="default 100 (or the --stats file's)")
    s.add_argument("--steps", type=int, nargs="+", default=[5, 10], help="student step counts")
    s.add_argument("--guidance-scale", type=float, default=None)
    s.add_argument("--seeds-per-prompt", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--height", type=int, default=None)
    s.add_argument("--width", type=int, default=None)
    s.add_argument("--path", default="uniform", choices=["uniform", "minimax"])
    s.add_argument("--granularity", default="global", choices=["global", "channel"])
    s.add_argument("--no-refine", action="store_true", help="skip the student-in-the-loop re-fit (paper's fit)")
    s.add_argument("--refine-samples", type=int, default=None)
    s.add_argument("--device", default="cpu")
    s.add_argument("--dtype", default="float32")
    s.add_argument("--force", action="store_true",
                   help="write into a non-empty output folder (without --resume: discard an existing checkpoint)")
    s.add_argument("--stats", default=None, metavar="FILE",
                   help="search these finished statistics (a stats.safetensors / finished checkpoint) instead of "
                        "recording; with --no-refine the pipeline is never run")
    s.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="checkpoint the recording statistics to FILE (default OUT/stats.safetensors when "
                        "--checkpoint-every or --resume is given)")
    s.add_argument("--checkpoint-every", type=int, default=None, metavar="M",
                   help="write the checkpoint every M batches (default 10 when checkpointing)")
    s.add_argument("--resume", action="store_true",
                   help="continue the recording from the checkpoint (after a crash or kill)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_search)
    from .demo import add_demo_parser

    add_demo_parser(sub)
    from .export.cli import add_export_parser  # olss-fast export (ONNX / TensorRT); imports no torch
    add_export_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"olss-fast: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

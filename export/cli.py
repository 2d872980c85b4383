"""``olss-fast export``: write a searched OLSS sampler as static-shape ONNX (or ONNX + TensorRT engines).

Examples::

    olss-fast export --pipeline digits --scheduler runs/digits/scheduler --steps 5 --format onnx --out digits_onnx
    olss-fast export --pipeline path/to/sd15 --scheduler schedule_10.json --format tensorrt --out sd_trt \\
        --device cuda --dtype float16 --height 512 --width 512 --batch-size 1 --guidance-scale 7.5

``--scheduler`` is a folder written by ``OLSSScheduler.save_pretrained`` (``--steps`` picks one of its schedules)
or a schedule JSON (``OLSSSchedule.save``; ``--steps``, when given, must match it). This module only defines the
argument parser and the command: importing it loads no torch.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)

__all__ = ["add_export_parser", "cmd_export", "load_schedule_source"]


def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to ``olss-fast``'s subparsers; returns its parser."""
    p = subparsers.add_parser(
        "export", help="export a searched OLSS sampler to static-shape ONNX (or ONNX + TensorRT engines)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from olss_fast.cli import finite_float, positive_int

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


def load_schedule_source(path: "str | Path", steps: Optional[int] = None) -> Any:
    """An ``OLSSScheduler`` (folder or scheduler config JSON) or an ``OLSSSchedule`` (schedule JSON) from ``path``.

    ``ValueError`` when the path is missing or unreadable, or when ``steps`` does not match a schedule file.
    """
    from olss_fast.core.schedule import OLSSSchedule
    from olss_fast.serve.scheduler import load_schedule_source as load

    source = load(path)
    if isinstance(source, OLSSSchedule) and steps is not None and int(steps) != source.num_steps:
        raise ValueError(f"--steps {steps} was requested but the schedule in {path} has {source.num_steps} steps")
    return source


def cmd_export(args: argparse.Namespace) -> int:
    """Run ``olss-fast export``; errors (bad input, missing tensorrt) print one line and return 2."""
    try:
        return _export(args)
    except (ValueError, RuntimeError) as exc:
        from olss_fast.cli import cli_message

        print(f"olss-fast export: error: {cli_message(str(exc))}", file=sys.stderr)
        return 2


def _export(args: argparse.Namespace) -> int:
    if args.export_format == "tensorrt":  # before loading anything heavy
        from olss_fast.export.tensorrt import require_tensorrt

        require_tensorrt()
    source = load_schedule_source(args.scheduler, args.steps)
    from olss_fast.cli import load_pipeline

    pipe = load_pipeline(args.pipeline, args.device, args.dtype)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=args.steps, batch_size=args.batch_size, height=args.height, width=args.width,
                  guidance_scale=args.guidance_scale, dtype=args.dtype, opset=args.opset,
                  allow_mismatch=tuple(args.allow_mismatch))
    if args.export_format == "onnx":
        from olss_fast.export.onnx_export import export_onnx

        result = export_onnx(pipe, source, args.out, overwrite=args.overwrite, **kwargs)
        engines: dict = {}
    else:
        from olss_fast.export.tensorrt import export_tensorrt

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

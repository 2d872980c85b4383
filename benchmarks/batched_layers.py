"""The re-fit programme with and without batched layers (``olss_fast.fit.probe.layer_denoiser``), in one run.

For each model: record a teacher on a few prompts, then run ``refit_programme`` (the default fit's path proposal) on
those search samples twice from the same inputs: one pipeline call per state (the reference, as with
``OLSS_FAST_FORCE_REFERENCE=1``) and each layer's states sharing ``batch_size``-row calls with per-row timesteps.
Reports denoiser calls, latent rows, seconds of each and their ratio, and whether the proposals agree.

    python benchmarks/batched_layers.py                       # the tiny SD / SD3 / Flux pipelines on CPU
    python benchmarks/batched_layers.py --models sd15 --device cuda --dtype float16   # SD1.5 shapes, random weights

Writes benchmarks/batched_layers.json (or ``--out``) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from olss_fast.core.grid import programme_states
from olss_fast.core.refine import refit_programme
from olss_fast.fit.config import RecordConfig
from olss_fast.fit.probe import layer_denoiser, pipeline_denoiser, student_noise
from olss_fast.fit.recording import record_trajectories
from olss_fast.fit.work import make_work_items
from olss_fast.pipelines.facts import denoiser_of

from fit_cost import RowCounter  # (benchmarks/, the script's own folder, is on sys.path)

HERE = Path(__file__).resolve().parent
PROMPTS = ["a cat", "a dog", "blue sky", "red car", "old tree", "a bird", "green hill", "a boat"]


def model_setup(name: str, device: str, dtype: torch.dtype, workdir: Path):
    """(pipeline, RecordConfig, step counts, stride) of one model."""
    if name in ("sd15", "sd3-medium", "flux-dev"):
        sys.path.insert(0, str(HERE))
        import latency  # the random-weight pipelines at real shapes

        if name == "sd15":
            pipe = latency.build_pipeline(torch.device(device), dtype, False, workdir)
            return pipe, RecordConfig(teacher_steps=100, batch_size=16, guidance_scale=7.5), (4, 5, 6, 8, 10), 4
        pipe = latency.build_flow_pipeline(name, torch.device(device), dtype, False, workdir)
        rec = RecordConfig(teacher_steps=28, batch_size=8, guidance_scale=4.0 if name == "sd3-medium" else 3.5,
                           height=1024, width=1024, call_kwargs={"max_sequence_length": 77})
        return pipe, rec, (4, 5, 6, 8, 10), 2
    from olss_fast.testing import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline

    if name == "tiny-sd":
        pipe = tiny_sd_pipeline()
        return pipe.to(device), RecordConfig(teacher_steps=100, batch_size=16, guidance_scale=7.5), (4, 5, 6, 8, 10), 1
    call = {"max_sequence_length": 16}
    if name == "tiny-sd3":
        rec = RecordConfig(teacher_steps=28, batch_size=6, guidance_scale=4.0, height=16, width=16, call_kwargs=call)
        return tiny_sd3_pipeline().to(device), rec, (4, 5, 6, 8, 10), 2
    rec = RecordConfig(teacher_steps=28, batch_size=6, guidance_scale=3.5, height=32, width=32, call_kwargs=call)
    return tiny_flux_pipeline().to(device), rec, (4, 5, 6, 8, 10), 2


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    pipe, rec, steps, stride = model_setup(name, args.device, getattr(torch, args.dtype), workdir)
    pipe.set_progress_bar_config(disable=True)
    items = make_work_items(PROMPTS[: args.samples])
    kept = []
    stats = record_trajectories(pipe, [it.prompt for it in items], items=items, progress=False,
                                on_batch=lambda it, x, e: kept.append(x.to("cpu", torch.float32)),
                                **{k: getattr(rec, k) for k in ("teacher_steps", "batch_size", "guidance_scale",
                                                                 "height", "width", "call_kwargs")})
    latents = torch.cat(kept, dim=1)
    x0 = student_noise(pipe, items, rec)
    counter = RowCounter(denoiser_of(pipe))
    out = {"search_samples": len(items), "batch_size": rec.batch_size, "teacher_steps": rec.teacher_steps,
           "steps": list(steps), "stride": stride, "states": programme_states(rec.teacher_steps, steps, stride)}
    found = {}
    try:
        for label, batched in (("per_state", None), ("batched", layer_denoiser(pipe, items, rec))):
            if label == "batched" and batched is None:
                raise SystemExit(f"{name}: the batched layers are off (OLSS_FAST_FORCE_REFERENCE set?)")
            den = pipeline_denoiser(pipe, items, rec)
            best = None
            for _ in range(args.repeats):
                counter.calls = counter.rows = 0
                sync(args.device)
                t = time.perf_counter()
                found[label], _ = refit_programme(stats.timesteps, x0, latents, den, steps, stride=stride,
                                                  progress=False, batched=batched)
                sync(args.device)
                best = min(best or float("inf"), time.perf_counter() - t)
            out[label] = {"calls": counter.calls, "rows": counter.rows, "seconds": best}
    finally:
        counter.handle.remove()
    out["speedup"] = out["per_state"]["seconds"] / out["batched"]["seconds"]
    out["same_proposals"] = {str(n): found["per_state"][n][0] == found["batched"][n][0] for n in steps}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny-sd", "tiny-sd3", "tiny-flux"],
                   choices=["tiny-sd", "tiny-sd3", "tiny-flux", "sd15", "sd3-medium", "flux-dev"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--samples", type=int, default=4, help="search samples (prompts, one seed each; at most 8)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each contender (the fastest counts)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=str(HERE / "batched_layers.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = {"device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
           "dtype": args.dtype, "torch": torch.__version__, "python": platform.python_version(),
           "threads": args.threads, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            res["models"][name] = r = measure(name, args, Path(tmp))
            print(f"{name}: {r['states']} states of {r['search_samples']} samples, batch {r['batch_size']}: "
                  f"per state {r['per_state']['calls']} calls {r['per_state']['seconds']:.2f} s, batched "
                  f"{r['batched']['calls']} calls {r['batched']['seconds']:.2f} s ({r['speedup']:.2f}x; rows "
                  f"{r['per_state']['rows']} / {r['batched']['rows']}); same proposals: {r['same_proposals']}",
                  flush=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

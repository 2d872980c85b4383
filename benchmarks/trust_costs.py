"""What the trust-boundary checks cost, on CPU: the weights fingerprint of an SD1.5-sized UNet, single-sample
``GramStats`` updates that record work items, and loading hostile and valid files (time and peak memory growth).

    OMP_NUM_THREADS=1 python benchmarks/trust_costs.py [--unet-scale 1.0] [--out trust_costs.json]

Run it from a checkout of another olss_fast version (with this file copied in) to compare versions: it uses only
public APIs that both sides have. Peak memory growth is the kernel's high-water mark of this process, reset before
each load (Linux ``/proc/self/clear_refs``).
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from olss_fast import GramStats, OLSSSchedule, OLSSScheduler  # noqa: E402
from olss_fast.core.fingerprint import fingerprint  # noqa: E402

MiB = 2**20


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure(fn: Callable[[], Any]) -> dict[str, Any]:
    """Seconds, peak resident-memory growth (MiB) and outcome of ``fn()``."""
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    t0 = time.perf_counter()
    try:
        fn()
        outcome = "loaded"
    except ValueError as exc:
        outcome = f"ValueError: {str(exc)[:90]}"
    except MemoryError:
        outcome = "MemoryError"
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 3), "peak_growth_mib": round((_status("VmHWM") - before) / MiB, 1),
            "outcome": outcome}


# ---------------------------------------------------------------------------------------------- fingerprint
def fingerprint_cost(scale: float) -> dict[str, Any]:
    """SD1.5's UNet2DConditionModel config (block widths times ``scale``), random weights; fingerprint time in
    float32 and float16."""
    from diffusers import UNet2DConditionModel

    widths = tuple(int(round(w * scale / 32)) * 32 for w in (320, 640, 1280, 1280))
    torch.manual_seed(0)
    t0 = time.perf_counter()
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=widths,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
    ).eval()
    built = time.perf_counter() - t0
    params = sum(p.numel() for p in unet.parameters())
    out: dict[str, Any] = {"block_out_channels": list(widths), "parameters": params, "build_seconds": round(built, 1)}
    for dtype in (torch.float32, torch.float16):
        unet = unet.to(dtype)
        nbytes = sum(t.numel() * t.element_size() for t in list(unet.parameters()) + list(unet.buffers()))
        fingerprint(unet)  # warm-up (page-in)
        t0 = time.perf_counter()
        fingerprint(unet)
        seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        fingerprint(unet, samples=16)
        sampled = time.perf_counter() - t0
        out[str(dtype).replace("torch.", "")] = {"bytes": nbytes, "seconds": round(seconds, 2),
                                                  "mb_per_s": round(nbytes / seconds / 1e6),
                                                  "sampled_16_seconds": round(sampled, 3)}
    return out


# ---------------------------------------------------------------------------------------------- updates
def update_scaling(counts: tuple[int, ...] = (5000, 10000, 20000)) -> dict[str, Any]:
    """Cumulative time of n single-sample updates that each record their work item."""
    ts = list(range(990, 990 - 10 * 4, -10))
    x = torch.randn(5, 1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    e = torch.randn(4, 1, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    out = {}
    for n in counts:
        s = GramStats(ts, prediction_type="epsilon")
        t0 = time.perf_counter()
        for i in range(n):
            s.update(x, e, items=[i])
        out[str(n)] = round(time.perf_counter() - t0, 2)
    return out


# ---------------------------------------------------------------------------------------------- loaders
def _sparse_stats(path: Path, teacher_steps: int, channels: int) -> int:
    m = 2 * teacher_steps + 1
    header = {"format": "olss_fast.gram_stats", "version": 2, "timesteps": list(range(teacher_steps - 1, -1, -1)),
              "teacher": "t", "model": "m", "prediction_type": "epsilon", "context": {}, "num_samples": 1,
              "sample_shape": [channels, 8, 8], "dtype": "float32", "items": [[0, 1]], "meta": {}}
    nbytes = channels * m * m * 8
    outer = json.dumps({"__metadata__": {"olss_fast": json.dumps(header), "olss_fast.sha256": "0" * 64},
                        "gram": {"dtype": "F64", "shape": [channels, m, m], "data_offsets": [0, nbytes]}}).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(outer)) + outer)
        fh.truncate(8 + len(outer) + nbytes)
    return nbytes


def loader_costs(folder: Path) -> dict[str, Any]:
    size = 64 * MiB - 4096
    objects = ",".join(["{}"] * (size // 3))
    out = {}
    p = folder / "objects.json"
    p.write_text('{"format": "olss_fast.schedule", "version": 2, "coeffs": [' + objects + "]}")
    out["schedule: 64 MiB of empty objects"] = measure(lambda: OLSSSchedule.load(p))
    p.unlink()
    sched = folder / "sched"
    sched.mkdir()
    (sched / "scheduler_config.json").write_text('{"_class_name": "OLSSScheduler", "schedules": [' + objects + "]}")
    out["scheduler config: 64 MiB of empty objects"] = measure(lambda: OLSSScheduler.from_pretrained(sched))
    del objects
    n = 1000
    big = OLSSSchedule(list(range(999, -1, -1)), list(range(n)),
                       (torch.randn(n, n + 1, dtype=torch.float64,
                                    generator=torch.Generator().manual_seed(0)) * 0.1).tril(1), teacher_steps=n)
    p = folder / "big.json"
    big.save(p)
    out[f"schedule: valid, 1000 steps ({p.stat().st_size / MiB:.0f} MiB)"] = measure(lambda: OLSSSchedule.load(p))
    p = folder / "sparse.safetensors"
    claimed = _sparse_stats(p, teacher_steps=2000, channels=4)
    out[f"statistics: a sparse file claiming a {claimed / MiB:.0f} MiB Gram, wrong digest"] = measure(
        lambda: GramStats.load(p))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--unet-scale", type=float, default=1.0, help="SD1.5 UNet block widths times this")
    ap.add_argument("--skip-unet", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    result: dict[str, Any] = {"torch": torch.__version__, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        result["loaders"] = loader_costs(Path(tmp))
    result["single_sample_updates_seconds"] = update_scaling()
    if not args.skip_unet:
        result["fingerprint"] = fingerprint_cost(args.unet_scale)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

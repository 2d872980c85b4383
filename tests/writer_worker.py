"""Worker for tests/test_hostile_inputs.py: write one kind of olss_fast output in a loop until killed.

``python writer_worker.py KIND TARGET`` writes version A, prints READY, then alternates B, A, B, ... forever; the test
SIGKILLs it at a random moment and checks that TARGET holds a complete A or B (never a torn file). The objects are
built by :func:`objects` here and in the test, so both sides know A and B.
"""
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def objects(kind: str):
    from olss_fast import GramStats, OLSSSchedule, OLSSScheduler

    out = []
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        c = torch.randn(6, 7, generator=g, dtype=torch.float64).tril(1)
        sched = OLSSSchedule([900, 700, 500, 300, 200, 100], [0, 2, 4, 6, 7, 8], c, teacher_steps=10)
        if kind == "schedule":
            out.append(sched)
        elif kind == "scheduler":
            out.append(OLSSScheduler.from_schedules([sched]))
        elif kind == "stats":
            s = GramStats(list(range(990, 990 - 10 * 60, -10)), prediction_type="epsilon")
            s.update(torch.randn(61, 8, 4, 32, 32, generator=g), torch.randn(60, 8, 4, 32, 32, generator=g),
                     items=list(range(8 * seed, 8 * seed + 8)))
            out.append(s)
        elif kind == "export":
            from test_runtime import make_digits_pipe

            pipe = make_digits_pipe()
            base = OLSSScheduler.from_config(pipe.scheduler.config).ddim_schedule(3)
            out.append((pipe, OLSSSchedule(base.timesteps, base.indices, base.coeffs * (1 + 0.01 * seed),
                                           teacher_steps=base.teacher_steps)))
        else:
            raise SystemExit(f"unknown kind {kind}")
    return out


def write(kind: str, obj, target: Path) -> None:
    if kind in ("schedule", "stats"):
        obj.save(target)
    elif kind == "scheduler":
        obj.save_pretrained(target)
    else:
        from olss_fast.export.onnx_export import export_onnx

        pipe, sched = obj
        export_onnx(pipe, sched, target, guidance_scale=2.0, overwrite=True)


def main() -> None:
    kind, target = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    objs = objects(kind)
    write(kind, objs[0], target)
    print("READY", flush=True)
    i = 1
    while True:
        write(kind, objs[i % 2], target)
        i += 1


if __name__ == "__main__":
    main()

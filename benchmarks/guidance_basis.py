"""Digits at 5 NFE against OSS-DPM-Solver++ at 8: where the gap lies, and one sampler form beyond the paper's
(section "Digits at 5 NFE: where the gap to OSS-DPM-Solver++ at 8 lies, and a split guidance basis" of
``benchmarks/RESULTS.md``).

An offline experiment, not a library option. OLSS writes each student latent as a linear combination of the initial
noise and the *guided* model outputs so far (one coefficient per output; OLSS Eq. 8). With classifier-free guidance
each step has two outputs, the unconditional ``e_u`` and the conditional ``e_c``, and the guided one is fixed to
``e_u + w (e_c - e_u)``. The "split" form gives both their own coefficient (basis ``x0, g_0, d_0, …, g_j, d_j`` with
``g = e_u + w (e_c - e_u)`` and ``d = e_c - e_u``), so each step may choose its own guidance. Both forms are re-fitted
student-in-the-loop here (each step's model outputs at the student's own latent, its row fitted by least squares to
the teacher's latent at the next path point, with ``olss_fast.core.lstsq.gram_lstsq`` and the library's relative
ridge of 1e-8) on the paths the default fit chose (``fit_cost.json``, "after"), on the benchmark's sets:

- training: classes 0–4 × 20 seeds (base seed 0), the DPM-Solver++-100 teacher recorded by ``record_trajectories``;
- held-out: classes 5–9 × 60 seeds (base seed 777), RMSE against the same teacher (as ``fit_cost.py --part digits``);
- ``bound``: each form fitted on the held-out set itself (not a sampler that can ship; what the form can reach).

``--oss`` also fits OSS-DPM-Solver++ (``fit_oss_baselines``, about 10 min on one CPU thread) to compare per held-out
sample with OLSS at 5 NFE (the default's per-sample errors from ``fit_cost.json``). Writes
``benchmarks/guidance_basis.json``::

    python benchmarks/guidance_basis.py --oss      # 24 min on this project's 2-core container (shared)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from olss_fast import record_trajectories
from olss_fast.core.lstsq import gram_lstsq
from olss_fast.core.metrics import rmse
from olss_fast.fit.baselines import fit_oss_baselines, sample
from olss_fast.fit.work import make_work_items
from olss_fast.models.digits import DEFAULT_GUIDANCE_SCALE, NULL_CLASS, load_digits_pipeline

from heldout import DIGITS_HELDOUT_CLASSES, DIGITS_HELDOUT_SEED, check_disjoint, digits_heldout

HERE = Path(__file__).resolve().parent
RIDGE = 1e-8  # the re-fit's (olss_fast.core.refine.sequential_refit)
FORMS = ("guided", "split")


@torch.no_grad()
def outputs(unet, x: torch.Tensor, t, labels: torch.Tensor, scale: float, form: str) -> list[torch.Tensor]:
    """The basis vectors one model evaluation (a CFG batch, unconditional half first) adds in ``form``."""
    b = x.shape[0]
    out = unet(torch.cat([x, x]), torch.full((2 * b,), t),
               class_labels=torch.cat([torch.full((b,), NULL_CLASS), labels])).sample
    e_u, e_c = out.double().chunk(2)
    guided = e_u + scale * (e_c - e_u)
    return [guided] if form == "guided" else [guided, e_c - e_u]


def run(unet, timesteps, path, x0, labels, scale, form, targets=None, coeffs=None):
    """The student on ``path``: with ``targets`` each row is fitted (student in the loop) and the rows are returned
    with the final latent; with ``coeffs`` the rows are applied."""
    basis, x, rows = [x0.double()], x0, []
    for j, p in enumerate(path):
        basis += outputs(unet, x, timesteps[p], labels, scale, form)
        if targets is not None:
            vecs = torch.stack([v.reshape(-1) for v in basis + [targets[j].double()]])
            c, _ = gram_lstsq((vecs @ vecs.T)[None], list(range(len(basis))), len(basis), RIDGE)
            rows.append(c[0])
        c = rows[j] if targets is not None else coeffs[j]
        x = sum(ci * v for ci, v in zip(c.tolist(), basis)).float()
    return x, rows


def recorded(pipe, classes, seeds_per_class: int, base_seed: int, batch_size: int):
    """The default teacher's latents along its path for ``classes`` × seeds: ``([T + 1, N, C, H, W]`` (the latent
    before each step, then the final one), the class labels, the teacher's timesteps)."""
    parts: list[torch.Tensor] = []
    labels: list[int] = []

    def keep(batch, x_path, _):
        parts.append(x_path)
        labels.extend(it.prompt for it in batch)

    stats = record_trajectories(pipe, classes, teacher_steps=100, seeds_per_prompt=seeds_per_class,
                                base_seed=base_seed, batch_size=batch_size, on_batch=keep, progress=False)
    return torch.cat(parts, dim=1), torch.tensor(labels), stats.timesteps


def per_sample(samples: torch.Tensor, reference: torch.Tensor) -> dict:
    each = rmse(samples, reference, per_sample=True)
    return {"rmse": rmse(samples, reference), "median": float(each.median()),
            "per_sample": [float(f"{v:.4g}") for v in each.tolist()]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--oss", action="store_true", help="also fit OSS-DPM-Solver++ for the per-sample comparison")
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()
    paths = {int(n): v["indices"] for n, v in
             json.loads((HERE / "fit_cost.json").read_text())["after"]["parts"]["digits"]["paths"].items()}
    pipe = load_digits_pipeline()
    pipe.set_progress_bar_config(disable=True)
    unet, scale = pipe.unet, DEFAULT_GUIDANCE_SCALE  # the pipeline's default, as the benchmarks use it
    train_classes = [0, 1, 2, 3, 4]
    items, prompts, x0, teacher = digits_heldout(pipe)
    check_disjoint(make_work_items(train_classes, 20, base_seed=0), items, "digits")
    x_train, labels_train, ts = recorded(pipe, train_classes, 20, 0, batch_size=200)
    # the held-out teacher's latents along the path, for the in-sample bound; its final latents must be the
    # reference the other digits benchmarks use (digits_heldout's), which this records a second time
    x_held, labels_held, _ = recorded(pipe, list(DIGITS_HELDOUT_CLASSES), 60, DIGITS_HELDOUT_SEED, batch_size=300)
    if not (torch.equal(x_held[0], x0) and labels_held.tolist() == prompts
            and torch.allclose(x_held[-1], teacher, atol=1e-5)):
        raise ValueError("the recorded held-out set differs from the benchmark's (noise, labels or teacher)")
    last = len(ts)

    res: dict = {"date": time.strftime("%Y-%m-%d"), "machine": "2-core CPU container (torch "
                 f"{torch.__version__}, 1 thread)", "paths": paths, "cells": {}}
    for n, path in sorted(paths.items()):
        idx = list(path[1:]) + [last]
        for form in FORMS:
            final, rows = run(unet, ts, path, x_train[0], labels_train, scale, form, targets=[x_train[i] for i in idx])
            held, _ = run(unet, ts, path, x0, labels_held, scale, form, coeffs=rows)
            bound, _ = run(unet, ts, path, x0, labels_held, scale, form, targets=[x_held[i] for i in idx])
            res["cells"][f"{n} {form}"] = {"train": rmse(final, x_train[last]), "heldout": per_sample(held, teacher),
                                           "bound": rmse(bound, teacher)}
            cell = res["cells"][f"{n} {form}"]
            print(f"{n} NFE {form}: train {cell['train']:.4f} held-out {cell['heldout']['rmse']:.4f} "
                  f"bound {cell['bound']:.4f}", file=sys.stderr, flush=True)
    if args.oss:
        oss = fit_oss_baselines(pipe, train_classes, ("dpmsolver++",), [5, 8], teacher_steps=100, seeds_per_prompt=20,
                                base_seed=0, batch_size=200, progress=False)["dpmsolver++"][1]
        res["oss-dpmsolver++"] = {str(n): per_sample(sample(pipe, oss, prompts, x0, n, batch_size=300), teacher)
                                  for n in (5, 8)}
    res["seconds"] = time.time() - start
    (Path(args.out) / "guidance_basis.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Quality benchmark (issue 3): OLSS vs diffusers' samplers at the same NFE, with ablations.

Two models:
- the analytic Gaussian mixture (exact reference: the probability-flow ODE solved with RK4 in float64), and
- the bundled digits model (reference: the DDIM-100 teacher; Fréchet distance to real digits; class accuracy).

Ablations: OLSS global vs per-channel coefficients; the paper's fit vs the student-in-the-loop re-fit; minimax vs
uniform path; teacher DDIM-100 vs DPM-Solver++-50; generalisation (digits): search on classes 0–4 vs 0–9, evaluate
on 5–9. Everything on held-out noise. Writes ``benchmarks/quality.json``, ``benchmarks/quality.png`` and the section
"## Quality (issue 3)" of ``benchmarks/RESULTS.md``.

    python benchmarks/quality.py            # full (about 10-15 min on 2 CPU cores)
    python benchmarks/quality.py --quick    # a smaller run

Issue 14 (learned-step peers): OSS-DDIM and OSS-DPM-Solver++ (olss_fast/core/oss.py) next to every diffusers solver and
OLSS (paper fit, re-fit on the uniform / minimax path, and the path search judged after the re-fit), at 4–10 NFE on
both models, plus the choice of teacher on the mixture (error vs the exact ODE per teacher model evaluation). Each
part writes into ``benchmarks/quality_issue14.json``; the report section "## Quality against learned-step baselines
(issue 14)" of ``benchmarks/RESULTS.md`` is rebuilt from that file after every part:

    python benchmarks/quality.py --part gmm14        # mixture table + robustness over training seeds (~10 min)
    python benchmarks/quality.py --part teachers     # teacher choice on the mixture (~5 min)
    python benchmarks/quality.py --part digits14     # digits table (~30-40 min on 2 busy CPU cores)
    python benchmarks/quality.py --part issue3       # the issue-3 tables above (what no --part runs)
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch

from olss_fast import OLSSScheduler, fit_olss_scheduler, refine_schedule, search_schedule
from olss_fast.fit.baselines import baseline_scheduler, compare_samplers, fit_oss_baselines, sample
from olss_fast.core.metrics import rmse
from olss_fast.fit.config import RecordConfig
from olss_fast.fit.recording import record_trajectories
from olss_fast.fit.teacher import default_teacher
from olss_fast.fit.work import item_noise, make_work_items
from olss_fast.core.search import DEFAULT_PATH

from heldout import DIGITS_HELDOUT_CLASSES, MIXTURE_TRAINING_SEEDS, check_disjoint, digits_heldout, mixture_heldout

HERE = Path(__file__).resolve().parent
BASELINES = ["ddim", "dpmsolver++", "unipc", "deis", "pndm", "euler"]


def olss_variants(stats, steps, refine_fn, with_channel=True):
    """Schedulers for the ablation grid: {paper, refined} × {uniform, minimax} × {global, channel}."""
    out = {}
    grans = ("global", "channel") if with_channel else ("global",)
    for path in ("uniform", "minimax"):
        for gran in grans:
            paper = [search_schedule(stats, n, path=path, granularity=gran) for n in steps]
            tag = f"{path}/{gran}"
            out[f"olss paper fit {tag}"] = paper
            out[f"olss refined {tag}"] = [refine_fn(s) for s in paper]
    return out


# ---------------------------------------------------------------------------------------------------- GMM
def gmm_benchmark(args) -> dict:
    ntrain, ntest = (128, 200) if args.quick else (256, 500)
    pipe, test_items, test_x0, exact = mixture_heldout(ntest)
    cfg = dict(pipe.scheduler.config)
    steps = [5, 10] if args.quick else [4, 5, 6, 8, 10, 15, 20]
    train_items = make_work_items([None] * ntrain, base_seed=1)
    check_disjoint(train_items, test_items, "mixture, training seed 1")
    prompts = [None] * ntest

    def quality(samples):
        per = rmse(samples, exact, per_sample=True)
        return {"rmse": rmse(samples, exact), "median": float(per.median())}

    results = {"model": "gaussian mixture 3x6x6, 4 components", "train": ntrain, "test": ntest, "steps": steps,
               "reference": "probability-flow ODE, RK4 float64, 1000 log-sigma steps", "teachers": {}}
    teachers = {"ddim-100": (baseline_scheduler("ddim", cfg), 100),
                "dpmsolver++-50": (baseline_scheduler("dpmsolver++", cfg), 50)}
    for tname, (teacher, T) in teachers.items():
        kept = []
        stats = record_trajectories(pipe, [None] * ntrain, teacher=teacher, items=train_items, progress=False,
                                    config=RecordConfig(teacher_steps=T, batch_size=ntrain),
                                    on_batch=lambda it, x, e: kept.append(x))
        x_path = kept[0]
        unet = pipe.unet

        def refine_fn(s, x_path=x_path):
            return refine_schedule(s, lambda x, t: unet(x, t).sample, x_path[0], x_path, progress=False)

        samplers = {b: baseline_scheduler(b, cfg) for b in BASELINES} if tname == "ddim-100" else {}
        variants = olss_variants(stats, steps, refine_fn, with_channel=(tname == "ddim-100"))
        for name, scheds in variants.items():
            samplers[f"{name} [{tname}]"] = OLSSScheduler.from_schedules(scheds, config=cfg)
        table = compare_samplers(pipe, samplers, steps, prompts, test_x0, quality)
        teacher_q = quality(sample(pipe, teacher, prompts, test_x0, T))
        results["teachers"][tname] = {"teacher_vs_exact": teacher_q, "table": table}
    return results


# ---------------------------------------------------------------------------------------------------- digits
def digits_benchmark(args) -> dict:
    from olss_fast.demo import digits_quality
    from olss_fast.models.digits import load_digits_classifier, load_digits_pipeline

    pipe = load_digits_pipeline()
    classifier = load_digits_classifier()
    cfg = dict(pipe.scheduler.config)
    steps = [5, 10] if args.quick else [4, 5, 6, 8, 10, 15, 20]
    seeds_train, seeds_test = (10, 20) if args.quick else (20, 60)
    eval_classes = [5, 6, 7, 8, 9]
    items = make_work_items(eval_classes, seeds_test, base_seed=777)
    prompts = [it.prompt for it in items]
    x0 = item_noise(items, (1, 16, 16))
    teacher = sample(pipe, baseline_scheduler("ddim", cfg), prompts, x0, 100)
    quality = digits_quality(teacher, torch.tensor(prompts), eval_classes, classifier)
    results = {"model": "bundled digits (16x16, class-conditional, CFG 1.5)", "steps": steps,
               "eval": f"classes {eval_classes} x {seeds_test} held-out seeds", "teacher": quality(teacher)}
    samplers = {b: baseline_scheduler(b, cfg) for b in BASELINES}
    for train_classes, tag in (([0, 1, 2, 3, 4], "search on 0-4"), (list(range(10)), "search on 0-9")):
        check_disjoint(make_work_items(train_classes, seeds_train, base_seed=0), items, f"digits, {tag}")
        fit = fit_olss_scheduler(pipe, train_classes, teacher_steps=100, num_steps=tuple(steps),
                                 seeds_per_prompt=seeds_train, base_seed=0, batch_size=200,
                                 refine_samples=len(train_classes) * seeds_train, progress=False, path="uniform",
                                 teacher=baseline_scheduler("ddim", cfg))  # issue 3's DDIM-100 teacher
        samplers[f"olss refined uniform/global [{tag}]"] = fit.scheduler
        samplers[f"olss paper fit uniform/global [{tag}]"] = OLSSScheduler.from_schedules(
            list(fit.paper_schedules.values()), config=cfg)
        if tag == "search on 0-4":
            samplers[f"olss paper fit minimax/global [{tag}]"] = OLSSScheduler.from_schedules(
                [search_schedule(fit.stats, n, path="minimax") for n in steps], config=cfg)
    results["table"] = compare_samplers(pipe, samplers, steps, prompts, x0, quality, batch_size=200)
    return results


# ---------------------------------------------------------------------------------------------------- report
def fmt_table(table: dict, steps, metric: str, fmt: str) -> list[str]:
    lines = ["| sampler | " + " | ".join(f"{n} NFE" for n in steps) + " |", "|---|" + "---|" * len(steps)]
    best = {}
    for n in steps:
        vals = [(v[str(n)][metric], k) for k, v in table.items() if v.get(str(n))]
        best[n] = (min if metric != "accuracy" else max)(vals)[1] if vals else None
    for name, per in table.items():
        cells = []
        for n in steps:
            cell = per.get(str(n))
            text = fmt.format(cell[metric]) if cell else "–"
            cells.append(f"**{text}**" if best[n] == name else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def write_report(results: dict, path: Path) -> None:
    lines = ["## Quality (issue 3)", "",
             f"`benchmarks/quality.py{' --quick' if results['quick'] else ''}` on {results['machine']}, "
             f"{results['date']}, {results['seconds']:.0f} s. Raw numbers: `benchmarks/quality.json`, "
             "plot: `benchmarks/quality.png`. Best per column in bold. All samplers start at t = 999 (trailing "
             "timesteps; PNDM linspace), same noise, held-out seeds.", ""]
    g = results["gmm"]
    lines += [f"### Analytic Gaussian mixture ({g['model']}; {g['train']} training / {g['test']} held-out noises)",
              "", f"RMSE of the final sample against the exact ODE solution ({g['reference']}); the median per-sample"
              " RMSE is in quality.json.", ""]
    for tname, t in g["teachers"].items():
        lines += [f"Teacher {tname} (its own RMSE vs exact: {t['teacher_vs_exact']['rmse']:.4f}):", ""]
        lines += fmt_table(t["table"], g["steps"], "rmse", "{:.4f}") + [""]
    d = results["digits"]
    lines += [f"### Bundled digits model ({d['model']}; {d['eval']})", "",
              f"Teacher DDIM-100: Fréchet distance {d['teacher']['fd']:.2f}, accuracy {d['teacher']['accuracy']:.3f}."
              " Fréchet distances at this sample count carry a large upward bias (real digits alone score ~25 at 300"
              " samples): compare rows, not absolute values.", ""]
    for metric, label, fmt in (("rmse", "RMSE vs teacher", "{:.4f}"), ("fd", "Fréchet distance to real digits", "{:.2f}"),
                               ("accuracy", "class accuracy", "{:.3f}")):
        lines += [f"{label}:", ""] + fmt_table(d["table"], d["steps"], metric, fmt) + [""]
    section = "\n".join(lines).rstrip() + "\n"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(r"## Quality \(issue 3\).*?(?=\n## |\Z)", re.S)
    text = pattern.sub(section.rstrip("\n"), text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.write_text(text)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    g = results["gmm"]["teachers"]["ddim-100"]["table"]
    d = results["digits"]["table"]
    for ax, table, steps, title in ((axes[0], g, results["gmm"]["steps"], "Gaussian mixture: RMSE vs exact ODE"),
                                    (axes[1], d, results["digits"]["steps"], "digits: RMSE vs DDIM-100 teacher")):
        for name, per in table.items():
            if "olss" in name and "refined uniform/global" not in name:
                continue
            ys = [per[str(n)]["rmse"] if per.get(str(n)) else float("nan") for n in steps]
            ax.plot(steps, ys, marker="o", label=name, linewidth=2.5 if "olss" in name else 1)
        ax.set(xlabel="model evaluations (NFE)", ylabel="RMSE", yscale="log", title=title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------------------------------- issue 14
STEPS14 = [4, 5, 6, 8, 10]
PATH_ROWS = {"uniform": "olss re-fit, uniform path", "minimax": "olss re-fit, minimax path",
             "refit": "olss re-fit, refit path search"}
PAPER_ROW = "olss paper fit, uniform path"
OSS_ROWS = {"ddim": "oss-ddim", "dpmsolver++": "oss-dpmsolver++"}


def default_row() -> str:
    return PATH_ROWS[DEFAULT_PATH]


def learned_rows(pipe, prompts, fit_kw, oss_kw, steps, progress=False, with_oss=True) -> tuple[dict, dict]:
    """{row name: scheduler} for OLSS (paper fit; re-fit on the uniform, minimax and refit paths) and OSS-DDIM /
    OSS-DPM-Solver++ on the same training work items, and what each chose (paths, fit seconds)."""
    samplers, info = {}, {}
    t = time.time()
    fit = fit_olss_scheduler(pipe, prompts, num_steps=tuple(steps), path="uniform", progress=progress, **fit_kw)
    info["olss uniform"] = {"seconds": time.time() - t, "paths": {n: s.indices for n, s in fit.schedules.items()}}
    samplers[PAPER_ROW] = OLSSScheduler.from_schedules(list(fit.paper_schedules.values()),
                                                       config=dict(pipe.scheduler.config))
    samplers[PATH_ROWS["uniform"]] = fit.scheduler
    for path in ("minimax", "refit"):
        t = time.time()
        res = fit_olss_scheduler(pipe, prompts, num_steps=tuple(steps), path=path, stats=fit.stats,
                                 progress=progress, **fit_kw)
        samplers[PATH_ROWS[path]] = res.scheduler
        info[f"olss {path}"] = {"seconds": time.time() - t,
                                "paths": {n: s.indices for n, s in res.schedules.items()}}
        if path == "refit":
            info["olss refit"]["search"] = {n: {k: s.meta.get(k) for k in ("refit_search", "heldout")}
                                            for n, s in res.schedules.items()}
    if with_oss:
        t = time.time()
        oss = fit_oss_baselines(pipe, prompts, ("ddim", "dpmsolver++"), steps, progress=progress, **oss_kw)
        info["oss"] = {"seconds": time.time() - t, "paths": {k: v[0].indices for k, v in oss.items()},
                       "train_mse": {k: v[0].errors for k, v in oss.items()},
                       "evaluations": {k: v[0].evaluations for k, v in oss.items()}}
        for solver, (_, sched) in oss.items():
            samplers[OSS_ROWS[solver]] = sched
    return samplers, info


def gmm_setup(quick: bool):
    ntrain, ntest = (128, 200) if quick else (256, 500)
    pipe, test_items, test_x0, exact = mixture_heldout(ntest)

    def quality(samples):
        per = rmse(samples, exact, per_sample=True)
        return {"rmse": rmse(samples, exact), "median": float(per.median()),
                "worst": float(per.max())}

    def check(train_seed: int) -> None:
        check_disjoint(make_work_items([None] * ntrain, base_seed=train_seed), test_items,
                       f"mixture, training seed {train_seed}")

    return pipe, ntrain, ntest, test_x0, quality, check


def gmm14(args) -> dict:
    """Mixture, held-out noise, RMSE against the exact ODE: diffusers solvers, OSS, OLSS (the default teacher with 100
    steps, training seed 1 as in issue 3), and the OLSS/OSS rows again for the other training seeds of
    ``heldout.MIXTURE_TRAINING_SEEDS`` (robustness)."""
    pipe, ntrain, ntest, test_x0, quality, check = gmm_setup(args.quick)
    cfg = dict(pipe.scheduler.config)
    steps = [5, 10] if args.quick else STEPS14
    prompts = [None] * ntrain
    out = {"model": "gaussian mixture 3x6x6, 4 components", "train": ntrain, "test": ntest, "steps": steps,
           "teacher": f"{type(default_teacher(pipe.scheduler)).__name__}, 100 trailing steps (the default teacher)",
           "reference": "probability-flow ODE, RK4 float64, 1000 log-sigma steps", "seeds": {}}
    teacher = sample(pipe, default_teacher(pipe.scheduler), [None] * ntest, test_x0, 100)
    out["teacher_vs_exact"] = quality(teacher)
    for seed in ([1] if args.quick else MIXTURE_TRAINING_SEEDS):
        check(seed)
        fit_kw = dict(teacher_steps=100, batch_size=ntrain, refine_samples=ntrain, base_seed=seed)
        oss_kw = dict(teacher_steps=100, batch_size=ntrain, base_seed=seed)
        samplers, info = learned_rows(pipe, prompts, fit_kw, oss_kw, steps)
        if seed == 1:
            samplers = {**{b: baseline_scheduler(b, cfg) for b in BASELINES}, **samplers}
        table = compare_samplers(pipe, samplers, steps, [None] * ntest, test_x0, quality)
        out["seeds"][str(seed)] = {"table": table, "info": info}
        print(f"gmm14 seed {seed} done", file=sys.stderr, flush=True)
    return out


def teachers14(args) -> dict:
    """Mixture: each teacher's own RMSE against the exact ODE at 50–250 steps (cost = steps), and OLSS re-fit
    (default path) from each teacher at 100 steps on held-out noise."""
    pipe, ntrain, ntest, test_x0, quality, check = gmm_setup(args.quick)
    check(1)
    cfg = dict(pipe.scheduler.config)
    prompts = [None] * ntest
    grid = [50, 100] if args.quick else [50, 100, 125, 200, 250]  # divisors of 1000: DDIM's step lands on its grid
    out = {"steps": grid, "teachers": {}, "students": {}, "student_steps": [5, 10] if args.quick else STEPS14}
    for name in ("ddim", "dpmsolver++", "unipc"):
        out["teachers"][name] = {str(T): quality(sample(pipe, baseline_scheduler(name, cfg), prompts, test_x0, T))
                                 for T in grid}
    for name in ("ddim", "dpmsolver++", "unipc"):
        teacher = baseline_scheduler(name, cfg)
        res = fit_olss_scheduler(pipe, [None] * ntrain, teacher=teacher, teacher_steps=100,
                                 num_steps=tuple(out["student_steps"]), batch_size=ntrain, refine_samples=ntrain,
                                 base_seed=1, progress=False)
        table = compare_samplers(pipe, {name: res.scheduler}, out["student_steps"], prompts, test_x0, quality)
        out["students"][name] = table[name]
    return out


def digits14(args) -> dict:
    """Digits, held-out classes 5–9 × held-out seeds: teacher RMSE, Fréchet distance, accuracy."""
    from olss_fast.demo import digits_quality
    from olss_fast.models.digits import load_digits_classifier, load_digits_pipeline

    pipe = load_digits_pipeline()
    classifier = load_digits_classifier()
    cfg = dict(pipe.scheduler.config)
    steps = [5, 10] if args.quick else STEPS14
    seeds_train, seeds_test = (10, 20) if args.quick else (20, 60)
    train_classes, eval_classes = [0, 1, 2, 3, 4], list(DIGITS_HELDOUT_CLASSES)
    items, prompts, x0, teacher = digits_heldout(pipe, seeds_test)
    quality = digits_quality(teacher, torch.tensor(prompts), eval_classes, classifier)
    ntrain = len(train_classes) * seeds_train
    check_disjoint(make_work_items(train_classes, seeds_train, base_seed=0), items, "digits")
    fit_kw = dict(teacher_steps=100, seeds_per_prompt=seeds_train, base_seed=0, batch_size=200,
                  refine_samples=ntrain)
    oss_kw = dict(teacher_steps=100, seeds_per_prompt=seeds_train, base_seed=0, batch_size=200)
    samplers, info = learned_rows(pipe, train_classes, fit_kw, oss_kw, steps)
    samplers = {**{b: baseline_scheduler(b, cfg) for b in BASELINES}, **samplers}
    table = compare_samplers(pipe, samplers, steps, prompts, x0, quality, batch_size=300)
    return {"model": "bundled digits (16x16, class-conditional, CFG 1.5)", "steps": steps,
            "teacher_name": f"{type(default_teacher(pipe.scheduler)).__name__}, 100 trailing steps (the default)",
            "train": f"classes {train_classes} x {seeds_train} seeds", "eval": f"classes {eval_classes} x "
            f"{seeds_test} held-out seeds", "teacher": quality(teacher), "table": table, "info": info}


def _rank_line(table: dict, steps, metric: str, fmt: str, default: str) -> str:
    """Per NFE: the default row against the best row that is not OLSS (diffusers solvers and OSS)."""
    cells = []
    for n in steps:
        vals = {k: v[str(n)][metric] for k, v in table.items() if v.get(str(n))}
        ours = vals[default]
        other = min((v, k) for k, v in vals.items() if not k.startswith("olss"))
        cells.append(f"{n} NFE {'beats' if ours < other[0] else '**loses to**'} {other[1]} ({fmt.format(ours)} vs "
                     f"{fmt.format(other[0])})")
    return "; ".join(cells)


def write_report14(res: dict, path: Path) -> None:
    default = default_row()
    lines = ["## Quality against learned-step baselines (issue 14)", "",
             f"`benchmarks/quality.py --part gmm14 / teachers / digits14{' --quick' if res.get('quick') else ''}` on "
             f"{res['machine']}; dates per part: " + ", ".join(f"{k} {v}" for k, v in sorted(res["dates"].items()))
             + ". Raw numbers: `benchmarks/quality_issue14.json`. Best per column in bold. Rows: every diffusers "
             "solver of the benchmark (trailing timesteps, PNDM linspace), OSS (Optimal Stepsize Distillation, Pei, "
             "Hu, Gu 2025: `olss_fast/core/oss.py`'s dynamic programme over the teacher's trajectories on the training "
             "noises, run as diffusers' `DPMSolverMultistepScheduler` with the chosen custom timesteps; OSS-DDIM = "
             "its first-order form), and OLSS from the same teacher (the default, DPM-Solver++(2M) with 100 trailing "
             "steps) and training noises: the paper's fit (uniform path), the re-fit on the uniform / minimax path, "
             "and the re-fit on the path judged after the re-fit (`path=\"refit\"`: OSS's programme with the re-fit "
             f"inside, on all re-fit samples). Default: **{default}** (`DEFAULT_PATH = \"{DEFAULT_PATH}\"`).", ""]
    g = res.get("gmm14")
    if g:
        t1 = g["seeds"]["1"]["table"]
        lines += [f"### Gaussian mixture ({g['model']}; {g['train']} training / {g['test']} held-out noises, training "
                  "seed 1)", "",
                  f"RMSE of the final sample against the exact ODE solution ({g['reference']}); teacher "
                  f"{g['teacher']}: {g['teacher_vs_exact']['rmse']:.4f} (median per sample "
                  f"{g['teacher_vs_exact']['median']:.4f}). The RMSE over all samples is dominated by the few "
                  "held-out noises that end in another mixture component than the exact solution; the median "
                  "per-sample RMSE is in the second table.", ""]
        lines += fmt_table(t1, g["steps"], "rmse", "{:.4f}") + [""]
        lines += ["Median per-sample RMSE:", ""] + fmt_table(t1, g["steps"], "median", "{:.4f}") + [""]
        lines += [f"Default vs the best non-OLSS row (RMSE): "
                  f"{_rank_line(t1, g['steps'], 'rmse', '{:.4f}', default)}.", ""]
        if len(g["seeds"]) > 1:
            others = ", ".join(k for k in g["seeds"] if k != "1")
            lines += [f"Robustness: the OLSS and OSS rows fitted on other training noises (seeds {others}; the "
                      "diffusers rows do not depend on them; the held-out noises are those above), RMSE against the "
                      "exact ODE:", ""]
            rob = {f"{k} [seed {seed}]": v for seed, d in g["seeds"].items() if seed != "1"
                   for k, v in d["table"].items()}
            lines += fmt_table(rob, g["steps"], "rmse", "{:.4f}") + [""]
    t = res.get("teachers")
    if t:
        lines += ["### Teacher choice (mixture; held-out noise, RMSE against the exact ODE)", "",
                  "Each teacher's own error; its cost is its number of steps (one model evaluation each, also for "
                  "UniPC's corrector, which re-uses the next step's evaluation):", "",
                  "| teacher | " + " | ".join(f"{T} steps" for T in t["steps"]) + " |",
                  "|---|" + "---|" * len(t["steps"])]
        for name, per in t["teachers"].items():
            lines.append(f"| {name} | " + " | ".join(f"{per[str(T)]['rmse']:.4f} / {per[str(T)]['median']:.4f}"
                                                      for T in t["steps"]) + " |")
        lines += ["", "(RMSE over all samples / median per-sample RMSE.) OLSS re-fit (default path) from each "
                  "teacher at 100 steps, same training noises, RMSE against the exact ODE:", ""]
        lines += fmt_table({f"olss from {k}-100": v for k, v in t["students"].items()}, t["student_steps"], "rmse",
                           "{:.4f}") + [""]
    d = res.get("digits14")
    if d:
        lines += [f"### Bundled digits model ({d['model']}; trained on {d['train']}, evaluated on {d['eval']})", "",
                  f"Teacher ({d['teacher_name']}): Fréchet distance {d['teacher']['fd']:.2f}, accuracy "
                  f"{d['teacher']['accuracy']:.3f} (Fréchet distances at 300 samples carry a large bias: compare "
                  "rows). RMSE is against this teacher's sample from the same noise.", ""]
        for metric, label, fmt in (("rmse", "RMSE vs the teacher", "{:.4f}"),
                                   ("fd", "Fréchet distance to real digits", "{:.2f}")):
            lines += [f"{label}:", ""] + fmt_table(d["table"], d["steps"], metric, fmt) + [""]
        lines += [f"Default vs the best non-OLSS row (teacher RMSE): "
                  f"{_rank_line(d['table'], d['steps'], 'rmse', '{:.4f}', default)}.", ""]
        info = d["info"]
        lines += ["Fit cost on this machine (seconds, shared CPU): " + ", ".join(
            f"{k} {v['seconds']:.0f}" for k, v in info.items()) + ".", ""]
    section = "\n".join(lines).rstrip() + "\n"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(r"## Quality against learned-step baselines \(issue 14\).*?(?=\n## |\Z)", re.S)
    text = pattern.sub(lambda m: section.rstrip("\n"), text) if pattern.search(text) \
        else text.rstrip() + "\n\n" + section
    path.write_text(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(HERE))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--part", choices=["issue3", "gmm14", "teachers", "digits14"], default="issue3",
                        help="which benchmark to run (default: the issue-3 tables)")
    parser.add_argument("--machine", default="2-core CPU container, no GPU", help="machine named in the report")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part != "issue3":
        return main14(args)
    t0 = time.time()
    results = {"quick": args.quick, "date": time.strftime("%Y-%m-%d"),
               "machine": f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"}
    results["gmm"] = gmm_benchmark(args)
    print(f"gaussian mixture done ({time.time() - t0:.0f} s)", file=sys.stderr)
    results["digits"] = digits_benchmark(args)
    results["seconds"] = time.time() - t0
    out = Path(args.out)
    (out / "quality.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "quality.png")
    write_report(results, out / "RESULTS.md")
    print((out / "RESULTS.md").read_text().split("## Quality (issue 3)")[1][:6000])
    return 0


def main14(args) -> int:
    out = Path(args.out)
    file = out / "quality_issue14.json"
    res = json.loads(file.read_text()) if file.exists() else {}
    t0 = time.time()
    part = {"gmm14": gmm14, "teachers": teachers14, "digits14": digits14}[args.part](args)
    part["seconds"] = time.time() - t0
    res[args.part] = part
    res.setdefault("dates", {})[args.part] = time.strftime("%Y-%m-%d")
    res["machine"] = f"{args.machine} (torch {torch.__version__}, {torch.get_num_threads()} threads)"
    res["quick"] = args.quick
    file.write_text(json.dumps(res, indent=1))
    write_report14(res, out / "RESULTS.md")
    print((out / "RESULTS.md").read_text().split("## Quality against learned-step baselines (issue 14)")[1][:8000])
    return 0


if __name__ == "__main__":
    sys.exit(main())

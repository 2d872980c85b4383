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
from olss_fast.evaluate import baseline_scheduler, compare_samplers, sample
from olss_fast.metrics import rmse
from olss_fast.recording import RecordConfig, item_noise, make_work_items, record_trajectories

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
    from olss_fast.models.gmm import make_gmm, ode_solution

    pipe = make_gmm((3, 6, 6), num_components=4, seed=0)
    pipe.set_progress_bar_config(disable=True)
    cfg = dict(pipe.scheduler.config)
    ntrain, ntest = (128, 200) if args.quick else (256, 500)
    steps = [5, 10] if args.quick else [4, 5, 6, 8, 10, 15, 20]
    train_items = make_work_items([None] * ntrain, base_seed=1)
    test_x0 = item_noise(make_work_items([None] * ntest, base_seed=2), (3, 6, 6))
    prompts = [None] * ntest
    ac = pipe.scheduler.alphas_cumprod
    exact = ode_solution(pipe.unet, test_x0.double(), float(ac[999]), 1.0, num_steps=1000).float()

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
        fit = fit_olss_scheduler(pipe, train_classes, teacher_steps=100, num_steps=tuple(steps),
                                 seeds_per_prompt=seeds_train, base_seed=0, batch_size=200,
                                 refine_samples=len(train_classes) * seeds_train, progress=False)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(HERE))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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


if __name__ == "__main__":
    sys.exit(main())

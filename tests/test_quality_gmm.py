"""Held-out quality on the analytic Gaussian mixture: OLSS vs diffusers' solvers at the same NFE.

Teacher: the default teacher (DPM-Solver++(2M)), 50 trailing steps, ending at clean data (σ = 0) like every
baseline. Metric: final-sample RMSE against that teacher from the same held-out noise.
The recommended flow (search, then refine) must beat every baseline at 5 and 10 NFE; the table is printed.
"""
import pytest

from olss_fast import OLSSScheduler, fit_olss_scheduler, search_schedule
from olss_fast.core.metrics import rmse
from olss_fast.fit.baselines import baseline_scheduler, sample
from olss_fast.models.gmm import make_gmm
from olss_fast.fit.teacher import default_teacher
from olss_fast.fit.work import item_noise, make_work_items

BASELINE_NAMES = ["ddim", "dpmsolver++", "unipc", "deis"]


@pytest.fixture(scope="module")
def table():
    pipe = make_gmm((3, 6, 6), num_components=4, seed=0)
    pipe.set_progress_bar_config(disable=True)
    cfg = dict(pipe.scheduler.config)
    res = fit_olss_scheduler(pipe, [None] * 256, teacher_steps=50, num_steps=(5, 10), batch_size=256,
                             refine_samples=256, progress=False)
    heldout = make_work_items([None] * 300, base_seed=12345)  # never seen by the search
    x0 = item_noise(heldout, (3, 6, 6))
    prompts = [None] * 300
    teacher = sample(pipe, default_teacher(pipe.scheduler), prompts, x0, 50)
    rows = {}
    for n in (5, 10):
        samplers = {name: baseline_scheduler(name, cfg) for name in BASELINE_NAMES}
        samplers["olss paper fit (uniform)"] = OLSSScheduler.from_schedules([res.paper_schedules[n]], config=cfg)
        samplers["olss paper fit (minimax)"] = OLSSScheduler.from_schedules(
            [search_schedule(res.stats, n, path="minimax")], config=cfg)
        samplers["olss refined (default)"] = res.scheduler
        row = {}
        for name, sched in samplers.items():
            out = sample(pipe, sched, prompts, x0, n)
            row[name] = (rmse(out, teacher), float(rmse(out, teacher, per_sample=True).median()))
        rows[n] = row
    return rows


def test_recommended_flow_beats_every_baseline(table, capsys):
    names = list(table[5])
    with capsys.disabled():
        print("\nHeld-out error vs the DPM-Solver++-50 teacher, Gaussian mixture 3x6x6 (4 components), 256 training "
              "samples;"
              " RMSE over all samples / median per-sample RMSE")
        print(f"{'sampler':28s} " + " ".join(f"{n:>17d} NFE" for n in table))
        for name in names:
            print(f"{name:28s} " + " ".join(f"{table[n][name][0]:10.4f} /{table[n][name][1]:8.4f}" for n in table))
    for n, row in table.items():
        ours = row["olss refined (default)"]
        for name in BASELINE_NAMES:
            assert ours[0] < row[name][0], (n, name, ours, row[name])  # RMSE over all samples
            assert ours[1] < row[name][1], (n, name, ours, row[name])  # typical sample

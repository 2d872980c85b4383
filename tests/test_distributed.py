"""Two gloo processes under torchrun give the same statistics and schedules as one process.

One torchrun launch (tests/dist_worker.py, ~30 s on 2 cores, mostly imports) runs the analytic GMM model and the tiny
random SD pipeline through the API and the CLI; the single-process references are computed here.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from olss_fast import GramStats, OLSSSchedule, fit_olss_scheduler
from olss_fast.fit.distributed import LOCAL, DistContext, gather_by_sum, make_batches, shard_batches
from olss_fast.models.gmm import make_gmm
from olss_fast.fit.work import make_work_items
from helpers import assert_fit_errors_optimal, assert_same_fit

if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import dist_worker as W  # noqa: E402

CLI_PROMPTS = [0, 1, 2, 1]
RESUME_PROMPTS = [0, 1, 2, 1, 2, 0, 0, 1]  # 4 batches of 2: two per rank


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    (out / "prompts.json").write_text(json.dumps(CLI_PROMPTS))
    (out / "prompts8.json").write_text(json.dumps(RESUME_PROMPTS))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "dist_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    logs = {r: json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)}
    return out, logs


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_sharding_rule_is_whole_batches_round_robin():
    items = make_work_items(list("abcdefg"), seeds_per_prompt=1)
    assert [[it.index for it in b] for b in make_batches(items, 3)] == [[0, 1, 2], [3, 4, 5], [6]]
    r0 = shard_batches(items, 2, DistContext(rank=0, world_size=3))
    r2 = shard_batches(items, 2, DistContext(rank=2, world_size=3))
    assert [(k, [it.index for it in b]) for k, b in r0] == [(0, [0, 1]), (3, [6])]
    assert [(k, [it.index for it in b]) for k, b in r2] == [(2, [4, 5])]
    assert gather_by_sum(torch.ones(2), LOCAL).tolist() == [1.0, 1.0]


def test_gmm_two_processes_equal_one_process(dist_run, one_thread):
    out, logs = dist_run
    # each rank recorded exactly its batches (k % 2 == rank of 3-sample batches), together all 10 items once
    assert logs[0]["my_items"] == [0, 1, 2, 6, 7, 8] and logs[1]["my_items"] == [3, 4, 5, 9]
    assert logs[0]["gmm_samples"] == logs[1]["gmm_samples"] == 10
    pipe = make_gmm(W.GMM["sample_shape"], num_components=W.GMM["num_components"], seed=W.GMM["seed"])
    ref = fit_olss_scheduler(pipe, W.GMM_PROMPTS, progress=False, distributed=False, **W.GMM_FIT)
    dist_stats = GramStats.load(out / "gmm_stats.safetensors")
    assert dist_stats.num_samples == ref.stats.num_samples == 10
    gram_diff = rel_diff(dist_stats.gram, ref.stats.gram)
    assert gram_diff <= 1e-12
    for n in (4, 6):
        paper = OLSSSchedule.load(out / f"gmm_paper_{n}.json")
        refined = OLSSSchedule.load(out / f"gmm_refined_{n}.json")
        # the paper's fit solves normal equations with condition numbers up to ~1e8 on this tiny mixture: the
        # coefficients agree within the least-squares perturbation bound of the statistics' difference
        assert_same_fit(ref.stats, paper, ref.paper_schedules[n], gram_diff)
        assert refined.refined and refined.indices == ref.schedules[n].indices
        torch.testing.assert_close(refined.coeffs, ref.schedules[n].coeffs, rtol=1e-9, atol=1e-12)
        assert refined.errors == pytest.approx(ref.schedules[n].errors, rel=1e-9, abs=1e-15)
    # rank 1 returned rank 0's schedule
    torch.testing.assert_close(torch.tensor(logs[1]["gmm_refined_4_coeffs"], dtype=torch.float64),
                               OLSSSchedule.load(out / "gmm_refined_4.json").coeffs, rtol=0, atol=0)
    # the paper's minimax path search on the all-reduced statistics finds the single-process path
    mm = OLSSSchedule.load(out / "gmm_minimax_5.json")
    ref_mm = fit_olss_scheduler(pipe, W.GMM_PROMPTS, stats=ref.stats, num_steps=(5,), path="minimax",
                                refine=False, progress=False, distributed=False).schedules[5]
    assert_same_fit(ref.stats, mm, ref_mm, gram_diff)


def test_tiny_sd_two_processes_equal_one_process(dist_run, one_thread):
    from olss_fast.testing import tiny_sd_pipeline

    out, _ = dist_run
    ref = fit_olss_scheduler(tiny_sd_pipeline(), W.SD_PROMPTS, progress=False, distributed=False, **W.SD_FIT)
    dist_stats = GramStats.load(out / "sd_stats.safetensors")
    assert dist_stats.num_samples == ref.stats.num_samples == 5 and dist_stats.sample_shape == (4, 8, 8)
    assert rel_diff(dist_stats.gram, ref.stats.gram) <= 1e-12
    refined = OLSSSchedule.load(out / "sd_refined_3.json")
    assert refined.indices == ref.schedules[3].indices
    torch.testing.assert_close(refined.coeffs, ref.schedules[3].coeffs, rtol=1e-9, atol=1e-12)


def test_cli_under_torchrun_rank0_writes_everything_once(dist_run, one_thread):
    out, logs = dist_run
    assert logs[0]["cli_rc"] == 0 and logs[1]["cli_rc"] == 0
    cli_out = out / "cli"
    # rank 0 wrote the results; the per-rank checkpoint files are gone, the finished statistics remain
    assert sorted(p.name for p in cli_out.iterdir()) == ["schedule_3.json", "scheduler", "stats.safetensors",
                                                         "summary.json"]
    summary = json.loads((cli_out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["samples"] == 4
    stats = GramStats.load(cli_out / "stats.safetensors")
    info = stats.meta["record_checkpoint"]
    assert info["complete"] and info["layout"]["world_size"] == 2 and info["done"] == [[0, 4]]
    pipe = make_gmm(W.GMM["sample_shape"], num_components=W.GMM["num_components"], seed=W.GMM["seed"])
    from olss_fast.fit.recording import record_trajectories

    ref = record_trajectories(pipe, CLI_PROMPTS, teacher_steps=20, batch_size=2, progress=False,
                              distributed=False)
    assert rel_diff(stats.gram, ref.gram) <= 1e-12


def test_crashed_two_process_recording_resumes_from_per_rank_checkpoints(dist_run, one_thread):
    out, logs = dist_run
    for r in (0, 1):
        assert logs[r]["crashed"] and logs[r]["resume_rc"] == 0
        # each rank checkpointed its first batch, crashed in its second, and on resume recorded only that one
        assert logs[r]["calls_total"] == 3
    assert logs[0]["shards_after_crash"] == ["stats.rank0-of-2.safetensors", "stats.rank1-of-2.safetensors"]
    res = out / "cli_resume"
    assert sorted(p.name for p in res.iterdir()) == ["schedule_3.json", "scheduler", "stats.safetensors",
                                                     "summary.json"]
    stats = GramStats.load(res / "stats.safetensors")
    assert stats.num_samples == 8 and stats.meta["record_checkpoint"]["complete"]
    from olss_fast.fit.recording import record_trajectories

    pipe = make_gmm(W.GMM["sample_shape"], num_components=W.GMM["num_components"], seed=W.GMM["seed"])
    ref = record_trajectories(pipe, RESUME_PROMPTS, teacher_steps=20, batch_size=2, progress=False,
                              distributed=False)
    assert rel_diff(stats.gram, ref.gram) <= 1e-12
    sched = OLSSSchedule.load(res / "schedule_3.json")
    from olss_fast import search_schedule

    direct = search_schedule(ref, 3)
    assert sched.indices == direct.indices
    # this tiny isotropic mixture makes the 3-step basis nearly collinear (fit errors ~1e-10 of the latents' mean
    # square), so the coefficients are not determined to float64 rounding; the fits are: the schedule's
    # coefficients reach the optimal fit errors on the reference data up to the rounding of evaluating them
    assert_fit_errors_optimal(ref, sched.indices, sched.coeffs, direct.errors)

"""Worker for tests/test_distributed.py, launched as ``torchrun --standalone --nproc_per_node=2 dist_worker.py OUT``.

Every rank runs the same jobs through the public API and the CLI (process group created from torchrun's
environment by the library itself); rank 0 writes what the test compares against single-process runs.
"""
import json
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from olss_fast import cli, fit_olss_scheduler  # noqa: E402
from olss_fast.fit.distributed import init_distributed  # noqa: E402
from olss_fast.models.gmm import GMMPipeline, make_gmm  # noqa: E402
from olss_fast.fit.recording import record_trajectories  # noqa: E402

# the job parameters, shared with the test (single-process references)
GMM = dict(sample_shape=(2, 4, 4), num_components=3, seed=0)
GMM_PROMPTS = [0, 1, 2, None, 1]
GMM_FIT = dict(teacher_steps=30, num_steps=(4, 6), batch_size=3, seeds_per_prompt=2, guidance_scale=2.0,
               refine_samples=7, base_seed=5)
SD_PROMPTS = ["a red cat", "blue sky", "a dog", "green car", "x"]
SD_FIT = dict(teacher_steps=8, num_steps=(3,), batch_size=2, guidance_scale=3.0, refine_samples=5)
CLI_ARGS = ["--teacher-steps", "20", "--steps", "3", "--batch-size", "2", "--checkpoint-every", "1"]


def main(out: Path) -> None:
    ctx = init_distributed()
    assert ctx.enabled and ctx.world_size == 2 and ctx.backend == "gloo", ctx
    rank = ctx.rank
    log = {"rank": rank, "world_size": ctx.world_size}

    # 1. GMM: record (sharded) + search + refine (sharded), API
    pipe = make_gmm(GMM["sample_shape"], num_components=GMM["num_components"], seed=GMM["seed"])
    res = fit_olss_scheduler(pipe, GMM_PROMPTS, progress=False, **GMM_FIT)
    log["gmm_samples"] = res.stats.num_samples
    # per-rank recording share (which work items this rank recorded)
    calls: list = []
    record_trajectories(pipe, GMM_PROMPTS, teacher_steps=10, batch_size=3, seeds_per_prompt=2, progress=False,
                        on_batch=lambda items, x, e: calls.extend(it.index for it in items))
    log["my_items"] = calls
    # minimax path on the all-reduced statistics (no refinement)
    mm = fit_olss_scheduler(pipe, GMM_PROMPTS, stats=res.stats, num_steps=(5,), path="minimax", refine=False,
                            progress=False)
    if rank == 0:
        res.stats.save(out / "gmm_stats.safetensors")
        for n, s in res.schedules.items():
            s.save(out / f"gmm_refined_{n}.json")
        for n, s in res.paper_schedules.items():
            s.save(out / f"gmm_paper_{n}.json")
        mm.schedules[5].save(out / "gmm_minimax_5.json")
    else:  # the other ranks hold the same results
        log["gmm_refined_4_coeffs"] = res.schedules[4].coeffs.tolist()

    # 2. tiny random Stable Diffusion pipeline
    from olss_fast.testing import tiny_sd_pipeline

    sd = tiny_sd_pipeline()
    res_sd = fit_olss_scheduler(sd, SD_PROMPTS, progress=False, **SD_FIT)
    if rank == 0:
        res_sd.stats.save(out / "sd_stats.safetensors")
        res_sd.schedules[3].save(out / "sd_refined_3.json")

    # 3. the CLI under torchrun, with per-rank checkpoints (the GMM pipeline stands in for a hub model)
    cli.load_pipeline = lambda name, device="cpu", dtype="float32": make_gmm(
        GMM["sample_shape"], num_components=GMM["num_components"], seed=GMM["seed"])
    rc = cli.main(["search", "--pipeline", "gmm", "--prompts", str(out / "prompts.json"), "--out",
                   str(out / "cli"), *CLI_ARGS, "--quiet"])
    log["cli_rc"] = rc

    # 4. a distributed recording that crashes on every rank at its second batch (after one checkpointed batch
    # each), then resumed with --resume by the same command: per-rank checkpoints
    crash = {"at": 1, "calls": 0}

    class CrashingGMM(GMMPipeline):
        def __call__(self, *args, **kwargs):
            crash["calls"] += 1
            if crash["calls"] - 1 == crash["at"]:
                raise RuntimeError("simulated crash")
            return super().__call__(*args, **kwargs)

    def load_crashing(name, device="cpu", dtype="float32"):
        pipe = make_gmm(GMM["sample_shape"], num_components=GMM["num_components"], seed=GMM["seed"])
        pipe.__class__ = CrashingGMM
        return pipe

    cli.load_pipeline = load_crashing
    resume_args = ["search", "--pipeline", "gmm", "--prompts", str(out / "prompts8.json"), "--out",
                   str(out / "cli_resume"), *CLI_ARGS, "--quiet", "--no-refine"]
    try:
        cli.main(resume_args)
        log["crashed"] = False
    except RuntimeError:
        log["crashed"] = True
    ctx.barrier()  # both ranks have crashed (and written their checkpoints) before the folder is listed
    log["shards_after_crash"] = sorted(p.name for p in (out / "cli_resume").glob("stats.rank*"))
    ctx.barrier()  # ... and before either rank resumes
    crash["at"] = -1
    log["resume_rc"] = cli.main(resume_args + ["--resume"])
    log["calls_total"] = crash["calls"]
    (out / f"rank{rank}.json").write_text(json.dumps(log))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))

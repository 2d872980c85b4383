"""Worker for tests/test_resume.py: ``olss-fast search`` on the analytic GMM model, which hangs at a given batch.

``python resume_worker.py HANG_AT_CALL <olss-fast search arguments>``: prints ``CALL k`` (flushed) when the pipeline
is called for the k-th time and sleeps forever from call ``HANG_AT_CALL`` on, so that the test can SIGKILL it with
exactly the batches before that call checkpointed.
"""
import sys
import time

import torch

from olss_fast import cli
from olss_fast.models.gmm import GMMPipeline, make_gmm

GMM = dict(sample_shape=(2, 4, 4), num_components=3, seed=0)


def gmm_pipeline():
    return make_gmm(GMM["sample_shape"], num_components=GMM["num_components"], seed=GMM["seed"])


class HangingGMM(GMMPipeline):
    calls = 0
    hang_at = 10**9

    def __call__(self, *args, **kwargs):
        k = HangingGMM.calls
        HangingGMM.calls += 1
        print(f"CALL {k}", flush=True)
        if k >= HangingGMM.hang_at:
            time.sleep(3600)
        return super().__call__(*args, **kwargs)


def load_hanging(name, device="cpu", dtype="float32"):
    pipe = gmm_pipeline()
    pipe.__class__ = HangingGMM
    return pipe


if __name__ == "__main__":
    torch.set_num_threads(1)
    HangingGMM.hang_at = int(sys.argv[1])
    cli.load_pipeline = load_hanging
    sys.exit(cli.main(sys.argv[2:]))

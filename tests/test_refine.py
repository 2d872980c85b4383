"""Student-in-the-loop re-fit: the API with a denoise callable, and the pipeline-driven version agree."""
import pytest
import torch

from olss_fast import refine_schedule, search_schedule
from olss_fast.fit.probe import refine_through_pipeline
from olss_fast.models.gmm import make_gmm
from olss_fast.fit.config import RecordConfig
from olss_fast.fit.recording import record_trajectories
from olss_fast.fit.work import make_work_items
from olss_fast.serve.scheduler import OLSSScheduler


def recorded(seed=0, samples=48, T=40):
    pipe = make_gmm((2, 4, 4), num_components=3, seed=seed)
    items = make_work_items([None] * samples)
    kept = []
    stats = record_trajectories(pipe, [None] * samples, teacher_steps=T, batch_size=samples, progress=False,
                                items=items, on_batch=lambda it, x, e: kept.append(x))
    return pipe, stats, items, kept[0]


def student_final(pipe, schedule, x0):
    pipe.scheduler = OLSSScheduler.from_schedules([schedule], config=dict(pipe.scheduler.config))
    return pipe(prompt=x0.shape[0], latents=x0.clone(), num_inference_steps=schedule.num_steps).sample


@pytest.mark.parametrize("granularity", ["global", "channel"])
def test_refine_errors_are_the_students_true_errors_and_beat_the_paper_fit(granularity):
    pipe, stats, items, x_path = recorded()
    unet = pipe.unet
    base = dict(pipe.scheduler.config)
    paper = search_schedule(stats, 6, granularity=granularity)
    refined = refine_schedule(paper, lambda x, t: unet(x, t).sample, x_path[0], x_path, progress=False)
    assert refined.refined and refined.indices == paper.indices and refined.granularity == granularity
    # the reported last-step error is the MSE of the student's own final sample against the teacher's
    pipe.scheduler = OLSSScheduler.from_config(base)
    final = student_final(pipe, refined, x_path[0])
    mse = float(((final.double() - x_path[-1].double()) ** 2).mean())
    assert refined.errors[-1] == pytest.approx(mse, rel=1e-3)
    pipe.scheduler = OLSSScheduler.from_config(base)
    paper_mse = float(((student_final(pipe, paper, x_path[0]).double() - x_path[-1].double()) ** 2).mean())
    assert mse < paper_mse


def test_refine_through_pipeline_equals_refine_with_denoise():
    pipe, stats, items, x_path = recorded(seed=1, samples=20)
    paper = search_schedule(stats, 4)
    a = refine_schedule(paper, lambda x, t: pipe.unet(x, t).sample, x_path[0], x_path, progress=False)
    b = refine_through_pipeline(pipe, paper, items, x_path, RecordConfig(teacher_steps=40, batch_size=7),
                                progress=False)
    torch.testing.assert_close(b.coeffs, a.coeffs, rtol=1e-4, atol=1e-6)


def test_refine_bad_input():
    pipe, stats, items, x_path = recorded(samples=8, T=20)
    paper = search_schedule(stats, 3)
    den = lambda x, t: pipe.unet(x, t).sample  # noqa: E731
    with pytest.raises(ValueError, match="initial latent"):
        refine_schedule(paper, den, torch.randn_like(x_path[0]), x_path, progress=False)
    with pytest.raises(ValueError, match="teacher steps"):
        refine_schedule(paper, den, x_path[0], x_path[:-3], progress=False)
    with pytest.raises(ValueError, match="must match"):
        refine_schedule(paper, den, x_path[0][:2], x_path, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        refine_schedule(paper, lambda x, t: x * float("nan"), x_path[0], x_path, progress=False)

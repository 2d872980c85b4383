"""The batched evaluation of the re-fit programme's layers (``probe.layer_denoiser``): every registered family gives
each row the model output at its own timestep, equal to the one-timestep-per-call reference; where it cannot be
sure, it takes the reference (forced, a foreign pipeline loop, a denoiser called otherwise than its adapter says)."""
from __future__ import annotations

import logging

import pytest
import torch

from olss_fast import fit_olss_scheduler
from olss_fast.fit import probe
from olss_fast.fit.config import RecordConfig
from olss_fast.fit.probe import layer_denoiser, pipeline_denoiser
from olss_fast.fit.work import make_work_items
from olss_fast.models.digits import load_digits_pipeline
from olss_fast.models.gmm import make_gmm
from olss_fast.pipelines.facts import denoiser_of, latent_shape
from olss_fast.testing import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

VP_TIMES = [981, 801, 601, 401, 201, 1]
FLOW_TIMES = [1000.0, 800.5, 600.25, 400.0, 100.0]
PROMPTS = ["a cat", "a dog", "blue sky"]


def _family(name: str):
    """(pipeline, record config, prompts, timesteps) of one family, guided unless the name says otherwise."""
    if name in ("sd", "sd-unguided"):
        g = 1.0 if name == "sd-unguided" else 7.5
        return tiny_sd_pipeline(), RecordConfig(batch_size=4, guidance_scale=g), PROMPTS, VP_TIMES
    if name == "sdxl":
        return tiny_sdxl_pipeline(), RecordConfig(batch_size=4, guidance_scale=5.0), PROMPTS, VP_TIMES
    if name == "digits":
        return load_digits_pipeline(), RecordConfig(batch_size=4, guidance_scale=2.0), [3, 7, 9], VP_TIMES
    call = {"max_sequence_length": 16}
    if name == "sd3":
        rec = RecordConfig(batch_size=4, guidance_scale=4.0, height=16, width=16, call_kwargs=call)
        return tiny_sd3_pipeline(), rec, PROMPTS, FLOW_TIMES
    if name == "flux-bf16":  # the transformer's timestep in bfloat16, as FluxPipeline casts it
        rec = RecordConfig(batch_size=4, guidance_scale=3.5, height=32, width=32, call_kwargs=call)
        return tiny_flux_pipeline(dtype=torch.bfloat16), rec, PROMPTS, FLOW_TIMES
    if name == "flux-true-cfg":  # two transformer calls per step, the negative prompt's and the prompt's
        call = dict(call, true_cfg_scale=2.0, negative_prompt="blurry")
    rec = RecordConfig(batch_size=4, guidance_scale=3.5, height=32, width=32, call_kwargs=call)
    return tiny_flux_pipeline(), rec, PROMPTS, FLOW_TIMES


def _states(pipe, rec, count, items, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = latent_shape(pipe, rec.height, rec.width)
    return [torch.randn(len(items), *shape, generator=g) for _ in range(count)]


@pytest.mark.parametrize("name", ["sd", "sd-unguided", "sdxl", "digits", "sd3", "flux", "flux-true-cfg",
                                  "flux-bf16"])
def test_every_row_gets_the_output_at_its_own_timestep(name, caplog):
    """Six (flow models: five) states of two samples each at different timesteps, in 4-row calls (so calls mix
    states and timesteps), with no fallback: each state's outputs equal the reference's at its timestep and differ
    from the outputs at its neighbour's."""
    pipe, rec, prompts, times = _family(name)
    items = make_work_items(prompts[:2])
    den, batched = pipeline_denoiser(pipe, items, rec), layer_denoiser(pipe, items, rec)
    assert batched is not None
    zs = _states(pipe, rec, len(times), items)
    calls = []
    hook = denoiser_of(pipe).register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    try:
        with caplog.at_level(logging.WARNING, logger="olss_fast.fit.probe"):
            got = batched(zs, times)
    finally:
        hook.remove()
    assert "one timestep at a time" not in caplog.text
    per_call = 2 if name == "flux-true-cfg" else 1
    assert len(calls) == per_call * -(-len(times) * len(items) // rec.batch_size)  # all rows in calls of 4
    tol = 1e-3 if name == "flux-bf16" else 1e-5  # (room for bfloat16 rounding in other batch shapes)
    for z, t, e in zip(zs, times, got):
        ref = den(z, t)
        assert e.shape == ref.shape and e.dtype == torch.float32
        torch.testing.assert_close(e, ref, rtol=tol, atol=tol * float(ref.abs().max()))
    elsewhere = den(zs[2], times[1])
    assert float((elsewhere - got[2]).abs().max()) > 1e-3 * float(got[2].abs().max())


def test_the_reference_is_taken_when_forced_or_for_a_pipeline_it_cannot_vouch_for(monkeypatch):
    pipe, rec, prompts, _ = _family("sd")
    items = make_work_items(prompts)
    assert layer_denoiser(pipe, items, rec) is not None
    monkeypatch.setenv("OLSS_FAST_FORCE_REFERENCE", "1")
    assert layer_denoiser(pipe, items, rec) is None
    monkeypatch.setenv("OLSS_FAST_FORCE_REFERENCE", "0")
    assert layer_denoiser(pipe, items, rec) is not None

    class OwnLoop(type(pipe)):  # a subclass whose loop may use the timestep where the hook cannot reach
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    pipe.__class__ = OwnLoop
    assert layer_denoiser(pipe, items, rec) is None
    gmm = make_gmm((2, 4, 4), num_components=2, seed=0)  # no registered family
    assert layer_denoiser(gmm, make_work_items([None] * 3), RecordConfig()) is None


@pytest.mark.parametrize("how", ["other timestep", "denoiser not called"])
def test_a_denoiser_called_otherwise_falls_back_to_the_reference_with_one_warning(monkeypatch, caplog, how):
    pipe, rec, prompts, times = _family("sd")
    items = make_work_items(prompts[:2])
    den = pipeline_denoiser(pipe, items, rec)
    if how == "other timestep":  # the adapter expects another argument than the pipeline passes
        monkeypatch.setattr(type(probe.adapter_for(pipe)), "model_timestep",
                            lambda self, t, x: t.expand(x.shape[0]) + 1)
    else:  # the hook sits on a module the pipeline never calls
        monkeypatch.setattr(probe, "denoiser_of", lambda p: torch.nn.Identity())
    batched = layer_denoiser(pipe, items, rec)
    zs = _states(pipe, rec, len(times), items, seed=1)
    with caplog.at_level(logging.WARNING, logger="olss_fast.fit.probe"):
        got = batched(zs, times)
        again = batched(zs[:3], times[:3])
    assert caplog.text.count("one timestep at a time from now on") == 1
    for z, t, e in zip(zs, times, got):
        torch.testing.assert_close(e, den(z, t), rtol=1e-5, atol=1e-6)
    for z, t, e in zip(zs, times, again):
        torch.testing.assert_close(e, den(z, t), rtol=1e-5, atol=1e-6)


def test_a_fit_with_batched_layers_makes_fewer_denoiser_calls_for_the_same_rows(monkeypatch):
    """The default fit of the tiny SD pipeline: the same latent rows through the denoiser and the same schedules'
    paths as with the reference forced, in fewer calls (the programme's states share calls)."""
    pipe = tiny_sd_pipeline()
    prompts = [f"prompt {i}" for i in range(8)]
    kw = dict(teacher_steps=40, batch_size=8, guidance_scale=7.5, num_steps=(3, 4), progress=False,
              search_samples=3)

    def run():
        rows = []

        def count(module, args, kwargs):
            rows.append(int((args[0] if args else kwargs["sample"]).shape[0]))

        hook = denoiser_of(pipe).register_forward_pre_hook(count, with_kwargs=True)
        try:
            res = fit_olss_scheduler(pipe, prompts, **kw)
        finally:
            hook.remove()
        return res, sum(rows), len(rows)

    fast, fast_rows, fast_calls = run()
    monkeypatch.setenv("OLSS_FAST_FORCE_REFERENCE", "1")
    ref, ref_rows, ref_calls = run()
    assert fast_rows == ref_rows and fast_calls < ref_calls
    for n in (3, 4):
        assert fast.schedules[n].meta["refit_search"]["proposal"] == ref.schedules[n].meta["refit_search"]["proposal"]
        assert fast.schedules[n].indices == ref.schedules[n].indices

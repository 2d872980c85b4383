"""The bundled digits diffusion model: offline loading, sampling quality, the pipeline contract, errors."""
from __future__ import annotations

import json
import shutil
import socket

import numpy as np
import pytest
import torch

from olss_fast.models.digit_metrics import class_accuracy
from olss_fast.models import digits as D
from olss_fast.models.digits import (DIGITS_DIR, NULL_CLASS, DigitsPipeline, load_digits_classifier,
                                     load_digits_pipeline, digits_reference_stats)

pytestmark = [pytest.mark.skipif(not (DIGITS_DIR / "unet" / D.WEIGHTS_NAME).is_file(),
                                 reason="bundled digits weights not trained yet"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def pipe():
    return load_digits_pipeline()


@pytest.fixture()
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_bundled_files_present_and_small():
    for rel in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                "classifier/config.json", "classifier/model.safetensors", "feature_stats.safetensors",
                "training.json", "README.md", "checksums.json"):
        assert (DIGITS_DIR / rel).is_file(), rel
    total = sum(p.stat().st_size for p in DIGITS_DIR.rglob("*") if p.is_file())
    assert total <= 10 * 2**20
    info = json.loads((DIGITS_DIR / "training.json").read_text())
    assert info["classifier"]["test_accuracy"] >= 0.95


def test_loads_offline(no_network):
    p = load_digits_pipeline()
    assert isinstance(p, DigitsPipeline)
    assert p.unet.config.num_class_embeds == 11
    assert p.unet.config.sample_size == 16 and p.unet.config.in_channels == 1
    assert type(p.scheduler).__name__ == "DDIMScheduler"
    assert p.scheduler.config.timestep_spacing == "trailing"
    assert p.scheduler.config.prediction_type == "epsilon"
    clf = load_digits_classifier("cpu")
    mu, sigma = digits_reference_stats()
    assert mu.dtype == torch.float64 and sigma.shape == (mu.shape[0], mu.shape[0])
    assert 32 <= mu.shape[0] <= 64
    assert clf.features(torch.zeros(2, 1, 16, 16)).shape == (2, mu.shape[0])


def test_from_pretrained_folder_offline(no_network):
    p = DigitsPipeline.from_pretrained(str(DIGITS_DIR))
    assert p.unet.config.num_class_embeds == 11


def test_ddim_samples_are_recognised(pipe):
    labels = [c for c in range(10) for _ in range(2)]
    g = torch.Generator().manual_seed(1234)
    x = pipe(prompt=labels, num_inference_steps=30, generator=g, output_type="latent").images
    assert x.shape == (20, 1, 16, 16) and torch.isfinite(x).all()
    acc = class_accuracy(x, labels)
    assert acc >= 0.7, acc


def test_other_schedulers_plug_in(pipe):
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    labels = list(range(10))
    for cls in (DPMSolverMultistepScheduler, EulerDiscreteScheduler):
        sched = cls.from_config(pipe.scheduler.config)
        p = DigitsPipeline(unet=pipe.unet, scheduler=sched)
        p.set_progress_bar_config(disable=True)
        x = p(prompt=labels, num_inference_steps=12, generator=torch.Generator().manual_seed(0),
              output_type="latent").images
        assert torch.isfinite(x).all()
        assert class_accuracy(x, labels) >= 0.6, cls.__name__


def test_output_types(pipe):
    kw = dict(prompt=[3, 7], num_inference_steps=2, generator=None)
    out = pipe(**kw, output_type="np")
    assert out.images.shape == (2, 16, 16, 1) and out.images.dtype.kind == "f"
    assert out.images.min() >= 0 and out.images.max() <= 1
    pt = pipe(**kw, output_type="pt").images
    assert pt.shape == (2, 1, 16, 16) and 0 <= pt.min() and pt.max() <= 1
    pil = pipe(**kw).images
    assert len(pil) == 2 and pil[0].mode == "L" and pil[0].size[0] >= 16
    (lat,) = pipe(**kw, output_type="latent", return_dict=False)
    assert lat.shape == (2, 1, 16, 16)


def test_prompt_forms_and_determinism(pipe):
    def run(**kw):
        return pipe(num_inference_steps=3, generator=torch.Generator().manual_seed(5), output_type="latent",
                    **kw).images

    ref = run(prompt=[3, 8])
    assert torch.equal(ref, run(prompt=["3", "8"]))
    assert torch.equal(ref, run(class_labels=torch.tensor([3, 8])))
    assert torch.equal(ref, run(prompt=[np.int64(3), "eight"]))
    assert torch.equal(run(prompt=4), run(prompt="4"))
    assert run(prompt=None).shape[0] == 10
    assert run(prompt=[1, 2], num_images_per_prompt=3).shape[0] == 6
    lat = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(9))
    a = pipe(prompt=[1, 2], num_inference_steps=3, latents=lat, output_type="latent").images
    b = pipe(prompt=[1, 2], num_inference_steps=3, latents=lat.clone(), output_type="latent").images
    assert torch.equal(a, b)


def test_cfg_batch_layout(pipe, monkeypatch):
    seen = []
    real = pipe.unet.forward

    def spy(sample, timestep, class_labels=None, **kw):
        seen.append((sample.shape[0], class_labels.tolist()))
        return real(sample, timestep, class_labels=class_labels, **kw)

    monkeypatch.setattr(pipe.unet, "forward", spy)
    pipe(prompt=[2, 5], num_inference_steps=2, guidance_scale=3.0, output_type="latent")
    assert seen == [(4, [NULL_CLASS, NULL_CLASS, 2, 5])] * 2  # unconditional half first
    seen.clear()
    pipe(prompt=[2, 5], negative_prompt=7, num_inference_steps=1, guidance_scale=3.0, output_type="latent")
    assert seen == [(4, [7, 7, 2, 5])]
    seen.clear()
    pipe(prompt=[2, 5], num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    assert seen == [(2, [2, 5])]


@pytest.mark.parametrize("bad", [10, -1, "a", "12", 3.0, True, [1, 11], [], None])
def test_bad_class_label(pipe, bad):
    if bad is None:  # prompt and class_labels both given
        with pytest.raises(ValueError):
            pipe(prompt=1, class_labels=1, num_inference_steps=1)
        return
    with pytest.raises(ValueError):
        pipe(prompt=bad, num_inference_steps=1)


def test_bad_arguments(pipe):
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(prompt=1, num_inference_steps=0)
    with pytest.raises(ValueError, match="output_type"):
        pipe(prompt=1, num_inference_steps=1, output_type="jpeg")
    with pytest.raises(ValueError, match="latents"):
        pipe(prompt=[1, 2], num_inference_steps=1, latents=torch.zeros(3, 1, 16, 16))
    with pytest.raises(ValueError, match="negative_prompt"):
        pipe(prompt=[1, 2, 3], negative_prompt=[1, 2], num_inference_steps=1)


def _copy(tmp_path):
    dst = tmp_path / "digits"
    shutil.copytree(DIGITS_DIR, dst)
    return dst


@pytest.mark.parametrize("keep_checksums", [True, False])
def test_truncated_unet_weights(tmp_path, keep_checksums):
    folder = _copy(tmp_path)
    if not keep_checksums:
        (folder / D.CHECKSUMS_NAME).unlink()
    w = folder / "unet" / D.WEIGHTS_NAME
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors"):
        load_digits_pipeline(path=folder)
    w.write_bytes(data[:5])
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors"):
        load_digits_pipeline(path=folder)


def test_bitflip_detected_by_checksum(tmp_path):
    folder = _copy(tmp_path)
    w = folder / "unet" / D.WEIGHTS_NAME
    data = bytearray(w.read_bytes())
    data[-100] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        load_digits_pipeline(path=folder)


def test_corrupted_classifier_and_stats(tmp_path):
    folder = _copy(tmp_path)
    (folder / D.CHECKSUMS_NAME).unlink()
    c = folder / "classifier" / D.CLASSIFIER_WEIGHTS_NAME
    c.write_bytes(c.read_bytes()[:100])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_digits_classifier(path=folder)
    (folder / D.FEATURE_STATS_NAME).write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="feature_stats"):
        digits_reference_stats(path=folder)
    (folder / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_digits_pipeline(path=folder)


def test_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_digits_pipeline(path=tmp_path / "nope")

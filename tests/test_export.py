"""Tests of olss_fast.export: ONNX export of the fixed-step OLSS loop, the onnxruntime-only runner, the
``onnxruntime`` / ``tensorrt`` backends of compile_olss_pipeline and ``olss-fast export``.

References (independent of the export code):
* the eager runner ``compile_olss_pipeline(pipe, schedule, backend="eager")`` (itself tested against diffusers);
* diffusers' own pipeline ``__call__`` with ``OLSSScheduler`` (same schedule, same noise);
* the torch UNet forward for the UNet cut back out of the ONNX loop (the TensorRT engine's source).
Models: the tiny random Stable Diffusion pipeline (``olss_fast.testing.tiny_sd_pipeline``) and the bundled digits
model. TensorRT is not installable here: its tests cover the cache keys, the missing-package error and the engine
build plumbing against a recording stand-in for the ``tensorrt`` module.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from olss_fast.export import onnx_export  # noqa: E402
from olss_fast.export.graph import extract_unet_model
from olss_fast.export.onnx_export import export_onnx  # noqa: E402
from olss_fast.export import onnx_runner as onnx_runner_module  # noqa: E402
from olss_fast.export.onnx_runner import OnnxOLSSRunner, manifest_digest  # noqa: E402
from olss_fast.serve.runner import compile_olss_pipeline  # noqa: E402
from olss_fast.core.schedule import OLSSSchedule  # noqa: E402
from olss_fast.serve.scheduler import OLSSScheduler  # noqa: E402
from helpers import assert_close_scaled, perturbed  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

RUNNER_FILE = Path(onnx_runner_module.__file__).resolve()  # the installed package's file (or the checkout's)
SD_PROMPTS = ["a cat", "the dog 7"]
DIGITS = [3, 1, 4, 9]
# measured on this CPU (float32, ORT 1.32 vs torch 2.13 eager): images <= 3e-5 (digits), <= 2e-6 (tiny SD)
ATOL_IMAGE = 1e-4  # images in [0, 1]
REL_LATENT = 1e-5  # latents are unnormalised (|x| up to ~25): max-norm relative error, float32 rounding of the loop
ATOL_FP16 = 2e-2  # float16 export vs float32 eager (measured <= 4e-3)


@pytest.fixture(scope="module")
def so() -> Any:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return opts


# ================================================================================================ models, schedules
def ddim(pipe: Any, n: int) -> OLSSSchedule:
    return OLSSScheduler.from_config(pipe.scheduler.config).ddim_schedule(n)


@pytest.fixture(scope="module")
def sd_pipe() -> Any:
    from olss_fast.testing import tiny_sd_pipeline

    return tiny_sd_pipeline(seed=0)


@pytest.fixture(scope="module")
def digits_pipe() -> Any:
    from olss_fast.models.digits import load_digits_pipeline

    try:
        return load_digits_pipeline()
    except ValueError as exc:  # pragma: no cover - the weights ship with the package
        pytest.skip(f"bundled digits weights not available: {exc}")


@pytest.fixture(scope="module")
def sd_sched(sd_pipe: Any) -> OLSSSchedule:
    return perturbed(ddim(sd_pipe, 4), seed=3, channels=4)  # per-channel coefficients


@pytest.fixture(scope="module")
def digits_sched(digits_pipe: Any) -> OLSSSchedule:
    # global coefficients; timesteps off the DDIM grid after step 0, as timestep_shift=True fits them
    s = perturbed(ddim(digits_pipe, 5), seed=4)
    return dataclasses.replace(s, timesteps=[s.timesteps[0]] + [t - 13 for t in s.timesteps[1:]])


@pytest.fixture(scope="module")
def sd_export(sd_pipe: Any, sd_sched: OLSSSchedule, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return export_onnx(sd_pipe, sd_sched, tmp_path_factory.mktemp("sd") / "export", batch_size=2,
                       guidance_scale=5.0)


@pytest.fixture(scope="module")
def digits_export(digits_pipe: Any, digits_sched: OLSSSchedule, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return export_onnx(digits_pipe, digits_sched, tmp_path_factory.mktemp("digits") / "export", batch_size=4,
                       guidance_scale=2.0)


def sd_ids(pipe: Any, prompts: list[str]) -> np.ndarray:
    tok = pipe.tokenizer
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="np").input_ids


def noise_for(shape: tuple, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def folder_digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ================================================================================================ numerics
def test_sd_export_matches_eager_and_diffusers(sd_pipe: Any, sd_sched: OLSSSchedule, sd_export: Any,
                                               so: Any) -> None:
    runner = sd_export.runner(session_options=so)
    assert runner.has_text_encoder and runner.latent_shape == (2, 4, 8, 8) and runner.guided
    lat = noise_for(runner.latent_shape, seed=1)
    eager = compile_olss_pipeline(sd_pipe, sd_sched, backend="eager", guidance_scale=5.0)
    ref = eager(SD_PROMPTS, latents=lat, output_type="np").images
    ref_lat = eager(SD_PROMPTS, latents=lat, output_type="latent").images
    ids = sd_ids(sd_pipe, SD_PROMPTS)
    out = runner(input_ids=ids, noise=lat.numpy())
    assert out.shape == ref.shape == (2, 16, 16, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=ATOL_IMAGE, rtol=0)
    assert_close_scaled(runner(input_ids=ids, noise=lat.numpy(), output_type="latent"), ref_lat, REL_LATENT,
                        what="ONNX latents vs eager")
    assert np.abs(ref - 0.5).max() > 0.01  # not a trivially constant image
    # diffusers' own loop with the OLSSScheduler: an independent reference
    sd_pipe.scheduler, saved = OLSSScheduler.from_schedules([sd_sched], config=sd_pipe.scheduler.config), \
        sd_pipe.scheduler
    try:
        dref = sd_pipe(SD_PROMPTS, num_inference_steps=4, guidance_scale=5.0, latents=lat, output_type="np").images
    finally:
        sd_pipe.scheduler = saved
    np.testing.assert_allclose(out, dref, atol=ATOL_IMAGE, rtol=0)
    # embeddings instead of ids (text encoder skipped), negative prompt as ids
    with torch.no_grad():
        pos, neg = sd_pipe.encode_prompt(SD_PROMPTS, "cpu", 1, True, ["7", "abc"])
    a = runner(embeddings=torch.cat([neg, pos]).numpy(), noise=lat.numpy())
    b = runner(input_ids=ids, negative_input_ids=sd_ids(sd_pipe, ["7", "abc"]), noise=lat.numpy())
    ref_neg = eager(SD_PROMPTS, negative_prompt=["7", "abc"], latents=lat, output_type="np").images
    np.testing.assert_allclose(a, ref_neg, atol=ATOL_IMAGE, rtol=0)
    np.testing.assert_allclose(b, ref_neg, atol=ATOL_IMAGE, rtol=0)
    assert np.abs(ref_neg - ref).max() > 1e-3


def test_digits_export_matches_eager(digits_pipe: Any, digits_sched: OLSSSchedule, digits_export: Any,
                                     so: Any) -> None:
    runner = digits_export.runner(session_options=so)
    assert not runner.has_text_encoder and runner.guidance_scale == 2.0 and runner.latent_shape == (4, 1, 16, 16)
    lat = noise_for(runner.latent_shape, seed=2)
    eager = compile_olss_pipeline(digits_pipe, digits_sched, backend="eager", guidance_scale=2.0)
    ref = eager(DIGITS, latents=lat, output_type="np").images
    out = runner(input_ids=DIGITS, noise=lat.numpy())
    assert out.shape == (4, 16, 16, 1)
    np.testing.assert_allclose(out, ref, atol=ATOL_IMAGE, rtol=0)
    err = float(np.abs(out - ref).max())
    assert err < ATOL_IMAGE
    # a negative class instead of the null class; one label broadcast to the batch
    ref7 = eager(DIGITS, negative_prompt=7, latents=lat, output_type="np").images
    np.testing.assert_allclose(runner(input_ids=DIGITS, negative_input_ids=7, noise=lat.numpy()), ref7,
                               atol=ATOL_IMAGE, rtol=0)
    ref5 = eager([5] * 4, latents=lat, output_type="np").images
    np.testing.assert_allclose(runner(input_ids=5, noise=lat.numpy()), ref5, atol=ATOL_IMAGE, rtol=0)


def test_extracted_unet_matches_torch(digits_pipe: Any, digits_export: Any, so: Any) -> None:
    """The one-call UNet cut out of the ONNX loop (what TensorRT builds from) == the torch UNet."""
    model = extract_unet_model(onnx.load(str(digits_export.file("denoise"))))
    onnx.checker.check_model(model, full_check=True)
    n_unet_params = len(digits_pipe.unet.state_dict())
    assert len(model.graph.initializer) <= n_unet_params + 64  # the weights (+ exporter constants), nothing else
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = noise_for((8, 1, 16, 16), seed=5)
    labels = torch.tensor([0, 1, 2, 3, 10, 10, 10, 10])
    for t in (999, 401, 1):
        got = sess.run(None, {"olss/unet_sample": x.numpy(), "olss/unet_timestep": np.array(t, dtype=np.int64),
                              "class_labels": labels.numpy()})[0]
        with torch.no_grad():
            want = digits_pipe.unet(x, torch.tensor(t), class_labels=labels).sample
        np.testing.assert_allclose(got, want.numpy(), atol=2e-5, rtol=1e-4)


# ================================================================================================ format
def test_files_metadata_and_static_shapes(sd_export: Any, sd_sched: OLSSSchedule) -> None:
    from olss_fast import __version__

    m = sd_export.manifest
    assert set(m["components"]) == {"text_encoder", "denoise", "decoder"}
    assert m["exporter"] == onnx_export.EXPORTER_TORCHSCRIPT
    for name in m["components"]:
        path = sd_export.file(name)
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        for v in list(inferred.graph.input) + list(inferred.graph.output):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            assert all(isinstance(d, int) and d > 0 for d in dims), (name, v.name, dims)
        meta = {p.key: p.value for p in model.metadata_props}
        assert json.loads(meta["olss_fast.schedule"]) == json.loads(json.dumps(sd_sched.to_dict()))
        assert float(meta["olss_fast.guidance_scale"]) == 5.0
        assert meta["olss_fast.dtype"] == "float32" and meta["olss_fast.version"] == __version__
        assert meta["olss_fast.exporter"] == onnx_export.EXPORTER_TORCHSCRIPT
        assert meta["olss_fast.component"] == name and meta["olss_fast.cache_key"] == m["cache_key"]
        shapes = json.loads(meta["olss_fast.shapes"])
        assert shapes["latents"] == [2, 4, 8, 8] and shapes["encoder_hidden_states"] == [4, 16, 16]
    den = onnx.load(str(sd_export.file("denoise")))
    assert [n.op_type for n in den.graph.node] == ["Cast", "ConstantOfShape", "Loop", "Cast"]
    coeffs = {t.name: t for t in den.graph.initializer}["olss/coeffs"]
    np.testing.assert_allclose(onnx.numpy_helper.to_array(coeffs), sd_sched.coeffs.numpy(), rtol=1e-7)
    assert m["image_shape"] == [2, 3, 16, 16]
    assert (sd_export.path / "olss_onnx_runner.py").read_bytes() == RUNNER_FILE.read_bytes()


def test_default_guidance_and_keys(digits_pipe: Any, digits_sched: OLSSSchedule, sd_pipe: Any,
                                   sd_sched: OLSSSchedule) -> None:
    from olss_fast.export.plan import plan_export
    from olss_fast.models.digits import DEFAULT_GUIDANCE_SCALE

    plan = plan_export(digits_pipe, digits_sched)
    assert plan.guidance_scale == DEFAULT_GUIDANCE_SCALE and plan.uncond_ids == 10 and plan.cond[0].shape == (2,)
    assert plan_export(sd_pipe, sd_sched).guidance_scale == 7.5
    keys = {plan.key, plan_export(digits_pipe, digits_sched, guidance_scale=1.0).key,
            plan_export(digits_pipe, digits_sched, batch_size=2).key,
            plan_export(digits_pipe, perturbed(digits_sched, seed=2)).key,
            plan_export(digits_pipe, digits_sched, dtype="float16").key}
    assert len(keys) == 5 and plan_export(digits_pipe, digits_sched).key == plan.key
    unguided = plan_export(digits_pipe, digits_sched, guidance_scale=1.0)
    assert not unguided.guided and unguided.cond[0].shape == (1,)


def test_weights_stored_once(digits_pipe: Any, tmp_path: Path) -> None:
    """The ONNX loop holds one copy of the UNet: initializers and file size do not grow with the step count."""
    param_bytes = sum(t.numel() * t.element_size() for t in digits_pipe.unet.state_dict().values())
    sizes, inits, convs = {}, {}, {}
    for n in (2, 6):
        ex = export_onnx(digits_pipe, ddim(digits_pipe, n), tmp_path / f"n{n}", batch_size=1)
        model = onnx.load(str(ex.file("denoise")))
        sizes[n] = ex.file("denoise").stat().st_size
        inits[n] = sorted(t.name for t in model.graph.initializer if not t.name.startswith("olss/"))
        body = next(a.g for nd in model.graph.node if nd.op_type == "Loop" for a in nd.attribute if a.name == "body")
        convs[n] = sum(nd.op_type == "Conv" for nd in body.node)
    assert inits[2] == inits[6]
    assert convs[2] == convs[6] == sum(isinstance(m, torch.nn.Conv2d) for m in digits_pipe.unet.modules())
    assert abs(sizes[6] - sizes[2]) < 4096  # only the coefficients/timesteps differ
    assert param_bytes < sizes[6] < 1.1 * param_bytes  # one copy of the weights, not n


def test_export_is_deterministic_and_cached(digits_pipe: Any, digits_sched: OLSSSchedule, digits_export: Any,
                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    again = export_onnx(digits_pipe, digits_sched, tmp_path / "again", batch_size=4, guidance_scale=2.0)
    assert not again.reused
    assert folder_digests(again.path) == folder_digests(digits_export.path)  # byte-identical files
    calls: list[str] = []
    real = onnx_export._torch_export

    def counting(*args: Any, **kwargs: Any) -> str:
        calls.append(type(args[0]).__name__)
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "_torch_export", counting)
    reused = export_onnx(digits_pipe, digits_sched, tmp_path / "again", batch_size=4, guidance_scale=2.0)
    assert reused.reused and calls == [] and reused.cache_key == again.cache_key
    # another schedule into the same folder: refused, or replaced with overwrite=True
    other = perturbed(digits_sched, seed=11)
    with pytest.raises(ValueError, match="another model, schedule"):
        export_onnx(digits_pipe, other, tmp_path / "again", batch_size=4, guidance_scale=2.0)
    assert calls == []
    replaced = export_onnx(digits_pipe, other, tmp_path / "again", batch_size=4, guidance_scale=2.0,
                           overwrite=True)
    assert not replaced.reused and calls == ["DigitsUNet", "DigitsDecoder"]
    assert replaced.cache_key != again.cache_key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no staging/old folders left behind


def test_external_data_for_large_models(digits_pipe: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        so: Any) -> None:
    """Weights beyond the threshold go to one side file (how >2 GB models are stored); the runner still works."""
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 1024)
    sched = ddim(digits_pipe, 3)
    ex = export_onnx(digits_pipe, sched, tmp_path / "ext", batch_size=2, guidance_scale=2.0)
    entry = ex.manifest["components"]["denoise"]
    assert entry["external_data"][0]["file"] == "denoise.onnx.data"
    assert (ex.path / "denoise.onnx").stat().st_size < 200_000 < (ex.path / "denoise.onnx.data").stat().st_size
    lat = noise_for((2, 1, 16, 16), seed=8)
    ref = compile_olss_pipeline(digits_pipe, sched, backend="eager", guidance_scale=2.0)(
        [0, 8], latents=lat, output_type="np").images
    np.testing.assert_allclose(ex.runner(session_options=so)(input_ids=[0, 8], noise=lat.numpy()), ref,
                               atol=ATOL_IMAGE, rtol=0)
    data = ex.path / "denoise.onnx.data"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        OnnxOLSSRunner(ex.path)


def test_fp16_export_uses_fallback_exporter_where_needed(sd_pipe: Any, tmp_path: Path, so: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """float16 export, and the fallback: a TorchScript graph that fails ``onnx.checker`` (as transformers 5's CLIP in
    float16 does, with mixed-type LayerNormalization inputs; transformers 4's passes) is replaced by the dynamo
    exporter's. The checker is made to refuse the first text-encoder graph, so the fallback runs whatever the
    installed versions; the images of the mixed export still match the eager runner."""
    real_check, refused = onnx.checker.check_model, []

    def check_model(model: Any, *args: Any, **kwargs: Any) -> None:
        if str(model).endswith("text_encoder.onnx") and not refused:
            refused.append(model)
            raise onnx.checker.ValidationError("mixed-type LayerNormalization inputs (as transformers 5's fp16 CLIP)")
        real_check(model, *args, **kwargs)

    monkeypatch.setattr(onnx.checker, "check_model", check_model)
    sched = ddim(sd_pipe, 3)
    ex = export_onnx(sd_pipe, sched, tmp_path / "fp16", batch_size=1, guidance_scale=3.0, dtype=torch.float16)
    assert len(refused) == 1
    assert sd_pipe.unet.dtype == torch.float32  # the pipeline itself is not converted
    comps = ex.manifest["components"]
    assert comps["text_encoder"]["exporter"] == onnx_export.EXPORTER_DYNAMO
    assert comps["denoise"]["exporter"] == onnx_export.EXPORTER_TORCHSCRIPT
    den = onnx.load(str(ex.file("denoise")))
    assert den.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    runner = ex.runner(session_options=so)
    lat = noise_for(runner.latent_shape, seed=3)
    ref = compile_olss_pipeline(sd_pipe, sched, backend="eager", guidance_scale=3.0)(
        SD_PROMPTS[:1], latents=lat, output_type="np").images
    out = runner(input_ids=sd_ids(sd_pipe, SD_PROMPTS[:1]), noise=lat.numpy())
    np.testing.assert_allclose(out, ref, atol=ATOL_FP16, rtol=0)


# ================================================================================================ torch-free runner
_BLOCKER = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "diffusers", "transformers", "olss_fast"):
            raise ImportError(f"blocked import of {name}")
        return None
sys.meta_path.insert(0, _Block())
"""


def test_runner_needs_no_torch(digits_pipe: Any, digits_sched: OLSSSchedule, digits_export: Any,
                               tmp_path: Path) -> None:
    lat = noise_for((4, 1, 16, 16), seed=6)
    np.save(tmp_path / "noise.npy", lat.numpy())
    script = _BLOCKER + textwrap.dedent(f"""
        import importlib.util, numpy as np
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("torch was importable")
        noise = np.load({str(tmp_path / 'noise.npy')!r})
        # 1) the copy shipped in the export folder
        sys.path.insert(0, {str(digits_export.path)!r})
        from olss_onnx_runner import OnnxOLSSRunner
        runner = OnnxOLSSRunner({str(digits_export.path)!r})
        np.save({str(tmp_path / 'a.npy')!r}, runner(input_ids={DIGITS!r}, noise=noise))
        # 2) the package file, loaded by path
        spec = importlib.util.spec_from_file_location("by_path", {str(RUNNER_FILE)!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        runner_b = mod.OnnxOLSSRunner({str(digits_export.path)!r})
        np.save({str(tmp_path / 'b.npy')!r}, runner_b(input_ids={DIGITS!r}, noise=noise))
        bad = [m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers", "olss_fast")]
        assert not bad, bad
        print("ok")
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]
    ref = compile_olss_pipeline(digits_pipe, digits_sched, backend="eager", guidance_scale=2.0)(
        DIGITS, latents=lat, output_type="np").images
    for name in ("a.npy", "b.npy"):
        np.testing.assert_allclose(np.load(tmp_path / name), ref, atol=ATOL_IMAGE, rtol=0)


# ================================================================================================ errors
def test_bad_inputs(sd_pipe: Any, digits_pipe: Any, digits_sched: OLSSSchedule, digits_export: Any,
                    tmp_path: Path) -> None:
    from diffusers import DDPMPipeline, UNet2DModel

    from olss_fast.testing import tiny_sdxl_pipeline

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="other content"):
        export_onnx(digits_pipe, digits_sched, junk, overwrite=True)
    assert [p.name for p in junk.iterdir()] == ["notes.txt"]
    with pytest.raises(ValueError, match="num_inference_steps=4 but the schedule has 5 steps"):
        export_onnx(digits_pipe, digits_sched, tmp_path / "a", num_inference_steps=4)
    two = OLSSScheduler.from_schedules([ddim(digits_pipe, 3), digits_sched], config=digits_pipe.scheduler.config)
    with pytest.raises(ValueError, match=r"holds searched schedules for \[3, 5\] steps, not 4"):
        export_onnx(digits_pipe, two, tmp_path / "a", num_inference_steps=4)
    with pytest.raises(ValueError, match="choose one with num_inference_steps"):
        export_onnx(digits_pipe, two, tmp_path / "a")
    with pytest.raises(ValueError, match="per-channel coefficients for 4 channels"):
        export_onnx(digits_pipe, perturbed(digits_sched, seed=1, channels=4), tmp_path / "a")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        export_onnx(digits_pipe, digits_sched, tmp_path / "a", batch_size=0)
    with pytest.raises(ValueError, match="unsupported export dtype"):
        export_onnx(digits_pipe, digits_sched, tmp_path / "a", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="16x16"):
        export_onnx(digits_pipe, digits_sched, tmp_path / "a", height=32, width=32)
    with pytest.raises(ValueError, match="StableDiffusionXLPipeline"):
        export_onnx(tiny_sdxl_pipeline(), None, tmp_path / "a")
    ddpm = DDPMPipeline(unet=UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                         down_block_types=("DownBlock2D", "DownBlock2D"),
                                         up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4),
                        scheduler=sd_pipe.scheduler)
    with pytest.raises(ValueError, match="DDPMPipeline is not supported by the OLSS runtime; supported pipelines: "
                                         "StableDiffusionPipeline"):
        export_onnx(ddpm, digits_sched, tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk"]  # nothing was written

    # the runner: wrong shapes, truncated/corrupted files, a broken manifest
    runner = OnnxOLSSRunner(digits_export.path)
    with pytest.raises(ValueError, match=r"`noise` has shape \[2, 1, 16, 16\] but this export expects"):
        runner(input_ids=DIGITS, noise=np.zeros((2, 1, 16, 16), np.float32))
    with pytest.raises(ValueError, match=r"class labels outside \[0, 11\)"):
        runner(input_ids=[1, 2, 3, 11], noise=np.zeros(runner.latent_shape, np.float32))
    with pytest.raises(ValueError, match="negative_input_ids"):
        runner(input_ids=DIGITS, negative_input_ids=-1, noise=np.zeros(runner.latent_shape, np.float32))
    with pytest.raises(ValueError, match="exactly one of"):
        runner(noise=np.zeros(runner.latent_shape, np.float32))
    with pytest.raises(ValueError, match="class labels as `input_ids`"):
        runner(embeddings=np.zeros((8, 4, 4), np.float32), noise=np.zeros(runner.latent_shape, np.float32))
    for name in ("truncated", "rehashed", "manifest"):
        broken = tmp_path / f"broken_{name}"
        shutil.copytree(digits_export.path, broken)
        den = broken / "denoise.onnx"
        if name == "manifest":
            (broken / "manifest.json").write_text('{"format": "olss_fast.onnx_exp')
            with pytest.raises(ValueError, match="manifest.json is unreadable or corrupted"):
                OnnxOLSSRunner(broken)
            continue
        den.write_bytes(den.read_bytes()[: den.stat().st_size // 2])
        if name == "truncated":
            with pytest.raises(ValueError, match=r"denoise: file .* has \d+ bytes but the export wrote \d+ \(trunc"):
                OnnxOLSSRunner(broken)
        else:  # the manifest agrees with the damaged file: onnxruntime's own load error is wrapped
            man = json.loads((broken / "manifest.json").read_text())
            man["components"]["denoise"].update(bytes=den.stat().st_size,
                                                sha256=hashlib.sha256(den.read_bytes()).hexdigest())
            (broken / "manifest.json").write_text(json.dumps(man))
            with pytest.raises(ValueError, match="does not match its manifest_sha256"):
                OnnxOLSSRunner(broken)
            man["manifest_sha256"] = manifest_digest(man)  # re-signed too
            (broken / "manifest.json").write_text(json.dumps(man))
            with pytest.raises(ValueError, match=r"onnxruntime [\d.]+ cannot load .*denoise.onnx \(truncated or corrupted\?\)"):
                OnnxOLSSRunner(broken)
    with pytest.raises(ValueError, match="is not an olss_fast ONNX export"):
        OnnxOLSSRunner(junk)


def test_failure_mid_export_leaves_nothing(sd_pipe: Any, sd_sched: OLSSSchedule, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("simulated crash after the text encoder was written")

    monkeypatch.setattr(onnx_export, "build_denoise_model", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        export_onnx(sd_pipe, sd_sched, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []  # neither the target nor a staging folder
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RuntimeError, match="simulated crash"):
        export_onnx(sd_pipe, sd_sched, empty)
    assert [p.name for p in tmp_path.iterdir()] == ["empty"] and list(empty.iterdir()) == []


# ================================================================================================ compile backends
def test_compile_backend_onnxruntime(sd_pipe: Any, sd_sched: OLSSSchedule, digits_pipe: Any,
                                     digits_sched: OLSSSchedule, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from olss_fast.export.backends import OnnxRuntimeBackend

    cache = tmp_path / "cache"
    fast = compile_olss_pipeline(sd_pipe, sd_sched, backend="onnxruntime", guidance_scale=5.0, cache_dir=str(cache))
    eager = compile_olss_pipeline(sd_pipe, sd_sched, backend="eager", guidance_scale=5.0)
    assert isinstance(fast._program, OnnxRuntimeBackend) and fast.num_inference_steps == 4 and fast.backend == "onnxruntime"
    kw = dict(negative_prompt="7", generator=torch.Generator().manual_seed(4))
    a = fast(SD_PROMPTS, output_type="pt", **kw)
    b = eager(SD_PROMPTS, output_type="pt", negative_prompt="7", generator=torch.Generator().manual_seed(4))
    assert type(a) is type(b) and a.nsfw_content_detected is None
    torch.testing.assert_close(a.images, b.images, atol=ATOL_IMAGE, rtol=0)
    lat = noise_for((2, 4, 8, 8), seed=9)
    la, _ = fast(SD_PROMPTS, latents=lat, output_type="latent", return_dict=False)
    lb, _ = eager(SD_PROMPTS, latents=lat, output_type="latent", return_dict=False)
    assert_close_scaled(la, lb, REL_LATENT, what="onnxruntime backend latents vs eager")
    with torch.no_grad():
        pos, neg = sd_pipe.encode_prompt(SD_PROMPTS, "cpu", 1, True, ["abc", "abc"])
    ea = fast(prompt_embeds=pos, negative_prompt_embeds=neg, latents=lat, output_type="np").images  # embeds mode
    eb = eager(prompt_embeds=pos, negative_prompt_embeds=neg, latents=lat, output_type="np").images
    np.testing.assert_allclose(ea, eb, atol=ATOL_IMAGE, rtol=0)
    pil = fast(SD_PROMPTS, latents=lat).images
    assert len(pil) == 2 and pil[0].size == (16, 16)
    info = fast.cache_info()
    assert info["num_exports"] == 1 and len(info["entries"]) == 1  # one program for this signature
    # a new process (runner) with the same cache: no export at all
    calls: list[str] = []
    monkeypatch.setattr(onnx_export, "_torch_export", lambda *a, **k: calls.append("x"))  # type: ignore[func-returns-value]
    again = compile_olss_pipeline(sd_pipe, sd_sched, backend="onnxruntime", guidance_scale=5.0, cache_dir=str(cache))
    c = again(SD_PROMPTS, output_type="pt", **dict(kw, generator=torch.Generator().manual_seed(4)))
    assert calls == [] and again.cache_info()["num_exports"] == 0
    torch.testing.assert_close(c.images, a.images, atol=0, rtol=0)
    monkeypatch.undo()

    dig = compile_olss_pipeline(digits_pipe, digits_sched, backend="onnxruntime", guidance_scale=2.0,
                                cache_dir=str(cache))
    dig_eager = compile_olss_pipeline(digits_pipe, digits_sched, backend="eager", guidance_scale=2.0)
    lat = noise_for((3, 1, 16, 16), seed=10)
    for output_type in ("np", "pt", "latent"):
        x = dig(["three", 1, 4], latents=lat, output_type=output_type).images
        y = dig_eager(["three", 1, 4], latents=lat, output_type=output_type).images
        assert type(x) is type(y)
        if output_type == "latent":  # unnormalised (|x| up to ~25): relative to the largest value
            assert_close_scaled(torch.as_tensor(np.asarray(x)), torch.as_tensor(np.asarray(y)), REL_LATENT,
                                what="onnxruntime backend latents vs eager")
        else:
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=ATOL_IMAGE, rtol=0)
    with pytest.raises(ValueError, match="5-step schedule"):
        dig(DIGITS, num_inference_steps=4)


def test_tensorrt_backend_without_tensorrt(sd_pipe: Any, sd_sched: OLSSSchedule, digits_pipe: Any,
                                           digits_sched: OLSSSchedule, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:  # pragma: no cover - not installable here
        pytest.skip("tensorrt is installed")
    from olss_fast.cli import main
    from olss_fast.export.tensorrt import export_tensorrt

    with pytest.raises(RuntimeError, match=r"needs the `tensorrt` package"):
        compile_olss_pipeline(sd_pipe, sd_sched, backend="tensorrt", cache_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match=r"`tensorrt`"):
        export_tensorrt(digits_pipe, digits_sched, tmp_path / "trt")
    sched_file = tmp_path / "s.json"
    digits_sched.save(sched_file)
    rc = main(["export", "--pipeline", "digits", "--scheduler", str(sched_file), "--format", "tensorrt",
               "--out", str(tmp_path / "trt")])
    assert rc == 2 and "`tensorrt`" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]


# ================================================================================================ TensorRT plumbing
def test_engine_cache_keys(sd_export: Any, digits_export: Any, tmp_path: Path) -> None:
    from olss_fast.export.tensorrt import engine_cache_key, engine_paths

    base = dict(model_sha256="a" * 64, schedule_sha256="b" * 64, shapes={"x": [1, 4, 64, 64]}, dtype="float16",
                trt_version="10.3.0", gpu_name="NVIDIA H100 80GB HBM3")
    k = engine_cache_key(**base)
    assert k == engine_cache_key(**dict(base)) and len(k) == 64
    changed = [dict(base, model_sha256="c" * 64), dict(base, schedule_sha256="d" * 64),
               dict(base, shapes={"x": [2, 4, 64, 64]}), dict(base, dtype="float32"),
               dict(base, trt_version="10.4.0"), dict(base, gpu_name="NVIDIA A100-SXM4-80GB")]
    keys = {engine_cache_key(**c) for c in changed} | {engine_cache_key(**base, fp16=False)}
    assert len(keys) == 7 and k not in keys
    with pytest.raises(ValueError, match="gpu_name"):
        engine_cache_key(**dict(base, gpu_name=""))
    sd = engine_paths(sd_export.path, tmp_path, trt_version="10.3.0", gpu_name="gpu")
    dg = engine_paths(digits_export.path, tmp_path, trt_version="10.3.0", gpu_name="gpu")
    assert set(sd) == {"text_encoder", "unet", "decoder"} and set(dg) == {"unet", "decoder"}
    assert sd["unet"][1] != dg["unet"][1] and sd["unet"][0].name.startswith("unet-")
    assert engine_paths(sd_export.path, tmp_path, trt_version="10.3.0", gpu_name="gpu") == sd
    assert engine_paths(sd_export.path, tmp_path, trt_version="10.3.0", gpu_name="other")["unet"] != sd["unet"]


class _FakeTRT:
    """A recording stand-in for the parts of the ``tensorrt`` module that building engines uses (no GPU needed).

    Its parser loads the ONNX file with onnx and checks it, so the test sees exactly what TensorRT would be given.
    TensorRT itself is exercised only through this fake: no test builds or runs a real engine, so engine building
    with the real module, the ``tensorrt`` backend and its outputs are not verified by the suite on any machine
    (benchmarks/gpu_check.sh runs the real CUDA-graph tests, ``pytest -m gpu``, but there is no real TensorRT test).
    """

    __version__ = "10.0.fake"

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            self.level = level

    class BuilderFlag:
        FP16 = "FP16"

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    class NetworkDefinitionCreationFlag:
        EXPLICIT_BATCH = 0

    def __init__(self) -> None:
        self.parsed: list[Any] = []
        self.flags: list[str] = []
        self.builds = 0
        fake = self

        class Input:
            def __init__(self, vi: Any) -> None:
                self.name = vi.name
                self.shape = tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)

        class Network:
            inputs: list[Any] = []

            @property
            def num_inputs(self) -> int:
                return len(self.inputs)

            def get_input(self, i: int) -> Any:
                return self.inputs[i]

        class OnnxParser:
            def __init__(self, network: Any, logger: Any) -> None:
                self.network = network
                self.num_errors = 0

            def parse_from_file(self, path: str) -> bool:
                onnx.checker.check_model(path, full_check=True)
                model = onnx.load(path)
                fake.parsed.append(model)
                self.network.inputs = [Input(v) for v in model.graph.input]
                return True

        class Config:
            def set_flag(self, flag: str) -> None:
                fake.flags.append(flag)

            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                pass

        class Builder:
            def __init__(self, logger: Any) -> None:
                pass

            def create_network(self, flags: int) -> Any:
                return Network()

            def create_builder_config(self) -> Any:
                return Config()

            def build_serialized_network(self, network: Any, config: Any) -> bytes:
                fake.builds += 1
                return b"engine:" + ",".join(i.name for i in network.inputs).encode()

        self.Builder, self.OnnxParser = Builder, OnnxParser


def test_build_engines_plumbing_with_a_stand_in(sd_export: Any, tmp_path: Path, so: Any) -> None:
    from olss_fast.export.tensorrt import build_engines

    fake = _FakeTRT()
    engines = build_engines(sd_export.path, tmp_path / "engines", gpu_name="Fake GPU", trt=fake)
    assert set(engines) == {"text_encoder", "unet", "decoder"} and fake.builds == 3
    assert fake.flags == ["FP16"] * 3
    unet = next(m for m in fake.parsed if m.graph.name == "olss_unet")  # the UNet cut out of the loop
    assert [i.name for i in unet.graph.input] == ["olss/unet_sample", "olss/unet_timestep", "encoder_hidden_states"]
    assert engines["unet"].read_bytes() == b"engine:olss/unet_sample,olss/unet_timestep,encoder_hidden_states"
    assert sorted(p.name for p in (tmp_path / "engines").iterdir()) == sorted(
        [p.name for p in engines.values()] + ["engines.json"])  # the temporary UNet ONNX is gone
    index = json.loads((tmp_path / "engines" / "engines.json").read_text())
    assert index["unet"]["gpu"] == "Fake GPU" and index["unet"]["tensorrt"] == "10.0.fake"
    again = build_engines(sd_export.path, tmp_path / "engines", gpu_name="Fake GPU", trt=fake)
    assert again == engines and fake.builds == 3  # cached: nothing rebuilt
    build_engines(sd_export.path, tmp_path / "engines", gpu_name="Other GPU", trt=fake)
    assert fake.builds == 6  # another GPU: new keys, new engines


# ================================================================================================ CLI
def test_cli_export(digits_pipe: Any, digits_sched: OLSSSchedule, digits_export: Any, tmp_path: Path,
                    capsys: pytest.CaptureFixture) -> None:
    from olss_fast.cli import main

    folder = tmp_path / "sched"
    OLSSScheduler.from_schedules([ddim(digits_pipe, 3), digits_sched],
                                 config=digits_pipe.scheduler.config).save_pretrained(str(folder))
    out = tmp_path / "out"
    args = ["export", "--pipeline", "digits", "--scheduler", str(folder), "--steps", "5", "--format", "onnx",
            "--out", str(out), "--batch-size", "4", "--guidance-scale", "2.0"]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    assert folder_digests(out) == folder_digests(digits_export.path)  # same as the API export
    assert main(args) == 0 and "reused" in capsys.readouterr().out
    one = tmp_path / "one.json"
    digits_sched.save(one)
    bad = ["export", "--pipeline", "digits", "--scheduler", str(one), "--steps", "4", "--out", str(tmp_path / "x")]
    assert main(bad) == 2 and "--steps 4 was requested but the schedule" in capsys.readouterr().err
    assert main(args[:-4] + ["--steps", "7"]) == 2 and "not 7" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a").write_text("x")
    junk_args = ["export", "--pipeline", "digits", "--scheduler", str(one), "--out", str(tmp_path / "junk")]
    assert main(junk_args) == 2 and "other content" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

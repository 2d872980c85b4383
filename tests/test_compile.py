"""Whole-program compilation (RuntimeConfig.compile), the persistent compile cache, channels_last, fused QKV
projections and warm-up, on CPU.

The compiled-equals-eager and second-process tests really run inductor (C++ kernels on CPU, a few minutes on two
cores); everything else checks the cache file logic with PyTorch's artefact functions stubbed.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from olss_fast.serve import compile_cache
from olss_fast.serve.compile_cache import CompileCache, cache_key
from olss_fast.pipelines.base import CallOptions
from olss_fast.core.fingerprint import model_id
from olss_fast.serve.backend import ProgramRequest
from olss_fast.serve.config import RuntimeConfig
from olss_fast.serve.runner import compile_olss_pipeline
from olss_fast.serve.scheduler import OLSSScheduler
from olss_fast.testing import tiny_sd_pipeline
from helpers import artifact_payload, assert_close_scaled, perturbed

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _ddim(pipe: Any, n: int = 3, seed: int = 1) -> Any:
    return perturbed(OLSSScheduler.from_config(pipe.scheduler.config).ddim_schedule(n), seed=seed)


def _noise(shape: tuple, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ============================================================================================ real compilation
def _worker(cache_dir: Path, inductor_dir: Path) -> dict[str, Any]:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(inductor_dir), HF_HUB_OFFLINE="1")
    env.pop("TORCHINDUCTOR_FORCE_DISABLE_CACHES", None)
    proc = subprocess.run([sys.executable, str(HERE / "compile_worker.py"), str(cache_dir)], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_compiled_program_equals_eager_and_a_second_process_loads_it(tmp_path: Path) -> None:
    """Text encoder, UNet and VAE decoder compiled (inductor) give the eager runner's images; a second process with
    an empty inductor cache compiles nothing: every FX graph is a hit from olss_fast's persistent cache."""
    cache = tmp_path / "olss_cache"
    first = _worker(cache, tmp_path / "inductor_1")
    assert first["differs_between_prompts"] > 1e-3  # the comparison below can fail
    assert first["max_diff"] <= 1e-5 * first["scale"], first
    assert first["counters"]["fxgraph_cache_miss"] >= 3 and first["counters"]["fxgraph_cache_hit"] == 0, first
    assert first["loaded"] == [] and len(first["saved"]) == 1, first
    entry = cache / "compile" / f"{first['saved'][0]}.bin"
    assert entry.is_file() and entry.stat().st_mode & 0o777 == 0o600

    second = _worker(cache, tmp_path / "inductor_2")
    assert second["max_diff"] <= 1e-5 * second["scale"], second
    assert second["loaded"] == first["saved"] and second["saved"] == [], second
    assert second["counters"] == {"fxgraph_cache_hit": first["counters"]["fxgraph_cache_miss"],
                                  "fxgraph_cache_miss": 0}, (first, second)


# ============================================================================================ the cache file
class _FakeArtifacts:
    """Stands in for torch.compiler.save/load_cache_artifacts: records what is loaded."""

    def __init__(self, payload: bytes | None = None) -> None:
        self.payload = payload if payload is not None else artifact_payload(
            [("inductor", "fabc123", b"compiled artefacts \x00\x01\x02" * 100),
             ("autotune", "ab/abcdef.best_config", b"{}")])
        self.loaded: list[bytes] = []
        self.fail = False

    def save(self) -> Any:
        return None if self.payload is None else (self.payload, compile_cache_info())

    def load(self, data: bytes) -> Any:
        if self.fail:
            raise RuntimeError("incompatible artefacts")
        assert type(data) is bytes  # inductor's cache writer takes bytes only (not a bytearray)
        self.loaded.append(bytes(data))
        return compile_cache_info()


def compile_cache_info() -> Any:
    from torch.compiler._cache import CacheInfo

    return CacheInfo()


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> _FakeArtifacts:
    f = _FakeArtifacts()
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", f.save)
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", f.load)
    return f


DESC = {"modules": {"denoiser": {"class": "X", "config_sha256": "a", "weights_sha256": "b"}},
        "program": {"inputs": [["latents", [1, 4, 8, 8], "torch.float32"]]}, "versions": {"torch": "2.x"}}


def test_cache_round_trip(tmp_path: Path, fake: _FakeArtifacts) -> None:
    cc = CompileCache(tmp_path / "c")
    key = cache_key(DESC)
    assert cc.load(key, DESC) is False and fake.loaded == []  # nothing there yet: silently False
    path = cc.save(key, DESC)
    assert path == tmp_path / "c" / f"{key}.bin" and path.stat().st_mode & 0o777 == 0o600
    assert CompileCache(tmp_path / "c").load(key, DESC) is True
    assert fake.loaded == [fake.payload]


def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "flip":
        path.write_bytes(data[:-10] + bytes([data[-10] ^ 1]) + data[-9:])
    elif how == "truncate":
        path.write_bytes(data[:-7])
    elif how == "header":
        path.write_bytes(b"{not json\n" + data.split(b"\n", 1)[1])
    elif how == "no_header":
        path.write_bytes(b"\x00" * 64)
    elif how == "foreign":
        header, payload = data.split(b"\n", 1)
        h = json.loads(header)
        h["format"] = "something.else"
        path.write_bytes(json.dumps(h).encode() + b"\n" + payload)


@pytest.mark.parametrize("how", ["flip", "truncate", "header", "no_header", "foreign"])
def test_corrupted_entry_is_ignored_with_a_warning(tmp_path: Path, fake: _FakeArtifacts, how: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    cc = CompileCache(tmp_path)
    key = cache_key(DESC)
    _corrupt(cc.save(key, DESC), how)
    with caplog.at_level(logging.WARNING, logger="olss_fast.serve.compile_cache"):
        assert cc.load(key, DESC) is False
    assert fake.loaded == []  # never handed to PyTorch
    assert "ignoring the compile cache entry" in caplog.text and "compiling from scratch" in caplog.text
    cc.save(key, DESC)  # rewritten by the next save, then usable
    assert cc.load(key, DESC) is True and fake.loaded == [fake.payload]


def test_stale_or_renamed_entries_are_ignored(tmp_path: Path, fake: _FakeArtifacts,
                                             caplog: pytest.LogCaptureFixture) -> None:
    cc = CompileCache(tmp_path)
    key = cache_key(DESC)
    path = cc.save(key, DESC)
    other = dict(DESC, versions={"torch": "9.9"})
    # an entry renamed onto another key's name, or a description that differs from the expected one
    (tmp_path / f"{cache_key(other)}.bin").write_bytes(path.read_bytes())
    os.chmod(tmp_path / f"{cache_key(other)}.bin", 0o600)
    with caplog.at_level(logging.WARNING, logger="olss_fast.serve.compile_cache"):
        assert cc.load(cache_key(other), other) is False
        assert cc.load(key, other) is False
    assert fake.loaded == [] and caplog.text.count("version (stale)") == 2


def test_unsafe_permissions_and_loader_failures_are_ignored(tmp_path: Path, fake: _FakeArtifacts,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    cc = CompileCache(tmp_path)
    key = cache_key(DESC)
    path = cc.save(key, DESC)
    os.chmod(path, 0o666)
    with caplog.at_level(logging.WARNING, logger="olss_fast.serve.compile_cache"):
        assert cc.load(key, DESC) is False
        assert "writable by other users" in caplog.text
        os.chmod(path, 0o600)
        fake.fail = True
        assert cc.load(key, DESC) is False
        assert "load_cache_artifacts failed" in caplog.text
    assert key not in cc.loaded


def test_nothing_to_save_and_unwritable_folders(tmp_path: Path, fake: _FakeArtifacts,
                                                caplog: pytest.LogCaptureFixture) -> None:
    fake.payload = None
    assert CompileCache(tmp_path / "a").save("k", DESC) is None and not (tmp_path / "a").exists()
    fake.payload = b"x"
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="olss_fast.serve.compile_cache"):
        assert CompileCache(blocker / "compile").save("k", DESC) is None
    assert "cannot write the compile cache entry" in caplog.text


# ============================================================================================ the key
def _digits_request(runner: Any, batch: int) -> ProgramRequest:
    a = runner.adapter
    prepared = a.prepare({"prompt": list(range(batch))}, True, 1, True, runner.height, runner.width, CallOptions())
    lat = torch.zeros(a.latent_shape(batch, runner.height, runner.width))
    return ProgramRequest(mode=prepared.mode, guided=True, decode=True, inputs={**prepared.inputs, "latents": lat},
                          guidance=2.0, height=runner.height, width=runner.width)


def test_cache_key_covers_models_shapes_dtype_versions_and_device(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from test_runtime import make_digits_pipe

    pipe = make_digits_pipe()
    sched = _ddim(pipe)
    runner = compile_olss_pipeline(pipe, sched, backend="eager", compile=True, cache_dir=tmp_path,
                                   guidance_scale=2.0)
    backend = runner._program

    def key(batch: int = 1, r: Any = runner) -> str:
        return cache_key(r._program._compile_description(_digits_request(r, batch)))

    desc = backend._compile_description(_digits_request(runner, 1))
    assert desc["modules"] == {"denoiser": model_id(pipe.unet)}
    assert desc["program"]["inputs"] == [["labels", [2], "torch.int64"], ["latents", [1, 1, 8, 8], "torch.float32"]]
    assert desc["dtype"] == "torch.float32" and desc["compile"] == ["text_encoder", "denoiser", "decoder"]
    assert desc["versions"]["torch"] == torch.__version__ and desc["versions"]["diffusers"]
    assert desc["device"] == {"type": "cpu", "isa": torch.backends.cpu.get_cpu_capability(),
                              "machine": __import__("platform").machine()}
    base = key()
    assert key(2) != base  # shapes
    other_mode = compile_olss_pipeline(pipe, sched, backend="eager", compile=True, cache_dir=tmp_path,
                                       guidance_scale=2.0, compile_mode="max-autotune-no-cudagraphs")
    assert key(r=other_mode) != base  # compile options
    monkeypatch.setattr(compile_cache, "environment", lambda device: {"versions": {"torch": "0"}, "device": {}})
    import olss_fast.serve.torch_backend as rt

    monkeypatch.setattr(rt, "environment", compile_cache.environment)
    assert key() != base  # software versions / device
    monkeypatch.undo()
    assert key() == base
    with torch.no_grad():
        pipe.unet.conv_in.weight.mul_(1.5)  # new weights: a new model digest
    assert key() != base
    half = make_digits_pipe().to(torch.float64)
    assert key(r=compile_olss_pipeline(half, sched, backend="eager", compile=True, cache_dir=tmp_path,
                                       guidance_scale=2.0)) != base  # dtype


# ============================================================================================ options
def test_compile_options_are_validated() -> None:
    pipe = tiny_sd_pipeline()
    sched = _ddim(pipe)
    with pytest.raises(ValueError, match=r"unknown module\(s\) \['unet'\]"):
        RuntimeConfig(compile=("unet",))
    with pytest.raises(ValueError, match="compile must be True, False or a tuple"):
        RuntimeConfig(compile=1)
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        RuntimeConfig(compile=True, compile_mode="fast")
    with pytest.raises(ValueError, match="needs compile=True"):
        RuntimeConfig(compile_mode="max-autotune-no-cudagraphs")
    with pytest.raises(ValueError, match=r"\['compile', 'fuse_qkv'\] apply to the PyTorch backends"):
        RuntimeConfig(backend="onnxruntime", compile=True, fuse_qkv=True)
    for flag in ("channels_last", "fuse_qkv", "compile_cache"):
        with pytest.raises(ValueError, match=f"{flag} must be true or false"):
            RuntimeConfig(**{flag: 1})
    with pytest.raises(ValueError, match="captures CUDA graphs of its own"):
        compile_olss_pipeline(pipe, sched, backend="cuda_graph", compile=True, compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['compile_unet'\]"):
        compile_olss_pipeline(pipe, sched, compile_unet=True)
    assert RuntimeConfig(compile="decoder").compile == ("decoder",)
    assert RuntimeConfig(compile=["decoder", "text_encoder"]).compile == ("text_encoder", "decoder")
    assert RuntimeConfig(compile=True).compile == ("text_encoder", "denoiser", "decoder")
    for bad in ([(1, 16)], [(0, 16, 16)], [(1, 16.0, 16)], "yes", []):
        with pytest.raises(ValueError, match="warm"):
            compile_olss_pipeline(pipe, sched, backend="eager", warmup=bad)


def test_channels_last_and_fused_qkv_give_the_same_images() -> None:
    from diffusers.models.attention_processor import Attention

    ref_pipe, pipe = tiny_sd_pipeline(seed=3), tiny_sd_pipeline(seed=3)
    sched = _ddim(pipe)
    lat = _noise((2, 4, 8, 8), 5)
    prompts = ["a red circle", "a blue square"]
    ref = compile_olss_pipeline(ref_pipe, sched, backend="eager", guidance_scale=4.0)(
        prompts, latents=lat, output_type="pt").images
    runner = compile_olss_pipeline(pipe, sched, backend="eager", guidance_scale=4.0, channels_last=True,
                                   fuse_qkv=True)
    attn = [m for m in pipe.unet.modules() if isinstance(m, Attention)]
    assert attn and all(m.fused_projections for m in attn)
    assert all(m.fused_projections for m in pipe.vae.modules() if isinstance(m, Attention))
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not ref_pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert model_id(pipe.unet) == model_id(ref_pipe.unet)  # the fused copies do not change the model digest
    out = runner(prompts, latents=lat, output_type="pt").images
    assert_close_scaled(out, ref, 1e-5, what="channels_last + fused QKV vs plain")
    # weights changed in place afterwards: the runner re-fuses (a stale to_qkv would ignore the change)
    with torch.no_grad():
        for p in (pipe, ref_pipe):
            first = next(m for m in p.unet.modules() if isinstance(m, Attention))
            first.to_q.weight.mul_(3.0)
            first.to_v.weight.add_(0.5)
    ref2 = compile_olss_pipeline(ref_pipe, sched, backend="eager", guidance_scale=4.0)(
        prompts, latents=lat, output_type="pt").images
    assert (ref2 - ref).abs().max() > 1e-3
    assert_close_scaled(runner(prompts, latents=lat, output_type="pt").images, ref2, 1e-5,
                        what="after an in-place weight change")


def test_fused_qkv_refuses_lora_layers_and_warns_when_nothing_fuses(caplog: pytest.LogCaptureFixture) -> None:
    peft = pytest.importorskip("peft")
    from test_runtime import make_digits_pipe

    pipe = tiny_sd_pipeline()
    pipe.unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"],
                                          init_lora_weights=False))
    with pytest.raises(ValueError, match="LoRA adapter layers"):
        compile_olss_pipeline(pipe, _ddim(pipe), backend="eager", fuse_qkv=True, allow_mismatch=("model",))
    digits = make_digits_pipe()
    with caplog.at_level(logging.WARNING, logger="olss_fast.serve.torch_backend"):
        compile_olss_pipeline(digits, _ddim(digits), backend="eager", fuse_qkv=True)
    assert "no module of this DigitsPipeline offers fuse_qkv_projections" in caplog.text


def test_warmup_shapes_build_ahead_and_new_shapes_log_once(monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    from test_runtime import _fake_graph_runner, make_digits_pipe

    pipe = make_digits_pipe()
    sched = _ddim(pipe)
    eager = compile_olss_pipeline(pipe, sched, backend="eager", guidance_scale=2.0, warmup=[(1, 8, 8), (3, 8, 8)])
    assert eager.cache_info()["builds"] == 2
    eager([1, 2, 3], latents=_noise((3, 1, 8, 8), 0), output_type="pt")
    assert eager.cache_info()["builds"] == 2 and eager.cache_info()["hits"] == 1

    graphed = _fake_graph_runner(pipe, sched, monkeypatch)  # capture/replay path with a CPU stand-in graph
    caplog.clear()  # the one-time warning about the schedule's missing provenance depends on test order
    with caplog.at_level(logging.INFO, logger="olss_fast.serve.torch_backend"):
        graphed.warmup(2)
        assert "warm-up: captures" in caplog.text and "WARNING" not in caplog.text
        caplog.clear()
        graphed([4, 5], latents=_noise((2, 1, 8, 8), 1), output_type="pt")
        assert "captures the" not in caplog.text  # warmed up: no build
        for seed in (2, 3):
            graphed([4], latents=_noise((1, 1, 8, 8), seed), output_type="pt")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "new input (latents [1, 1, 8, 8]" in warnings[0].getMessage()
    assert "warmup=[(batch, height, width)" in warnings[0].getMessage()

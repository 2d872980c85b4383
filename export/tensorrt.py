"""TensorRT engines for the exported OLSS sampler, cached on disk, run inside the fixed loop.

From an ONNX export (:func:`olss_fast.export.onnx_export.export_onnx`) this module builds static-shape engines with
TensorRT's Python API (``tensorrt.Builder`` → ``OnnxParser`` → ``BuilderFlag.FP16`` → ``build_serialized_network``):

* ``text_encoder`` from ``text_encoder.onnx`` (Stable Diffusion only);
* ``unet`` — ONE UNet call, cut out of ``denoise.onnx``'s ``Loop`` body by
  :func:`olss_fast.export.onnx_export.extract_unet_model` (TensorRT optimises a plain UNet graph far better than a
  UNet inside an ``ILoop``, and one call is what the loop repeats);
* ``decoder`` from ``decoder.onnx``.

Engines are cached as ``<component>-<key>.engine`` where the key (:func:`engine_cache_key`) hashes the ONNX
file's SHA-256, the schedule, the static shapes, the dtype, the fp16 flag, the TensorRT version and the GPU name, so
an engine is never loaded on a GPU or TensorRT version it was not built for. Writes are atomic.

:class:`TensorRTOLSSProgram` runs the sampler: [text encoder engine] → the shared loop of :mod:`olss_fast.serve.program`
(n × (UNet engine → fused OLSS step, Triton on CUDA)) → decoder engine, with every buffer static and shared between
engines (the text encoder writes straight into the UNet's conditioning input, the last step straight into the
decoder's input). The whole program is captured in one CUDA graph (``execute_async_v3`` is capturable once each
context has run once) and replayed; if capture fails it runs uncaptured, with a warning.

``tensorrt`` is imported lazily: without it every entry point raises ``RuntimeError`` naming the missing package.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from olss_fast.core.files import atomic_path, atomic_write_text, default_cache_dir
from olss_fast.export.graph import PREFIX, extract_unet_model
from olss_fast.export.onnx_export import save_model, validate_onnx_file, write_export
from olss_fast.export.onnx_runner import read_manifest
from olss_fast.export.plan import plan_export
from olss_fast.serve.cuda_graph import capture_cuda_graph
from olss_fast.serve.program import ProgramBuffers, run_loop

logger = logging.getLogger(__name__)

__all__ = [
    "ENGINE_COMPONENTS", "TensorRTEngine", "TensorRTOLSSProgram", "build_engine", "build_engines",
    "engine_cache_key", "engine_paths", "export_tensorrt", "require_tensorrt", "schedule_sha256",
]

ENGINE_COMPONENTS = ("text_encoder", "unet", "decoder")
ENGINE_INDEX_NAME = "engines.json"


def require_tensorrt() -> Any:
    """Import and return ``tensorrt``; ``RuntimeError`` naming the package when it is not installed."""
    try:
        import tensorrt
    except ImportError as exc:
        raise RuntimeError(
            "the TensorRT backend needs the `tensorrt` package (pip install 'tensorrt>=10' on a machine with an "
            f"NVIDIA GPU and a matching CUDA driver), which is not installed here ({exc}); use "
            "backend='onnxruntime', 'cuda_graph' or 'eager' instead"
        ) from None
    return tensorrt


def schedule_sha256(schedule: Mapping[str, Any]) -> str:
    """SHA-256 of a schedule's canonical JSON (``OLSSSchedule.to_dict()``)."""
    return hashlib.sha256(json.dumps(dict(schedule), sort_keys=True, allow_nan=False).encode()).hexdigest()


def engine_cache_key(*, model_sha256: str, schedule_sha256: str, shapes: Mapping[str, Any], dtype: str,
                     trt_version: str, gpu_name: str, fp16: bool = True) -> str:
    """The cache key of one engine: hex SHA-256 over everything an engine depends on.

    Args:
        model_sha256: SHA-256 of the ONNX file the engine is built from (plus its external data, if any).
        schedule_sha256: :func:`schedule_sha256` of the export's schedule.
        shapes: the engine's static input shapes ``{name: [dims]}``.
        dtype: the export's dtype (``"float32"`` / ``"float16"``).
        trt_version: ``tensorrt.__version__`` (engines are not portable across TensorRT versions).
        gpu_name: the GPU's name (engines are not portable across GPU models).
        fp16: whether ``BuilderFlag.FP16`` is set.
    """
    for what, value in (("model_sha256", model_sha256), ("schedule_sha256", schedule_sha256),
                        ("trt_version", trt_version), ("gpu_name", gpu_name)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"engine_cache_key needs a non-empty string {what}, got {value!r}")
    payload = {
        "model": model_sha256, "schedule": schedule_sha256,
        "shapes": {str(k): [int(d) for d in v] for k, v in sorted(shapes.items())},
        "dtype": str(dtype), "tensorrt": trt_version, "gpu": gpu_name, "fp16": bool(fp16), "format": 1,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ==================================================================================================== building
def build_engine(onnx_path: "str | os.PathLike[str]", engine_path: "str | os.PathLike[str]", *, fp16: bool = True,
                 workspace_bytes: Optional[int] = None, trt: Any = None) -> Path:
    """Build a static-shape engine from an ONNX file and write it (atomically) to ``engine_path``.

    Raises:
        RuntimeError: ``tensorrt`` missing, the parser rejects the model, or the build fails.
        ValueError: the network has a dynamic input shape (the exports are static).
    """
    trt = trt or require_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    flags = 0
    major = int(str(getattr(trt, "__version__", "10")).split(".")[0])
    if major < 10:  # TensorRT 8.x needs explicit batch; 10 has only explicit batch
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors}")
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        if any(int(d) < 0 for d in inp.shape):
            raise ValueError(f"{onnx_path.name}: input {inp.name} has a dynamic shape {tuple(inp.shape)}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    logger.info("building the TensorRT engine for %s (fp16=%s)", onnx_path.name, fp16)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path.name} (see TensorRT's log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    return engine_path


def _component_digest(export_dir: Path, entry: Mapping[str, Any]) -> str:
    parts = [entry["sha256"]] + [e["sha256"] for e in entry.get("external_data") or []]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _unet_shapes(manifest: Mapping[str, Any]) -> dict[str, list[int]]:
    lat = [int(v) for v in manifest["latent_shape"]]
    m = 2 * lat[0] if manifest["guided"] else lat[0]
    return {PREFIX + "unet_sample": [m] + lat[1:], PREFIX + "unet_timestep": [],
            **{str(c["name"]): [int(v) for v in c["shape"]] for c in manifest["cond_inputs"]}}


def engine_paths(export_dir: "str | os.PathLike[str]", engine_dir: "str | os.PathLike[str]", *, trt_version: str,
                 gpu_name: str, fp16: bool = True) -> dict[str, tuple[Path, str]]:
    """``{component: (engine path, cache key)}`` for an ONNX export, without building anything."""
    export_dir, engine_dir = Path(export_dir), Path(engine_dir)
    manifest = read_manifest(export_dir)
    sched = schedule_sha256(manifest["schedule"])
    out: dict[str, tuple[Path, str]] = {}
    for comp in ENGINE_COMPONENTS:
        source = "denoise" if comp == "unet" else comp
        entry = manifest["components"].get(source)
        if entry is None:
            continue
        shapes = _unet_shapes(manifest) if comp == "unet" else entry["inputs"]
        key = engine_cache_key(model_sha256=_component_digest(export_dir, entry), schedule_sha256=sched,
                               shapes=shapes, dtype=str(manifest["dtype"]), trt_version=trt_version,
                               gpu_name=gpu_name, fp16=fp16)
        out[comp] = (engine_dir / f"{comp}-{key[:24]}.engine", key)
    return out


def _gpu_name(device: Any = None) -> str:
    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT engines need an NVIDIA GPU, and torch sees no CUDA device")
    return str(torch.cuda.get_device_name(device))


def build_engines(export_dir: "str | os.PathLike[str]", engine_dir: "str | os.PathLike[str]", *, fp16: bool = True,
                  workspace_bytes: Optional[int] = None, gpu_name: Optional[str] = None,
                  trt: Any = None) -> dict[str, Path]:
    """Build (or reuse from ``engine_dir``) the engines of an ONNX export; returns ``{component: engine path}``."""
    import onnx

    trt = trt or require_tensorrt()
    export_dir, engine_dir = Path(export_dir), Path(engine_dir)
    gpu = gpu_name or _gpu_name()
    version = str(trt.__version__)
    plan = engine_paths(export_dir, engine_dir, trt_version=version, gpu_name=gpu, fp16=fp16)
    manifest = read_manifest(export_dir)
    engine_dir.mkdir(parents=True, exist_ok=True)
    built: dict[str, Path] = {}
    for comp, (path, _key) in plan.items():
        if path.is_file() and path.stat().st_size > 0:
            logger.info("reusing the cached TensorRT engine %s", path)
            built[comp] = path
            continue
        if comp == "unet":
            with tempfile.TemporaryDirectory(prefix="olss_unet_", dir=engine_dir) as tmp:
                unet = extract_unet_model(onnx.load(str(export_dir / manifest["components"]["denoise"]["file"])))
                unet_path = Path(tmp) / "unet.onnx"
                save_model(unet, unet_path)
                del unet
                validate_onnx_file(unet_path)
                build_engine(unet_path, path, fp16=fp16, workspace_bytes=workspace_bytes, trt=trt)
        else:
            source = export_dir / manifest["components"][comp]["file"]
            build_engine(source, path, fp16=fp16, workspace_bytes=workspace_bytes, trt=trt)
        built[comp] = path
    index = {comp: {"file": p.name, "key": plan[comp][1], "tensorrt": version, "gpu": gpu, "fp16": fp16}
             for comp, p in built.items()}
    atomic_write_text(engine_dir / ENGINE_INDEX_NAME, json.dumps(index, indent=1, sort_keys=True))
    return built


def export_tensorrt(pipe: Any, schedule: Any = None, out_dir: "str | os.PathLike[str] | None" = None, *,
                    fp16: bool = True, workspace_bytes: Optional[int] = None, overwrite: bool = False,
                    **export_kwargs: Any) -> tuple[Any, dict[str, Path]]:
    """ONNX export + TensorRT engines in one folder (``out_dir``: the ONNX files, ``out_dir/engines/``).

    Checks for ``tensorrt`` and a CUDA GPU before any work; written atomically like :func:`export_onnx`
    (:func:`olss_fast.export.onnx_export.write_export`, the engines built in its staging folder).
    ``export_kwargs`` go to :func:`olss_fast.export.plan.plan_export` (batch_size, height, width, guidance_scale,
    dtype, num_inference_steps, opset). Returns ``(OnnxExport, {component: engine path})``.
    """
    trt = require_tensorrt()
    gpu = _gpu_name()
    plan = plan_export(pipe, schedule, **export_kwargs)
    out = Path(out_dir) if out_dir is not None else default_cache_dir() / "tensorrt_exports" / plan.key[:24]

    def engines(folder: Path, reused: bool) -> dict[str, Path]:
        built = build_engines(folder, folder / "engines", fp16=fp16, workspace_bytes=workspace_bytes, gpu_name=gpu,
                              trt=trt)
        return {c: out / "engines" / p.name for c, p in built.items()}

    return write_export(plan, out, overwrite=overwrite, what="TensorRT export folder", finish=engines)


# ==================================================================================================== running
def _torch_dtype(trt: Any, dt: Any) -> Any:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
             trt.DataType.INT32: torch.int32, trt.DataType.BOOL: torch.bool}
    for name, tdt in (("INT64", torch.int64), ("BF16", torch.bfloat16), ("INT8", torch.int8)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = tdt
    if dt not in table:
        raise RuntimeError(f"unsupported TensorRT I/O type {dt}")
    return table[dt]


class TensorRTEngine:
    """A deserialised engine with one execution context and static, device-resident I/O buffers (by tensor name)."""

    def __init__(self, path: "str | os.PathLike[str]", device: Any, trt: Any = None) -> None:
        trt = trt or require_tensorrt()
        self.path = Path(path)
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._trt_logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ValueError(f"cannot deserialise the TensorRT engine {self.path} (corrupted, or built by another "
                             "TensorRT version or GPU); delete it to rebuild")
        self.context = self.engine.create_execution_context()
        self.buffers: dict[str, Any] = {}
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(int(d) for d in self.engine.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ValueError(f"{self.path.name}: tensor {name} has a dynamic shape {shape}")
            dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(name))
            buf = torch.empty(shape, dtype=dtype, device=device)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs).append(name)
            self.bind(name, buf)

    def bind(self, name: str, tensor: Any) -> None:
        """Use ``tensor`` (same shape and dtype, contiguous, on the device) as the buffer of I/O tensor ``name``."""
        old = self.buffers.get(name)
        if old is not None and (tuple(old.shape) != tuple(tensor.shape) or old.dtype != tensor.dtype):
            raise ValueError(f"{self.path.name}: cannot bind {name} to a {tensor.dtype} {list(tensor.shape)} tensor "
                             f"(the engine wants {old.dtype} {list(old.shape)})")
        if not tensor.is_contiguous():
            raise ValueError(f"{self.path.name}: the buffer for {name} must be contiguous")
        if not self.context.set_tensor_address(name, int(tensor.data_ptr())):
            raise RuntimeError(f"{self.path.name}: TensorRT refused the address for {name}")
        self.buffers[name] = tensor

    def execute(self, stream_handle: int) -> None:
        if not self.context.execute_async_v3(stream_handle):
            raise RuntimeError(f"{self.path.name}: TensorRT execution failed")


class TensorRTOLSSProgram:
    """The fixed OLSS loop on TensorRT engines (see the module docstring), CUDA-graphed when possible.

    ``run(mode, cond, latents, decode)`` has the interface of the ONNX Runtime program of
    :mod:`olss_fast.export.backends`: ``mode`` is ``"tokens"`` (``cond["ids"]``), ``"embeds"`` (``cond["embeds"]``)
    or ``"labels"`` (``cond["labels"]``).
    """

    def __init__(self, engines: Mapping[str, "str | os.PathLike[str]"], manifest: Mapping[str, Any], device: Any, *,
                 use_cuda_graph: bool = True, step_backend: str = "auto", trt: Any = None) -> None:
        trt = trt or require_tensorrt()
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"TensorRT engines run on a CUDA device, got {self.device}")
        self.manifest = dict(manifest)
        self.step_backend = step_backend
        self.te = TensorRTEngine(engines["text_encoder"], self.device, trt) if "text_encoder" in engines else None
        self.unet = TensorRTEngine(engines["unet"], self.device, trt)
        self.dec = TensorRTEngine(engines["decoder"], self.device, trt)
        sched = self.manifest["schedule"]
        self.n = len(sched["timesteps"])
        self.batch = int(self.manifest["batch_size"])
        self.guided = bool(self.manifest["guided"])
        ub = self.unet.buffers
        self.sample = ub[PREFIX + "unet_sample"]
        self.model_out = ub[PREFIX + "unet_out"]
        self.t_buf = ub[PREFIX + "unet_timestep"]
        text_input = self.manifest["text_input"]
        if self.te is not None:  # the text encoder writes straight into the UNet's conditioning input
            self.unet.bind(text_input, self.te.buffers[text_input])
        self.cond = {str(c["name"]): self.unet.buffers[str(c["name"])] for c in self.manifest["cond_inputs"]}
        self.final = self.dec.buffers["latents"]  # the last step writes straight into the decoder's input
        self.image = self.dec.buffers["image"]
        self.coeffs = torch.tensor(sched["coeffs"], dtype=torch.float32, device=self.device)
        self.timesteps = torch.tensor(sched["timesteps"], dtype=self.t_buf.dtype, device=self.device)
        self.guidance = (torch.full((1,), float(self.manifest["guidance_scale"]), dtype=torch.float32,
                                    device=self.device) if self.guided else None)
        lat = tuple(int(v) for v in self.manifest["latent_shape"])
        self.noise = torch.empty(lat, dtype=self.final.dtype, device=self.device)
        # the shared loop's buffers: the denoiser input is the UNet engine's input, the last step writes straight
        # into the decoder engine's input
        self.buffers = ProgramBuffers(
            x0=torch.empty(lat, dtype=torch.float32, device=self.device),
            history=torch.empty((self.n,) + lat, dtype=torch.float32, device=self.device),
            x_in=self.sample, final=self.final,
        )
        self.use_cuda_graph = use_cuda_graph
        self._graphs: dict[bool, Any] = {}

    def _program(self, encode: bool) -> None:
        stream = torch.cuda.current_stream(self.device).cuda_stream
        if encode and self.te is not None:
            self.te.execute(stream)

        def denoise_step(j: int, x: Any) -> Any:  # x is self.sample, the engine's bound input
            self.t_buf.copy_(self.timesteps[j])
            self.unet.execute(stream)
            return self.model_out

        run_loop(denoise_step, self.noise, self.buffers, self.coeffs, self.guidance, step_backend=self.step_backend)
        self.dec.execute(stream)

    def _replay(self, encode: bool) -> None:
        if not self.use_cuda_graph:
            self._program(encode)
            return
        graph = self._graphs.get(encode)
        if graph is None:
            try:  # TensorRT's lazy initialisation happens in the warm-up, before the capture
                graph, _ = capture_cuda_graph(lambda: self._program(encode), warmup_iters=2, device=self.device)
            except Exception as exc:  # noqa: BLE001 - fall back to the uncaptured loop
                logger.warning("capturing the TensorRT loop in a CUDA graph failed (%r); running it uncaptured", exc)
                self.use_cuda_graph = False
                self._program(encode)
                return
            self._graphs[encode] = graph
        graph.replay()

    def run(self, mode: str, cond: Mapping[str, Any], latents: Any, decode: bool,
            names: Optional[Mapping[str, str]] = None) -> Any:
        """Run the program: ``cond`` holds the adapter's inputs, ``names`` maps them to the engine's inputs."""
        def load(buffer: Any, value: Any, what: str) -> None:  # exact shapes: a copy_ would broadcast
            if tuple(value.shape) != tuple(buffer.shape):
                raise ValueError(f"{what} has shape {list(value.shape)} but the TensorRT program was built for "
                                 f"{list(buffer.shape)}")
            buffer.copy_(value)

        load(self.noise, latents, "latents")
        if mode == "tokens":
            if self.te is None:
                raise ValueError("this export has no text encoder")
            load(self.te.buffers["input_ids"], cond["ids"], "input_ids")
        else:
            names = dict(names or {})
            for key, value in cond.items():
                if names.get(key) not in self.cond:
                    raise ValueError(f"the TensorRT program has no conditioning input for {key!r}")
                load(self.cond[names[key]], value, key)
        self._replay(encode=(mode == "tokens"))
        return (self.image if decode else self.final).clone()

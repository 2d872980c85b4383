"""Export a searched OLSS sampler (text encoder, the whole n-step loop, VAE decoder) to static-shape ONNX.

What is written (one folder per export, see :mod:`olss_fast.export.onnx_runner` for the file list):

* ``text_encoder.onnx`` — the CLIP text encoder (Stable Diffusion), token ids ``[M, L]`` → ``[M, L, D]``;
* ``denoise.onnx`` — **the fixed-step loop with the schedule baked in**, as one ONNX ``Loop`` over the n steps;
* ``decoder.onnx`` — ``vae.decode(latents / scaling_factor)`` (for the pixel-space digits model, its
  ``(x/2 + 0.5).clamp(0, 1)``);
* ``manifest.json``, and ``olss_onnx_runner.py`` (a verbatim copy of the numpy + onnxruntime runner).

**Why an ONNX Loop and not an unrolled graph.** Unrolling n UNet calls in one graph either duplicates the UNet's
weights n times or needs ONNX local functions (whose support in runtimes and TensorRT's parser is patchy). A
``Loop`` stores the UNet once: the UNet nodes form the loop body, which reads the weights as *outer-scope*
initializers of the main graph, so ``denoise.onnx`` holds exactly one copy of every weight (the tests compare
initializer counts and file sizes across step counts). The body of iteration j is::

    t_j      = Gather(timesteps, j)                                  (timesteps: initializer [n])
    e        = UNet(concat(x, x) if CFG else x, t_j, cond)          (cond: outer-scope graph input)
    e        = e_u + g · (e_c − e_u)                                 (CFG, uncond half first; g: initializer)
    hist[j]  = e                                                     (Where(onehot(j), e, hist); hist [n, B, ...])
    x_{j+1}  = w_j · x0 + Σ_l v_{j,l} · hist[l]                      (OLSS Eq. 8; row j of coeffs, zero for l > j)

with the guidance and the combination in float32 whatever the model dtype, as :func:`olss_fast.kernels.fused_step.
fused_olss_step` does. The loop-carried state is ``(x, hist)``; ``x0`` (the noise, float32) is read from the outer
scope. Coefficients ``[n, n+1]`` (global) or ``[C, n, n+1]`` (per channel), timesteps and the guidance scale are
initializers, so the exported graph *is* the searched schedule. One ``session.run`` executes all n steps.

TensorRT builds its UNet engine from the same file: :func:`extract_unet_model` cuts the loop body (plus the
initializers it reads) back out into a standalone one-call UNet model, and the TensorRT runner drives the loop
itself (engines + the fused step, captured in a CUDA graph), see :mod:`olss_fast.export.tensorrt`.

**Exporter.** ``torch.onnx.export(dynamo=False)`` (the TorchScript exporter), opset 17 by default: it exports
diffusers' UNets, the VAE decoder and transformers' CLIP text encoder as they are, deterministically (two exports
are byte-identical). When it fails on a module the export retries with ``dynamo=True`` (needs ``onnxscript``); the
manifest and every model's ``metadata_props`` record which exporter produced each file.

**Everything is static**: batch, height, width, dtype (float32, or float16), guidance scale and schedule are fixed
at export; ``onnx.checker`` (full check, i.e. strict shape inference) validates each file and every graph input and
output has a fully static shape. Models whose weights exceed :data:`EXTERNAL_DATA_THRESHOLD` keep them in one
side file (``<name>.onnx.data``), which is how ONNX stores models beyond protobuf's 2 GB limit.

**Caching and atomicity.** The export's key hashes the weights and configs of the exported modules, the schedule,
shapes, dtype, guidance scale, opset and the library versions. :func:`export_onnx` into a folder that already holds
the export with the same key returns it without exporting again; everything is written into a temporary sibling
folder and renamed into place at the end, so a failure leaves no partial output.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from olss_fast.core.files import clean_stale_temporaries, current_umask, default_cache_dir, exclusive_lock, temporary_name
from olss_fast.export.onnx_runner import (
    EXPORT_FORMAT,
    EXPORT_VERSION,
    MANIFEST_NAME,
    RUNNER_COPY_NAME,
    OnnxOLSSRunner,
    file_sha256,
    read_manifest,
    verify_component_files,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_OPSET", "EXPORTER_DYNAMO", "EXPORTER_TORCHSCRIPT", "EXTERNAL_DATA_THRESHOLD", "ExportPlan",
    "OnnxExport", "build_denoise_model", "default_cache_dir", "export_onnx", "extract_unet_model", "plan_export",
    "validate_onnx_file",
]

DEFAULT_OPSET = 17
#: initializer bytes above which a model's weights go to one external-data side file (protobuf's limit is 2 GiB)
EXTERNAL_DATA_THRESHOLD = 1536 * 2**20
EXPORTER_TORCHSCRIPT = "torch.onnx.export(dynamo=False)"
EXPORTER_DYNAMO = "torch.onnx.export(dynamo=True)"
_DTYPES = ("float32", "float16")
_PREFIX = "olss/"  # names of every value and node the loop construction adds (never used by the exporters)


# ==================================================================================================== results
@dataclass
class OnnxExport:
    """A finished ONNX export folder.

    Attributes:
        path: the folder.
        manifest: its ``manifest.json`` (shapes, dtype, schedule, guidance scale, files, cache key, exporters).
        reused: ``True`` when a matching export was already there and nothing was exported.
    """

    path: Path
    manifest: dict
    reused: bool = False

    @property
    def cache_key(self) -> str:
        return str(self.manifest["cache_key"])

    def file(self, component: str) -> Path:
        """Path of ``text_encoder`` / ``denoise`` / ``decoder``."""
        return self.path / self.manifest["components"][component]["file"]

    def runner(self, **kwargs: Any) -> OnnxOLSSRunner:
        """An :class:`OnnxOLSSRunner` on this export (keyword arguments are passed on)."""
        return OnnxOLSSRunner(self.path, **kwargs)


@dataclass
class ExportPlan:
    """Everything an export needs, resolved and validated before any file is written (see :func:`plan_export`)."""

    pipeline: str
    schedule: Any  # OLSSSchedule
    batch_size: int
    height: int
    width: int
    dtype: str
    guidance_scale: float
    opset: int
    latent_shape: tuple[int, ...]
    spec: Any  # olss_fast.pipelines.ExportSpec: the family's modules with fixed signatures, conditioning shapes
    key: str = ""

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def model_batch(self) -> int:
        return 2 * self.batch_size if self.guided else self.batch_size

    @property
    def cond(self) -> list:
        """The denoiser's conditioning inputs (:class:`olss_fast.pipelines.CondInput`), in order."""
        return list(self.spec.cond)

    @property
    def uncond_ids(self) -> Any:
        return self.spec.uncond

    @property
    def id_limit(self) -> int:
        return int(self.spec.id_limit)

    @property
    def modules(self) -> dict[str, Any]:
        return self.spec.modules


# ==================================================================================================== planning
def _dtype_name(dtype: Any) -> str:
    import torch

    if dtype is None:
        return ""
    name = {torch.float32: "float32", torch.float16: "float16"}.get(dtype, dtype if isinstance(dtype, str) else None)
    if name not in _DTYPES:
        raise ValueError(f"unsupported export dtype {dtype!r}; use float32 or float16")
    return str(name)


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _module_digest(module: Any) -> str:
    """SHA-256 over a module's config and every state-dict tensor (name, dtype, shape, bytes)."""
    import torch

    h = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        try:
            cfg = dict(config) if not hasattr(config, "to_dict") else config.to_dict()
        except Exception:  # pragma: no cover - exotic configs
            cfg = {}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(type(module).__name__.encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def plan_export(
    pipe: Any,
    schedule: Any = None,
    *,
    num_inference_steps: Optional[int] = None,
    batch_size: int = 1,
    height: Optional[int] = None,
    width: Optional[int] = None,
    guidance_scale: Optional[float] = None,
    dtype: Any = None,
    opset: int = DEFAULT_OPSET,
    allow_mismatch: Any = (),
    call_args: Optional[dict[str, Any]] = None,
    example: Optional[dict[str, Any]] = None,
) -> ExportPlan:
    """Resolve and validate an export (``ValueError`` for an unsupported pipeline, a schedule that does not fit or was
    fitted for another model / noise schedule / prediction type, bad sizes), and compute its cache key. Nothing is
    written."""
    import torch

    from olss_fast import __version__
    from olss_fast.core import provenance
    from olss_fast.pipelines import adapter_for
    from olss_fast.serve.runner import check_guidance, default_guidance, resolve_schedule

    adapter = adapter_for(pipe)
    adapter.check_exportable()
    sched = resolve_schedule(schedule, num_inference_steps, pipe)
    c = sched.num_channels
    if c is not None and c != adapter.latent_channels:
        raise ValueError(
            f"the schedule has per-channel coefficients for {c} channels but the pipeline's latents have "
            f"{adapter.latent_channels}"
        )
    batch = _positive_int(batch_size, "batch_size")
    if isinstance(opset, bool) or not isinstance(opset, int) or not 14 <= opset <= 21:
        raise ValueError(f"opset must be an int in [14, 21], got {opset!r}")
    dh, dw = adapter.default_size()
    h = _positive_int(height, "height") if height is not None else dh
    w = _positive_int(width, "width") if width is not None else dw
    adapter.check_size(h, w)
    dt = _dtype_name(dtype) or _dtype_name(adapter.dtype)
    g = check_guidance(default_guidance(pipe, adapter.cfg_argument) if guidance_scale is None else guidance_scale)
    latent_shape = tuple(int(v) for v in adapter.latent_shape(batch, h, w))
    call_args = dict(call_args or {})
    spec = adapter.export_spec(batch, h, w, adapter.is_guided(dict(call_args, negative_prompt=""), g), call_args,
                               example)
    if sched.fitted_for:
        guided = adapter.is_guided(dict(call_args, negative_prompt=""), g)
        actual = {"model": provenance.model_id(adapter.denoiser), "mu": adapter.flow_mu(h, w),
                  "guidance_scale": adapter.fitted_guidance(call_args, g, guided),
                  "latent_shape": list(latent_shape[1:])}
        sched_cfg = provenance.config_dict(getattr(getattr(pipe, "scheduler", None), "config", None))
        if sched_cfg:
            actual["noise_schedule"] = provenance.noise_schedule_id(
                dict(sched_cfg, _class_name=type(pipe.scheduler).__name__))
            actual["prediction_type"] = "flow" if provenance.is_flow_config(
                dict(sched_cfg, _class_name=type(pipe.scheduler).__name__)) else sched_cfg.get("prediction_type")
        provenance.check_fitted_for(
            dict(sched.fitted_for, prediction_type=sched.prediction_type), actual,
            allow=tuple(provenance.check_allow(allow_mismatch)) + tuple(sched.fitted_for.get("accepted_mismatch", ())),
            what=f"the {sched.num_steps}-step schedule", where=f"in this {adapter.name} export",
        )
    plan = ExportPlan(
        pipeline=type(pipe).__name__, schedule=sched, batch_size=batch, height=h, width=w, dtype=dt,
        guidance_scale=g, opset=int(opset), latent_shape=latent_shape, spec=spec,
    )
    import onnx

    payload = {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "olss_fast": __version__, "torch": torch.__version__,
        "onnx": onnx.__version__, "opset": plan.opset, "pipeline": plan.pipeline, "schedule": sched.to_dict(),
        "guidance_scale": g, "batch_size": batch, "height": h, "width": w, "dtype": dt, "uncond_ids": spec.uncond,
        "cond": [[c.name, list(c.shape), c.dtype, c.batched] for c in spec.cond],
        "call_args": sorted(call_args.items()),
        "modules": {name: _module_digest(mod) for name, mod in sorted(spec.modules.items())},
    }
    plan.key = hashlib.sha256(json.dumps(payload, sort_keys=True, allow_nan=False).encode()).hexdigest()
    return plan


def _torch_export(module: Any, args: tuple, path: Path, input_names: list[str], output_names: list[str],
                  opset: int) -> str:
    """Export ``module(*args)`` to ``path``; TorchScript exporter first, dynamo exporter if it fails.

    The TorchScript exporter's output must also pass ``onnx.checker`` with strict shape inference (it does not
    always: e.g. transformers' CLIP in float16 comes out with mixed-type LayerNormalization inputs); otherwise the
    dynamo exporter is used. Returns the exporter used (:data:`EXPORTER_TORCHSCRIPT` or :data:`EXPORTER_DYNAMO`).
    """
    import onnx
    import torch

    try:
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.onnx.export(
                module, args, str(path), dynamo=False, opset_version=opset, input_names=input_names,
                output_names=output_names, do_constant_folding=True, export_params=True,
            )
        for w in caught:  # tracer warnings on diffusers' shape checks, the legacy-exporter notice
            logger.debug("exporter warning: %s", w.message)
        onnx.checker.check_model(str(path), full_check=True)
        return EXPORTER_TORCHSCRIPT
    except Exception as exc:  # noqa: BLE001 - any exporter failure triggers the fallback
        logger.warning("the TorchScript ONNX exporter failed on %s (%s); retrying with dynamo=True",
                       type(module).__name__, str(exc).splitlines()[0][:300])
        first = exc
    for p in path.parent.glob(path.name + "*"):
        p.unlink()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, dynamo=True, opset_version=max(opset, 18),
                                        input_names=input_names, output_names=output_names, verbose=False)
            if program is None:
                raise RuntimeError("torch.onnx.export(dynamo=True) returned no program")
            program.save(str(path))
        return EXPORTER_DYNAMO
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(
            f"exporting {type(module).__name__} to ONNX failed with both exporters: TorchScript: {first!r}; "
            f"dynamo: {exc!r}"
        ) from exc


# ==================================================================================================== ONNX helpers
def _tensor_elem(dtype: str) -> int:
    from onnx import TensorProto

    return {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}[dtype]


def _static_dims(value_info: Any) -> Optional[list[int]]:
    """The shape of a graph input/output, or ``None`` if any dimension is symbolic/unknown."""
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = []
    for d in t.shape.dim:
        if not d.HasField("dim_value") or d.dim_value <= 0:
            return None
        dims.append(int(d.dim_value))
    return dims


def _initializer_bytes(model: Any) -> int:
    total = 0
    for init in model.graph.initializer:
        if init.HasField("raw_data"):
            total += len(init.raw_data)
        else:
            total += init.ByteSize()
    return total


def _save_model(model: Any, path: Path) -> dict:
    """Save ``model`` (weights to one side file when they exceed :data:`EXTERNAL_DATA_THRESHOLD`); manifest entry."""
    import onnx

    external = _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if external:
        data_name = path.name + ".data"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024, convert_attribute=False)
    else:
        onnx.save_model(model, str(path))
    entry: dict[str, Any] = {"file": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}
    if external:
        data = path.parent / (path.name + ".data")
        entry["external_data"] = [{"file": data.name, "bytes": data.stat().st_size, "sha256": file_sha256(data)}]
    return entry


def validate_onnx_file(path: Path) -> None:
    """``onnx.checker`` full check (strict shape inference) and fully static graph inputs/outputs; ``ValueError``."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx.checker.ValidationError, InferenceError
        raise ValueError(f"{path.name} fails onnx.checker / shape inference: {exc}") from None
    model = onnx.load(str(path), load_external_data=False)
    for v in list(model.graph.input) + list(model.graph.output):
        if _static_dims(v) is None:
            raise ValueError(f"{path.name}: {v.name} has a non-static shape")


def _set_metadata(model: Any, plan: ExportPlan, component: str, exporter: str) -> None:
    from olss_fast import __version__

    model.doc_string = f"olss_fast {plan.schedule.num_steps}-step OLSS sampler: {component} ({plan.pipeline})"
    props = {
        "olss_fast.format": EXPORT_FORMAT,
        "olss_fast.component": component,
        "olss_fast.pipeline": plan.pipeline,
        "olss_fast.core.schedule": json.dumps(plan.schedule.to_dict(), sort_keys=True, allow_nan=False),
        "olss_fast.guidance_scale": repr(float(plan.guidance_scale)),
        "olss_fast.shapes": json.dumps(_shapes(plan), sort_keys=True),
        "olss_fast.dtype": plan.dtype,
        "olss_fast.image_range": plan.spec.image_range,
        "olss_fast.version": __version__,
        "olss_fast.exporter": exporter,
        "olss_fast.cache_key": plan.key,
    }
    del model.metadata_props[:]
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v


def _shapes(plan: ExportPlan) -> dict:
    return {
        "batch_size": plan.batch_size, "height": plan.height, "width": plan.width,
        "latents": list(plan.latent_shape), **{c.name: list(c.shape) for c in plan.cond},
    }


# ==================================================================================================== the loop graph
def build_denoise_model(
    unet_model: Any,
    *,
    coeffs: np.ndarray,
    timesteps: np.ndarray,
    guidance_scale: Optional[float],
    latent_shape: tuple[int, ...],
    dtype: str,
    cond: list[tuple[str, int, tuple[int, ...]]],
) -> Any:
    """Wrap a one-call denoiser model into the n-step OLSS loop (an ONNX ``Loop``; its weights stay stored once).

    ``unet_model`` must have inputs ``olss/unet_sample`` (``[M, ...]``, ``dtype``), ``olss/unet_timestep``
    (0-d, the timesteps' type) and the conditioning inputs ``cond`` (``(name, ONNX element type, shape)`` each), and
    the output ``olss/unet_out`` (``[M, ...]``). ``guidance_scale=None`` means no classifier-free guidance
    (``M = B``); otherwise ``M = 2B``, uncond half first. The result has inputs ``noise`` (``latent_shape``,
    ``dtype``) and the conditioning inputs (read by the loop body from the outer scope), and the output ``latents``.
    """
    from onnx import TensorProto, helper, numpy_helper

    coeffs = np.ascontiguousarray(coeffs, dtype=np.float32)
    n = int(coeffs.shape[-2])
    if coeffs.shape[-1] != n + 1 or coeffs.ndim not in (2, 3):
        raise ValueError(f"coeffs must be [n, n+1] or [C, n, n+1], got {list(coeffs.shape)}")
    timesteps = np.asarray(timesteps)
    if timesteps.shape != (n,):
        raise ValueError(f"{n} steps need {n} timesteps, got shape {list(timesteps.shape)}")
    lat = [int(v) for v in latent_shape]
    r = len(lat)
    b = lat[0]
    guided = guidance_scale is not None
    elem = _tensor_elem(dtype)
    fp = TensorProto.FLOAT
    P = _PREFIX

    for node in unet_model.graph.node:
        if node.name.startswith(P) or any(o.startswith(P) and o != P + "unet_out" for o in node.output):
            raise ValueError(f"UNet node {node.name!r} uses the reserved prefix {P!r}")

    inits = [
        numpy_helper.from_array(coeffs, P + "coeffs"),
        numpy_helper.from_array(timesteps, P + "timesteps"),
        numpy_helper.from_array(np.arange(n, dtype=np.int64), P + "step_ids"),
        numpy_helper.from_array(np.array(n, dtype=np.int64), P + "trip_count"),
        numpy_helper.from_array(np.array(True), P + "loop_cond"),
        numpy_helper.from_array(np.array([n] + lat, dtype=np.int64), P + "hist_shape"),
        numpy_helper.from_array(np.array([n] + [1] * r, dtype=np.int64), P + "slot_shape"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), P + "axis0"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), P + "zero1"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), P + "one1"),
        numpy_helper.from_array(np.array([n + 1], dtype=np.int64), P + "n_plus_1"),
    ]
    if guided:
        inits += [
            numpy_helper.from_array(np.array(guidance_scale, dtype=np.float32), P + "guidance"),
            numpy_helper.from_array(np.array([b, b], dtype=np.int64), P + "cfg_split"),
        ]
    node = helper.make_node
    body_nodes: list[Any] = []
    body_nodes.append(node("Gather", [P + "timesteps", P + "iter"], [P + "unet_timestep"], name=P + "timestep",
                           axis=0))
    x_model = P + "x"
    if dtype != "float32":
        body_nodes.append(node("Cast", [P + "x"], [P + "x_model"], name=P + "cast_in", to=elem))
        x_model = P + "x_model"
    if guided:
        body_nodes.append(node("Concat", [x_model, x_model], [P + "unet_sample"], name=P + "cfg_concat", axis=0))
    else:
        body_nodes.append(node("Identity", [x_model], [P + "unet_sample"], name=P + "unet_in"))
    body_nodes.extend(unet_model.graph.node)
    body_nodes.append(node("Cast", [P + "unet_out"], [P + "e_raw"], name=P + "cast_out", to=fp))
    if guided:
        body_nodes += [
            node("Split", [P + "e_raw", P + "cfg_split"], [P + "e_uncond", P + "e_cond"], name=P + "cfg_split",
                 axis=0),
            node("Sub", [P + "e_cond", P + "e_uncond"], [P + "e_diff"], name=P + "cfg_sub"),
            node("Mul", [P + "e_diff", P + "guidance"], [P + "e_scaled"], name=P + "cfg_mul"),
            node("Add", [P + "e_uncond", P + "e_scaled"], [P + "e"], name=P + "cfg_add"),
        ]
    else:
        body_nodes.append(node("Identity", [P + "e_raw"], [P + "e"], name=P + "no_cfg"))
    body_nodes += [
        # hist[j] = e
        node("Unsqueeze", [P + "e", P + "axis0"], [P + "e_slot"], name=P + "e_slot"),
        node("Equal", [P + "step_ids", P + "iter"], [P + "slot_mask"], name=P + "slot_mask"),
        node("Reshape", [P + "slot_mask", P + "slot_shape"], [P + "slot_mask_b"], name=P + "slot_mask_b"),
        node("Where", [P + "slot_mask_b", P + "e_slot", P + "hist"], [P + "hist_next"], name=P + "hist_write"),
    ]
    # row j of the coefficients -> w_j (broadcasts against x0) and v_j (broadcasts against hist)
    if coeffs.ndim == 2:
        inits.append(numpy_helper.from_array(np.array([n] + [1] * r, dtype=np.int64), P + "v_shape"))
        body_nodes += [
            node("Gather", [P + "coeffs", P + "iter"], [P + "row"], name=P + "row", axis=0),
            node("Slice", [P + "row", P + "zero1", P + "one1", P + "axis0"], [P + "w"], name=P + "w"),
            node("Slice", [P + "row", P + "one1", P + "n_plus_1", P + "axis0"], [P + "v"], name=P + "v"),
            node("Reshape", [P + "v", P + "v_shape"], [P + "v_b"], name=P + "v_b"),
        ]
    else:
        c = int(coeffs.shape[0])
        if r < 2 or lat[1] != c:
            raise ValueError(f"per-channel coeffs for {c} channels, latents {lat}")
        inits += [
            numpy_helper.from_array(np.array([1, c] + [1] * (r - 2), dtype=np.int64), P + "w_shape"),
            numpy_helper.from_array(np.array([n, 1, c] + [1] * (r - 2), dtype=np.int64), P + "v_shape"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), P + "axis1"),
        ]
        body_nodes += [
            node("Gather", [P + "coeffs", P + "iter"], [P + "row"], name=P + "row", axis=1),  # [C, n+1]
            node("Slice", [P + "row", P + "zero1", P + "one1", P + "axis1"], [P + "w_c"], name=P + "w_c"),
            node("Reshape", [P + "w_c", P + "w_shape"], [P + "w"], name=P + "w"),
            node("Slice", [P + "row", P + "one1", P + "n_plus_1", P + "axis1"], [P + "v_c"], name=P + "v_c"),
            node("Transpose", [P + "v_c"], [P + "v_t"], name=P + "v_t", perm=[1, 0]),  # [n, C]
            node("Reshape", [P + "v_t", P + "v_shape"], [P + "v_b"], name=P + "v_b"),
        ]
    body_nodes += [
        node("Mul", [P + "w", P + "x0"], [P + "wx"], name=P + "wx"),
        node("Mul", [P + "v_b", P + "hist_next"], [P + "vh"], name=P + "vh"),
        node("ReduceSum", [P + "vh", P + "axis0"], [P + "ve"], name=P + "ve", keepdims=0),
        node("Add", [P + "wx", P + "ve"], [P + "x_next"], name=P + "x_next"),
        node("Identity", [P + "loop_cond_in"], [P + "loop_cond_out"], name=P + "loop_cond_out"),
    ]
    hist_shape = [n] + lat
    body = helper.make_graph(
        body_nodes, P + "step",
        inputs=[
            helper.make_tensor_value_info(P + "iter", TensorProto.INT64, []),
            helper.make_tensor_value_info(P + "loop_cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info(P + "x", fp, lat),
            helper.make_tensor_value_info(P + "hist", fp, hist_shape),
        ],
        outputs=[
            helper.make_tensor_value_info(P + "loop_cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info(P + "x_next", fp, lat),
            helper.make_tensor_value_info(P + "hist_next", fp, hist_shape),
        ],
    )
    outer_nodes = [
        node("Cast", ["noise"], [P + "x0"], name=P + "x0", to=fp),
        node("ConstantOfShape", [P + "hist_shape"], [P + "hist0"], name=P + "hist0",
             value=numpy_helper.from_array(np.zeros(1, dtype=np.float32))),
        node("Loop", [P + "trip_count", P + "loop_cond", P + "x0", P + "hist0"], [P + "x_final", P + "hist_final"],
             name=P + "loop", body=body),
        node("Cast", [P + "x_final"], ["latents"], name=P + "latents", to=elem),
    ]
    graph = helper.make_graph(
        outer_nodes, "olss_denoise",
        inputs=[helper.make_tensor_value_info("noise", elem, lat)]
        + [helper.make_tensor_value_info(name, cond_elem, list(shape)) for name, cond_elem, shape in cond],
        outputs=[helper.make_tensor_value_info("latents", elem, lat)],
        initializer=list(unet_model.graph.initializer) + inits,
    )
    graph.sparse_initializer.extend(unet_model.graph.sparse_initializer)
    model = helper.make_model(graph, opset_imports=list(unet_model.opset_import),
                              producer_name=unet_model.producer_name, producer_version=unet_model.producer_version)
    model.ir_version = unet_model.ir_version
    model.functions.extend(unet_model.functions)
    return model


def _names_read(graph: Any) -> set[str]:
    """Every value name read by the nodes of ``graph`` and of its subgraphs."""
    names: set[str] = set()
    for nd in graph.node:
        names.update(i for i in nd.input if i)
        for attr in nd.attribute:
            if attr.g is not None and attr.HasField("g"):
                names |= _names_read(attr.g)
            for g in attr.graphs:
                names |= _names_read(g)
    return names


def extract_unet_model(denoise_model: Any) -> Any:
    """Cut the one-call UNet back out of a ``denoise.onnx`` loop (for TensorRT), weights shared, not copied twice.

    The result has inputs ``olss/unet_sample`` ``[M, ...]``, ``olss/unet_timestep`` (0-d) and the conditioning
    inputs of the loop, and the output ``olss/unet_out``.
    """
    from onnx import helper

    P = _PREFIX
    loops = [nd for nd in denoise_model.graph.node if nd.op_type == "Loop" and nd.name == P + "loop"]
    if len(loops) != 1:
        raise ValueError("not an olss_fast denoise model: no 'olss/loop' node")
    body = next(a.g for a in loops[0].attribute if a.name == "body")
    unet_nodes = [nd for nd in body.node if not nd.name.startswith(P)]
    outer_inputs = {v.name: v for v in denoise_model.graph.input}
    inits = {t.name: t for t in denoise_model.graph.initializer}
    noise = outer_inputs["noise"]
    conds = [v for name, v in outer_inputs.items() if name != "noise"]
    m = _static_dims(conds[0])[0]  # type: ignore[index]
    lat = _static_dims(noise)
    assert lat is not None
    sample_shape = [m] + lat[1:]
    elem = noise.type.tensor_type.elem_type
    t_elem = inits[P + "timesteps"].data_type
    read = _names_read(helper.make_graph(unet_nodes, "tmp", [], []))
    graph = helper.make_graph(
        unet_nodes, "olss_unet",
        inputs=[
            helper.make_tensor_value_info(P + "unet_sample", elem, sample_shape),
            helper.make_tensor_value_info(P + "unet_timestep", t_elem, []),
            *[copy.deepcopy(c) for c in conds],
        ],
        outputs=[helper.make_tensor_value_info(P + "unet_out", elem, sample_shape)],
        initializer=[t for name, t in inits.items() if name in read and not name.startswith(P)],
    )
    model = helper.make_model(graph, opset_imports=list(denoise_model.opset_import),
                              producer_name=denoise_model.producer_name)
    model.ir_version = denoise_model.ir_version
    model.functions.extend(denoise_model.functions)
    model.metadata_props.extend(denoise_model.metadata_props)
    return model


# ==================================================================================================== writing
@contextlib.contextmanager
def _module_as(module: Any, dtype: str) -> Iterator[Any]:
    """``module`` in ``dtype`` (a converted copy when it differs; the pipeline's own module is never modified)."""
    import torch

    want = {"float32": torch.float32, "float16": torch.float16}[dtype]
    params = list(module.parameters())
    if not params or all(p.dtype == want for p in params):
        was_training = module.training
        module.eval()
        try:
            yield module
        finally:
            module.train(was_training)
        return
    logger.info("exporting a %s copy of %s", dtype, type(module).__name__)
    yield copy.deepcopy(module).to(want).eval()


def _write_export(plan: ExportPlan, folder: Path) -> dict:
    """Export every component of ``plan`` into the (empty, temporary) ``folder``; returns the manifest."""
    import onnx
    import torch
    from onnx import TensorProto

    from olss_fast import __version__

    spec = plan.spec
    scratch = folder / ".scratch"
    scratch.mkdir()
    tdt = {"float32": torch.float32, "float16": torch.float16}[plan.dtype]
    sched = plan.schedule
    is_int_t = all(isinstance(t, int) for t in sched.timesteps)
    components: dict[str, Any] = {}
    exporters: dict[str, str] = {}
    device = next(spec.denoiser.parameters()).device

    def run_export(name: str, module: Any, args: tuple, inputs: list[str], outputs: list[str]) -> Any:
        path = scratch / f"{name}.onnx"
        with _module_as(module, plan.dtype) as mod:
            exporters[name] = _torch_export(mod, args, path, inputs, outputs, plan.opset)
        model = onnx.load(str(path))
        shutil.rmtree(scratch)
        scratch.mkdir()
        return model

    def finish(name: str, model: Any, inputs: dict[str, list[int]]) -> None:
        _set_metadata(model, plan, name, exporters[name])
        path = folder / f"{name}.onnx"
        entry = _save_model(model, path)
        validate_onnx_file(path)
        entry["inputs"] = inputs
        entry["exporter"] = exporters[name]
        components[name] = entry
        logger.info("wrote %s (%.1f MB, %s)", path.name, entry["bytes"] / 1e6, exporters[name])

    m = plan.model_batch
    if spec.text_encoder is not None:
        ids = torch.tensor([spec.uncond] * m, dtype=torch.long, device=device)
        model = run_export("text_encoder", spec.text_encoder, (ids,), ["input_ids"], [spec.text_input])
        finish("text_encoder", model, {"input_ids": [m, len(spec.uncond)]})

    # ---- the denoiser, once, then the loop around it
    sample = torch.zeros((m,) + plan.latent_shape[1:], dtype=tdt, device=device)
    t0 = torch.tensor(sched.timesteps[0], dtype=torch.long if is_int_t else torch.float32, device=device)
    examples, cond_specs = [], []
    for c in spec.cond:
        if c.dtype == "int64":
            fill = int(spec.uncond) if spec.id_input == c.name else 0
            examples.append(torch.full(c.shape, fill, dtype=torch.long, device=device))
            cond_specs.append((c.name, TensorProto.INT64, tuple(c.shape)))
        else:
            dt = tdt if c.dtype == "model" else torch.float32
            examples.append(torch.zeros(c.shape, dtype=dt, device=device))
            cond_specs.append((c.name, _tensor_elem(plan.dtype) if c.dtype == "model" else TensorProto.FLOAT,
                               tuple(c.shape)))
    unet_model = run_export("denoise", spec.denoiser, (sample, t0, *examples),
                            [_PREFIX + "unet_sample", _PREFIX + "unet_timestep", *[c.name for c in spec.cond]],
                            [_PREFIX + "unet_out"])
    denoise = build_denoise_model(
        unet_model, coeffs=sched.coeffs.numpy().astype(np.float32),
        timesteps=np.array(sched.timesteps, dtype=np.int64 if is_int_t else np.float32),
        guidance_scale=plan.guidance_scale if plan.guided else None, latent_shape=plan.latent_shape,
        dtype=plan.dtype, cond=cond_specs,
    )
    del unet_model
    finish("denoise", denoise, {"noise": list(plan.latent_shape), **{c.name: list(c.shape) for c in spec.cond}})
    del denoise

    # ---- decoder
    latents = torch.zeros(plan.latent_shape, dtype=tdt, device=device)
    model = run_export("decoder", spec.decoder, (latents,), ["latents"], ["image"])
    image_shape = _static_dims(model.graph.output[0])
    finish("decoder", model, {"latents": list(plan.latent_shape)})
    shutil.rmtree(scratch)

    shutil.copyfile(Path(__file__).with_name("onnx_runner.py"), folder / RUNNER_COPY_NAME)
    exporter_names = sorted(set(exporters.values()))
    return {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "cache_key": plan.key, "olss_fast": __version__,
        "torch": torch.__version__, "onnx": onnx.__version__, "opset": plan.opset,
        "exporter": exporter_names[0] if len(exporter_names) == 1 else exporter_names,
        "pipeline": plan.pipeline, "num_inference_steps": sched.num_steps, "batch_size": plan.batch_size,
        "height": plan.height, "width": plan.width, "dtype": plan.dtype, "guidance_scale": plan.guidance_scale,
        "guided": plan.guided, "latent_shape": list(plan.latent_shape),
        "cond_inputs": [{"name": c.name, "shape": list(c.shape), "dtype": plan.dtype if c.dtype == "model" else c.dtype,
                         "batched": c.batched} for c in spec.cond],
        "text_input": spec.text_input, "id_input": spec.id_input, "image_shape": image_shape,
        "uncond_ids": plan.uncond_ids, "id_limit": plan.id_limit, "image_range": spec.image_range,
        "schedule": sched.to_dict(),
        "components": components, "runner": RUNNER_COPY_NAME,
        "runner_sha256": file_sha256(folder / RUNNER_COPY_NAME),
    }


def _existing_export(out: Path, key: str, verify: bool = True) -> Optional[OnnxExport]:
    """The export in ``out`` when it exists, is ours, is complete and has ``key``; else ``None``."""
    try:
        manifest = read_manifest(out)
        if manifest.get("cache_key") != key:
            return None
        verify_component_files(out, manifest, check_digest=verify)
    except ValueError:
        return None
    return OnnxExport(out, manifest, reused=True)


def _check_target(out: Path, key: str, overwrite: bool) -> Optional[OnnxExport]:
    """Reuse a matching export, accept a missing/empty folder, refuse anything else (unless ``overwrite``)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"export path {out} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return None
    found = _existing_export(out, key)
    if found is not None:
        return found
    ours = (out / MANIFEST_NAME).is_file()
    if not ours:
        raise ValueError(
            f"export folder {out} exists with other content (no olss_fast {MANIFEST_NAME}); refusing to write into "
            "it: choose an empty or new folder"
        )
    if not overwrite:
        raise ValueError(
            f"export folder {out} holds an olss_fast export of another model, schedule, shape or dtype (or a "
            "damaged one); pass overwrite=True (CLI: --overwrite) to replace it, or choose another folder"
        )
    return None


def _publish(staging: Path, out: Path) -> None:
    """Move the finished ``staging`` folder onto ``out`` (replacing an empty folder or an old export)."""
    old: Optional[Path] = None
    if out.exists():
        if any(out.iterdir()):
            old = temporary_name(out, "partial")
            old.mkdir()
            os.replace(out, old / "x")
        else:
            out.rmdir()
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staging_folder(out: Path) -> Iterator[Path]:
    """A temporary sibling of ``out`` that is deleted unless the body moved it away (atomic folder writes)."""
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create {parent}: {exc}") from None
    if not os.access(parent, os.W_OK):
        raise ValueError(f"cannot write to {parent}")
    clean_stale_temporaries(parent)  # staging folders of killed exports
    staging = temporary_name(out, "partial")
    staging.mkdir(mode=0o777 & ~current_umask())
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def export_onnx(
    pipe: Any,
    schedule: Any = None,
    out_dir: "str | os.PathLike[str] | None" = None,
    *,
    num_inference_steps: Optional[int] = None,
    batch_size: int = 1,
    height: Optional[int] = None,
    width: Optional[int] = None,
    guidance_scale: Optional[float] = None,
    dtype: Any = None,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    allow_mismatch: Any = (),
    call_args: Optional[dict[str, Any]] = None,
) -> OnnxExport:
    """Export ``pipe`` sampled with an OLSS ``schedule`` to static-shape ONNX in ``out_dir``.

    Args:
        pipe: a ``StableDiffusionPipeline`` or the bundled ``DigitsPipeline``.
        schedule: an ``OLSSSchedule``, or an ``OLSSScheduler`` with ``num_inference_steps`` choosing one
            (``None``: ``pipe.scheduler``).
        out_dir: the export folder: new, empty, or holding this very export (then it is reused, nothing is
            exported; ``OnnxExport.reused`` is ``True``). ``None``: a folder named by the cache key under
            :func:`default_cache_dir`.
        batch_size, height, width: static sizes (default: batch 1, the pipeline's default size).
        guidance_scale: baked-in classifier-free guidance scale (> 1 enables CFG; default: the pipeline's own default).
        dtype: ``"float32"`` / ``"float16"`` (or torch dtypes); default the UNet's. The pipeline is not modified
            (a converted copy is exported).
        opset: ONNX opset for the TorchScript exporter.
        overwrite: replace an *olss_fast export* of something else in ``out_dir`` (other content is never
            overwritten).
        allow_mismatch: export a schedule fitted for another ``"model"``, ``"noise_schedule"`` or
            ``"prediction_type"`` anyway (see :mod:`olss_fast.core.provenance`).
        call_args: call arguments that fix conditioning shapes (e.g. ``{"max_sequence_length": 256}`` for SD3 and
            Flux, whose text encoders run outside the export: their embeddings are the export's inputs).

    Raises:
        ValueError: unsupported pipeline, a schedule that does not fit (step count, channels), bad sizes, an
            ``out_dir`` with other content.
        RuntimeError: both exporters failed on a module.
    """
    plan = plan_export(pipe, schedule, num_inference_steps=num_inference_steps, batch_size=batch_size,
                       height=height, width=width, guidance_scale=guidance_scale, dtype=dtype, opset=opset,
                       allow_mismatch=allow_mismatch, call_args=call_args)
    return export_plan(plan, out_dir, overwrite=overwrite)


def export_plan(plan: ExportPlan, out_dir: "str | os.PathLike[str] | None" = None, *,
                overwrite: bool = False) -> OnnxExport:
    """Write (or reuse) the export described by ``plan`` (see :func:`export_onnx`)."""
    out = Path(out_dir) if out_dir is not None else default_cache_dir() / "onnx" / plan.key[:24]
    with exclusive_lock(out, "ONNX export folder"):  # one writer per folder: a second one gets a ValueError
        found = _check_target(out, plan.key, overwrite)
        if found is not None:
            logger.info("reusing the ONNX export in %s (cache key %s)", out, plan.key[:12])
            return found
        logger.info("exporting the %d-step OLSS sampler of a %s to %s (%s, batch %d, %dx%d)",
                    plan.schedule.num_steps, plan.pipeline, out, plan.dtype, plan.batch_size, plan.height, plan.width)
        with staging_folder(out) as staging:
            manifest = _write_export(plan, staging)
            write_manifest(staging, manifest)
            _fsync_tree(staging)
            _publish(staging, out)
    return OnnxExport(out, manifest, reused=False)


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write ``manifest.json`` with its own digest (``manifest_sha256``), checked as a reader will check it."""
    from olss_fast.core.files import atomic_write_text
    from olss_fast.export.onnx_runner import check_manifest, manifest_digest

    manifest["manifest_sha256"] = manifest_digest(manifest)
    check_manifest(manifest)
    atomic_write_text(folder / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False))


def _fsync_tree(folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())

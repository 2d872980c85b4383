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
folder and moved into place at the end, so a failure leaves no partial output, and a crash at any moment leaves the
old export or the new one (see :func:`olss_fast.export.folders.publish_folder`). ``overwrite=True`` replaces only a folder whose manifest is an
olss_fast manifest with a valid digest; any other content is refused.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

import torch

from olss_fast.core.files import (atomic_write_text, clean_stale_temporaries, default_cache_dir,
                                  exclusive_lock)
from olss_fast.core.version import __version__
from olss_fast.export.folders import fsync_tree, publish_folder, restore_parked, staging_folder
from olss_fast.export.graph import PREFIX, build_denoise_model, static_dims, tensor_elem
from olss_fast.export.onnx_runner import (EXPORT_FORMAT, EXPORT_VERSION, MANIFEST_NAME, RUNNER_COPY_NAME, OnnxOLSSRunner,
                                          check_manifest, file_sha256, input_metadata, manifest_digest,
                                          read_manifest, verify_component_files)
from olss_fast.export.plan import ExportPlan, plan_export

logger = logging.getLogger(__name__)

__all__ = ["EXPORTER_DYNAMO", "EXPORTER_TORCHSCRIPT", "EXTERNAL_DATA_THRESHOLD", "OnnxExport", "export_onnx",
           "export_plan", "save_model", "validate_onnx_file", "write_export"]

#: initializer bytes above which a model's weights go to one external-data side file (protobuf's limit is 2 GiB)
EXTERNAL_DATA_THRESHOLD = 1536 * 2**20
EXPORTER_TORCHSCRIPT = "torch.onnx.export(dynamo=False)"
EXPORTER_DYNAMO = "torch.onnx.export(dynamo=True)"


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


@contextlib.contextmanager
def _native_output_to(log: Path) -> Iterator[None]:
    """Send what native code writes to the process's stdout and stderr to ``log`` for the body (logged at DEBUG)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    try:
        with open(log, "wb") as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)
        with contextlib.suppress(OSError):
            text = log.read_text(errors="replace")
            if text.strip():
                logger.debug("exporter output (%d lines): %s", text.count("\n"), text[:2000])
            log.unlink()


def _torch_export(module: Any, args: tuple, path: Path, input_names: list[str], output_names: list[str],
                  opset: int) -> str:
    """Export ``module(*args)`` to ``path``; TorchScript exporter first, dynamo exporter if it fails.

    The TorchScript exporter's output must also pass ``onnx.checker`` with strict shape inference (it does not
    always: e.g. transformers' CLIP in float16 comes out with mixed-type LayerNormalization inputs); otherwise the
    dynamo exporter is used. Returns the exporter used (:data:`EXPORTER_TORCHSCRIPT` or :data:`EXPORTER_DYNAMO`).
    """
    import onnx

    try:
        # (the TorchScript exporter prints its whole IR graph to the process's stdout when it fails: kept in a file)
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught, \
                _native_output_to(path.with_suffix(".log")):
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


def _initializer_bytes(model: Any) -> int:
    total = 0
    for init in model.graph.initializer:
        if init.HasField("raw_data"):
            total += len(init.raw_data)
        else:
            total += init.ByteSize()
    return total


def save_model(model: Any, path: Path) -> dict:
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
        if static_dims(v) is None:
            raise ValueError(f"{path.name}: {v.name} has a non-static shape")


def _set_metadata(model: Any, plan: ExportPlan, component: str, exporter: str) -> None:

    model.doc_string = f"olss_fast {plan.schedule.num_steps}-step OLSS sampler: {component} ({plan.pipeline})"
    props = {
        "olss_fast.format": EXPORT_FORMAT,
        "olss_fast.component": component,
        "olss_fast.pipeline": plan.pipeline,
        "olss_fast.schedule": json.dumps(plan.schedule.to_dict(), sort_keys=True, allow_nan=False),
        "olss_fast.guidance_scale": repr(float(plan.guidance_scale)),
        "olss_fast.shapes": json.dumps(_shapes(plan), sort_keys=True),
        "olss_fast.dtype": plan.dtype,
        "olss_fast.image_range": plan.spec.image_range,
        "olss_fast.version": __version__,
        "olss_fast.exporter": exporter,
        "olss_fast.cache_key": plan.key,
        "olss_fast.inputs": input_metadata(_inputs(plan)),
    }
    del model.metadata_props[:]
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v


def _inputs(plan: ExportPlan) -> dict:
    """The manifest's fields about the inputs (:data:`olss_fast.export.onnx_runner.INPUT_FIELDS`)."""
    spec = plan.spec
    return {
        "cond_inputs": [{"name": c.name, "shape": list(c.shape), "dtype": plan.dtype if c.dtype == "model" else c.dtype,
                         "batched": c.batched} for c in spec.cond],
        "text_input": spec.text_input, "id_input": spec.id_input, "uncond_ids": plan.uncond_ids,
        "id_limit": plan.id_limit, "guided": plan.guided, "latent_shape": list(plan.latent_shape),
    }


def _shapes(plan: ExportPlan) -> dict:
    return {
        "batch_size": plan.batch_size, "height": plan.height, "width": plan.width,
        "latents": list(plan.latent_shape), **{c.name: list(c.shape) for c in plan.cond},
    }


# ==================================================================================================== writing
@contextlib.contextmanager
def _module_as(module: Any, dtype: str) -> Iterator[Any]:
    """``module`` in ``dtype`` and in eval mode (a converted copy when the dtype differs); the pipeline's own modules
    are left as they were, each submodule's train/eval mode included (``train(mode)`` on a wrapper would set them
    all)."""
    want = {"float32": torch.float32, "float16": torch.float16}[dtype]
    params = list(module.parameters())
    if not params or all(p.dtype == want for p in params):
        modes = [(m, m.training) for m in module.modules()]
        module.eval()
        try:
            yield module
        finally:
            for m, training in modes:
                m.training = training
        return
    logger.info("exporting a %s copy of %s", dtype, type(module).__name__)
    yield copy.deepcopy(module).to(want).eval()


def _write_export(plan: ExportPlan, folder: Path) -> dict:
    """Export every component of ``plan`` into the (empty, temporary) ``folder``; returns the manifest."""
    import onnx
    from onnx import TensorProto


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
        entry = save_model(model, path)
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
            cond_specs.append((c.name, tensor_elem(plan.dtype) if c.dtype == "model" else TensorProto.FLOAT,
                               tuple(c.shape)))
    unet_model = run_export("denoise", spec.denoiser, (sample, t0, *examples),
                            [PREFIX + "unet_sample", PREFIX + "unet_timestep", *[c.name for c in spec.cond]],
                            [PREFIX + "unet_out"])
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
    image_shape = static_dims(model.graph.output[0])
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
        **_inputs(plan), "image_shape": image_shape, "image_range": spec.image_range,
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
    """Reuse a matching export, accept a missing/empty folder, refuse anything else (``overwrite`` replaces only a
    folder whose manifest is an olss_fast export manifest with a valid digest: never other content)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"export path {out} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return None
    found = _existing_export(out, key)
    if found is not None:
        return found
    try:
        read_manifest(out)
    except ValueError as exc:
        raise ValueError(
            f"export folder {out} exists with other content, not an olss_fast export ({exc}); refusing to write "
            "into it or replace it, also with overwrite=True: choose an empty or new folder"
        ) from None
    if not overwrite:
        raise ValueError(
            f"export folder {out} holds an olss_fast export of another model, schedule, shape or dtype (or a "
            "damaged one); pass overwrite=True (CLI: --overwrite) to replace it, or choose another folder"
        )
    return None


def export_onnx(pipe: Any, schedule: Any = None, out_dir: "str | os.PathLike[str] | None" = None, *,
                overwrite: bool = False, **plan_options: Any) -> OnnxExport:
    """Export ``pipe`` sampled with an OLSS ``schedule`` to static-shape ONNX in ``out_dir``.

    Args:
        pipe: a pipeline of a family the export supports (Stable Diffusion, SD3, Flux, the bundled digits model).
        schedule: an ``OLSSSchedule``, or an ``OLSSScheduler`` with ``num_inference_steps`` choosing one
            (``None``: ``pipe.scheduler``).
        out_dir: the export folder: new, empty, or holding this very export (then it is reused, nothing is
            exported; ``OnnxExport.reused`` is ``True``). ``None``: a folder named by the cache key under
            :func:`default_cache_dir`.
        overwrite: replace an *olss_fast export* of something else in ``out_dir`` (other content is never
            overwritten).
        plan_options: :func:`~olss_fast.export.plan.plan_export`'s options: ``num_inference_steps``,
            ``batch_size``, ``height``, ``width`` (static sizes; default batch 1 and the pipeline's size),
            ``guidance_scale`` (baked in; > 1 enables CFG; default the pipeline's), ``dtype`` (``"float32"`` /
            ``"float16"``; default the denoiser's; a converted copy is exported), ``opset``, ``allow_mismatch``
            (export a schedule fitted for another ``"model"``, ``"noise_schedule"`` or ``"prediction_type"``),
            ``call_args`` (call arguments that fix conditioning shapes, e.g. ``{"max_sequence_length": 256}`` for
            SD3 and Flux, whose text encoders run outside the export).

    Raises:
        ValueError: unsupported pipeline, a schedule that does not fit (step count, channels, provenance), bad
            sizes, an ``out_dir`` with other content.
        RuntimeError: both exporters failed on a module.
    """
    return export_plan(plan_export(pipe, schedule, **plan_options), out_dir, overwrite=overwrite)


def export_plan(plan: ExportPlan, out_dir: "str | os.PathLike[str] | None" = None, *,
                overwrite: bool = False) -> OnnxExport:
    """Write (or reuse) the export described by ``plan`` (see :func:`export_onnx`)."""
    out = Path(out_dir) if out_dir is not None else default_cache_dir() / "onnx" / plan.key[:24]
    return write_export(plan, out, overwrite=overwrite)[0]


def write_export(plan: ExportPlan, out: Path, *, overwrite: bool = False, what: str = "ONNX export folder",
                 finish: Optional[Callable[[Path, bool], Any]] = None) -> tuple[OnnxExport, Any]:
    """The one way an export folder is written: under an exclusive lock, reuse a matching export in ``out``, else
    export into a staging folder beside it, write and check the manifest, call ``finish(folder, reused)`` (TensorRT
    builds its engines here, into the staging folder or into the reused export), fsync, and publish by rename.
    Returns ``(the export, what finish returned)``."""
    with exclusive_lock(out, what):  # one writer per folder: a second one gets a ValueError
        if out.parent.is_dir():
            clean_stale_temporaries(out.parent)  # staging folders of killed exports, also when this one is reused
            restore_parked(out)
        found = _check_target(out, plan.key, overwrite)
        if found is not None:
            logger.info("reusing the ONNX export in %s (cache key %s)", out, plan.key[:12])
            return found, finish(out, True) if finish is not None else None
        logger.info("exporting the %d-step OLSS sampler of a %s to %s (%s, batch %d, %dx%d)",
                    plan.schedule.num_steps, plan.pipeline, out, plan.dtype, plan.batch_size, plan.height, plan.width)
        with staging_folder(out) as staging:
            manifest = _write_export(plan, staging)
            write_manifest(staging, manifest)
            extra = finish(staging, False) if finish is not None else None
            fsync_tree(staging)
            publish_folder(staging, out)
    return OnnxExport(out, manifest, reused=False), extra


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write ``manifest.json`` with its own digest (``manifest_sha256``), checked as a reader will check it."""
    manifest["manifest_sha256"] = manifest_digest(manifest)
    check_manifest(manifest)
    atomic_write_text(folder / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False))



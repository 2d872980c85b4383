"""Run an exported OLSS sampler with onnxruntime and numpy only (no torch, no diffusers, no olss_fast).

This file is self-contained on purpose: it imports only the standard library, ``numpy`` and ``onnxruntime``, and
every export written by :func:`olss_fast.export.export_onnx` carries a verbatim copy of it as
``olss_onnx_runner.py``. On a machine with just ``pip install onnxruntime numpy``::

    import sys, numpy as np
    sys.path.insert(0, "digits_onnx")                # the export folder
    from olss_onnx_runner import OnnxOLSSRunner
    runner = OnnxOLSSRunner("digits_onnx")
    noise = np.random.default_rng(0).standard_normal(runner.latent_shape, dtype=np.float32)
    images = runner(input_ids=[3, 1, 4, 1], noise=noise)   # [B, H, W, C] float32 in [0, 1]

(Importing it as ``olss_fast.export.onnx_runner`` works too, but that runs ``olss_fast/__init__.py``, which imports
torch; the copy in the export folder, or loading this file by path, does not.)

An export folder holds (see :data:`MANIFEST_NAME` and the ``components`` section of the manifest):

* ``text_encoder.onnx`` (Stable Diffusion only): token ids ``[M, L]`` int64 → ``encoder_hidden_states`` ``[M, L, D]``;
* ``denoise.onnx``: the whole n-step OLSS loop with the schedule, the guidance scale and every shape baked in:
  ``noise`` ``[B, C, h, w]`` + conditioning (``encoder_hidden_states`` ``[M, L, D]`` or ``class_labels`` ``[M]``)
  → ``latents`` ``[B, C, h, w]``; ``M = 2B`` with classifier-free guidance (unconditional half first), else ``B``;
* ``decoder.onnx``: ``latents`` → ``image`` ``[B, 3|1, H, W]`` (the VAE decode, ``latents / scaling_factor``
  included; for the pixel-space digits model the ``x/2 + 0.5`` clamp);
* ``manifest.json``: shapes, dtype, schedule, guidance scale, file sizes and SHA-256 digests, the cache key.

:class:`OnnxOLSSRunner` checks the folder (sizes, digests, input/output signatures) and raises ``ValueError`` with a
clear message for a missing, truncated or modified file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "EXPORT_FORMAT", "EXPORT_VERSION", "MANIFEST_NAME", "RUNNER_COPY_NAME", "OnnxOLSSRunner", "file_sha256",
    "read_manifest",
]

EXPORT_FORMAT = "olss_fast.onnx_export"
EXPORT_VERSION = 1
MANIFEST_NAME = "manifest.json"
RUNNER_COPY_NAME = "olss_onnx_runner.py"
COMPONENTS = ("text_encoder", "denoise", "decoder")
_NP_DTYPES = {"float32": np.float32, "float16": np.float16}
_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
    "tensor(int32)": np.int32, "tensor(double)": np.float64,
}


def file_sha256(path: "str | os.PathLike[str]") -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(export_dir: "str | os.PathLike[str]") -> dict:
    """Read and check ``manifest.json`` of an export folder (``ValueError`` when missing, corrupted or foreign)."""
    folder = Path(export_dir)
    if not folder.is_dir():
        raise ValueError(f"ONNX export folder {folder} does not exist")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"{folder} is not an olss_fast ONNX export: {MANIFEST_NAME} is missing")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is unreadable or corrupted (truncated?): {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not an olss_fast ONNX export manifest")
    if manifest.get("version") != EXPORT_VERSION:
        raise ValueError(
            f"{path} has export format version {manifest.get('version')!r}; this runner reads version {EXPORT_VERSION}"
        )
    comps = manifest.get("components")
    if not isinstance(comps, dict) or "denoise" not in comps or "decoder" not in comps:
        raise ValueError(f"{path} lists no denoise/decoder components (corrupted manifest)")
    return manifest


def verify_component_files(export_dir: "str | os.PathLike[str]", manifest: Mapping[str, Any],
                           check_digest: bool = True) -> None:
    """Check every file the manifest lists (size always, SHA-256 when ``check_digest``); ``ValueError`` otherwise."""
    folder = Path(export_dir)
    for name, comp in manifest["components"].items():
        for entry in [comp] + list(comp.get("external_data") or []):
            path = folder / entry["file"]
            if not path.is_file():
                raise ValueError(f"{name}: file {path} is missing from the ONNX export")
            size = path.stat().st_size
            if size != int(entry["bytes"]):
                raise ValueError(
                    f"{name}: file {path} has {size} bytes but the export wrote {entry['bytes']} (truncated or "
                    "modified); re-export it"
                )
            if check_digest and file_sha256(path) != entry["sha256"]:
                raise ValueError(f"{name}: file {path} does not match its SHA-256 in {MANIFEST_NAME} (modified?)")


class OnnxOLSSRunner:
    """The exported fixed-step OLSS sampler on onnxruntime: token ids / class labels (or embeddings) + noise → image.

    Args:
        export_dir: a folder written by ``olss_fast.export.export_onnx`` (or ``olss-fast export --format onnx``).
        providers: onnxruntime execution providers (default: ``["CPUExecutionProvider"]``; e.g.
            ``["CUDAExecutionProvider", "CPUExecutionProvider"]`` on a GPU build of onnxruntime).
        session_options: an ``onnxruntime.SessionOptions`` shared by the sessions (threads, optimisation level).
        verify: check the files' SHA-256 against the manifest before loading (sizes are always checked).

    Raises:
        ValueError: the folder, its manifest or an ONNX file is missing, truncated, modified or not loadable.

    Everything is static: the batch size, the image size, the schedule and the guidance scale are the export's
    (:attr:`batch_size`, :attr:`latent_shape`, :attr:`guidance_scale`); export again for other values.
    """

    def __init__(self, export_dir: "str | os.PathLike[str]", providers: Optional[Sequence[Any]] = None,
                 session_options: Any = None, verify: bool = True) -> None:
        import onnxruntime as ort

        self.export_dir = Path(export_dir)
        self.manifest = read_manifest(self.export_dir)
        verify_component_files(self.export_dir, self.manifest, check_digest=verify)
        m = self.manifest
        try:
            self.batch_size = int(m["batch_size"])
            self.latent_shape = tuple(int(v) for v in m["latent_shape"])
            self.image_shape = tuple(int(v) for v in m["image_shape"])
            self.dtype = np.dtype(_NP_DTYPES[m["dtype"]])
            self.guidance_scale = float(m["guidance_scale"])
            self.guided = bool(m["guided"])
            self.cond_input = str(m["cond_input"])
            self.cond_shape = tuple(int(v) for v in m["cond_shape"])
            self.uncond_ids = np.asarray(m["uncond_ids"], dtype=np.int64)
            self.id_limit = int(m.get("id_limit", 0))
            self.image_range = str(m["image_range"])
            self.schedule = dict(m["schedule"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{self.export_dir / MANIFEST_NAME} lacks or garbles field {exc} (corrupted?)") from None
        self.num_inference_steps = len(self.schedule.get("timesteps", []))
        self.providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
        self._sessions: dict[str, Any] = {}
        for name, comp in m["components"].items():
            path = self.export_dir / comp["file"]
            try:
                sess = ort.InferenceSession(str(path), sess_options=session_options, providers=self.providers)
            except Exception as exc:  # onnxruntime raises InvalidProtobuf / Fail / InvalidGraph
                raise ValueError(f"{name}: onnxruntime cannot load {path} (truncated or corrupted?): {exc}") from None
            self._check_signature(name, sess, comp)
            self._sessions[name] = sess
        logger.info("loaded the %d-step OLSS ONNX export %s (%s)", self.num_inference_steps, self.export_dir,
                    ", ".join(self._sessions))

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check_signature(name: str, sess: Any, comp: Mapping[str, Any]) -> None:
        want = {k: tuple(v) for k, v in comp["inputs"].items()}
        got = {i.name: tuple(i.shape) for i in sess.get_inputs()}
        if got != want:
            raise ValueError(f"{name}: the ONNX model's inputs {got} do not match the manifest's {want} (modified?)")

    def _array(self, value: Any, shape: tuple, dtype: Any, what: str) -> np.ndarray:
        arr = np.asarray(value)
        if arr.shape != tuple(shape):
            raise ValueError(
                f"`{what}` has shape {list(arr.shape)} but this export expects {list(shape)} (static shapes: batch "
                f"{self.batch_size}, latents {list(self.latent_shape)}; export again for other sizes)"
            )
        if np.issubdtype(np.dtype(dtype), np.integer):
            if not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"`{what}` must hold integers, got {arr.dtype}")
        elif not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"`{what}` must hold floating-point numbers, got {arr.dtype}")
        return np.ascontiguousarray(arr.astype(dtype, copy=False))

    # ------------------------------------------------------------------ the three programs
    @property
    def has_text_encoder(self) -> bool:
        return "text_encoder" in self._sessions

    def encode(self, input_ids: Any) -> np.ndarray:
        """Text encoder: token ids ``[M, L]`` (unconditional rows first when guided) → embeddings ``[M, L, D]``."""
        if not self.has_text_encoder:
            raise ValueError("this export has no text encoder (class-conditional model): pass labels to denoise()")
        sess = self._sessions["text_encoder"]
        (inp,) = sess.get_inputs()
        ids = self._array(input_ids, tuple(inp.shape), np.int64, "input_ids")
        return sess.run(None, {inp.name: ids})[0]

    def denoise(self, noise: Any, cond: Any) -> np.ndarray:
        """The n-step loop: noise ``[B, C, h, w]`` + full conditioning ``[M, ...]`` → final latents ``[B, C, h, w]``."""
        sess = self._sessions["denoise"]
        cond_dtype = np.int64 if self.cond_input == "class_labels" else self.dtype
        feeds = {
            "noise": self._array(noise, self.latent_shape, self.dtype, "noise"),
            self.cond_input: self._array(cond, self.cond_shape, cond_dtype, self.cond_input),
        }
        return sess.run(None, feeds)[0]

    def decode(self, latents: Any) -> np.ndarray:
        """Decoder: latents → image ``[B, C, H, W]`` in the model's range (``manifest['image_range']``)."""
        sess = self._sessions["decoder"]
        return sess.run(None, {"latents": self._array(latents, self.latent_shape, self.dtype, "latents")})[0]

    # ------------------------------------------------------------------ the whole sampler
    def _check_ids(self, ids: np.ndarray, what: str) -> np.ndarray:
        if self.id_limit and ids.size and (ids.min() < 0 or ids.max() >= self.id_limit):
            kind = "class labels" if self.cond_input == "class_labels" else "token ids"
            raise ValueError(f"`{what}` holds {kind} outside [0, {self.id_limit}): min {ids.min()}, max {ids.max()}")
        return ids

    def _full_ids(self, input_ids: Any, negative_input_ids: Any) -> np.ndarray:
        """Conditional ids (+ negatives, unconditional half first when guided) as the text encoder / UNet wants them."""
        per_row = self.uncond_ids.shape  # () for class labels, (L,) for token ids
        b = self.batch_size
        ids = np.asarray(input_ids)
        if ids.shape == per_row:
            ids = np.broadcast_to(ids, (b,) + per_row)
        ids = self._check_ids(self._array(ids, (b,) + per_row, np.int64, "input_ids"), "input_ids")
        if not self.guided:
            if negative_input_ids is not None:
                raise ValueError(f"this export has no classifier-free guidance (guidance_scale = "
                                 f"{self.guidance_scale}); negative_input_ids cannot be used")
            return ids
        neg = self.uncond_ids if negative_input_ids is None else np.asarray(negative_input_ids)
        if neg.shape == per_row:
            neg = np.broadcast_to(neg, (b,) + per_row)
        neg = self._check_ids(self._array(neg, (b,) + per_row, np.int64, "negative_input_ids"),
                              "negative_input_ids")
        return np.concatenate([neg, ids], axis=0)

    def __call__(self, input_ids: Any = None, noise: Any = None, *, negative_input_ids: Any = None,
                 embeddings: Any = None, output_type: str = "np") -> np.ndarray:
        """Sample: ids (or embeddings) + initial noise → images.

        Args:
            input_ids: token ids ``[B, L]`` (Stable Diffusion; tokenise with the pipeline's CLIP tokenizer, padded to
                ``max_length``) or class labels ``[B]`` (digits); one row is broadcast to the batch.
            noise: the initial latents ``[B, C, h, w]`` (standard normal).
            negative_input_ids: the unconditional half (default: the empty prompt / null class stored at export).
            embeddings: instead of ids, the full UNet conditioning ``[M, L, D]`` (unconditional half first when
                guided); the text encoder is skipped.
            output_type: ``"np"`` (``[B, H, W, C]`` float32 in [0, 1], like diffusers' ``output_type="np"``),
                ``"latent"`` (the final latents) or ``"raw"`` (the decoder's output, NCHW).
        """
        if output_type not in ("np", "latent", "raw"):
            raise ValueError(f"output_type must be 'np', 'latent' or 'raw', got {output_type!r}")
        if noise is None:
            raise ValueError("pass the initial `noise` (standard-normal latents of shape "
                             f"{list(self.latent_shape)})")
        if (input_ids is None) == (embeddings is None):
            raise ValueError("pass exactly one of `input_ids` and `embeddings`")
        if embeddings is not None:
            if self.cond_input != "encoder_hidden_states":
                raise ValueError("this export is class-conditional: pass class labels as `input_ids`")
            if negative_input_ids is not None:
                raise ValueError("`embeddings` already hold the unconditional half; drop `negative_input_ids`")
            cond = embeddings
        else:
            ids = self._full_ids(input_ids, negative_input_ids)
            cond = self.encode(ids) if self.has_text_encoder else ids
        latents = self.denoise(noise, cond)
        if output_type == "latent":
            return latents
        image = self.decode(latents)
        if output_type == "raw":
            return image
        return self.postprocess(image)

    def postprocess(self, image: np.ndarray) -> np.ndarray:
        """Decoder output (NCHW) → ``[B, H, W, C]`` float32 in [0, 1] (diffusers' denormalisation)."""
        img = np.asarray(image, dtype=np.float32)
        if self.image_range == "[-1,1]":
            img = np.clip(img / 2 + 0.5, 0.0, 1.0)
        return np.ascontiguousarray(img.transpose(0, 2, 3, 1))

    def __repr__(self) -> str:
        return (f"OnnxOLSSRunner({self.export_dir}, steps={self.num_inference_steps}, batch={self.batch_size}, "
                f"latents={list(self.latent_shape)}, dtype={self.dtype}, guidance_scale={self.guidance_scale})")

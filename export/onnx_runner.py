"""Run an exported OLSS sampler with onnxruntime and numpy only (no torch, no diffusers, no olss_fast).

This file is self-contained on purpose: it imports only the standard library, ``numpy`` and ``onnxruntime``, and
every export written by :func:`olss_fast.export.onnx_export.export_onnx` carries a verbatim copy of it as
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
import math
import os
import re
import stat
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "EXPORT_FORMAT", "EXPORT_VERSION", "MANIFEST_NAME", "RUNNER_COPY_NAME", "OnnxOLSSRunner", "check_manifest",
    "check_metadata", "file_sha256", "input_metadata", "manifest_digest", "parse_json", "read_manifest",
    "verify_component_files",
]

EXPORT_FORMAT = "olss_fast.onnx_export"
EXPORT_VERSION = 3  # 2: strict manifest with its own digest; 3: the models' metadata also records the call inputs
MANIFEST_NAME = "manifest.json"
RUNNER_COPY_NAME = "olss_onnx_runner.py"
COMPONENTS = ("text_encoder", "denoise", "decoder")
MAX_MANIFEST_BYTES = 16 * 2**20
MAX_RUNNER_BYTES = 2**20
MAX_MANIFEST_VALUES = 2**21
#: the manifest fields about the inputs that each model's metadata repeats (``olss_fast.inputs``)
INPUT_FIELDS = ("cond_inputs", "text_input", "id_input", "uncond_ids", "id_limit", "guided", "latent_shape")
_NP_DTYPES = {"float32": np.float32, "float16": np.float16}
_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
    "tensor(int32)": np.int32, "tensor(double)": np.float64,
}
_FILE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_MANIFEST_KEYS = (
    "format", "version", "cache_key", "olss_fast", "torch", "onnx", "opset", "exporter", "pipeline",
    "num_inference_steps", "batch_size", "height", "width", "dtype", "guidance_scale", "guided", "latent_shape",
    "cond_inputs", "text_input", "id_input", "image_shape", "uncond_ids", "id_limit", "image_range", "schedule",
    "components", "runner", "runner_sha256", "manifest_sha256",
)
_COND_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}
_COMPONENT_KEYS = ("file", "bytes", "sha256", "inputs", "exporter")


def _open_file(path: "str | os.PathLike[str]", max_bytes: int) -> tuple[int, os.stat_result]:
    """Open a file once (non-blocking, not following a final link) and check the opened descriptor: a regular file of
    at most ``max_bytes``; ``ValueError`` otherwise (a FIFO, a device, a folder, a link, a huge sparse file)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise ValueError(f"{path} cannot be opened ({exc.strerror}: missing, or a link?)") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
        os.close(fd)
        raise ValueError(f"{path} is not a regular file of at most {max_bytes} bytes")
    return fd, st


def file_sha256(path: "str | os.PathLike[str]", max_bytes: int = 2**40) -> str:
    """Hex SHA-256 of a regular file of at most ``max_bytes``, read in 1 MiB chunks (``ValueError`` otherwise)."""
    fd, _ = _open_file(path, max_bytes)
    h = hashlib.sha256()
    try:
        for chunk in iter(lambda: os.read(fd, 1 << 20), b""):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def canonical_json(obj: Any) -> str:
    """Sorted-key, compact JSON (what the manifest's digest is computed over)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a manifest without its own ``manifest_sha256`` field."""
    return hashlib.sha256(canonical_json({k: v for k, v in manifest.items() if k != "manifest_sha256"}).encode()
                          ).hexdigest()


# ---------------------------------------------------------------------------------------------- strict checks
def _bad(what: str) -> ValueError:
    return ValueError(f"corrupted manifest: {what}")


def _int(m: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    v = m[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _bad(f"{key} must be an integer in [{lo}, {hi}], got {str(v)[:40]}")
    return v


def _ints(v: Any, what: str, min_len: int, max_len: int, lo: int = 1, hi: int = 2**31) -> list:
    if not isinstance(v, list) or not min_len <= len(v) <= max_len or any(
            isinstance(x, bool) or not isinstance(x, int) or not lo <= x <= hi for x in v):
        raise _bad(f"{what} must be a list of {min_len}-{max_len} integers in [{lo}, {hi}], got {str(v)[:80]}")
    return v


def _str(m: Mapping[str, Any], key: str, choices: Optional[Sequence[str]] = None, max_len: int = 4096) -> str:
    v = m[key]
    if not isinstance(v, str) or len(v) > max_len or (choices is not None and v not in choices):
        raise _bad(f"{key} must be {'one of ' + str(list(choices)) if choices else 'a string'}, got {str(v)[:60]}")
    return v


def check_manifest(m: Any) -> dict:
    """Every field of a manifest with its exact type and range, the file names plain names inside the folder, and
    the manifest's own digest; ``ValueError`` otherwise."""
    if not isinstance(m, dict) or m.get("format") != EXPORT_FORMAT:
        raise ValueError("not an olss_fast ONNX export manifest")
    if type(m.get("version")) is not int or m.get("version") != EXPORT_VERSION:
        raise ValueError(f"export format version {str(m.get('version'))[:20]}; this runner reads version "
                         f"{EXPORT_VERSION} (export again)")
    missing = [k for k in _MANIFEST_KEYS if k not in m]
    unknown = [k for k in m if k not in _MANIFEST_KEYS]
    if missing or unknown:
        raise _bad(f"missing fields {missing}, unknown fields {unknown}")
    if not isinstance(m["manifest_sha256"], str) or m["manifest_sha256"] != manifest_digest(m):
        raise ValueError("the manifest does not match its manifest_sha256 digest: it was modified or corrupted")
    n = _int(m, "num_inference_steps", 1, 1000)
    b = _int(m, "batch_size", 1, 4096)
    _int(m, "height", 1, 65536)
    _int(m, "width", 1, 65536)
    _int(m, "opset", 1, 1000)
    _int(m, "id_limit", 0, 2**31)
    _str(m, "dtype", tuple(_NP_DTYPES))
    _str(m, "image_range", ("[-1,1]", "[0,1]"))
    for key in ("cache_key", "runner_sha256"):
        if not isinstance(m[key], str) or not _HEX64.match(m[key]):
            raise _bad(f"{key} must be a SHA-256 hex digest")
    if m["runner"] != RUNNER_COPY_NAME:
        raise _bad(f"runner must be {RUNNER_COPY_NAME!r}")
    for key in ("olss_fast", "torch", "onnx", "pipeline"):
        _str(m, key, max_len=200)
    ex = m["exporter"]
    if not (isinstance(ex, str) or (isinstance(ex, list) and 1 <= len(ex) <= 4 and all(isinstance(e, str) for e in ex))):
        raise _bad("exporter must be a string or a list of strings")
    g = m["guidance_scale"]
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or abs(g) > 1e6:
        raise _bad(f"guidance_scale must be a finite number, got {str(g)[:40]}")
    if not isinstance(m["guided"], bool) or m["guided"] != (g > 1.0):
        raise _bad("guided must be true exactly when guidance_scale > 1")
    lat = _ints(m["latent_shape"], "latent_shape", 2, 5)
    if lat[0] != b or math.prod(lat) > 2**31:
        raise _bad(f"latent_shape {lat} does not fit batch_size {b}")
    conds = m["cond_inputs"]
    if not isinstance(conds, list) or not 1 <= len(conds) <= 8:
        raise _bad("cond_inputs must list 1 to 8 conditioning inputs")
    names = []
    for c in conds:
        if not isinstance(c, dict) or set(c) != {"name", "shape", "dtype", "batched"} or \
                not isinstance(c["batched"], bool):
            raise _bad("each cond_inputs entry needs exactly name, shape, dtype and batched (a bool)")
        if not isinstance(c["name"], str) or not _FILE_RE.match(c["name"]) or c["name"] in ("noise", *names):
            raise _bad(f"bad conditioning input name {str(c['name'])[:40]!r}")
        names.append(c["name"])
        shape = _ints(c["shape"], f"cond_inputs {c['name']} shape", 1, 4)
        if c["dtype"] not in _COND_DTYPES:
            raise _bad(f"cond_inputs {c['name']} dtype must be one of {list(_COND_DTYPES)}")
        if c["batched"] and shape[0] != (2 * b if m["guided"] else b):
            raise _bad(f"cond_inputs {c['name']} shape {shape} does not fit batch_size {b} (guided: {m['guided']})")
    _ints(m["image_shape"], "image_shape", 2, 5)
    u = m["uncond_ids"]
    for key in ("text_input", "id_input"):
        if m[key] is not None and m[key] not in names:
            raise _bad(f"{key} must name a conditioning input or be null")
    if m["id_input"] is not None:
        if isinstance(u, bool) or not isinstance(u, int) or not 0 <= u < max(m["id_limit"], 1):
            raise _bad("uncond_ids must be a class label")
    elif m["text_input"] is not None:
        _ints(u, "uncond_ids", 1, 4096, 0, max(m["id_limit"] - 1, 0))
    elif u is not None:
        raise _bad("uncond_ids must be null for an export that takes no ids")
    sched = m["schedule"]
    if not isinstance(sched, dict) or not isinstance(sched.get("timesteps"), list) or \
            len(sched["timesteps"]) != n or not isinstance(sched.get("coeffs"), list):
        raise _bad(f"schedule must be an OLSS schedule with {n} timesteps")
    comps = m["components"]
    if not isinstance(comps, dict) or "denoise" not in comps or "decoder" not in comps or \
            any(k not in COMPONENTS for k in comps) or ((m["text_input"] is not None) != ("text_encoder" in comps)):
        raise _bad("components must be denoise, decoder (and text_encoder for exports with a text_input)")
    names = set()
    for name, comp in comps.items():
        if not isinstance(comp, dict):
            raise _bad(f"component {name} must be an object")
        keys = set(comp)
        if not set(_COMPONENT_KEYS) <= keys or not keys <= set(_COMPONENT_KEYS) | {"external_data"}:
            raise _bad(f"component {name} has fields {sorted(keys)}")
        if "external_data" in comp and (not isinstance(comp["external_data"], list) or len(comp["external_data"]) != 1):
            raise _bad(f"component {name}: external_data must list one file")
        if not isinstance(comp["exporter"], str) or len(comp["exporter"]) > 200:
            raise _bad(f"component {name}: exporter must be a string")
        entries = [comp] + list(comp.get("external_data") or [])
        for e in entries:
            if not isinstance(e, dict) or not {"file", "bytes", "sha256"} <= set(e):
                raise _bad(f"component {name}: file entries need file, bytes and sha256")
            f = e["file"]
            if not isinstance(f, str) or not _FILE_RE.match(f) or f in (MANIFEST_NAME, RUNNER_COPY_NAME) or f in names:
                raise _bad(f"component {name}: file {str(f)[:60]!r} is not a plain file name inside the export folder")
            names.add(f)
            if isinstance(e["bytes"], bool) or not isinstance(e["bytes"], int) or not 1 <= e["bytes"] <= 2**40:
                raise _bad(f"component {name}: bytes must be a positive integer")
            if not isinstance(e["sha256"], str) or not _HEX64.match(e["sha256"]):
                raise _bad(f"component {name}: sha256 must be a hex digest")
        inputs = comp["inputs"]
        if not isinstance(inputs, dict) or not inputs:
            raise _bad(f"component {name}: inputs must map names to shapes")
        for k, v in inputs.items():
            _ints(v, f"component {name} input {str(k)[:40]}", 1, 5)
    return m


# The strict JSON rules below are those of olss_fast.core.files.parse_json, written again because this file runs
# without olss_fast (it imports only the standard library, numpy and onnxruntime); change both together.
def _no_constant(name: str) -> Any:
    raise ValueError(f"the JSON literal {name} is not a number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is beyond the float range")
    return value


def _unique(pairs: list) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the key {str(k)[:60]!r} appears twice in one object")
        out[k] = v
    return out


def parse_json(text: str, max_values: int = MAX_MANIFEST_VALUES) -> Any:
    """Strict JSON: no NaN/Infinity literals, no numbers beyond float range, no duplicate keys, and at most
    ``max_values`` values (and an eighth as many arrays and objects), counted before anything is built."""
    if text.count(",") + 1 > max_values or text.count("[") + text.count("{") > max_values // 8:
        raise ValueError(f"it holds more values than a manifest can (at most {max_values})")
    return json.loads(text, parse_constant=_no_constant, parse_float=_finite, object_pairs_hook=_unique)


def read_manifest(export_dir: "str | os.PathLike[str]") -> dict:
    """Read and check ``manifest.json`` of an export folder (``ValueError`` when missing, too large, corrupted,
    modified or foreign)."""
    folder = Path(export_dir)
    if not folder.is_dir():
        raise ValueError(f"ONNX export folder {folder} does not exist")
    path = folder / MANIFEST_NAME
    if not os.path.lexists(path):
        raise ValueError(f"{folder} is not an olss_fast ONNX export: {MANIFEST_NAME} is missing")
    fd, st = _open_file(path, MAX_MANIFEST_BYTES)
    try:
        chunks = []
        while sum(map(len, chunks)) <= st.st_size:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        manifest = parse_json(b"".join(chunks).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{path} is unreadable or corrupted (truncated?): {str(exc)[:200]}") from None
    finally:
        os.close(fd)
    try:
        return check_manifest(manifest)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def verify_component_files(export_dir: "str | os.PathLike[str]", manifest: Mapping[str, Any],
                           check_digest: bool = True) -> None:
    """Check every file the manifest lists, and the shipped runner (size always, SHA-256 when ``check_digest``);
    ``ValueError`` otherwise."""
    folder = Path(export_dir)
    listed = [(name, entry) for name, comp in manifest["components"].items()
              for entry in [comp] + list(comp.get("external_data") or [])]
    for name, entry in listed:
        path = folder / entry["file"]
        try:
            st = os.lstat(path)
        except OSError:
            raise ValueError(f"{name}: file {path} is missing from the ONNX export") from None
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{name}: {path} is not a regular file (a link or a folder?)")
        if st.st_size != int(entry["bytes"]):
            raise ValueError(
                f"{name}: file {path} has {st.st_size} bytes but the export wrote {entry['bytes']} (truncated or "
                "modified); re-export it"
            )
        if check_digest and file_sha256(path, int(entry["bytes"])) != entry["sha256"]:
            raise ValueError(f"{name}: file {path} does not match its SHA-256 in {MANIFEST_NAME} (modified?)")
    runner = folder / RUNNER_COPY_NAME
    try:  # the copy of this runner every export carries: present, a small regular file, unmodified
        digest = file_sha256(runner, MAX_RUNNER_BYTES)
    except ValueError as exc:
        raise ValueError(f"the export's runner copy: {exc}; re-export it") from None
    if check_digest and digest != manifest["runner_sha256"]:
        raise ValueError(f"{runner} does not match its SHA-256 in {MANIFEST_NAME} (modified?); re-export it")


def input_metadata(manifest: Mapping[str, Any]) -> str:
    """What every model's ``olss_fast.inputs`` metadata holds: the manifest's :data:`INPUT_FIELDS` as canonical
    JSON (an edited manifest cannot describe other inputs than the models were exported with)."""
    return canonical_json({k: manifest[k] for k in INPUT_FIELDS})


def check_metadata(name: str, props: Mapping[str, str], manifest: Mapping[str, Any]) -> None:
    """The model's own ``metadata_props`` must say what the manifest says (schedule, guidance, shapes, dtype, cache
    key): a manifest edited to describe another program is refused."""
    def fail(what: str) -> ValueError:
        return ValueError(f"{name}: the model's metadata and {MANIFEST_NAME} disagree on {what} (modified?)")

    if props.get("olss_fast.component") != name or props.get("olss_fast.cache_key") != manifest["cache_key"]:
        raise fail("the component or cache key")
    if props.get("olss_fast.dtype") != manifest["dtype"]:
        raise fail("the dtype")
    if props.get("olss_fast.image_range") != manifest["image_range"]:
        raise fail("the image range")
    if props.get("olss_fast.inputs") != input_metadata(manifest):
        raise fail("the inputs (conditioning inputs, unconditional ids, id limit)")
    try:
        sched = json.loads(props.get("olss_fast.schedule", "null"))
        shapes = json.loads(props.get("olss_fast.shapes", "null"))
        guidance = float(props.get("olss_fast.guidance_scale", "nan"))
    except (ValueError, TypeError):
        raise fail("the schedule, shapes or guidance scale") from None
    if canonical_json(sched) != canonical_json(manifest["schedule"]):
        raise fail("the schedule")
    if guidance != float(manifest["guidance_scale"]):
        raise fail("the guidance scale")
    want = {"batch_size": manifest["batch_size"], "height": manifest["height"], "width": manifest["width"],
            "latents": manifest["latent_shape"], **{c["name"]: c["shape"] for c in manifest["cond_inputs"]}}
    if shapes != want:
        raise fail("the shapes")


class OnnxOLSSRunner:
    """The exported fixed-step OLSS sampler on onnxruntime: token ids / class labels (or embeddings) + noise → image.

    Args:
        export_dir: a folder written by ``olss_fast.export.onnx_export.export_onnx`` (or ``olss-fast export --format onnx``).
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
        # read_manifest checked every field's type and range
        self.batch_size = m["batch_size"]
        self.latent_shape = tuple(m["latent_shape"])
        self.image_shape = tuple(m["image_shape"])
        self.dtype = np.dtype(_NP_DTYPES[m["dtype"]])
        self.guidance_scale = float(m["guidance_scale"])
        self.guided = m["guided"]
        #: the denoiser's conditioning inputs: name → (shape, numpy dtype), in order
        self.cond_inputs = {c["name"]: (tuple(c["shape"]), np.dtype(_COND_DTYPES[c["dtype"]]))
                            for c in m["cond_inputs"]}
        self.text_input, self.id_input = m["text_input"], m["id_input"]
        self.uncond_ids = np.asarray(m["uncond_ids"] if m["uncond_ids"] is not None else [], dtype=np.int64)
        self.id_limit = m["id_limit"]
        self.image_range = m["image_range"]
        self.schedule = dict(m["schedule"])
        self.num_inference_steps = m["num_inference_steps"]
        self.providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
        self._sessions: dict[str, Any] = {}
        for name, comp in m["components"].items():
            path = self.export_dir / comp["file"]
            try:
                sess = ort.InferenceSession(str(path), sess_options=session_options, providers=self.providers)
            except Exception as exc:  # onnxruntime raises InvalidProtobuf / Fail / InvalidGraph
                why = ("an operator this onnxruntime lacks: olss_fast's exports need onnxruntime >= 1.29"
                       if "NOT_IMPLEMENTED" in str(exc) else "truncated or corrupted?")
                raise ValueError(f"{name}: onnxruntime {ort.__version__} cannot load {path} ({why}): {exc}") from None
            self._check_signature(name, sess, comp)
            check_metadata(name, sess.get_modelmeta().custom_metadata_map, m)
            self._sessions[name] = sess
        decoded = tuple(self._sessions["decoder"].get_outputs()[0].shape)
        if decoded != self.image_shape:
            raise ValueError(f"the manifest's image_shape {list(self.image_shape)} is not the decoder's output "
                             f"{list(decoded)} (modified?)")
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
        """The n-step loop: noise (the latent shape) + the full conditioning (unconditional half first when guided)
        → final latents. ``cond`` is a dict ``{input name: array}`` (one array for an export with one input)."""
        sess = self._sessions["denoise"]
        if not isinstance(cond, Mapping):
            if len(self.cond_inputs) != 1:
                raise ValueError(f"this export takes {list(self.cond_inputs)}: pass them as a dict")
            cond = {next(iter(self.cond_inputs)): cond}
        if set(cond) != set(self.cond_inputs):
            raise ValueError(f"the conditioning must hold exactly {list(self.cond_inputs)}, got {sorted(cond)}")
        feeds = {"noise": self._array(noise, self.latent_shape, self.dtype, "noise")}
        for name, (shape, dtype) in self.cond_inputs.items():
            feeds[name] = self._array(cond[name], shape, dtype, name)
        return sess.run(None, feeds)[0]

    def decode(self, latents: Any) -> np.ndarray:
        """Decoder: latents → image ``[B, C, H, W]`` in the model's range (``manifest['image_range']``)."""
        sess = self._sessions["decoder"]
        return sess.run(None, {"latents": self._array(latents, self.latent_shape, self.dtype, "latents")})[0]

    # ------------------------------------------------------------------ the whole sampler
    def _check_ids(self, ids: np.ndarray, what: str) -> np.ndarray:
        if self.id_limit and ids.size and (ids.min() < 0 or ids.max() >= self.id_limit):
            kind = "class labels" if self.id_input is not None else "token ids"
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
                 embeddings: Any = None, conditioning: Optional[Mapping[str, Any]] = None,
                 output_type: str = "np") -> np.ndarray:
        """Sample: ids (or embeddings, or the whole conditioning) + initial noise → images.

        Args:
            input_ids: token ids ``[B, L]`` (Stable Diffusion; tokenise with the pipeline's CLIP tokenizer, padded to
                ``max_length``) or class labels ``[B]`` (digits); one row is broadcast to the batch.
            noise: the initial latents (standard normal, the export's ``latent_shape``).
            negative_input_ids: the unconditional half (default: the empty prompt / null class stored at export).
            embeddings: instead of ids, the full text conditioning ``[M, L, D]`` (unconditional half first when
                guided); the text encoder is skipped.
            conditioning: every conditioning input by name (``cond_inputs``; SD3 and Flux exports, whose text
                encoders run outside the export, take their prompt embeddings, pooled embeddings, ids and guidance
                this way).
            output_type: ``"np"`` (``[B, H, W, C]`` float32 in [0, 1], like diffusers' ``output_type="np"``),
                ``"latent"`` (the final latents) or ``"raw"`` (the decoder's output, NCHW).
        """
        if output_type not in ("np", "latent", "raw"):
            raise ValueError(f"output_type must be 'np', 'latent' or 'raw', got {output_type!r}")
        if noise is None:
            raise ValueError("pass the initial `noise` (standard-normal latents of shape "
                             f"{list(self.latent_shape)})")
        if sum(v is not None for v in (input_ids, embeddings, conditioning)) != 1:
            raise ValueError("pass exactly one of `input_ids`, `embeddings` and `conditioning`")
        if negative_input_ids is not None and input_ids is None:
            raise ValueError("`negative_input_ids` go with `input_ids`; embeddings already hold the unconditional half")
        if conditioning is not None:
            cond: Any = dict(conditioning)
        elif embeddings is not None:
            if self.text_input is None or len(self.cond_inputs) != 1:
                raise ValueError(f"this export takes {list(self.cond_inputs)}: pass `conditioning` (or class labels "
                                 "as `input_ids`)")
            cond = embeddings
        else:
            if self.text_input is None and self.id_input is None:
                raise ValueError(f"this export takes no ids: pass `conditioning` with {list(self.cond_inputs)}")
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

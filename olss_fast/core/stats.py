"""`GramStats`: float64 sufficient statistics of teacher trajectories for the OLSS search.

For a teacher run with T steps we keep, summed over samples, the Gram matrix of the 2T+1 flattened vectors
``{x[0..T], e[0..T-1]}`` (docs/design.md, "Sufficient statistics"): ``G[a, b] = Σ_samples ⟨v_a, v_b⟩``. Every
least-squares fit of the OLSS search (Duan et al. 2023, Eq. 9–10) needs only entries of G, so memory is O(T²)
whatever the number of samples or the image size, and statistics merge by addition.

One Gram matrix is kept per latent channel (``[C, M, M]``, M = 2T+1); the global one is their sum. That costs C
times the memory of a single matrix and allows per-channel coefficients (``granularity="channel"``).

The work items statistics hold are kept as ranges (:mod:`olss_fast.core.ranges`), so that merging refuses to count a
sample twice at a cost independent of the number of samples. Files are read by our own bounded safetensors reader:
every header field and the file's real size are checked against the shapes, and the digest verified, before the
matrix is allocated; the matrix is read into memory of its own (nothing stays mapped to the file).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from olss_fast.core import checks, ranges
from olss_fast.core.files import atomic_write_with, open_regular, parse_json, read_fd
from olss_fast.core.provenance import check_timesteps, describe_scheduler, scheduler_prediction_type
from olss_fast.core.step import PREDICTION_TYPES

STATS_FORMAT = "olss_fast.gram_stats"
STATS_VERSION = 2  # 2 added the digest, the work items and the recording context; version 1 is read as well
DIGEST_KEY = "olss_fast.sha256"
MAX_TEACHER_STEPS = 10_000
MAX_STATS_BYTES = 64 * 2**30
MAX_ITEMS = ranges.MAX_ITEMS
#: the dtypes recorded trajectories can have
DTYPES = ("float32", "float16", "bfloat16", "float64")
_MAX_HEADER_BYTES = 64 * 2**20
_CHUNK = 1 << 24
# cap on the float64 working copy of one update (bytes); larger batches are processed in slices
_UPDATE_CHUNK_BYTES = 256 * 2**20


class GramStats:
    """Streaming float64 Gram statistics of teacher trajectories.

    Args:
        timesteps: the teacher's T model timesteps, in sampling order (descending).
        teacher: the teacher scheduler (its class and config describe it, and give the prediction type), or a
            description string (must match to merge).
        model: a description of the model/pipeline (must match to merge).
        prediction_type: the output parametrisation of the recorded model outputs ("epsilon", "v_prediction",
            "sample" or "flow"); required unless ``teacher`` is a scheduler to take it from. Schedules searched on
            these statistics are labelled with it, and refused where it does not match.
        context: what the recording was made for (:func:`olss_fast.pipelines.provenance.recording_context`); copied into
            every schedule's ``fitted_for`` (must match to merge).
        device: where the statistics live (default CPU). Updates compute on the data's device.
    """

    def __init__(
        self,
        timesteps: Sequence[int | float],
        *,
        teacher: Any = "",
        model: str = "",
        prediction_type: str | None = None,
        context: dict[str, Any] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if not isinstance(teacher, str):  # a scheduler object
            if prediction_type is None:
                prediction_type = scheduler_prediction_type(teacher)
            teacher = describe_scheduler(teacher, len(timesteps))
        if prediction_type is None:
            raise ValueError(
                "GramStats needs the parametrisation of the model outputs you record: pass prediction_type= "
                f"(one of {PREDICTION_TYPES}, e.g. pipe.scheduler.config.prediction_type; 'flow' for flow matching) "
                "or teacher=<the teacher scheduler> to take it from"
            )
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
        ts = [t.item() if isinstance(t, torch.Tensor) else t for t in timesteps]
        if len(ts) < 1:
            raise ValueError("GramStats needs the teacher's timesteps (got an empty list)")
        if any(not math.isfinite(float(t)) for t in ts):
            raise ValueError("teacher timesteps must be finite")
        if len(set(float(t) for t in ts)) != len(ts):
            raise ValueError(
                "teacher timesteps contain duplicates: teachers that evaluate the model twice per timestep "
                "(Heun, DPM2, PNDM's PRK warm-up) cannot be recorded; use DDIM, DPM-Solver++(2M), UniPC or DEIS"
            )
        self.timesteps: list = [int(t) if float(t) == int(t) and not isinstance(t, float) else t for t in ts]
        self.teacher = str(teacher)
        self.model = str(model)
        self.prediction_type = str(prediction_type)
        if context is not None and not isinstance(context, dict):
            raise ValueError(f"context must be a dict, got {type(context).__name__}")
        self.context: dict[str, Any] = dict(context or {})
        self.device = torch.device(device)
        if len(ts) > MAX_TEACHER_STEPS:
            raise ValueError(f"a teacher has at most {MAX_TEACHER_STEPS} steps, got {len(ts)}")
        self.gram: torch.Tensor | None = None  # [C, M, M] float64, created on the first update
        self.num_samples = 0
        #: the recording's work-item indices in these statistics, as sorted ``[start, stop)`` ranges (None: unknown,
        #: e.g. updated by hand); merging statistics that share an item is refused
        self.items: list[list[int]] | None = []
        self.sample_shape: tuple[int, ...] | None = None
        self.dtype: str | None = None
        self.meta: dict[str, Any] = {}

    # ------------------------------------------------------------------ shape helpers
    @property
    def num_teacher_steps(self) -> int:
        return len(self.timesteps)

    @property
    def num_vectors(self) -> int:
        return 2 * self.num_teacher_steps + 1

    @property
    def num_channels(self) -> int:
        if self.sample_shape is None:
            raise ValueError("these statistics are empty: record at least one batch first")
        return self.sample_shape[0] if len(self.sample_shape) >= 2 else 1

    @property
    def elements_per_sample(self) -> int:
        if self.sample_shape is None:
            raise ValueError("these statistics are empty: record at least one batch first")
        return math.prod(self.sample_shape)

    def x_index(self, k: int) -> int:
        """Row of the teacher latent ``x[k]`` (k = 0..T) in the Gram matrix."""
        return k

    def e_index(self, k: int) -> int:
        """Row of the teacher model output ``e[k]`` (k = 0..T-1) in the Gram matrix."""
        return self.num_teacher_steps + 1 + k

    def global_gram(self) -> torch.Tensor:
        """``[M, M]`` Gram matrix over all elements (sum of the per-channel ones)."""
        self._require_data()
        return self.gram.sum(0)

    def _require_data(self) -> None:
        if self.gram is None or self.num_samples == 0:
            raise ValueError("these statistics hold no samples: record teacher trajectories first")

    # ------------------------------------------------------------------ update
    def update(self, x_path: torch.Tensor, e_path: torch.Tensor, items: Sequence[int] | None = None) -> "GramStats":
        """Add one batch of teacher trajectories.

        Args:
            x_path: ``[T+1, B, ...]`` teacher latents; ``x_path[0]`` the initial noise, ``x_path[T]`` the final one.
            e_path: ``[T, B, ...]`` model outputs passed to ``scheduler.step`` (after guidance) at each step.
            items: the work-item indices of the B samples (recordings pass them, so that no item is counted twice);
                None marks the statistics' item set as unknown.
        """
        T = self.num_teacher_steps
        if not isinstance(x_path, torch.Tensor) or not isinstance(e_path, torch.Tensor):
            raise ValueError("x_path and e_path must be torch tensors")
        if x_path.dim() < 3 or e_path.dim() < 3:
            raise ValueError(
                f"x_path must be [T+1, B, ...] and e_path [T, B, ...]; got shapes {list(x_path.shape)} and "
                f"{list(e_path.shape)}"
            )
        if x_path.shape[0] != T + 1 or e_path.shape[0] != T:
            raise ValueError(
                f"these statistics are for a {T}-step teacher: x_path needs {T + 1} latents and e_path {T} model "
                f"outputs, got {x_path.shape[0]} and {e_path.shape[0]}"
            )
        if x_path.shape[1:] != e_path.shape[1:]:
            raise ValueError(
                f"x_path and e_path disagree on batch/sample shape: {list(x_path.shape[1:])} vs "
                f"{list(e_path.shape[1:])}"
            )
        sample_shape = tuple(x_path.shape[2:])
        if self.sample_shape is not None and sample_shape != self.sample_shape:
            raise ValueError(
                f"sample shape {list(sample_shape)} differs from the {list(self.sample_shape)} recorded so far"
            )
        if not (torch.isfinite(x_path).all() and torch.isfinite(e_path).all()):
            raise ValueError("trajectories contain NaN or Inf (did the model diverge, or fp16 overflow?)")
        batch = x_path.shape[1]
        dtype = str(x_path.dtype).replace("torch.", "")
        if self.dtype is not None and dtype != self.dtype:
            raise ValueError(f"these statistics hold {self.dtype} trajectories, this batch is {dtype}: one recording "
                             "has one dtype")
        new_items = None
        if items is not None:
            items = [checks.integer(i.item() if isinstance(i, torch.Tensor) else i, "items", 0, ranges.MAX_ITEMS - 1)
                     for i in items]
            new_items = ranges.to_ranges(items)
            if len(items) != batch or ranges.count(new_items) != batch:
                raise ValueError(f"items must list {batch} distinct non-negative work-item indices, got "
                                 f"{str(items)[:200]}")
            if self.items is not None and ranges.shared(self.items, new_items)[0]:
                raise ValueError("these work items are already in the statistics: a sample would count twice")
        channels = sample_shape[0] if len(sample_shape) >= 2 else 1
        per_sample_bytes = self.num_vectors * math.prod(sample_shape) * 8
        chunk = max(1, _UPDATE_CHUNK_BYTES // max(per_sample_bytes, 1))
        total = torch.zeros(channels, self.num_vectors, self.num_vectors, dtype=torch.float64, device=x_path.device)
        with torch.no_grad():  # (a context, not a decorator: mutation testing skips decorated functions)
            for start in range(0, batch, chunk):
                sl = slice(start, min(batch, start + chunk))
                v = torch.cat([x_path[:, sl], e_path[:, sl]], dim=0).to(torch.float64)  # [M, b, ...]
                v = v.reshape(self.num_vectors, v.shape[1], channels, -1)  # [M, b, C, P]
                v = v.permute(2, 0, 1, 3).reshape(channels, self.num_vectors, -1)  # [C, M, b*P]
                total += torch.bmm(v, v.transpose(1, 2))
        total = total.to(self.device)
        if self.gram is None:
            self.gram = total
            self.sample_shape = sample_shape
            self.dtype = dtype
        else:
            self.gram += total
        self.num_samples += batch
        self.items = None if new_items is None or self.items is None else ranges.union(self.items, new_items)
        return self

    # ------------------------------------------------------------------ merge
    def _check_compatible(self, other: "GramStats") -> None:
        def differ(what: str, a: Any, b: Any) -> ValueError:
            return ValueError(f"cannot merge statistics recorded with different {what}: {a!r} vs {b!r}")

        if [float(t) for t in self.timesteps] != [float(t) for t in other.timesteps]:
            raise differ("teacher timesteps", self.timesteps[:4] + ["..."], other.timesteps[:4] + ["..."])
        if self.teacher != other.teacher:
            raise differ("teachers", self.teacher, other.teacher)
        if self.model != other.model:
            raise differ("models", self.model, other.model)
        if self.prediction_type != other.prediction_type:
            raise differ("prediction types", self.prediction_type, other.prediction_type)
        if self.context != other.context:
            keys = sorted(k for k in set(self.context) | set(other.context) if self.context.get(k) != other.context.get(k))
            raise ValueError(f"cannot merge statistics recorded for different settings (context differs in {keys})")
        if self.sample_shape is not None and other.sample_shape is not None and self.sample_shape != other.sample_shape:
            raise differ("sample shapes", self.sample_shape, other.sample_shape)
        if self.dtype is not None and other.dtype is not None and self.dtype != other.dtype:
            raise differ("dtypes", self.dtype, other.dtype)

    def _check_disjoint(self, other: "GramStats", disjoint: bool) -> None:
        if other is self and self.num_samples:
            raise ValueError("cannot merge statistics with themselves: every sample would count twice")
        if not (self.num_samples and other.num_samples):
            return
        if self.items is None or other.items is None:
            if not disjoint:
                raise ValueError(
                    "cannot tell whether these statistics share samples: they record no work items (updated without "
                    "items=, or a version-1 file), and merging a recording with itself would count every sample "
                    "twice. Pass items= to update(), or, if you know the parts are disjoint, merge with "
                    "a.merge_(b, disjoint=True)")
            return
        count, first = ranges.shared(self.items, other.items)
        if count:
            raise ValueError(f"cannot merge statistics that share {count} work item(s) (e.g. item {first}): those "
                             "samples would count twice")

    def __add__(self, other: "GramStats") -> "GramStats":
        if not isinstance(other, GramStats):
            return NotImplemented
        self._check_compatible(other)
        self._check_disjoint(other, False)
        out = self.copy()
        out.merge_(other)
        return out

    def merge_(self, other: "GramStats", disjoint: bool = False) -> "GramStats":
        """In-place merge (``self += other``). Statistics sharing work items are refused; so are statistics that do
        not record their work items, unless ``disjoint=True`` states that they share no sample."""
        self._check_compatible(other)
        self._check_disjoint(other, checks.boolean(disjoint, "disjoint"))
        if other.gram is None:
            return self
        if self.gram is None:
            self.gram = other.gram.to(self.device).clone()
            self.sample_shape = other.sample_shape
            self.dtype = other.dtype
        else:
            self.gram += other.gram.to(self.device)
        self.num_samples += other.num_samples
        self.items = None if self.items is None or other.items is None else ranges.union(self.items, other.items)
        return self

    __iadd__ = merge_

    def copy(self) -> "GramStats":
        out = GramStats(
            self.timesteps, teacher=self.teacher, model=self.model, prediction_type=self.prediction_type,
            context=json.loads(json.dumps(self.context)), device=self.device,
        )
        out.gram = None if self.gram is None else self.gram.clone()
        out.num_samples = self.num_samples
        out.sample_shape = self.sample_shape
        out.dtype = self.dtype
        out.meta = json.loads(json.dumps(self.meta))
        out.items = None if self.items is None else [list(r) for r in self.items]
        return out

    # ------------------------------------------------------------------ persistence
    def header(self) -> dict[str, Any]:
        return {
            "format": STATS_FORMAT,
            "version": STATS_VERSION,
            "timesteps": self.timesteps,
            "teacher": self.teacher,
            "model": self.model,
            "prediction_type": self.prediction_type,
            "context": self.context,
            "num_samples": self.num_samples,
            "sample_shape": list(self.sample_shape) if self.sample_shape is not None else None,
            "dtype": self.dtype,
            "items": self.items,
            "meta": self.meta,
        }

    def save(self, path: str | os.PathLike, lock: bool = True) -> None:
        """Write to a safetensors file (tensor ``gram``, the JSON header and the SHA-256 digest of both in its
        metadata), atomically, holding the file's exclusive lock (``lock=False``: the caller holds it; a second
        writer gets a ``ValueError``)."""
        from safetensors.torch import save_file

        self._require_data()
        header = json.dumps(self.header(), allow_nan=False)
        gram = self.gram.detach().cpu().contiguous()
        metadata = {"olss_fast": header, DIGEST_KEY: stats_digest(header, gram)}
        atomic_write_with(path, lambda tmp: save_file({"gram": gram}, str(tmp), metadata=metadata), lock)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> "GramStats":
        """Read statistics written by :meth:`save`: ``ValueError`` if the file is missing, too large, not ours,
        modified (digest), or holds a matrix that cannot be a Gram matrix (not finite, symmetric and positive
        semi-definite within rounding)."""
        path = Path(path)
        try:
            return cls._load(path, device)
        except ValueError as exc:
            msg = str(exc)
            raise ValueError(msg if str(path) in msg else f"statistics file {path}: {msg}") from None

    @classmethod
    def _load(cls, path: Path, device: torch.device | str) -> "GramStats":
        fd, st = open_regular(path, MAX_STATS_BYTES, "statistics file")
        try:
            metadata, entry, data_start = _safetensors_header(fd, st.st_size)
            header = _parse_header(metadata["olss_fast"])
            m = 2 * len(header["timesteps"]) + 1
            channels = _channels(header["sample_shape"])
            nbytes = channels * m * m * 8
            if entry["dtype"] != "F64" or entry["shape"] != [channels, m, m]:
                raise ValueError(f"its gram tensor is {str(entry['dtype'])[:10]} {str(entry['shape'])[:60]}, "
                                 f"expected F64 [{channels}, {m}, {m}]")
            if entry["data_offsets"] != [0, nbytes] or st.st_size != data_start + nbytes:
                raise ValueError(f"its size ({st.st_size} bytes) does not fit its header's {channels}×{m}×{m} Gram "
                                 "matrix (truncated, or not one of ours)")
            stored = metadata.get(DIGEST_KEY)
            if header["version"] >= 2:  # verified before anything the size of the matrix is allocated
                checks.hex_digest(stored, "its digest")
                if _file_digest(fd, metadata["olss_fast"], data_start, nbytes) != stored:
                    raise ValueError("the statistics do not match their sha256 digest: the file was modified or "
                                     "corrupted after it was written")
            elif stored is not None:
                raise ValueError("a version-1 statistics file carries no digest")
            gram = torch.empty(channels, m, m, dtype=torch.float64)  # our own copy: nothing stays mapped to the file
            data = gram.numpy()
            view = memoryview(data).cast("B")
            for pos in range(0, nbytes, _CHUNK):
                view[pos:pos + min(_CHUNK, nbytes - pos)] = read_fd(fd, min(_CHUNK, nbytes - pos), "its Gram matrix",
                                                                    data_start + pos)
            if sys.byteorder != "little":  # pragma: no cover - safetensors stores little-endian
                data.byteswap(inplace=True)
            if stored is not None and stats_digest(metadata["olss_fast"], gram) != stored:
                raise ValueError("the file changed while it was being read")
        finally:
            os.close(fd)
        stats = cls(header["timesteps"], teacher=header["teacher"], model=header["model"],
                    prediction_type=header["prediction_type"], context=header["context"], device=device)
        stats.num_samples = header["num_samples"]
        stats.sample_shape = tuple(header["sample_shape"])
        stats.dtype = header["dtype"]
        stats.meta = header["meta"]
        stats.items = header["items"]
        if stats.items is not None and ranges.count(stats.items) != stats.num_samples:
            raise ValueError(f"it lists {ranges.count(stats.items)} work items but holds {stats.num_samples} samples")
        check_gram(gram, stats.num_samples)
        stats.gram = gram.to(stats.device)
        return stats

    def __repr__(self) -> str:
        return (
            f"GramStats(T={self.num_teacher_steps}, samples={self.num_samples}, sample_shape={self.sample_shape}, "
            f"teacher={self.teacher!r})"
        )


# ---------------------------------------------------------------------------------------------- helpers
def _safetensors_header(fd: int, size: int) -> tuple[dict[str, str], dict[str, Any], int]:
    """The metadata, the ``gram`` tensor entry and where the data starts, from a safetensors file's header (8-byte
    little-endian length, then JSON), every field checked before anything is allocated."""
    if size < 8:
        raise ValueError("not a safetensors file (truncated?)")
    n = int.from_bytes(read_fd(fd, 8, "its header length"), "little")
    if not 2 <= n <= min(_MAX_HEADER_BYTES, size - 8):
        raise ValueError(f"not a safetensors file (header length {n}; truncated or not ours)")
    outer = checks.mapping(parse_json(read_fd(fd, n, "its header", 8), "its safetensors header"),
                           "its safetensors header")
    metadata = outer.get("__metadata__")
    if set(outer) != {"gram", "__metadata__"} or not isinstance(metadata, dict) or "olss_fast" not in metadata:
        raise ValueError("not an olss_fast statistics file (no 'gram' tensor or no olss_fast header)")
    for k, v in metadata.items():
        checks.string(v, f"its metadata {str(k)[:40]}", _MAX_HEADER_BYTES)
    entry = checks.mapping(outer["gram"], "its gram tensor entry", ("dtype", "shape", "data_offsets"))
    return metadata, entry, 8 + n


def _file_digest(fd: int, header: str, start: int, nbytes: int) -> str:
    """:func:`stats_digest` of a file's header text and data, read in chunks."""
    h = hashlib.sha256(header.encode())
    for pos in range(0, nbytes, _CHUNK):
        h.update(read_fd(fd, min(_CHUNK, nbytes - pos), "its Gram matrix", start + pos))
    return h.hexdigest()


def stats_digest(header: str, gram: torch.Tensor) -> str:
    """The statistics file's digest: SHA-256 of its JSON header and the Gram matrix bytes."""
    h = hashlib.sha256(header.encode())
    h.update(memoryview(gram.detach().cpu().contiguous().numpy()).cast("B"))
    return h.hexdigest()


def _channels(sample_shape: list[int] | None) -> int:
    if sample_shape is None:
        raise ValueError("the header holds no sample shape (empty statistics are never written)")
    return sample_shape[0] if len(sample_shape) >= 2 else 1


_HEADER_V2 = ("format", "version", "timesteps", "teacher", "model", "prediction_type", "context", "num_samples",
              "sample_shape", "dtype", "items", "meta")
_HEADER_V1 = ("format", "version", "timesteps", "teacher", "model", "prediction_type", "num_samples",
              "sample_shape", "dtype", "meta")


def _parse_header(text: Any) -> dict[str, Any]:
    """The statistics header, every field type- and range-checked (version 1 headers get the version 2 defaults)."""
    h = checks.mapping(parse_json(checks.string(text, "the header", _MAX_HEADER_BYTES), "the header"), "the header")
    if h.get("format") != STATS_FORMAT:
        raise ValueError(f"not an olss_fast statistics file (format {str(h.get('format'))[:60]!r})")
    version = checks.version(h.get("version"), "statistics format", (1, 2))
    checks.mapping(h, "the header", _HEADER_V2 if version == 2 else _HEADER_V1)
    ts = checks.listing(h["timesteps"], "timesteps", MAX_TEACHER_STEPS)
    if not ts:
        raise ValueError("the header lists no teacher timesteps")
    for t in ts:
        checks.real(t, "teacher timesteps", 0.0, 100_000.0)
    if h["prediction_type"] not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {str(h['prediction_type'])[:30]!r}")
    checks.string(h["teacher"], "teacher")
    checks.string(h["model"], "model")
    checks.integer(h["num_samples"], "num_samples", 1, MAX_ITEMS)
    shape = checks.listing(h["sample_shape"], "sample_shape", 8)
    if not shape or any(checks.integer(v, "sample_shape", 1, 2**31) < 1 for v in shape) or \
            math.prod(shape) > 2**40 or (len(shape) >= 2 and shape[0] > 4096):
        raise ValueError(f"sample_shape {shape} is not a latent shape")
    if h["dtype"] is not None or version == 2:
        checks.choice(h["dtype"], "dtype", DTYPES)
    checks.mapping(h["meta"], "meta")
    if version == 2:
        checks.mapping(h["context"], "context")
        check_timesteps(ts, h["context"].get("noise_schedule"), "the statistics' teacher timesteps")
        if h["items"] is not None:
            h["items"] = ranges.check_ranges(h["items"], "items")
    else:
        h["context"], h["items"] = {}, None
    return h


def check_gram(gram: torch.Tensor, num_samples: int) -> None:
    """``ValueError`` unless ``gram`` ``[C, M, M]`` can be a Gram matrix of recorded vectors: finite, symmetric,
    a positive squared norm of the initial noise, a non-negative diagonal and positive semi-definite within rounding
    (the Jacobi-scaled matrix plus 1e-8·I has a Cholesky factor)."""
    if not torch.isfinite(gram).all():
        raise ValueError("its Gram matrix contains NaN or Inf (corrupted)")
    scale = gram.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-300)
    if ((gram - gram.transpose(1, 2)).abs() / scale).max() > 1e-9:
        raise ValueError("its Gram matrix is not symmetric (corrupted)")
    diag = torch.diagonal(gram, dim1=1, dim2=2)
    if (diag < 0).any():
        raise ValueError("its Gram matrix has a negative diagonal entry (a negative squared norm): corrupted")
    if num_samples > 0 and not (diag[:, 0] > 0).all():
        raise ValueError("its Gram matrix gives the initial noise a zero squared norm: it holds no real samples")
    bound = (diag.unsqueeze(-1) * diag.unsqueeze(-2)).sqrt()  # Cauchy–Schwarz: |<a, b>| <= |a| |b|
    if (gram.abs() > bound * (1 + 1e-8) + 1e-12 * scale).any():
        raise ValueError("its Gram matrix has an entry larger than the product of the two norms (|G_ij| > "
                         "sqrt(G_ii G_jj), e.g. a zero squared norm with a non-zero inner product): corrupted")
    inv = torch.where(diag > 0, diag.rsqrt(), torch.zeros_like(diag))
    scaled = gram * inv.unsqueeze(-1) * inv.unsqueeze(-2)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype)
    _, info = torch.linalg.cholesky_ex(scaled + 1e-8 * eye)
    if (info != 0).any():
        raise ValueError("its Gram matrix is not positive semi-definite (no set of vectors has it): corrupted")

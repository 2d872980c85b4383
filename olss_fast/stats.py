"""`GramStats`: float64 sufficient statistics of teacher trajectories for the OLSS search.

For a teacher run with T steps we keep, summed over samples, the Gram matrix of the 2T+1 flattened vectors
``{x[0..T], e[0..T-1]}`` (docs/design.md, "Sufficient statistics"): ``G[a, b] = Σ_samples ⟨v_a, v_b⟩``. Every
least-squares fit of the OLSS search (Duan et al. 2023, Eq. 9–10) needs only entries of G, so memory is O(T²)
whatever the number of samples or the image size, and statistics merge by addition.

One Gram matrix is kept per latent channel (``[C, M, M]``, M = 2T+1); the global one is their sum. That costs C
times the memory of a single matrix and allows per-channel coefficients (``granularity="channel"``).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from ._io import atomic_write_with

STATS_FORMAT = "olss_fast.gram_stats"
STATS_VERSION = 1
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
        context: what the recording was made for (:func:`olss_fast.provenance.recording_context`); copied into
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
        from .step import PREDICTION_TYPES

        if not isinstance(teacher, str):  # a scheduler object
            from .recording import describe_scheduler, teacher_prediction_type

            if prediction_type is None:
                prediction_type = teacher_prediction_type(teacher)
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
        self.gram: torch.Tensor | None = None  # [C, M, M] float64, created on the first update
        self.num_samples = 0
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
    @torch.no_grad()
    def update(self, x_path: torch.Tensor, e_path: torch.Tensor) -> "GramStats":
        """Add one batch of teacher trajectories.

        Args:
            x_path: ``[T+1, B, ...]`` teacher latents; ``x_path[0]`` the initial noise, ``x_path[T]`` the final one.
            e_path: ``[T, B, ...]`` model outputs passed to ``scheduler.step`` (after guidance) at each step.
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
        channels = sample_shape[0] if len(sample_shape) >= 2 else 1
        per_sample_bytes = self.num_vectors * math.prod(sample_shape) * 8
        chunk = max(1, _UPDATE_CHUNK_BYTES // max(per_sample_bytes, 1))
        total = torch.zeros(channels, self.num_vectors, self.num_vectors, dtype=torch.float64, device=x_path.device)
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
            self.dtype = str(x_path.dtype).replace("torch.", "")
        else:
            self.gram += total
        self.num_samples += batch
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

    def __add__(self, other: "GramStats") -> "GramStats":
        if not isinstance(other, GramStats):
            return NotImplemented
        self._check_compatible(other)
        out = self.copy()
        out.merge_(other)
        return out

    def merge_(self, other: "GramStats") -> "GramStats":
        """In-place merge (``self += other``)."""
        self._check_compatible(other)
        if other.gram is None:
            return self
        if self.gram is None:
            self.gram = other.gram.to(self.device).clone()
            self.sample_shape = other.sample_shape
            self.dtype = other.dtype
        else:
            self.gram += other.gram.to(self.device)
        self.num_samples += other.num_samples
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
            "meta": self.meta,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write to a safetensors file (tensor ``gram`` + JSON header in its metadata), atomically."""
        from safetensors.torch import save_file

        self._require_data()
        header = json.dumps(self.header(), allow_nan=False)
        gram = self.gram.detach().cpu().contiguous()
        atomic_write_with(path, lambda tmp: save_file({"gram": gram}, str(tmp), metadata={"olss_fast": header}))

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> "GramStats":
        """Read statistics written by :meth:`save`; ``ValueError`` if the file is missing, corrupted or foreign."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"statistics file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as fh:
                metadata = fh.metadata() or {}
                gram = fh.get_tensor("gram") if "gram" in fh.keys() else None
        except Exception as exc:  # safetensors raises its own error types for truncated headers/data
            raise ValueError(f"statistics file {path} is not a readable safetensors file (truncated?): {exc}") from None
        if gram is None or "olss_fast" not in metadata:
            raise ValueError(f"{path} is not an olss_fast statistics file (no 'gram' tensor or header)")
        try:
            header = json.loads(metadata["olss_fast"])
        except json.JSONDecodeError as exc:
            raise ValueError(f"statistics file {path} has a corrupted header: {exc}") from None
        if header.get("format") != STATS_FORMAT or header.get("version") != STATS_VERSION:
            raise ValueError(
                f"{path}: unsupported statistics format/version {header.get('format')!r}/{header.get('version')!r}"
            )
        stats = cls(
            header["timesteps"], teacher=header.get("teacher", ""), model=header.get("model", ""),
            prediction_type=header.get("prediction_type", "epsilon"), context=header.get("context") or {},
            device=device,
        )
        M = stats.num_vectors
        if gram.dim() != 3 or tuple(gram.shape[1:]) != (M, M) or gram.dtype != torch.float64:
            raise ValueError(f"{path}: gram tensor has shape {list(gram.shape)}/{gram.dtype}, expected [C, {M}, {M}] float64")
        if not torch.isfinite(gram).all():
            raise ValueError(f"{path}: gram tensor contains NaN or Inf (corrupted)")
        if not torch.allclose(gram, gram.transpose(1, 2)):
            raise ValueError(f"{path}: gram tensor is not symmetric (corrupted)")
        stats.gram = gram.to(stats.device)
        stats.num_samples = int(header.get("num_samples", 0))
        stats.sample_shape = tuple(header["sample_shape"]) if header.get("sample_shape") else None
        stats.dtype = header.get("dtype")
        stats.meta = header.get("meta", {}) or {}
        if stats.sample_shape is not None and stats.num_channels != gram.shape[0]:
            raise ValueError(f"{path}: {gram.shape[0]} channel Gram matrices for sample shape {stats.sample_shape}")
        return stats

    def __repr__(self) -> str:
        return (
            f"GramStats(T={self.num_teacher_steps}, samples={self.num_samples}, sample_shape={self.sample_shape}, "
            f"teacher={self.teacher!r})"
        )

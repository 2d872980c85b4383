"""`OLSSSchedule`: a searched n-step sampler (timesteps + coefficient matrix), stored as versioned JSON.

Student step j evaluates the model at ``timesteps[j]`` (teacher index ``indices[j]``) and produces the next latent

    x_{j+1} = w_j · x_0 + Σ_{l ≤ j} v_{j,l} · e_l                       (OLSS, Duan et al. 2023, Eq. 8)

with row j of ``coeffs`` = ``[w_j, v_{j,0}, …, v_{j,j}, 0, …]``. ``coeffs`` is ``[n, n+1]`` for one coefficient set
shared by every latent element (``granularity="global"``, the paper's), or ``[C, n, n+1]`` for one set per latent
channel (``granularity="channel"``).
"""
from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ._io import atomic_write_text
from .step import PREDICTION_TYPES

SCHEDULE_FORMAT = "olss_fast.schedule"
SCHEDULE_VERSION = 2  # 2 added ``fitted_for``; version 1 files are read with an empty one
READ_VERSIONS = (1, 2)
GRANULARITIES = ("global", "channel")


@dataclass
class OLSSSchedule:
    """A fixed n-step OLSS sampler.

    Attributes:
        timesteps: model timesteps, length n, strictly descending (ints for VP models, floats for flow matching).
        indices: teacher step indices of the path, ``indices[0] == 0``, strictly increasing, ``< teacher_steps``.
        coeffs: float64 ``[n, n+1]`` (global) or ``[C, n, n+1]`` (per channel); row j is lower-triangular padded.
        errors: per-step fit MSE on the data the coefficients were fitted on (teacher or student trajectories).
        teacher_steps: T, the teacher's number of steps (``indices`` live in ``[0, T)``).
        prediction_type: the model's output parametrisation the coefficients apply to (informational).
        path: how the path was chosen ("uniform", "minimax", "ddim", ...).
        refined: whether the coefficients come from the student-in-the-loop re-fit.
        teacher: a short description of the teacher sampler.
        fitted_for: what the coefficients were fitted for (model, noise schedule, guidance scale, latent shape,
            teacher, prompt set; see :mod:`olss_fast.provenance`), checked wherever the schedule is used.
        meta: free-form JSON-serialisable extra information (sample counts, library version, ...).
    """

    timesteps: list
    indices: list[int]
    coeffs: torch.Tensor
    errors: list[float] = field(default_factory=list)
    teacher_steps: int = 0
    prediction_type: str = "epsilon"
    path: str = "uniform"
    refined: bool = False
    teacher: str = ""
    fitted_for: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.coeffs = torch.as_tensor(self.coeffs, dtype=torch.float64).detach().cpu().clone()
        self.timesteps = [_plain_number(t) for t in self.timesteps]
        self.indices = [int(i) for i in self.indices]
        self.errors = [float(e) for e in self.errors]
        if not self.teacher_steps and self.indices:
            self.teacher_steps = self.indices[-1] + 1
        self.validate()

    # ------------------------------------------------------------------ properties
    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def granularity(self) -> str:
        return "channel" if self.coeffs.dim() == 3 else "global"

    @property
    def num_channels(self) -> int | None:
        return int(self.coeffs.shape[0]) if self.coeffs.dim() == 3 else None

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` describing the first inconsistency found."""
        n = len(self.timesteps)
        if n < 1:
            raise ValueError("an OLSS schedule needs at least one step (timesteps is empty)")
        if len(self.indices) != n:
            raise ValueError(f"schedule has {n} timesteps but {len(self.indices)} indices; they must match")
        c = self.coeffs
        if c.dim() not in (2, 3) or tuple(c.shape[-2:]) != (n, n + 1):
            raise ValueError(
                f"coeffs must have shape [n, n+1] = [{n}, {n + 1}] (global) or [C, {n}, {n + 1}] (per channel) "
                f"for {n} timesteps, got {list(c.shape)}"
            )
        if c.dim() == 3 and c.shape[0] < 1:
            raise ValueError("per-channel coeffs need at least one channel")
        if not torch.isfinite(c).all():
            raise ValueError("coeffs contain NaN or Inf; the schedule is unusable (re-run the search)")
        upper = torch.triu(c, diagonal=2)
        if upper.abs().max().item() > 0:
            raise ValueError("coeffs row j may only use x0 and e_0..e_j: entries right of column j+1 must be zero")
        for t in self.timesteps:
            if not math.isfinite(float(t)):
                raise ValueError(f"timesteps must be finite numbers, got {t!r}")
        if any(float(a) <= float(b) for a, b in zip(self.timesteps, self.timesteps[1:])):
            raise ValueError(f"timesteps must be strictly descending, got {self.timesteps}")
        if self.indices[0] != 0:
            raise ValueError(f"the path must start at teacher index 0, got indices[0] = {self.indices[0]}")
        if any(a >= b for a, b in zip(self.indices, self.indices[1:])):
            raise ValueError(f"indices must be strictly increasing, got {self.indices}")
        if self.teacher_steps < self.indices[-1] + 1:
            raise ValueError(
                f"teacher_steps = {self.teacher_steps} but the path uses teacher index {self.indices[-1]}"
            )
        if self.errors and len(self.errors) != n:
            raise ValueError(f"errors must have one entry per step ({n}), got {len(self.errors)}")
        if any(not math.isfinite(e) for e in self.errors):
            raise ValueError("errors contain NaN or Inf")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}; expected one of {PREDICTION_TYPES}")
        if self.granularity not in GRANULARITIES:  # pragma: no cover - derived from shape
            raise ValueError(f"unknown granularity {self.granularity}")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SCHEDULE_FORMAT,
            "version": SCHEDULE_VERSION,
            "num_steps": self.num_steps,
            "granularity": self.granularity,
            "timesteps": list(self.timesteps),
            "indices": list(self.indices),
            "coeffs": self.coeffs.tolist(),
            "errors": list(self.errors),
            "teacher_steps": int(self.teacher_steps),
            "prediction_type": self.prediction_type,
            "path": self.path,
            "refined": bool(self.refined),
            "teacher": self.teacher,
            "fitted_for": self.fitted_for,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Any) -> "OLSSSchedule":
        """Build a schedule from :meth:`to_dict` output, validating everything (``ValueError`` on any problem)."""
        if not isinstance(data, dict):
            raise ValueError(f"an OLSS schedule must be a JSON object, got {type(data).__name__}")
        if data.get("format", SCHEDULE_FORMAT) != SCHEDULE_FORMAT:
            raise ValueError(f"not an OLSS schedule (format = {data.get('format')!r})")
        version = data.get("version")
        if version not in READ_VERSIONS or isinstance(version, bool):
            raise ValueError(
                f"unsupported OLSS schedule version {version!r}; this olss_fast reads versions {READ_VERSIONS}"
            )
        missing = [k for k in ("timesteps", "indices", "coeffs") if k not in data]
        if missing:
            raise ValueError(f"OLSS schedule is missing field(s) {missing}")
        try:
            coeffs = torch.tensor(data["coeffs"], dtype=torch.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"OLSS schedule coeffs are not a rectangular numeric array: {exc}") from None
        for key in ("timesteps", "indices", "errors"):
            value = data.get(key, [])
            if not isinstance(value, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
            ):
                raise ValueError(f"OLSS schedule field {key!r} must be a list of numbers")
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise ValueError("OLSS schedule field 'meta' must be an object")
        fitted_for = data.get("fitted_for", {})
        if not isinstance(fitted_for, dict):
            raise ValueError("OLSS schedule field 'fitted_for' must be an object")
        sched = cls(
            timesteps=data["timesteps"],
            indices=data["indices"],
            coeffs=coeffs,
            errors=data.get("errors", []),
            teacher_steps=int(data.get("teacher_steps", 0)),
            prediction_type=str(data.get("prediction_type", "epsilon")),
            path=str(data.get("path", "uniform")),
            refined=bool(data.get("refined", False)),
            teacher=str(data.get("teacher", "")),
            fitted_for=fitted_for,
            meta=meta,
        )
        if "num_steps" in data and data["num_steps"] != sched.num_steps:
            raise ValueError(f"num_steps = {data['num_steps']} does not match {sched.num_steps} timesteps")
        if "granularity" in data and data["granularity"] != sched.granularity:
            raise ValueError(
                f"granularity = {data['granularity']!r} does not match coeffs of shape {list(sched.coeffs.shape)}"
            )
        return sched

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)

    def save(self, path: str | os.PathLike) -> None:
        """Write the schedule as JSON, atomically (never pickle)."""
        self.validate()
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "OLSSSchedule":
        """Read and validate a schedule written by :meth:`save`."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ValueError(f"schedule file {path} does not exist") from None
        except UnicodeDecodeError:
            raise ValueError(f"schedule file {path} is not UTF-8 JSON (corrupted?)") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"schedule file {path} is not valid JSON (truncated or corrupted?): {exc}") from None
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"schedule file {path}: {exc}") from None

    # ------------------------------------------------------------------ helpers
    def coeffs_as(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        return self.coeffs.to(device=device, dtype=dtype)

    def __repr__(self) -> str:  # short and useful
        errs = ", ".join(f"{e:.3g}" for e in self.errors)
        return (
            f"OLSSSchedule(n={self.num_steps}, timesteps={self.timesteps}, path={self.path!r}, "
            f"granularity={self.granularity!r}, refined={self.refined}, errors=[{errs}])"
        )


def _plain_number(t: Any) -> int | float:
    """A timestep as a plain Python number: int for integer types, float otherwise."""
    if isinstance(t, torch.Tensor):
        t = t.item()
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise ValueError(f"timesteps must be numbers, got {t!r}")
    return int(t) if isinstance(t, numbers.Integral) else float(t)


def stack_schedules_by_steps(schedules: Sequence[OLSSSchedule]) -> dict[int, OLSSSchedule]:
    """Key schedules by step count; ``ValueError`` on duplicates."""
    out: dict[int, OLSSSchedule] = {}
    for s in schedules:
        if not isinstance(s, OLSSSchedule):
            raise ValueError(f"expected OLSSSchedule objects, got {type(s).__name__}")
        if s.num_steps in out:
            raise ValueError(f"two schedules with {s.num_steps} steps; keep one schedule per step count")
        out[s.num_steps] = s
    return out

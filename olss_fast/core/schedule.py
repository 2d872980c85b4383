"""`OLSSSchedule`: a searched n-step sampler (timesteps + coefficient matrix), stored as versioned JSON.

Student step j evaluates the model at ``timesteps[j]`` (teacher index ``indices[j]``) and produces the next latent

    x_{j+1} = w_j · x_0 + Σ_{l ≤ j} v_{j,l} · e_l                       (OLSS, Duan et al. 2023, Eq. 8)

with row j of ``coeffs`` = ``[w_j, v_{j,0}, …, v_{j,j}, 0, …]``. ``coeffs`` is ``[n, n+1]`` for one coefficient set
shared by every latent element (``granularity="global"``, the paper's), or ``[C, n, n+1]`` for one set per latent
channel (``granularity="channel"``).

**The file format** (version 2) is strict: every field has one JSON type (no coercion: ``3.5`` is not an index,
``"false"`` is not a bool), numbers are range-checked in the dtype they are used in (coefficients and float timesteps
in float32), unknown fields are refused, and the ``sha256`` field (a digest of the canonical JSON of all other fields)
must match: an edited or bit-flipped file is a ``ValueError``, never a silently different sampler. Versions are exact
integers, duplicate keys and numbers beyond float range are refused, coefficients are bounded by :data:`MAX_COEFF`
and a file holds at most :data:`MAX_COEFFS` coefficients (and :data:`MAX_JSON_VALUES` values), checked before
anything is built. Timesteps must lie on the noise schedule the file records (``fitted_for.noise_schedule``). Version 1
files (olss_fast 0.1, no digest, no ``fitted_for``) are read with a warning naming each such file.

The digest detects corruption and careless edits, not tampering: anyone can recompute it (docs/design.md, "Trust
boundaries"), so every field is also checked for what it means.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from olss_fast.core import checks
from olss_fast.core.files import atomic_write_text, digest, read_json
from olss_fast.core.provenance import REFUSED, check_timesteps
from olss_fast.core.step import PREDICTION_TYPES

logger = logging.getLogger(__name__)

SCHEDULE_FORMAT = "olss_fast.schedule"
SCHEDULE_VERSION = 2  # 2 added ``fitted_for`` and the ``sha256`` digest; version 1 files are read with a warning
READ_VERSIONS = (1, 2)
GRANULARITIES = ("global", "channel")
#: bounds of what a schedule can hold (far beyond any real one; they keep hostile files from costing memory)
MAX_STEPS = 1000
MAX_TEACHER_STEPS = 10_000
MAX_CHANNELS = 4096
MAX_TIMESTEP = 100_000
MAX_SCHEDULE_BYTES = 64 * 2**20
#: the most coefficients a schedule holds (a 1000-step global schedule, or 64 channels of 180 steps)
MAX_COEFFS = 2**21
#: the most JSON values a schedule file may hold (counted before parsing)
MAX_JSON_VALUES = 2**22
#: the largest coefficient magnitude a usable sampler has (fitted ones stay below 1e4; larger ones only amplify
#: rounding, and 1e30 overflows float32 in the combination)
MAX_COEFF = 1e8
_FIELDS_V2 = ("format", "version", "num_steps", "granularity", "timesteps", "indices", "coeffs", "errors",
              "teacher_steps", "prediction_type", "path", "refined", "teacher", "fitted_for", "meta", "sha256")
_FIELDS_V1 = ("format", "version", "num_steps", "granularity", "timesteps", "indices", "coeffs", "errors",
              "teacher_steps", "prediction_type", "path", "refined", "teacher", "meta")


def _index(i: Any, what: str) -> int:
    if isinstance(i, torch.Tensor) and i.numel() == 1 and not i.is_floating_point():
        i = i.item()
    if isinstance(i, bool) or not isinstance(i, numbers.Integral):
        raise ValueError(f"{what} must be integers, got {i!r}")
    return int(i)


def _timestep(t: Any) -> int | float:
    """A timestep as a plain Python number: int for integer types, float otherwise (finite, in range)."""
    if isinstance(t, torch.Tensor):
        t = t.item()
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise ValueError(f"timesteps must be numbers, got {t!r}")
    if isinstance(t, numbers.Integral):
        return checks.integer(t, "a timestep", 0, MAX_TIMESTEP)
    return checks.real(t, "a timestep", 0.0, float(MAX_TIMESTEP), float32=True)


@dataclass
class OLSSSchedule:
    """A fixed n-step OLSS sampler.

    Attributes:
        timesteps: model timesteps, length n, strictly descending (ints for VP models, floats for flow matching).
        indices: teacher step indices of the path, ``indices[0] == 0``, strictly increasing, ``< teacher_steps``.
        coeffs: float64 ``[n, n+1]`` (global) or ``[C, n, n+1]`` (per channel); row j is lower-triangular padded.
        errors: per-step fit MSE on the data the coefficients were fitted on (teacher or student trajectories).
        teacher_steps: T, the teacher's number of steps (``indices`` live in ``[0, T)``).
        prediction_type: the model's output parametrisation the coefficients apply to (checked where it is used).
        path: how the path was chosen ("uniform", "minimax", "ddim", ...).
        refined: whether the coefficients come from the student-in-the-loop re-fit.
        teacher: a short description of the teacher sampler.
        fitted_for: what the coefficients were fitted for (model, noise schedule, guidance scale, latent shape,
            teacher, prompt set; see :mod:`olss_fast.core.provenance`), checked wherever the schedule is used.
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
        if not isinstance(self.coeffs, torch.Tensor):
            try:
                self.coeffs = torch.tensor(self.coeffs, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
                raise ValueError(f"coeffs are not a rectangular numeric array: {exc}") from None
        self.coeffs = self.coeffs.detach().to("cpu", torch.float64).clone()
        if isinstance(self.timesteps, torch.Tensor):
            self.timesteps = self.timesteps.tolist()
        if isinstance(self.indices, torch.Tensor):
            self.indices = self.indices.tolist()
        self.timesteps = [_timestep(t) for t in self.timesteps]
        self.indices = [_index(i, "indices") for i in self.indices]
        self.errors = [checks.real(e, "an error", 0.0) for e in self.errors]
        if not self.teacher_steps and self.indices:
            self.teacher_steps = self.indices[-1] + 1
        self.teacher_steps = _index(self.teacher_steps, "teacher_steps")
        for name in ("prediction_type", "path", "teacher"):
            checks.string(getattr(self, name), name)
        checks.boolean(self.refined, "refined")
        for name in ("fitted_for", "meta"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a dict, got {type(getattr(self, name)).__name__}")
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
        if n > MAX_STEPS:
            raise ValueError(f"a schedule has at most {MAX_STEPS} steps, got {n}")
        if len(self.indices) != n:
            raise ValueError(f"schedule has {n} timesteps but {len(self.indices)} indices; they must match")
        c = self.coeffs
        if c.dim() not in (2, 3) or tuple(c.shape[-2:]) != (n, n + 1):
            raise ValueError(
                f"coeffs must have shape [n, n+1] = [{n}, {n + 1}] (global) or [C, {n}, {n + 1}] (per channel) "
                f"for {n} timesteps, got {list(c.shape)}"
            )
        if c.dim() == 3 and not 1 <= c.shape[0] <= MAX_CHANNELS:
            raise ValueError(f"per-channel coeffs need 1 to {MAX_CHANNELS} channels, got {c.shape[0]}")
        if not torch.isfinite(c).all():
            raise ValueError("coeffs contain NaN or Inf; the schedule is unusable (re-run the search)")
        if c.abs().max().item() > MAX_COEFF:
            raise ValueError(f"coeffs reach {c.abs().max().item():.3g}, beyond the ±{MAX_COEFF:g} any usable sampler "
                             "needs (corrupted, or a degenerate fit)")
        if c.numel() > MAX_COEFFS:
            raise ValueError(f"a schedule holds at most {MAX_COEFFS} coefficients, got {c.numel()}")
        upper = torch.triu(c, diagonal=2)
        if upper.abs().max().item() > 0:
            raise ValueError("coeffs row j may only use x0 and e_0..e_j: entries right of column j+1 must be zero")
        kinds = {isinstance(t, int) for t in self.timesteps}
        if len(kinds) > 1:
            raise ValueError(f"timesteps must be all integers (VP) or all floats (flow matching), got {self.timesteps}")
        if any(float(a) <= float(b) for a, b in zip(self.timesteps, self.timesteps[1:])):
            raise ValueError(f"timesteps must be strictly descending, got {self.timesteps}")
        if self.indices[0] != 0:
            raise ValueError(f"the path must start at teacher index 0, got indices[0] = {self.indices[0]}")
        if any(a >= b for a, b in zip(self.indices, self.indices[1:])):
            raise ValueError(f"indices must be strictly increasing, got {self.indices}")
        if not self.indices[-1] < self.teacher_steps <= MAX_TEACHER_STEPS:
            raise ValueError(
                f"teacher_steps = {self.teacher_steps} must exceed the path's last teacher index {self.indices[-1]} "
                f"(and be at most {MAX_TEACHER_STEPS})"
            )
        if self.errors and len(self.errors) != n:
            raise ValueError(f"errors must have one entry per step ({n}), got {len(self.errors)}")
        if any(not math.isfinite(e) or e < 0 for e in self.errors):
            raise ValueError("errors must be finite and non-negative")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}; expected one of {PREDICTION_TYPES}")
        _check_fitted_for(self.fitted_for)
        check_timesteps(self.timesteps, self.fitted_for.get("noise_schedule"), "the schedule")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """The version-2 JSON object, ``sha256`` (the digest of everything else) included."""
        data = {
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
            "fitted_for": copy.deepcopy(self.fitted_for),  # a copy: editing the dict must not edit the schedule
            "meta": copy.deepcopy(self.meta),
        }
        data["sha256"] = digest(data)
        return data

    @classmethod
    def from_dict(cls, data: Any) -> "OLSSSchedule":
        """Build a schedule from :meth:`to_dict` output, validating everything (``ValueError`` on any problem)."""
        checks.mapping(data, "an OLSS schedule")
        if data.get("format") != SCHEDULE_FORMAT:
            raise ValueError(f"not an OLSS schedule (format = {str(data.get('format'))[:80]!r})")
        version = checks.version(data.get("version"), "OLSS schedule", READ_VERSIONS)
        if version == 1:
            checks.mapping(data, "a version-1 OLSS schedule", ("timesteps", "indices", "coeffs"),
                        optional=[k for k in _FIELDS_V1 if k not in ("timesteps", "indices", "coeffs")])
            checks.warn_once(("v1-schedule", digest(data)), "reading a version-1 OLSS schedule (olss_fast 0.1): it "
                             "carries no digest and no record of what it was fitted for, so nothing can check it "
                             "against the pipeline it runs in; save it again to upgrade it", logger=logger)
        else:
            checks.mapping(data, "an OLSS schedule", _FIELDS_V2)
            stored = checks.hex_digest(data["sha256"], "sha256")
            if stored != digest({k: v for k, v in data.items() if k != "sha256"}):
                raise ValueError("the schedule does not match its sha256 digest: it was modified or corrupted after "
                                 "it was written (re-create it, or save an edited schedule with OLSSSchedule.save)")
        timesteps = checks.listing(data["timesteps"], "timesteps", MAX_STEPS)
        n = len(timesteps)
        indices = [checks.integer(i, "indices", 0, MAX_TEACHER_STEPS) for i in
                   checks.listing(data["indices"], "indices", MAX_STEPS)]
        coeffs = _coeff_tensor(data["coeffs"], n)
        errors = [checks.real(e, "errors", 0.0) for e in checks.listing(data.get("errors", []), "errors", MAX_STEPS)]
        fitted_for = checks.mapping(data.get("fitted_for", {}), "fitted_for")
        meta = checks.mapping(data.get("meta", {}), "meta")
        sched = cls(
            timesteps=timesteps, indices=indices, coeffs=coeffs, errors=errors,
            teacher_steps=checks.integer(data.get("teacher_steps", indices[-1] + 1 if indices else 0), "teacher_steps",
                                     1, MAX_TEACHER_STEPS),
            prediction_type=checks.string(data.get("prediction_type", "epsilon"), "prediction_type", 32),
            path=checks.string(data.get("path", "uniform"), "path", 64),
            refined=checks.boolean(data.get("refined", False), "refined"),
            teacher=checks.string(data.get("teacher", ""), "teacher"),
            fitted_for=fitted_for, meta=meta,
        )
        if "num_steps" in data and checks.integer(data["num_steps"], "num_steps") != sched.num_steps:
            raise ValueError(f"num_steps = {data['num_steps']} does not match {sched.num_steps} timesteps")
        if "granularity" in data and data["granularity"] != sched.granularity:
            raise ValueError(
                f"granularity = {str(data['granularity'])[:20]!r} does not match coeffs of shape "
                f"{list(sched.coeffs.shape)}"
            )
        return sched

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)

    def save(self, path: str | os.PathLike) -> None:
        """Write the schedule as JSON, atomically (never pickle), holding the file's exclusive lock (a second writer
        gets a ``ValueError``)."""
        self.validate()
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "OLSSSchedule":
        """Read and validate a schedule written by :meth:`save` (``ValueError`` naming the file on any problem)."""
        path = Path(path)
        data = read_json(path, MAX_SCHEDULE_BYTES, "schedule file", MAX_JSON_VALUES)
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"schedule file {path}: {exc}") from None

    # ------------------------------------------------------------------ helpers
    def __repr__(self) -> str:  # short and useful
        errs = ", ".join(f"{e:.3g}" for e in self.errors)
        return (
            f"OLSSSchedule(n={self.num_steps}, timesteps={self.timesteps}, path={self.path!r}, "
            f"granularity={self.granularity!r}, refined={self.refined}, errors=[{errs}])"
        )


def _coeff_tensor(value: Any, n: int) -> torch.Tensor:
    """The coefficient array from JSON: nested lists of finite float32-representable numbers, ``[n, n+1]`` or
    ``[C, n, n+1]`` (checked before building anything, so a hostile shape costs nothing)."""
    rows = checks.listing(value, "coeffs", MAX_CHANNELS)
    per_channel = bool(rows) and isinstance(rows[0], list) and bool(rows[0]) and isinstance(rows[0][0], list)
    mats = [checks.listing(m, "coeffs", MAX_STEPS) for m in rows] if per_channel else [rows]
    if len(mats) * n * (n + 1) > MAX_COEFFS:
        raise ValueError(f"a schedule holds at most {MAX_COEFFS} coefficients, got {len(mats)} × {n} × {n + 1}")
    for m in mats:
        if len(m) != n:
            raise ValueError(f"coeffs must have {n} rows per channel for {n} timesteps, got {len(m)}")
        for r in m:
            if len(checks.listing(r, "a coeffs row", MAX_STEPS + 1)) != n + 1:
                raise ValueError(f"coeffs rows must have n+1 = {n + 1} entries, got {len(r)}")
            if not all(type(v) is float or type(v) is int for v in r):  # exact JSON number types (no bools)
                bad = next(v for v in r if type(v) is not float and type(v) is not int)
                checks.real(bad, "a coefficient")  # raises the usual message
    try:
        t = torch.tensor(mats, dtype=torch.float64)
    except (OverflowError, RuntimeError, TypeError):
        raise ValueError("a coefficient is a number too large for a float") from None
    if not torch.isfinite(t).all() or t.abs().max().item() > MAX_COEFF:
        raise ValueError(f"a coefficient must be a finite number in [-{MAX_COEFF:g}, {MAX_COEFF:g}], got "
                         f"{t.abs().max().item():.3g}")
    return t if per_channel else t[0]


_FITTED_FOR_KEYS = ("model", "noise_schedule", "guidance_scale", "latent_shape", "teacher", "prompts_sha256",
                    "call_kwargs_sha256", "call_kwargs", "num_samples", "mu", "accepted_mismatch")


def _check_fitted_for(f: dict) -> None:
    """The ``fitted_for`` block's own types (see :mod:`olss_fast.core.provenance`)."""
    if not f:
        return
    checks.mapping(f, "fitted_for", keys=[], optional=_FITTED_FOR_KEYS)
    for key in ("model", "noise_schedule", "teacher", "call_kwargs"):
        if f.get(key) is not None:
            checks.mapping(f[key], f"fitted_for.{key}")
    if f.get("guidance_scale") is not None:
        checks.real(f["guidance_scale"], "fitted_for.guidance_scale")
    if f.get("mu") is not None:
        checks.real(f["mu"], "fitted_for.mu")
    if f.get("latent_shape") is not None:
        for v in checks.listing(f["latent_shape"], "fitted_for.latent_shape", 8):
            checks.integer(v, "fitted_for.latent_shape", 1, 2**31)
    if f.get("num_samples") is not None:
        checks.integer(f["num_samples"], "fitted_for.num_samples", 1)
    for key in ("prompts_sha256", "call_kwargs_sha256"):
        if f.get(key) is not None:
            checks.string(f[key], f"fitted_for.{key}", 64)
    if f.get("accepted_mismatch") is not None:
        accepted = f["accepted_mismatch"]
        if isinstance(accepted, list):
            raise ValueError("fitted_for.accepted_mismatch lists names without what was accepted (an older "
                             "olss_fast): an acceptance must name the setting it accepted; build the scheduler again "
                             "with OLSSScheduler.from_schedules(..., allow_mismatch=...)")
        for name, value in checks.mapping(accepted, "fitted_for.accepted_mismatch").items():
            if name not in REFUSED:
                raise ValueError(f"fitted_for.accepted_mismatch holds an unknown name {str(name)[:40]!r}")
            if name == "prediction_type":
                checks.choice(value, "fitted_for.accepted_mismatch.prediction_type", PREDICTION_TYPES)
            else:
                checks.mapping(value, f"fitted_for.accepted_mismatch.{name}")


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

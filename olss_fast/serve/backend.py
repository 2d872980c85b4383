"""The program-backend interface: what a backend is given (:class:`BackendSetup`, with the live
:class:`ProgramState`), what it is asked to run (:class:`ProgramRequest`) and what it returns (the program's output
tensor), and the registry of backends by name.

A backend runs the fixed OLSS program (:mod:`olss_fast.serve.program`) for the runner
(:class:`~olss_fast.serve.runner.OLSSRunner`, the one front end): PyTorch eager or in a CUDA graph
(:mod:`olss_fast.serve.torch_backend`), or an exported program (onnxruntime, TensorRT: :mod:`olss_fast.export.backends`,
registered there with :func:`register_backend`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from olss_fast.core.schedule import OLSSSchedule
from olss_fast.pipelines.base import CallOptions, PipelineAdapter
from olss_fast.serve.config import BACKEND_NAMES, RuntimeConfig

__all__ = ["BackendSetup", "CaptureFailed", "ProgramBackend", "ProgramRequest", "ProgramState", "backend_class",
           "register_backend"]


@dataclass
class ProgramState:
    """The loaded schedule as device tensors the programs read (captured graphs read these addresses, so a new
    schedule of the same length is copied in place: :meth:`load`).

    Attributes:
        schedule: the :class:`OLSSSchedule` loaded.
        coeffs: float32 ``[n, n+1]`` or ``[C, n, n+1]``.
        timesteps: int64 (VP) or float32 (flow matching) ``[n]``.
        guidance: float32 ``[1]``, the guidance scale of the current call.
    """

    schedule: OLSSSchedule
    coeffs: torch.Tensor
    timesteps: torch.Tensor
    guidance: torch.Tensor

    @classmethod
    def create(cls, schedule: OLSSSchedule, guidance: float, device: torch.device) -> "ProgramState":
        return cls(schedule=schedule, coeffs=schedule.coeffs.to(device=device, dtype=torch.float32).contiguous(),
                   timesteps=timesteps_tensor(schedule, device),
                   guidance=torch.full((1,), float(guidance), dtype=torch.float32, device=device))

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    def load(self, schedule: OLSSSchedule) -> None:
        """Copy another schedule of the same length, coefficient layout and timestep type into the tensors
        (``ValueError`` otherwise: those need a new runner)."""
        if schedule.num_steps != self.num_steps:
            raise ValueError(
                f"update_schedule needs a schedule with {self.num_steps} steps (the captured loop's length), got "
                f"{schedule.num_steps}; compile a new runner for another step count"
            )
        if tuple(schedule.coeffs.shape) != tuple(self.coeffs.shape):
            raise ValueError(f"coefficient shape {list(schedule.coeffs.shape)} differs from the loaded "
                             f"{list(self.coeffs.shape)} (global vs per-channel); compile a new runner")
        ts = timesteps_tensor(schedule, self.timesteps.device)
        if ts.dtype != self.timesteps.dtype:
            raise ValueError(f"timestep type {ts.dtype} differs from the loaded {self.timesteps.dtype}; compile a new "
                             "runner")
        self.coeffs.copy_(schedule.coeffs.to(torch.float32))
        self.timesteps.copy_(ts)
        self.schedule = schedule


def timesteps_tensor(schedule: OLSSSchedule, device: torch.device) -> torch.Tensor:
    """The schedule's timesteps as the OLSSScheduler stores them (int64 for integer timesteps, else float32)."""
    is_int = all(isinstance(t, int) for t in schedule.timesteps)
    return torch.tensor(schedule.timesteps, dtype=torch.long if is_int else torch.float32, device=device)


@dataclass
class BackendSetup:
    """Everything a backend is given when it is built.

    Attributes:
        pipe: the pipeline (exported backends export from it).
        adapter: its family's :class:`~olss_fast.pipelines.base.PipelineAdapter` (components read live).
        config: the :class:`~olss_fast.serve.config.RuntimeConfig`.
        backend: the backend's name (``"auto"`` resolved).
        device, dtype: where and in which dtype the program runs.
        state: the :class:`ProgramState` (the runner swaps schedules in it; see :meth:`ProgramBackend.schedule_changed`).
    """

    pipe: Any
    adapter: PipelineAdapter
    config: RuntimeConfig
    backend: str
    device: torch.device
    dtype: torch.dtype
    state: ProgramState


@dataclass
class ProgramRequest:
    """One call of the program, as the front end hands it to a backend.

    Attributes:
        mode: the conditioning mode (the adapter's: "tokens", "embeds", "labels", ...).
        guided: classifier-free guidance on (the denoiser sees the doubled batch).
        decode: run the decoder (False for ``output_type="latent"``).
        inputs: static inputs (the adapter's conditioning tensors and ``"latents"``), on the device.
        guidance: the guidance scale.
        height, width: the image size.
        options: call options that change the program (clip_skip, LoRA scale, guidance_rescale).
        on_step: ``(j, latents)`` after each step (eager only: ``callback_on_step_end``).
        warmup: the call builds a program ahead of serving (logged at INFO, not as a warning).
    """

    mode: str
    guided: bool
    decode: bool
    inputs: dict[str, torch.Tensor]
    guidance: float
    height: int
    width: int
    options: CallOptions = field(default_factory=CallOptions)
    on_step: Optional[Callable[[int, torch.Tensor], None]] = None
    warmup: bool = False

    @property
    def batch(self) -> int:
        return int(self.inputs["latents"].shape[0])


class ProgramBackend:
    """The interface of a program backend (subclasses implement :meth:`run` and :meth:`cache_info`)."""

    #: whether a change of weight *values* (not only of tensors) requires rebuilding the program
    needs_weight_values = False

    def __init__(self, setup: BackendSetup) -> None:
        self.setup = setup

    def run(self, req: ProgramRequest) -> torch.Tensor:
        """Run the program for ``req``; returns the decoded image (``req.decode``) or the final latents, a tensor the
        caller owns."""
        raise NotImplementedError

    def invalidate(self) -> None:
        """The pipeline's modules or weights changed: drop whatever was built from them."""

    def schedule_changed(self) -> None:
        """:attr:`BackendSetup.state` holds another schedule (device-tensor readers need do nothing)."""

    def cache_info(self) -> dict[str, Any]:
        """The backend's program cache (entries, hits, misses, ...)."""
        raise NotImplementedError


class CaptureFailed(RuntimeError):
    """Capturing a program in a CUDA graph failed (the runner may retry without the text encoder in the graph)."""

    def __init__(self, mode: str, error: BaseException) -> None:
        super().__init__(f"CUDA-graph capture failed ({mode} mode): {error!r}")
        self.mode = mode
        self.error = error


_BACKENDS: dict[str, type[ProgramBackend]] = {}


def register_backend(name: str, cls: type[ProgramBackend]) -> None:
    """Register the class that runs backend ``name`` (one of :data:`~olss_fast.serve.config.BACKEND_NAMES`)."""
    if name not in BACKEND_NAMES or not (isinstance(cls, type) and issubclass(cls, ProgramBackend)):
        raise ValueError(f"register_backend takes a name of {BACKEND_NAMES} and a ProgramBackend subclass")
    _BACKENDS[name] = cls


def backend_class(name: str) -> type[ProgramBackend]:
    cls = _BACKENDS.get(name)
    if cls is None:
        raise ValueError(f"backend {name!r} is not available (registered: {sorted(_BACKENDS)})")
    return cls

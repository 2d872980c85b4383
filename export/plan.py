"""Planning an ONNX export: the pipeline, schedule, shapes and dtype resolved and checked before any file is
written, and the export's cache key."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from olss_fast.core import checks
from olss_fast.core.files import digest
from olss_fast.core.fingerprint import fingerprint
from olss_fast.core.version import __version__
from olss_fast.export.onnx_runner import EXPORT_FORMAT, EXPORT_VERSION
from olss_fast.pipelines.facts import default_guidance
from olss_fast.pipelines.provenance import check_schedule, usage
from olss_fast.pipelines.registry import adapter_for
from olss_fast.serve.schedules import resolve_schedule

DEFAULT_OPSET = 17


_DTYPES = ("float32", "float16")


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
    if dtype is None:
        return ""
    name = {torch.float32: "float32", torch.float16: "float16"}.get(dtype, dtype if isinstance(dtype, str) else None)
    if name not in _DTYPES:
        raise ValueError(f"unsupported export dtype {dtype!r}; use float32 or float16")
    return str(name)


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
    adapter = adapter_for(pipe)
    adapter.check_exportable()
    sched = resolve_schedule(schedule, num_inference_steps, pipe)
    c = sched.num_channels
    if c is not None and c != adapter.latent_channels:
        raise ValueError(
            f"the schedule has per-channel coefficients for {c} channels but the pipeline's latents have "
            f"{adapter.latent_channels}"
        )
    batch = checks.integer(batch_size, "batch_size", 1)
    checks.integer(opset, "opset", 14, 21)
    dh, dw = adapter.default_size()
    h = checks.optional(checks.integer, height, "height", 1) or dh
    w = checks.optional(checks.integer, width, "width", 1) or dw
    adapter.check_size(h, w)
    dt = _dtype_name(dtype) or _dtype_name(adapter.dtype)
    g = checks.real(default_guidance(pipe, adapter.cfg_argument) if guidance_scale is None else guidance_scale,
                    "guidance_scale")
    latent_shape = tuple(int(v) for v in adapter.latent_shape(batch, h, w))
    call_args = dict(call_args or {})
    guided = adapter.is_guided(dict(call_args, negative_prompt=""), g)
    spec = adapter.export_spec(batch, h, w, guided, call_args, example)
    ids = spec.uncond if isinstance(spec.uncond, list) else [] if spec.uncond is None else [spec.uncond]
    if spec.id_limit and any(not 0 <= int(i) < spec.id_limit for i in ids):
        raise ValueError(f"the pipeline's unconditional ids {ids[:8]} lie outside its id range [0, {spec.id_limit}) "
                         "(a tokenizer larger than the text encoder's vocabulary?): the export could not run them")
    check_schedule(sched, usage(adapter, guidance=g, height=h, width=w, call_args=call_args, guided=guided),
                   allow=allow_mismatch, where=f"in this {adapter.name} export")
    plan = ExportPlan(
        pipeline=type(pipe).__name__, schedule=sched, batch_size=batch, height=h, width=w, dtype=dt,
        guidance_scale=g, opset=int(opset), latent_shape=latent_shape, spec=spec,
    )
    import onnx  # optional: the export needs it

    payload = {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "olss_fast": __version__, "torch": torch.__version__,
        "onnx": onnx.__version__, "opset": plan.opset, "pipeline": plan.pipeline, "schedule": sched.to_dict(),
        "guidance_scale": g, "batch_size": batch, "height": h, "width": w, "dtype": dt, "uncond_ids": spec.uncond,
        "cond": [[c.name, list(c.shape), c.dtype, c.batched] for c in spec.cond],
        "call_args": sorted(call_args.items()),
        "modules": {name: fingerprint(mod) for name, mod in sorted(spec.modules.items())},
    }
    plan.key = digest(payload)
    return plan

"""What every layer asks of a pipeline, answered once: its denoiser, dtype and device, per-sample latent shape, the
default guidance scale of its ``__call__``, the noise schedule of a scheduler config, short descriptions.

Pipelines of a registered family answer through their adapter (:mod:`olss_fast.pipelines`); other pipelines (the
analytic test models, a user's own ``DiffusionPipeline``) from their denoiser's config.
"""
from __future__ import annotations

import hashlib
import inspect
import json
from typing import Any, Mapping, Optional

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from olss_fast.core.provenance import is_flow
from olss_fast.pipelines.registry import adapter_for

#: DDIMScheduler's config keys (a VP noise schedule and DDIM's own options)
DDIM_KEYS = (
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "clip_sample",
    "set_alpha_to_one", "steps_offset", "prediction_type", "thresholding", "dynamic_thresholding_ratio",
    "clip_sample_range", "sample_max_value", "timestep_spacing", "rescale_betas_zero_snr",
)
#: FlowMatchEulerDiscreteScheduler's config keys that define its sigma(t) mapping
FLOW_SCHEDULE_KEYS = (
    "num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
    "max_image_seq_len", "invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
    "use_beta_sigmas", "time_shift_type",
)
#: FlowMatchEulerDiscreteScheduler's config keys
FLOW_KEYS = FLOW_SCHEDULE_KEYS + ("stochastic_sampling",)
#: the VP config keys that define ᾱ(t)
VP_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                    "rescale_betas_zero_snr")


def denoiser_of(pipe: Any) -> Optional[torch.nn.Module]:
    """The pipeline's denoiser (``unet`` or ``transformer``), or None."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


def pipeline_modules(pipe: Any) -> dict[str, torch.nn.Module]:
    """The pipeline's torch modules by component name (``pipe.components``, else its module attributes)."""
    components = getattr(pipe, "components", None)
    if not isinstance(components, dict):
        components = vars(pipe)
    return {k: v for k, v in components.items() if isinstance(v, torch.nn.Module)}


def pipeline_dtype(pipe: Any) -> torch.dtype:
    return getattr(denoiser_of(pipe), "dtype", torch.float32)


def pipeline_device(pipe: Any) -> torch.device:
    dev = getattr(pipe, "device", None)
    return torch.device(dev) if dev is not None else torch.device("cpu")


def latent_shape(pipe: Any, height: Optional[int] = None, width: Optional[int] = None) -> tuple[int, ...]:
    """Per-sample latent shape: the family adapter's, else ``(C, h, w)`` from the denoiser's config (or its
    ``sample_shape``, for the analytic test models)."""
    adapter = adapter_for(pipe, required=False)
    if adapter is not None:
        dh, dw = adapter.default_size()
        return tuple(adapter.latent_shape(1, height or dh, width or dw)[1:])
    unet = denoiser_of(pipe)
    if unet is None:
        raise ValueError(f"{type(pipe).__name__} has no unet/transformer; pass latent_shape explicitly")
    if hasattr(unet, "sample_shape"):
        return tuple(unet.sample_shape)
    cfg = unet.config
    size = cfg.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    factor = getattr(pipe, "vae_scale_factor", None)
    if factor and hasattr(pipe, "vae"):
        return (cfg.in_channels, (height or size[0] * factor) // factor, (width or size[1] * factor) // factor)
    return (cfg.in_channels, *size)


#: the negative-prompt arguments of the pipelines' ``__call__``
NEGATIVE_PROMPTS = ("negative_prompt", "negative_prompt_2", "negative_prompt_3")


def call_parameters(pipe: Any) -> list[str]:
    """The named parameters of ``pipe.__call__`` (empty when it has no inspectable signature)."""
    try:
        return list(inspect.signature(type(pipe).__call__).parameters)
    except (TypeError, ValueError):
        return []


def call_default_guidance(pipe: Any, argument: str = "guidance_scale") -> Optional[float]:
    """The default ``guidance_scale`` (or another ``argument``) of ``pipe.__call__``, or None when it takes none
    (unconditional pipelines)."""
    try:
        param = inspect.signature(type(pipe).__call__).parameters.get(argument)
    except (TypeError, ValueError):
        param = None
    if param is None or not isinstance(param.default, (int, float)) or isinstance(param.default, bool):
        return None
    return float(param.default)


def default_guidance(pipe: Any, argument: str = "guidance_scale") -> float:
    """The guidance scale a runner or an export uses by default: :func:`call_default_guidance`, else 7.5."""
    g = call_default_guidance(pipe, argument)
    return 7.5 if g is None else g


def describe_model(pipe: Any) -> str:
    name = getattr(getattr(pipe, "config", None), "_name_or_path", None) or ""
    return f"{type(pipe).__name__}:{name}"


def jsonable_config(config: Any) -> dict[str, Any]:
    """A diffusers config as plain JSON data (tuples become lists, tensors/arrays lists, other objects strings)."""

    def default(obj: Any) -> Any:
        return obj.tolist() if hasattr(obj, "tolist") else str(obj)

    try:
        return json.loads(json.dumps(dict(config or {}), default=default))
    except (TypeError, ValueError):
        return {}


def noise_schedule_id(config: Mapping[str, Any], class_name: str = "") -> dict[str, Any]:
    """The noise schedule a scheduler config defines, as a small comparable dict.

    VP schedules are identified by the SHA-256 of their ``alphas_cumprod`` (float32, as diffusers computes them from
    the betas: different configs that give the same ᾱ are the same schedule); flow-matching schedules by the config
    keys that define their sigma(t) mapping (shift, dynamic shifting, ...).
    """
    config = dict(config)
    if is_flow(config, class_name):
        defaults = FlowMatchEulerDiscreteScheduler.extract_init_dict({})[0]
        return {"kind": "flow", **{key: config.get(key, defaults.get(key)) for key in FLOW_SCHEDULE_KEYS}}
    ddim = DDIMScheduler(**{k: config[k] for k in VP_SCHEDULE_KEYS if k in config})
    ac = ddim.alphas_cumprod.to(torch.float32).contiguous()
    return {"kind": "vp", "num_train_timesteps": int(ac.numel()),
            "alphas_cumprod_sha256": hashlib.sha256(ac.numpy().tobytes()).hexdigest()}

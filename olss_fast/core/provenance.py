"""What a schedule was fitted for, and the check that it is used for the same thing.

An OLSS schedule is a least-squares fit to one teacher's trajectories on one model: its coefficients are only right
for that model's denoiser, that noise schedule and that output parametrisation, and they are tuned to the guidance
scale and latent size of the recording. Recording stores a ``fitted_for`` description (:func:`recording_context`) in
the statistics and every schedule searched from them; using a schedule compares it with what it is used for
(:func:`check_fitted_for`):

* a different **model** architecture (denoiser class or config), **noise schedule** (betas / flow shift) or
  **prediction type** is refused with a ``ValueError`` that lists every difference and names the explicit override
  (``allow_mismatch=("model", ...)``); other weights of the same architecture (a fine-tune, a fused LoRA) warn once;
* a different **guidance scale**, **latent shape** (image size) or flow **mu** (resolution shift) logs a one-time
  warning saying the schedule runs anyway, unchanged.

Schedules written before this existed carry no description; they are used without checks (one warning).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from typing import Any, Iterable, Mapping

import torch

logger = logging.getLogger(__name__)

#: differences that make the coefficients wrong: refused unless named in ``allow_mismatch``
REFUSED = ("model", "noise_schedule", "prediction_type")
#: differences the coefficients were not tuned for: one warning, then used as they are
WARNED = ("guidance_scale", "latent_shape", "mu")

#: the FlowMatchEulerDiscreteScheduler config keys that define its sigma(t) mapping
FLOW_SCHEDULE_KEYS = (
    "num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
    "max_image_seq_len", "invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
    "use_beta_sigmas", "time_shift_type",
)

_warned: set[tuple] = set()


def sha256_json(obj: Any) -> str:
    """SHA-256 of a canonical JSON rendering (sorted keys; non-JSON values by ``repr``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=repr).encode()).hexdigest()


def warn_once(key: tuple, message: str, *args: Any) -> None:
    """Log ``message`` as a warning the first time ``key`` is seen in this process."""
    if key in _warned:
        return
    _warned.add(key)
    logger.warning(message, *args)


# ---------------------------------------------------------------------------------------------- identities
def is_flow_config(config: Mapping[str, Any]) -> bool:
    """Whether a scheduler config describes a flow-matching noise schedule: a ``FlowMatch*`` class name (configs
    read from files carry it), ``prediction_type="flow"``, or flow keys (``shift``) without VP ones
    (``beta_schedule``, ``prediction_type``)."""
    if "prediction_type" in config:
        return config.get("prediction_type") == "flow"
    name = str(config.get("_class_name", ""))
    return name.startswith("FlowMatch") or ("shift" in config and "beta_schedule" not in config)


def noise_schedule_id(config: Mapping[str, Any]) -> dict[str, Any]:
    """The noise schedule a scheduler config defines, as a small comparable dict.

    VP schedules are identified by the SHA-256 of their ``alphas_cumprod`` (float32, as diffusers computes them from
    the betas: different configs that give the same ᾱ are the same schedule); flow-matching schedules by the
    config keys that define their sigma(t) mapping (shift, dynamic shifting, ...).
    """
    config = dict(config)
    if is_flow_config(config):
        from diffusers import FlowMatchEulerDiscreteScheduler

        defaults = FlowMatchEulerDiscreteScheduler.extract_init_dict({})[0]
        out = {"kind": "flow"}
        for key in FLOW_SCHEDULE_KEYS:
            out[key] = config.get(key, defaults.get(key))
        return out
    from diffusers import DDIMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
            "rescale_betas_zero_snr")
    ddim = DDIMScheduler(**{k: config[k] for k in keys if k in config})
    ac = ddim.alphas_cumprod.to(torch.float32).contiguous()
    return {"kind": "vp", "num_train_timesteps": int(ac.numel()),
            "alphas_cumprod_sha256": hashlib.sha256(ac.numpy().tobytes()).hexdigest()}


def module_fingerprint(module: torch.nn.Module, samples_per_tensor: int = 16) -> str:
    """A cheap hash of a module's weights: every parameter's and buffer's name, shape, dtype and a few evenly spaced
    values (``samples_per_tensor`` each), so it costs milliseconds even for multi-GB models and changes with any
    retraining, re-initialisation or fused LoRA. Fused attention projections (``to_qkv``, ``to_kv``,
    ``to_added_qkv``: copies of the separate projections) are left out, so fusing does not change the digest."""
    h = hashlib.sha256()
    update_fingerprint(h, module, samples_per_tensor)
    return h.hexdigest()


_FUSED_PROJECTIONS = frozenset({"to_qkv", "to_kv", "to_added_qkv"})


def update_fingerprint(h: Any, module: torch.nn.Module, samples_per_tensor: int = 16) -> None:
    """Feed ``module``'s sampled weights into the hash object ``h`` (see :func:`module_fingerprint`)."""
    tensors = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    for name in sorted(tensors):
        if _FUSED_PROJECTIONS.intersection(name.split(".")):
            continue  # diffusers' fused attention projections are copies of to_q/to_k/to_v (fuse_qkv_projections)
        t = tensors[name].detach()
        h.update(f"{name}:{list(t.shape)}:{t.dtype};".encode())
        flat = t.reshape(-1)
        if flat.numel() == 0:
            continue
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor].to("cpu", torch.float64)
        h.update(sample.numpy().tobytes())


def denoiser_of(pipe: Any) -> torch.nn.Module | None:
    """The pipeline's denoiser (``unet`` or ``transformer``), or None."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


def model_id(module: torch.nn.Module) -> dict[str, str]:
    """Class, config hash and sampled-weights hash of a denoiser."""
    cfg = {k: v for k, v in config_dict(getattr(module, "config", None)).items() if not str(k).startswith("_")}
    return {"class": type(module).__name__, "config_sha256": sha256_json(cfg),
            "weights_sha256": module_fingerprint(module)}


def config_dict(config: Any) -> dict[str, Any]:
    """A config object (diffusers ``FrozenDict``, a mapping, a dataclass, ``to_dict()``) as a plain dict."""
    import dataclasses

    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    return dict(vars(config))


def recording_context(*, pipe: Any, teacher: Any, teacher_steps: int, guidance_scale: float | None,
                      latent_shape: Iterable[int], prompts: Any, call_kwargs: Mapping[str, Any],
                      mu: float | None = None) -> dict[str, Any]:
    """The ``fitted_for`` description of a recording (stored in ``GramStats.context`` and every schedule)."""
    denoiser = denoiser_of(pipe)
    cfg = config_dict(getattr(teacher, "config", None))
    out: dict[str, Any] = {
        "model": model_id(denoiser) if denoiser is not None else None,
        "noise_schedule": noise_schedule_id(dict(cfg, _class_name=type(teacher).__name__)),
        "guidance_scale": None if guidance_scale is None else float(guidance_scale),
        "latent_shape": [int(v) for v in latent_shape],
        "teacher": {"class": type(teacher).__name__, "steps": int(teacher_steps),
                    "config_sha256": sha256_json({k: v for k, v in cfg.items() if not str(k).startswith("_")})},
        "prompts_sha256": sha256_json(_jsonable(prompts)),
        "call_kwargs_sha256": sha256_json(_jsonable(dict(call_kwargs))),
    }
    if mu is not None:
        out["mu"] = float(mu)
    return out


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=repr))


# ---------------------------------------------------------------------------------------------- the check
def check_allow(allow: Iterable[str]) -> tuple[str, ...]:
    """Validate an ``allow_mismatch`` argument → a tuple of names from :data:`REFUSED`."""
    if isinstance(allow, str):
        allow = (allow,)
    out = tuple(allow)
    bad = [a for a in out if a not in REFUSED]
    if bad:
        raise ValueError(f"allow_mismatch takes names from {REFUSED}, got {bad}")
    return out


def _same(key: str, a: Any, b: Any) -> bool:
    if key in ("guidance_scale", "mu") and a is not None and b is not None:
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    if key == "latent_shape" and a is not None and b is not None:
        return [int(v) for v in a] == [int(v) for v in b]
    return a == b


def _describe(key: str, value: Any) -> str:
    if key == "model" and isinstance(value, dict):
        return f"{value.get('class')} (config {str(value.get('config_sha256'))[:12]}…, " \
               f"weights {str(value.get('weights_sha256'))[:12]}…)"
    if key == "noise_schedule" and isinstance(value, dict) and value.get("kind") == "vp":
        return f"VP, {value.get('num_train_timesteps')} steps, ᾱ {str(value.get('alphas_cumprod_sha256'))[:12]}…"
    return repr(value)


def check_fitted_for(fitted: Mapping[str, Any], actual: Mapping[str, Any], *, allow: Iterable[str] = (),
                     what: str = "the schedule", where: str = "here") -> None:
    """Compare a schedule's ``fitted_for`` (plus its ``prediction_type``) with what it is used for.

    Only keys present (not None) on both sides are compared. Refused differences (:data:`REFUSED`) not named in
    ``allow`` raise one ``ValueError`` listing all of them; warned ones (:data:`WARNED`) log once per difference.
    """
    allow = check_allow(allow)
    if not fitted:
        warn_once(("no-provenance", what), "%s records nothing about what it was fitted for (written by an older "
                  "olss_fast): it cannot be checked %s", what, where)
        return
    refused = []
    for key in REFUSED:
        a, b = fitted.get(key), actual.get(key)
        if a is None or b is None or key in allow or _same(key, a, b):
            continue
        if key == "model" and isinstance(a, dict) and isinstance(b, dict) and all(
                a.get(k) == b.get(k) for k in ("class", "config_sha256")):
            # the same architecture with other weights: a fine-tune or a fused LoRA, most likely close enough
            warn_once(("weights", what, repr(a), repr(b)),
                      "%s was fitted on other weights of the same %s (a fine-tune or a fused LoRA?) than %s; it runs "
                      "unchanged (re-fit on these weights for the best quality)", what, a.get("class"), where)
            continue
        refused.append(f"{key.replace('_', ' ')}: fitted for {_describe(key, a)}, used with {_describe(key, b)}")
    if refused:
        names = ", ".join(repr(k) for k in REFUSED)
        raise ValueError(
            f"{what} was fitted for another setting than it is used {where}: " + "; ".join(refused)
            + f". Its coefficients are only right for what it was fitted on: search a schedule for this one, or pass "
            f"allow_mismatch=(...) with any of {names} (CLI: --allow-mismatch) to use it anyway"
        )
    for key in WARNED:
        a, b = fitted.get(key), actual.get(key)
        if a is None or b is None or _same(key, a, b):
            continue
        warn_once(("mismatch", what, key, repr(a), repr(b)),
                  "%s was fitted at %s = %s but runs at %s = %s %s; it runs unchanged, tuned for %s (search a "
                  "schedule at this setting for the best quality)", what, key, a, key, b, where, a)

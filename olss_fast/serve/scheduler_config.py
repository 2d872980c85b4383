"""The ``OLSSScheduler`` config: its value checks and its digest (the scheduler folder's ``scheduler_config.json``)."""
from __future__ import annotations

import logging
from typing import Any

from olss_fast.core import checks
from olss_fast.core.checks import warn_once
from olss_fast.core.files import digest
from olss_fast.core.step import PREDICTION_TYPES

logger = logging.getLogger(__name__)


_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


_SPACINGS = ("leading", "trailing", "linspace")


_FLAGS = ("clip_sample", "set_alpha_to_one", "thresholding", "rescale_betas_zero_snr", "use_dynamic_shifting",
          "invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling")


CONFIG_DIGEST_KEY = "_olss_sha256"


MAX_CONFIG_BYTES = 64 * 2**20


MAX_TRAIN_TIMESTEPS = 100_000


def config_digest(data: dict) -> str:
    """The digest of a scheduler config, without the digest itself and diffusers' version stamp."""
    return digest({k: v for k, v in data.items() if k not in (CONFIG_DIGEST_KEY, "_diffusers_version")})


def validate_config(cfg: dict[str, Any]) -> None:
    """``ValueError`` for config values diffusers would choke on later (or silently misuse)."""
    def what(key: str) -> str:
        return f"OLSSScheduler config {key}"

    n = checks.integer(cfg["num_train_timesteps"], what("num_train_timesteps"), 1, MAX_TRAIN_TIMESTEPS)
    checks.choice(cfg["prediction_type"], what("prediction_type"), PREDICTION_TYPES)
    for key in ("beta_start", "beta_end"):
        checks.real(cfg[key], what(key), 0.0, 1.0, open_lo=True)
    checks.choice(cfg["beta_schedule"], what("beta_schedule"), _BETA_SCHEDULES)
    if cfg["trained_betas"] is not None:
        betas = cfg["trained_betas"]
        if not isinstance(betas, (list, tuple)) or len(betas) != n:
            raise ValueError(f"{what('trained_betas')} must be a list of num_train_timesteps = {n} numbers")
        for b in betas:
            checks.real(b, what("trained_betas entries"), 0.0, 1.0, open_lo=True)
    for key in _FLAGS:
        checks.boolean(cfg[key], what(key))
    checks.integer(cfg["steps_offset"], what("steps_offset"), 0, n - 1)
    checks.real(cfg["dynamic_thresholding_ratio"], what("dynamic_thresholding_ratio"), 0.0, 1.0, open_lo=True)
    for key in ("clip_sample_range", "sample_max_value", "shift"):
        checks.real(cfg[key], what(key), 0.0, open_lo=True)
    checks.choice(cfg["timestep_spacing"], what("timestep_spacing"), _SPACINGS)
    for key in ("base_shift", "max_shift"):
        checks.optional(checks.real, cfg[key], what(key))
    for key in ("base_image_seq_len", "max_image_seq_len"):
        checks.integer(cfg[key], what(key), 1, 2**31)
    checks.optional(checks.real, cfg["shift_terminal"], what("shift_terminal"), 0.0, 1.0)
    checks.choice(cfg["time_shift_type"], what("time_shift_type"), ("exponential", "linear"))


def check_config_data(data: Any, class_name: str, known: set, source: str) -> dict:
    """A parsed ``scheduler_config.json`` checked strictly: a JSON object of ``class_name``'s config, its digest
    verified (``ValueError`` on any problem); returns it without the digest."""
    if not isinstance(data, dict):
        raise ValueError(f"{source} must hold a JSON object, got {type(data).__name__}")
    name = data.get("_class_name", class_name)
    if name != class_name:
        raise ValueError(f"{source} is a {str(name)[:80]} config, not an {class_name}'s: to run that noise "
                         f"schedule through OLSSScheduler (DDIM without searched schedules), use "
                         f"OLSSScheduler.from_config(pipe.scheduler.config); to use searched schedules, load the "
                         f"folder fit_olss_scheduler saved, or use_olss_scheduler(pipe, schedules)")
    stored = data.get(CONFIG_DIGEST_KEY)
    if stored is None:
        warn_once("scheduler-config-no-digest", "%s carries no digest (written by olss_fast 0.1): it cannot be "
                  "checked for edits", source, logger=logger)
    elif stored != config_digest(data):
        raise ValueError(f"{source} does not match its digest: it was modified or corrupted after it was "
                         "written (re-create it, or save an edited scheduler with save_pretrained)")
    unknown = sorted(k for k in data if not str(k).startswith("_") and k not in known)
    if unknown:
        raise ValueError(f"{source} has unknown field(s) {unknown[:10]}")
    return {k: v for k, v in data.items() if k != CONFIG_DIGEST_KEY}

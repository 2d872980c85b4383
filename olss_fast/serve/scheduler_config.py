"""The ``OLSSScheduler`` config: its value checks and its digest (the scheduler folder's ``scheduler_config.json``).

A config file is read strictly: bounded size and number of JSON values (:data:`MAX_CONFIG_BYTES`,
:data:`MAX_CONFIG_VALUES`), no private keys but diffusers' ``_class_name`` / ``_diffusers_version`` and our digest
(``_use_default_values`` would make diffusers drop the keys it names), the digest a SHA-256 when present (files of
olss_fast 0.1 have none: a warning per file), and noise schedules whose ᾱ the model's parametrisation can invert.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from olss_fast.core import checks
from olss_fast.core.files import digest
from olss_fast.core.step import PREDICTION_TYPES

logger = logging.getLogger(__name__)


_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


_SPACINGS = ("leading", "trailing", "linspace")


_FLAGS = ("clip_sample", "set_alpha_to_one", "thresholding", "rescale_betas_zero_snr", "use_dynamic_shifting",
          "invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling")


CONFIG_DIGEST_KEY = "_olss_sha256"


MAX_CONFIG_BYTES = 64 * 2**20


#: the most JSON values a config file may hold (a few schedules of the largest size a schedule file may have)
MAX_CONFIG_VALUES = 2**23


#: the private keys a config file may hold
PRIVATE_KEYS = ("_class_name", "_diffusers_version", CONFIG_DIGEST_KEY)


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
    """A parsed ``scheduler_config.json`` checked strictly: a JSON object of ``class_name``'s config, no unknown
    fields, its private keys and digest checked (:func:`check_config_file`); ``ValueError`` on any problem. Returns
    it without the digest."""
    if not isinstance(data, dict):
        raise ValueError(f"{source} must hold a JSON object, got {type(data).__name__}")
    name = data.get("_class_name", class_name)
    if name != class_name:
        raise ValueError(f"{source} is a {str(name)[:80]} config, not an {class_name}'s: to run that noise "
                         f"schedule through OLSSScheduler (DDIM without searched schedules), use "
                         f"OLSSScheduler.from_config(pipe.scheduler.config); to use searched schedules, load the "
                         f"folder fit_olss_scheduler saved, or use_olss_scheduler(pipe, schedules)")
    check_config_file(data, source)
    unknown = sorted(k for k in data if not str(k).startswith("_") and k not in known)
    if unknown:
        raise ValueError(f"{source} has unknown field(s) {unknown[:10]}")
    return {k: v for k, v in data.items() if k != CONFIG_DIGEST_KEY}


def check_config_file(data: dict[str, Any], source: str) -> None:
    """The private keys of a config read from a file, and its digest (see the module docstring)."""
    private = sorted(str(k) for k in data if str(k).startswith("_") and k not in PRIVATE_KEYS)
    if private:
        raise ValueError(f"{source} has unknown private field(s) {private[:5]} (never written by save_pretrained; "
                         "_use_default_values would make diffusers drop the fields it names)")
    for key in ("_class_name", "_diffusers_version"):
        if key in data:
            checks.string(data[key], f"{source} {key}", 64)
    if CONFIG_DIGEST_KEY not in data:
        checks.warn_once(("scheduler-config-no-digest", digest(data)), "%s carries no digest (written by olss_fast "
                         "0.1): it cannot be checked for edits", source, logger=logger)
    elif checks.hex_digest(data[CONFIG_DIGEST_KEY], f"{source} {CONFIG_DIGEST_KEY}") != config_digest(data):
        raise ValueError(f"{source} does not match its digest: it was modified or corrupted after it was written "
                         "(re-create it, or save an edited scheduler with save_pretrained)")


def check_alphas_cumprod(alphas_cumprod: torch.Tensor, prediction_type: str) -> None:
    """``ValueError`` for a VP noise schedule a sampler cannot use: ᾱ (as diffusers computes it, float32) must be
    finite and in [0, 1], and positive everywhere for an epsilon-predicting model (DDIM divides by √ᾱ to recover the
    sample; ᾱ = 0 is zero terminal SNR, which needs v-prediction)."""
    ac = alphas_cumprod.detach().to("cpu", torch.float32)
    if not torch.isfinite(ac).all() or (ac < 0).any() or (ac > 1).any():
        raise ValueError("OLSSScheduler config: the betas give ᾱ outside [0, 1] (betas must lie in (0, 1])")
    if prediction_type == "epsilon" and not (ac > 0).all():
        first = int((ac <= 0).nonzero()[0, 0])
        raise ValueError(f"OLSSScheduler config: the noise schedule reaches ᾱ = 0 (in float32) at timestep {first} "
                         "(betas of 1, betas too large to keep ᾱ above float32's range, or zero terminal SNR): an "
                         "epsilon-predicting model cannot be sampled there (division by √ᾱ); use v_prediction for "
                         "zero-SNR schedules, or smaller betas")

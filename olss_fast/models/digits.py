"""The bundled class-conditional digits diffusion model.

A tiny pixel-space :class:`diffusers.UNet2DModel` (16x16 grayscale, ``num_class_embeds=11``) trained on
scikit-learn's 8x8 handwritten digits (upsampled to 16x16) by :mod:`olss_fast.models.train_digits`.
Class labels 0-9 are the digits; label :data:`NULL_CLASS` (10) is the "empty prompt" used for
classifier-free guidance, exactly as Stable Diffusion uses the empty text prompt.

The weights live in the package folder ``olss_fast/models/digits/`` and load with no network::

    from olss_fast.models.digits import load_digits_pipeline
    pipe = load_digits_pipeline()
    images = pipe(prompt=[0, 1, 2, 3], num_inference_steps=20).images   # PIL images

The folder also holds a small CNN digit classifier (``classifier/``) whose penultimate-layer features define
a Fréchet distance, and the mean/covariance of those features over the real digits
(``feature_stats.safetensors``); see :mod:`olss_fast.core.metrics`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

logger = logging.getLogger(__name__)

#: Folder holding the bundled weights (inside the installed package).
DIGITS_DIR = Path(__file__).resolve().parent / "digits"
#: Class label used for the unconditional ("empty prompt") branch of classifier-free guidance.
NULL_CLASS = 10
#: Number of real classes (digits 0-9).
NUM_DIGITS = 10
#: Side length of the model's images.
IMAGE_SIZE = 16
#: Default classifier-free guidance scale of :class:`DigitsPipeline`.
DEFAULT_GUIDANCE_SCALE = 1.5  # best Fréchet distance in a sweep, ~99.8% class accuracy (see digits/README.md)

UNET_SUBFOLDER = "unet"
SCHEDULER_SUBFOLDER = "scheduler"
CLASSIFIER_SUBFOLDER = "classifier"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
CLASSIFIER_WEIGHTS_NAME = "model.safetensors"
FEATURE_STATS_NAME = "feature_stats.safetensors"
CHECKSUMS_NAME = "checksums.json"

_DIGIT_WORDS = {w: i for i, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])}


# --------------------------------------------------------------------------------------------------------------
# Loading helpers
# --------------------------------------------------------------------------------------------------------------
def _folder(path: str | os.PathLike | None) -> Path:
    folder = DIGITS_DIR if path is None else Path(path)
    if not folder.is_dir():
        raise ValueError(
            f"digits model folder {folder} does not exist; train it with "
            f"`python -m olss_fast.models.train_digits --out {folder}`")
    return folder


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify_checksum(folder: Path, file: Path) -> None:
    """Compare ``file`` against ``checksums.json`` (written by the training script), if that lists it."""
    manifest = folder / CHECKSUMS_NAME
    if not manifest.is_file():
        return
    try:
        sums = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read checksum manifest {manifest}: {exc}") from exc
    rel = file.relative_to(folder).as_posix()
    want = sums.get(rel)
    if want is not None and file_sha256(file) != want:
        raise ValueError(
            f"weights file {file} is corrupted: its sha256 does not match {manifest} "
            f"(truncated or modified file); reinstall olss_fast or retrain with olss_fast.models.train_digits")


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise ValueError(f"missing config file {file}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"config file {file} is unreadable or corrupted: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"config file {file} does not hold a JSON object")
    return data


def _load_safetensors(file: Path, folder: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file with a clear ``ValueError`` naming the file when it is missing or corrupted."""
    from safetensors.torch import load_file

    if not file.is_file():
        raise ValueError(f"missing weights file {file}")
    _verify_checksum(folder, file)
    try:
        state = load_file(str(file), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError on bad headers
        raise ValueError(f"weights file {file} is corrupted or truncated and cannot be loaded: {exc}") from exc
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"weights file {file} is corrupted: tensor {name!r} holds NaN/inf values")
    return state


def _load_state_into(module: nn.Module, state: dict[str, torch.Tensor], file: Path) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"weights file {file} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(
                f"weights file {file} does not match its config: {k!r} has shape {tuple(v.shape)}, "
                f"expected {tuple(own[k].shape)}")
    module.load_state_dict(state, strict=True)


def load_digits_unet(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> UNet2DModel:
    """Load the bundled :class:`~diffusers.UNet2DModel` (eval mode) from ``path`` (default: the package folder)."""
    folder = _folder(path)
    config = _read_json(folder / UNET_SUBFOLDER / CONFIG_NAME)
    try:
        unet = UNet2DModel.from_config(config)
    except Exception as exc:
        raise ValueError(f"config file {folder / UNET_SUBFOLDER / CONFIG_NAME} is not a valid UNet2DModel "
                         f"config: {exc}") from exc
    wfile = folder / UNET_SUBFOLDER / WEIGHTS_NAME
    state = _load_safetensors(wfile, folder)
    state = {k: v.float() for k, v in state.items()}
    _load_state_into(unet, state, wfile)
    unet = unet.to(device=device)
    if dtype != torch.float32:  # (a no-op .to(dtype=float32) makes diffusers log a spurious warning)
        unet = unet.to(dtype=dtype)
    return unet.eval().requires_grad_(False)


def load_digits_scheduler(path: str | os.PathLike | None = None) -> DDIMScheduler:
    """The default sampler of the bundled model: DDIM with ``timestep_spacing="trailing"``."""
    folder = _folder(path)
    _read_json(folder / SCHEDULER_SUBFOLDER / "scheduler_config.json")  # clear error when missing/corrupted
    return DDIMScheduler.from_pretrained(str(folder / SCHEDULER_SUBFOLDER), timestep_spacing="trailing")


def load_digits_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                         scheduler: Any | None = None, path: str | os.PathLike | None = None) -> "DigitsPipeline":
    """Load the bundled digits pipeline offline.

    Args:
        device: where to put the UNet.
        dtype: UNet dtype (``torch.float32`` recommended on CPU).
        scheduler: a diffusers-style scheduler to use instead of the default
            ``DDIMScheduler(timestep_spacing="trailing")`` built from ``<folder>/scheduler``.
        path: model folder (default: ``olss_fast/models/digits`` inside the package).

    Raises:
        ValueError: the folder, a config or a weights file is missing, truncated or corrupted (the message names
            the file).
    """
    unet = load_digits_unet(path, device=device, dtype=dtype)
    if scheduler is None:
        scheduler = load_digits_scheduler(path)
    pipe = DigitsPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------------------------------
# Digit classifier (for metrics)
# --------------------------------------------------------------------------------------------------------------
class DigitsClassifier(nn.Module):
    """Small CNN classifying 16x16 digits in [-1, 1]; its penultimate layer gives Fréchet-distance features."""

    def __init__(self, channels: Sequence[int] = (32, 64), feature_dim: int = 64, num_classes: int = NUM_DIGITS,
                 image_size: int = IMAGE_SIZE, dropout: float = 0.3):
        super().__init__()
        c1, c2 = int(channels[0]), int(channels[1])
        self.config = {"channels": [c1, c2], "feature_dim": int(feature_dim), "num_classes": int(num_classes),
                       "image_size": int(image_size), "dropout": float(dropout)}
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c1, 3, padding=1)
        self.conv3 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2 * (image_size // 4) ** 2, feature_dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features ``[B, feature_dim]`` of images ``[B, 1, 16, 16]`` in [-1, 1]."""
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, num_classes]``."""
        return self.head(self.drop(self.features(x)))


def load_digits_classifier(device: str | torch.device = "cpu",
                           path: str | os.PathLike | None = None) -> DigitsClassifier:
    """Load the bundled digit classifier (eval mode, no grad) from ``<folder>/classifier``."""
    folder = _folder(path)
    config = _read_json(folder / CLASSIFIER_SUBFOLDER / CONFIG_NAME)
    kwargs = {k: config[k] for k in ("channels", "feature_dim", "num_classes", "image_size", "dropout")
              if k in config}
    try:
        model = DigitsClassifier(**kwargs)
    except Exception as exc:
        raise ValueError(f"config file {folder / CLASSIFIER_SUBFOLDER / CONFIG_NAME} is invalid: {exc}") from exc
    wfile = folder / CLASSIFIER_SUBFOLDER / CLASSIFIER_WEIGHTS_NAME
    _load_state_into(model, {k: v.float() for k, v in _load_safetensors(wfile, folder).items()}, wfile)
    return model.to(device).eval().requires_grad_(False)


def digits_reference_stats(path: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[D]`` and covariance ``[D, D]`` (float64) of the classifier features of all real digits."""
    folder = _folder(path)
    file = folder / FEATURE_STATS_NAME
    stats = _load_safetensors(file, folder)
    if "mu" not in stats or "sigma" not in stats:
        raise ValueError(f"feature stats file {file} lacks 'mu'/'sigma' tensors")
    mu, sigma = stats["mu"].double(), stats["sigma"].double()
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"feature stats file {file} has inconsistent shapes {tuple(mu.shape)}, {tuple(sigma.shape)}")
    return mu, sigma


# --------------------------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------------------------
def _one_label(x: Any, what: str) -> int:
    if isinstance(x, (bool, np.bool_)):
        raise ValueError(f"{what} must be a digit 0-9, got the bool {x!r}")
    if isinstance(x, str):
        s = x.strip().lower()
        if s in _DIGIT_WORDS:
            return _DIGIT_WORDS[s]
        if not (len(s) == 1 and s.isdigit()):
            raise ValueError(f"{what} must be a digit 0-9 (int, '3' or 'three'), got the string {x!r}")
        return int(s)
    if isinstance(x, torch.Tensor):
        if x.numel() != 1 or x.is_floating_point() or x.is_complex():
            raise ValueError(f"{what} must be an integer digit 0-9, got the tensor {x!r}")
        x = int(x.item())
    elif isinstance(x, (int, np.integer)):
        x = int(x)
    else:
        raise ValueError(f"{what} must be a digit 0-9 (int, '3' or 'three'), got {type(x).__name__} {x!r}")
    if not 0 <= x < NUM_DIGITS:
        raise ValueError(f"{what} must be a digit 0-9, got {x}")
    return x


def parse_class_labels(labels: Any, what: str = "prompt") -> list[int]:
    """Turn an int / digit string / list / 1-D tensor of those into a list of class labels 0-9."""
    if isinstance(labels, torch.Tensor):
        if labels.ndim == 0:
            return [_one_label(labels, what)]
        if labels.ndim != 1:
            raise ValueError(f"{what} tensor must be 1-D, got shape {tuple(labels.shape)}")
        labels = list(labels)
    elif isinstance(labels, np.ndarray):
        labels = labels.reshape(-1).tolist() if labels.ndim <= 1 else None
        if labels is None:
            raise ValueError(f"{what} array must be 1-D")
    if isinstance(labels, (list, tuple)):
        if len(labels) == 0:
            raise ValueError(f"{what} must name at least one digit, got an empty list")
        return [_one_label(x, what) for x in labels]
    return [_one_label(labels, what)]


class DigitsPipeline(DiffusionPipeline):
    """Class-conditional 16x16 digits pipeline with classifier-free guidance.

    Components:
        unet: :class:`~diffusers.UNet2DModel` with ``num_class_embeds=11`` (digits 0-9, null class 10),
            predicting epsilon.
        scheduler: any diffusers-style scheduler (``set_timesteps`` / ``timesteps`` / ``init_noise_sigma`` /
            ``scale_model_input`` / ``step``).
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: Any):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        prompt: Any = None,
        num_inference_steps: int = 50,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        negative_prompt: Any = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        class_labels: Any = None,
        num_images_per_prompt: int = 1,
    ) -> ImagePipelineOutput | tuple:
        """Sample digits.

        Args:
            prompt: the digit(s) to draw: an int, a digit string (``"3"`` or ``"three"``), or a list/1-D tensor of
                those. ``None`` (with no ``class_labels``) draws one of each digit 0-9.
            num_inference_steps: number of scheduler steps (>= 1).
            guidance_scale: classifier-free guidance scale; guidance (a doubled batch, unconditional half first)
                is used when it is > 1.
            negative_prompt: digit(s) used for the unconditional half instead of the null class (like Stable
                Diffusion's negative prompt); one label or one per prompt.
            generator: ``torch.Generator`` (or a list, one per image) for the initial noise.
            latents: initial noise ``[B, 1, 16, 16]``; drawn with ``randn_tensor`` when ``None``.
            output_type: ``"pil"`` (grayscale 64x64 images, 4x nearest upscaling), ``"np"`` (float
                ``[B, 16, 16, 1]`` in [0, 1]), ``"pt"`` (``[B, 1, 16, 16]`` in [0, 1]) or ``"latent"`` (raw samples
                ``[B, 1, 16, 16]`` in the model's [-1, 1] space, not clipped).
            return_dict: return an :class:`~diffusers.ImagePipelineOutput` (else a 1-tuple).
            class_labels: alias of ``prompt``.
            num_images_per_prompt: images per class label.
        """
        if prompt is not None and class_labels is not None:
            raise ValueError("pass the digits as `prompt` or as `class_labels`, not both")
        if prompt is None:
            prompt = class_labels
        labels = list(range(NUM_DIGITS)) if prompt is None else parse_class_labels(prompt, "prompt")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, (int, np.integer)) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an int >= 1, got {num_images_per_prompt!r}")
        labels = [c for c in labels for _ in range(int(num_images_per_prompt))]
        batch = len(labels)
        if negative_prompt is None:
            neg = [NULL_CLASS] * batch
        else:
            neg = parse_class_labels(negative_prompt, "negative_prompt")
            if len(neg) == 1:
                neg = neg * batch
            elif len(neg) * int(num_images_per_prompt) == batch:
                neg = [c for c in neg for _ in range(int(num_images_per_prompt))]
            else:
                raise ValueError(f"negative_prompt has {len(neg)} labels but prompt has {batch // num_images_per_prompt}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        try:
            guidance_scale = float(guidance_scale)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"guidance_scale must be a number, got {guidance_scale!r}") from exc
        if not np.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch} images")

        device = self._execution_device
        dtype = self.unet.dtype
        cfg = self.unet.config
        shape = (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        do_cfg = guidance_scale > 1.0

        cond = torch.tensor(labels, device=device, dtype=torch.long)
        if do_cfg:
            model_labels = torch.cat([torch.tensor(neg, device=device, dtype=torch.long), cond])
        else:
            model_labels = cond

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            latents = latents.to(device=device, dtype=dtype)
        latents = latents * self.scheduler.init_noise_sigma

        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([latents] * 2) if do_cfg else latents
            model_in = self.scheduler.scale_model_input(model_in, t)
            out = self.unet(model_in, t, class_labels=model_labels).sample
            if do_cfg:
                e_u, e_c = out.chunk(2)
                out = e_u + guidance_scale * (e_c - e_u)
            latents = self.scheduler.step(out, t, latents).prev_sample

        self.maybe_free_model_hooks()
        if output_type == "latent":
            images: Any = latents
        else:
            img = (latents.float() / 2 + 0.5).clamp(0, 1)
            if output_type == "pt":
                images = img
            else:
                arr = img.cpu().permute(0, 2, 3, 1).numpy()
                images = arr if output_type == "np" else self.numpy_to_pil_gray(arr)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    @staticmethod
    def numpy_to_pil_gray(images: np.ndarray, scale: int = 4) -> list:
        """``[B, H, W, 1]`` floats in [0, 1] -> list of grayscale PIL images upscaled ``scale`` x (nearest)."""
        from PIL import Image

        out = []
        for a in images:
            im = Image.fromarray((a[..., 0] * 255).round().astype(np.uint8))
            if scale != 1:
                im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
            out.append(im)
        return out

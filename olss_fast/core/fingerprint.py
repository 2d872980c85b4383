"""The one fingerprint of a model's weights (used by provenance, recording checkpoints, export and compile caches).

:func:`fingerprint` hashes a module's class, its config and **every byte** of every parameter and buffer (with names,
shapes and dtypes), so any change of any weight changes it: a fine-tune, a fused LoRA, an in-place ``.data`` edit.
Diffusers' fused attention projections (``to_qkv``, ``to_kv``, ``to_added_qkv``: copies of the separate projections
made by ``fuse_qkv_projections``) are left out, so fusing does not change it. It costs one pass over the weights
(reading them to the host in chunks and SHA-256): on this project's 2-core CPU container an SD1.5 UNet (860M
parameters, random weights) takes 6.3 s in float32 (3.4 GB, ~550 MB/s) and 1.7 s in float16 (1.7 GB);
``benchmarks/RESULTS.md``, "Trust boundaries", has the numbers (``benchmarks/trust_costs.py``).
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping, Optional

import torch

from olss_fast.core.files import digest
from olss_fast.core.provenance import config_dict

_FUSED_PROJECTIONS = frozenset({"to_qkv", "to_kv", "to_added_qkv"})
_CHUNK_BYTES = 64 * 2**20


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    return {name: t for name, t in tensors.items() if not _FUSED_PROJECTIONS.intersection(name.split("."))}


def _update(h: Any, module: torch.nn.Module, samples: Optional[int] = None) -> None:
    h.update(f"[{type(module).__name__}]".encode())
    cfg = {k: v for k, v in config_dict(getattr(module, "config", None)).items() if not str(k).startswith("_")}
    h.update(digest(cfg).encode())
    tensors = _tensors(module)
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}:{list(t.shape)}:{t.dtype};".encode())
        flat = t.reshape(-1)
        if flat.numel() == 0:
            continue
        if samples is not None:  # evenly spaced values only (a cheap change detector, not a content hash)
            flat = flat[:: max(1, flat.numel() // samples)][:samples]
        step = max(1, _CHUNK_BYTES // flat.element_size())
        for start in range(0, flat.numel(), step):
            chunk = flat[start:start + step].to("cpu").contiguous()
            h.update(chunk.view(torch.uint8).numpy().tobytes())


def fingerprint(module: torch.nn.Module, samples: Optional[int] = None) -> str:
    """SHA-256 of ``module``'s class, config and every weight byte (see the module docstring). With ``samples`` only
    that many evenly spaced values of each tensor are hashed: cheap enough to run before every call, but it misses
    edits of the values in between."""
    h = hashlib.sha256()
    _update(h, module, samples)
    return h.hexdigest()


def modules_fingerprint(modules: Mapping[str, Optional[torch.nn.Module]]) -> str:
    """:func:`fingerprint` of several named modules at once (a pipeline's components); ``None`` entries count."""
    h = hashlib.sha256()
    for name in sorted(modules):
        h.update(f"<{name}>".encode())
        module = modules[name]
        if isinstance(module, torch.nn.Module):
            _update(h, module)
    return h.hexdigest()


def model_id(module: torch.nn.Module) -> dict[str, str]:
    """A denoiser's identity as schedules record it: class, config digest and weights :func:`fingerprint`."""
    cfg = {k: v for k, v in config_dict(getattr(module, "config", None)).items() if not str(k).startswith("_")}
    return {"class": type(module).__name__, "config_sha256": digest(cfg), "weights_sha256": fingerprint(module)}

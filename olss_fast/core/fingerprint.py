"""The one fingerprint of a model (used by provenance, recording checkpoints, export and compile caches).

:func:`fingerprint` hashes a module's class, its config, the plain state of its submodules (:func:`module_state`:
adapters enabled or scaled, FreeU, attention processors, ...) and **every byte** of every parameter and buffer (with
names, shapes and dtypes), so any change of any weight changes it: a fine-tune, a fused LoRA, an in-place ``.data``
edit.
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

_CHUNK_BYTES = 64 * 2**20


_FUSED_PROJECTIONS = frozenset({"to_qkv", "to_kv", "to_added_qkv"})
_TORCH_STATE = frozenset({
    "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_backward_hooks", "_backward_pre_hooks",
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks", "_is_full_backward_hook", "_internal_dict", "config",
    "fused_projections", "original_attn_processors",  # fuse_qkv_projections' bookkeeping (the same computation)
    "_is_torch_compile", "_compiled_call_impl",  # torch.compile's markers (the same computation)
})


def _state_value(v: Any, identities: bool) -> Any:
    if isinstance(v, (bool, int, float, str, type(None))):
        return v
    if isinstance(v, (tuple, list)):
        return tuple(_state_value(x, identities) for x in v)
    if isinstance(v, (set, frozenset)):  # (sorted: a set's order differs between processes)
        return tuple(sorted((_state_value(x, identities) for x in v), key=repr))
    if isinstance(v, dict):
        return tuple(sorted(((str(k), _state_value(x, identities)) for k, x in v.items()), key=repr))
    if isinstance(v, torch.Tensor):
        return None  # tensors are hashed (or followed) on their own
    # attention processors, adapters' configs, ...: by class (and, within one process, by identity); diffusers' fused
    # attention processors compute what the unfused ones do (fuse_qkv_projections) and count as them
    name = type(v).__name__.removeprefix("Fused")
    return (name, id(v)) if identities else name


def module_state(module: torch.nn.Module, identities: bool = False) -> tuple:
    """The plain state of every submodule: its class and its non-tensor attributes (``training``, diffusers' FreeU
    factors, PEFT's active and disabled adapters and scalings, the class of each attention processor, ...) — what
    changes a module's output besides its weights. With ``identities`` other objects count by identity too (within one
    process: a new processor object of the same class is a change)."""
    return tuple((name, type(s).__name__, tuple((k, _state_value(v, identities)) for k, v in vars(s).items()
                                                if k not in _TORCH_STATE))
                 for name, s in module.named_modules() if not _FUSED_PROJECTIONS.intersection(name.split(".")))


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    return {name: t for name, t in tensors.items() if not _FUSED_PROJECTIONS.intersection(name.split("."))}


def _update(h: Any, module: torch.nn.Module, samples: Optional[int] = None) -> None:
    h.update(f"[{type(module).__name__}]".encode())
    cfg = {k: v for k, v in config_dict(getattr(module, "config", None)).items() if not str(k).startswith("_")}
    h.update(digest(cfg).encode())
    h.update(digest(module_state(module)).encode())
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


def weights_checksum(modules: Mapping[str, Optional[torch.nn.Module]]) -> tuple[float, ...]:
    """A cheap detector of changed weight values, computed where the weights live: the float64 sum and norm of every
    parameter and buffer (one pass over the weights, one host transfer). Any ordinary change of values — a fused LoRA,
    a rescaled layer, an edited weight, another dtype — changes it; values edited so as to keep both the sum and the
    norm of every tensor are not detected (this is change detection, not a digest: :func:`fingerprint` is)."""
    stats = []
    for name in sorted(modules):
        module = modules[name]
        if not isinstance(module, torch.nn.Module):
            continue
        for t in _tensors(module).values():
            t = t.detach()
            if t.numel() and (t.is_floating_point() or t.is_complex()):
                stats.append(torch.stack([t.sum(dtype=torch.float64), torch.linalg.vector_norm(t, dtype=torch.float64)]))
            elif t.numel():
                stats.append(torch.stack([t.sum(dtype=torch.float64), t.double().pow(2).sum()]).to(torch.float64))
    if not stats:
        return ()
    devices = {x.device for x in stats}
    flat = torch.cat([x.to("cpu") for x in stats]) if len(devices) > 1 else torch.cat(stats).cpu()
    return tuple(flat.tolist())

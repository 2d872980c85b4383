"""Work items: the samples of a recording (a prompt or class label and a seed), and their initial noise."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from olss_fast.core import checks

@dataclass
class WorkItem:
    """One sample to record: a prompt (or class label) and a seed index for its initial noise."""

    index: int
    prompt: Any
    seed: int


def spread_indices(total: int, count: int) -> list[int]:
    """``min(count, total)`` indices spread evenly over ``range(total)`` (first and last included), so that a subset
    of work items covers every prompt."""
    count = min(count, total)
    return sorted({round(k * (total - 1) / max(count - 1, 1)) for k in range(count)})


def make_work_items(prompts: Sequence[Any], seeds_per_prompt: int = 1, base_seed: int = 0) -> list[WorkItem]:
    """prompts × seeds, in a fixed order; item i's noise depends only on (base_seed, prompt index, seed index)."""
    prompts = prompt_list(prompts)
    if len(prompts) == 0:
        raise ValueError("no prompts given: pass at least one prompt (or class label)")
    checks.integer(seeds_per_prompt, "seeds_per_prompt", 1)
    items = []
    for p, prompt in enumerate(prompts):
        for s in range(seeds_per_prompt):
            items.append(WorkItem(len(items), prompt, _derive_seed(base_seed, p, s)))
    return items


def _derive_seed(base: int, prompt_index: int, seed_index: int) -> int:
    h = hashlib.sha256(f"{base}:{prompt_index}:{seed_index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def item_noise(items: Sequence[WorkItem], shape: Sequence[int], device: Any = "cpu", dtype=torch.float32) -> torch.Tensor:
    """Initial noise for a batch of work items (each from its own CPU generator, so batching does not matter)."""
    out = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(it.seed), dtype=torch.float32) for it in items]
    return torch.stack(out).to(device=device, dtype=dtype)


def prompt_list(prompts: Any) -> list[Any]:
    """Prompts as a list: a string (or a single label / None) is ONE prompt, a list or tuple is many."""
    if isinstance(prompts, (str, bytes)) or prompts is None or not isinstance(prompts, (list, tuple)):
        if isinstance(prompts, (dict, set)) or hasattr(prompts, "__next__"):
            raise ValueError(f"prompts must be a string, a label or a list of them, got {type(prompts).__name__}")
        return [prompts]
    return list(prompts)

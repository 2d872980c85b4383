"""Resumable recording: checkpoints of the teacher statistics with a job fingerprint.

A checkpoint is an ordinary :class:`~olss_fast.core.stats.GramStats` file (atomic safetensors write) whose header
``meta["record_checkpoint"]`` holds

- ``fingerprint``: what the statistics are *of* — teacher (description and config hash), teacher steps, model
  (description and a hash of sampled weights), prompt list hash, number of prompts, seeds per prompt, base seed,
  a hash of the work items (prompt, seed) themselves, guidance scale, other pipeline keyword arguments, sample shape
  and pipeline dtype. Resuming with any of these different is refused with a ``ValueError`` naming every field that
  differs; such statistics are never merged.
- ``layout``: how the work was cut — batch size, world size and rank. An unfinished checkpoint must be resumed with
  the same layout (so that the remaining batches are the ones an uninterrupted run would have made); a finished one
  is valid for any layout.
- ``done``: the finished work-item indices (as ``[start, stop)`` ranges), always whole batches;
  ``total_items``; ``complete``.

**Guarantee.** Batches are recorded in a fixed order and the statistics file stores the running float64 sum
bitwise, so a resumed run adds the same per-batch Gram matrices in the same order as an uninterrupted run: the
result is **bitwise identical** whenever the pipeline itself is deterministic (same machine, same kernels and
thread count). Otherwise they agree to the pipeline's own run-to-run noise; the statistics never miss or double-count
a batch. Under ``torchrun`` each rank checkpoints its own shard to ``<stem>.rank<r>-of-<W><suffix>``; when all ranks
are done rank 0 writes the summed, finished statistics to the checkpoint path itself and the per-rank files are
removed.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


from olss_fast.core import checks
from olss_fast.core.files import canonical_json, digest
from olss_fast.core.ranges import MAX_ITEMS, check_ranges, count, to_ranges
from olss_fast.core.stats import GramStats
from olss_fast.fit.distributed import LOCAL, DistContext

logger = logging.getLogger(__name__)

CHECKPOINT_KEY = "record_checkpoint"
CHECKPOINT_VERSION = 1

#: human-readable names of the fingerprint fields (used in error messages)
FIELD_NAMES = {
    "header_sha256": "teacher timesteps, prediction type, recording context or scheduler config",
    "teacher": "teacher",
    "teacher_config_sha256": "teacher scheduler config",
    "teacher_steps": "teacher steps",
    "model": "model",
    "model_sha256": "model weights",
    "prompts_sha256": "prompt list",
    "num_prompts": "number of prompts",
    "seeds_per_prompt": "seeds per prompt",
    "base_seed": "base seed",
    "items_sha256": "work items (prompt/seed list)",
    "num_items": "number of work items",
    "guidance_scale": "guidance scale",
    "call_kwargs": "pipeline keyword arguments",
    "sample_shape": "sample shape",
    "pipeline_dtype": "pipeline dtype",
    "batch_size": "batch size",
    "world_size": "world size (number of processes)",
    "rank": "rank",
}


# ---------------------------------------------------------------------------------------------- hashing
def config_sha256(config: Any) -> str:
    """Digest of a diffusers config, ignoring private keys (``_class_name``, ``_diffusers_version``, ...)."""
    return digest({k: v for k, v in dict(config or {}).items() if not str(k).startswith("_")})


def job_fingerprint(
    *,
    teacher_description: str,
    teacher_config: Any,
    teacher_steps: int,
    model_description: str,
    model_sha256: str,
    prompts: Sequence[Any],
    seeds_per_prompt: int,
    base_seed: int,
    items: Sequence[Any],
    guidance_scale: float | None,
    call_kwargs: dict[str, Any],
    sample_shape: Sequence[int],
    pipeline_dtype: Any,
    stats_identity: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The identity of a recording job (see module docstring); JSON-serialisable. ``stats_identity`` (the
    statistics header's teacher timesteps, descriptions, prediction type and recording context) is covered by a
    hash, so that every header field that changes the result is part of the identity."""
    return {
        "header_sha256": digest(stats_identity or {}),
        "teacher": teacher_description,
        "teacher_config_sha256": config_sha256(teacher_config),
        "teacher_steps": int(teacher_steps),
        "model": model_description,
        "model_sha256": model_sha256,
        "prompts_sha256": digest(list(prompts)),
        "num_prompts": len(prompts),
        "seeds_per_prompt": int(seeds_per_prompt),
        "base_seed": int(base_seed),
        "items_sha256": digest([[int(it.index), it.prompt, int(it.seed)] for it in items]),
        "num_items": len(items),
        "guidance_scale": None if guidance_scale is None else float(guidance_scale),
        "call_kwargs": canonical_json(call_kwargs),
        "sample_shape": [int(s) for s in sample_shape],
        "pipeline_dtype": str(pipeline_dtype).replace("torch.", ""),
    }


# ---------------------------------------------------------------------------------------------- index ranges
def from_ranges(ranges: Any, limit: int = MAX_ITEMS) -> set[int]:
    """Inverse of :func:`to_ranges`; ``ValueError`` on malformed input (checked before anything is expanded, and
    expanded only up to ``limit`` indices: a checkpoint's items are bounded by its job)."""
    checked = check_ranges(ranges, "'done'", limit)
    return {i for a, b in checked for i in range(a, b)}


# ---------------------------------------------------------------------------------------------- checkpoint files
def rank_checkpoint_path(path: str | os.PathLike, ctx: DistContext) -> Path:
    """The file rank ``ctx.rank`` checkpoints its shard to (``path`` itself when not distributed)."""
    path = Path(path)
    if not ctx.enabled:
        return path
    return path.with_name(f"{path.stem}.rank{ctx.rank}-of-{ctx.world_size}{path.suffix}")


def checkpoint_info(stats: GramStats) -> dict[str, Any] | None:
    """The ``record_checkpoint`` header block of statistics, or None for plain statistics."""
    info = stats.meta.get(CHECKPOINT_KEY) if isinstance(stats.meta, dict) else None
    return info if isinstance(info, dict) else None


def read_checkpoint(path: str | os.PathLike) -> tuple[GramStats, dict[str, Any]]:
    """Load a checkpoint; ``ValueError`` naming the file when it is truncated, modified, corrupted, inconsistent or
    not a checkpoint. ``info["done"]`` is returned as validated ranges (never expanded here)."""
    path = Path(path)
    try:
        stats = GramStats.load(path)
    except ValueError as exc:
        raise ValueError(
            f"checkpoint {path} is corrupted or unreadable ({exc}); delete it to start the recording over"
        ) from None
    info = checkpoint_info(stats)
    if info is None:
        raise ValueError(
            f"{path} holds statistics without checkpoint information (not written by a checkpointed recording); "
            "cannot resume from it — use it with --stats / fit_olss_scheduler(stats=...) instead"
        )
    try:
        info = check_info(info, stats)
    except ValueError as exc:
        raise ValueError(f"checkpoint {path} is corrupted: {exc}") from None
    return stats, info


def check_info(info: Any, stats: GramStats) -> dict[str, Any]:
    """The ``record_checkpoint`` block, strictly typed and consistent with the statistics it describes."""
    info = checks.mapping(info, "its checkpoint header", ("version", "fingerprint", "layout", "done", "total_items",
                                                       "complete"))
    checks.version(info["version"], "checkpoint", (CHECKPOINT_VERSION,))
    total = checks.integer(info["total_items"], "total_items", 1, MAX_ITEMS)
    done = check_ranges(info["done"], "'done'", total)
    complete = checks.boolean(info["complete"], "complete")
    fingerprint = checks.mapping(info["fingerprint"], "its fingerprint")
    unknown = sorted(set(fingerprint) - set(FIELD_NAMES))
    if unknown:
        raise ValueError(f"its fingerprint has unknown field(s) {unknown[:5]}")
    layout = checks.mapping(info["layout"], "its layout", ("batch_size", "world_size", "rank"))
    checks.integer(layout["batch_size"], "layout batch_size", 1, 2**20)
    world = checks.integer(layout["world_size"], "layout world_size", 1, 2**16)
    if layout["rank"] is not None:
        checks.integer(layout["rank"], "layout rank", 0, world - 1)
    n_done = count(done)
    if n_done != stats.num_samples:
        raise ValueError(f"it lists {n_done} finished work items but holds {stats.num_samples} samples")
    if stats.items != done:
        raise ValueError("its finished work items differ from the items its statistics hold")
    if fingerprint.get("sample_shape") is not None and not _same(list(stats.sample_shape), fingerprint["sample_shape"]):
        raise ValueError(f"its statistics are of samples of shape {list(stats.sample_shape)}, its fingerprint says "
                         f"{str(fingerprint['sample_shape'])[:40]}")
    if fingerprint.get("pipeline_dtype") is not None and stats.dtype != fingerprint["pipeline_dtype"]:
        raise ValueError(f"its statistics were recorded in {stats.dtype}, its fingerprint says "
                         f"{str(fingerprint['pipeline_dtype'])[:20]}")
    if complete and n_done != total:
        raise ValueError(f"it is marked complete but holds {n_done} of {total} work items")
    if fingerprint.get("num_items") is not None and fingerprint["num_items"] != total:
        raise ValueError(f"it is for {total} work items but its fingerprint says {fingerprint['num_items']}")
    if "header_sha256" in fingerprint and fingerprint["header_sha256"] != digest(stats_identity(stats)):
        raise ValueError("its statistics header (teacher timesteps, prediction type or recording context) does not "
                         "match its fingerprint")
    return dict(info, done=done)


def stats_identity(stats: GramStats) -> dict[str, Any]:
    """The statistics header fields that define what a recording is of (covered by the job fingerprint): everything
    but the counts, the items (checked against ``done``), the dtype and sample shape (checked against the
    fingerprint's) and the checkpoint block itself."""
    out = {k: v for k, v in stats.header().items()
           if k in ("format", "timesteps", "teacher", "model", "prediction_type", "context")}
    out["meta"] = {k: v for k, v in stats.meta.items() if k != CHECKPOINT_KEY}
    return out


def _same(a: Any, b: Any) -> bool:
    """JSON values equal in type and value (``true`` is not ``1``, ``4.0`` is not ``4``)."""
    try:
        return canonical_json(a) == canonical_json(b)
    except (TypeError, ValueError):
        return False


def describe_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"name: saved vs now"`` for every field that differs."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        if not _same(a, b):
            name = FIELD_NAMES.get(key, key)
            if isinstance(a, str) and isinstance(b, str) and len(a) == len(b) == 64:  # hashes
                a, b = a[:12] + "…", b[:12] + "…"
            out.append(f"{name}: {a!r} in the checkpoint vs {b!r} now")
    return out


def check_fingerprint(path: str | os.PathLike, info: dict[str, Any], fingerprint: dict[str, Any]) -> None:
    """``ValueError`` listing what differs when a checkpoint belongs to another job."""
    diffs = describe_differences(info["fingerprint"], fingerprint)
    if diffs:
        raise ValueError(
            f"checkpoint {path} was recorded for a different job and cannot be resumed or merged; it differs in "
            + "; ".join(diffs)
            + ". Use another checkpoint path, or delete it to start over"
        )


def check_layout(path: str | os.PathLike, info: dict[str, Any], layout: dict[str, Any]) -> None:
    """``ValueError`` when an unfinished checkpoint is resumed with another batch size / world size / rank."""
    diffs = describe_differences(info["layout"], layout)
    if diffs:
        raise ValueError(
            f"unfinished checkpoint {path} must be resumed with the same batch size and number of processes; it "
            "differs in " + "; ".join(diffs)
        )


@dataclass
class RecordCheckpointer:
    """Writes and resumes the checkpoint of one rank's share of a recording (see module docstring).

    Attributes:
        path: the checkpoint path given by the user (the finished statistics end up here).
        every: write every this many recorded batches (and always when the shard is finished).
        fingerprint: :func:`job_fingerprint` of the job.
        layout: ``{"batch_size", "world_size", "rank"}``.
        item_indices: indices of all work items of the whole job.
        ctx: the distributed context.
    """

    path: Path
    every: int
    fingerprint: dict[str, Any]
    layout: dict[str, Any]
    item_indices: Sequence[int]
    ctx: DistContext = LOCAL
    _since_save: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.item_indices = [int(i) for i in self.item_indices]
        if self.every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 batch, got {self.every}")
        if self.path.exists() and self.path.is_dir():
            raise ValueError(f"checkpoint path {self.path} is a folder; give a file name (e.g. stats.safetensors)")

    @property
    def total_items(self) -> int:
        return len(self.item_indices)

    @property
    def shard_path(self) -> Path:
        return rank_checkpoint_path(self.path, self.ctx)

    def _info(self, done: set[int], complete: bool, layout: dict[str, Any]) -> dict[str, Any]:
        return {
            "version": CHECKPOINT_VERSION, "fingerprint": self.fingerprint, "layout": layout,
            "done": to_ranges(done), "total_items": self.total_items, "complete": complete,
        }

    def load_final(self) -> GramStats | None:
        """The finished statistics at :attr:`path` if they exist (validated against the fingerprint)."""
        if not self.path.is_file():
            return None
        stats, info = read_checkpoint(self.path)
        check_fingerprint(self.path, info, self.fingerprint)
        if not info["complete"]:
            if self.ctx.enabled:  # an unfinished single-process checkpoint: only a single process can resume it
                check_layout(self.path, info, self.layout)
            return None
        return stats

    def other_layout_shards(self) -> list[Path]:
        """Per-rank checkpoint files of this path written by a run with another number of processes."""
        pattern = f"{self.path.stem}.rank*-of-*{self.path.suffix}"
        mine = self.shard_path.name if self.ctx.enabled else None
        found = []
        for p in sorted(self.path.parent.glob(pattern)) if self.path.parent.is_dir() else []:
            if p.name != mine and not p.name.endswith(f"-of-{self.ctx.world_size}{self.path.suffix}"):
                found.append(p)
        return found

    def load_shard(self) -> tuple[GramStats | None, set[int]]:
        """This rank's unfinished checkpoint: ``(stats, finished item indices)``, or ``(None, set())``."""
        if not self.shard_path.is_file():
            return None, set()
        stats, info = read_checkpoint(self.shard_path)
        check_fingerprint(self.shard_path, info, self.fingerprint)
        check_layout(self.shard_path, info, self.layout)
        return stats, from_ranges(info["done"], info["total_items"])  # bounded: the fingerprint fixed the count

    def step(self, stats: GramStats, done: set[int]) -> None:
        """Call after each recorded batch: writes every :attr:`every` batches."""
        self._since_save += 1
        if self._since_save >= self.every:
            self.save_shard(stats, done, complete=False)

    def save_shard(self, stats: GramStats, done: set[int], complete: bool) -> None:
        """Write this rank's statistics and finished items atomically (nothing to write before the first batch)."""
        self._since_save = 0
        if stats.gram is None or stats.num_samples == 0:
            return
        meta = dict(stats.meta)
        meta[CHECKPOINT_KEY] = self._info(done, complete and not self.ctx.enabled, self.layout)
        stats.meta = meta
        self.shard_path.parent.mkdir(parents=True, exist_ok=True)
        stats.save(self.shard_path, lock=False)  # record_trajectories holds the checkpoint's lock
        logger.debug("checkpoint %s: %d of %d items", self.shard_path, len(done), self.total_items)

    def save_final(self, stats: GramStats) -> None:
        """Rank 0: write the summed, finished statistics to :attr:`path` (marks ``stats.meta`` finished)."""
        layout = dict(self.layout)
        layout["rank"] = None
        meta = dict(stats.meta)
        meta[CHECKPOINT_KEY] = self._info(set(self.item_indices), True, layout)
        stats.meta = meta
        if self.ctx.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            stats.save(self.path, lock=False)

    def remove_shard(self) -> None:
        """Delete this rank's shard file (after the finished statistics were written)."""
        if self.ctx.enabled and self.shard_path.exists():
            self.shard_path.unlink()


def require_complete(stats: GramStats, source: str) -> None:
    """``ValueError`` for an unfinished checkpoint given as statistics to search on."""
    info = checkpoint_info(stats)
    if info is None:
        return
    if not info.get("complete", False):
        try:
            done = count(check_ranges(info.get("done", []), "'done'"))
        except ValueError as exc:
            raise ValueError(f"{source} has a corrupted checkpoint header: {exc}") from None
        raise ValueError(
            f"{source} is an unfinished recording checkpoint ({done} of {info.get('total_items')} work items); "
            "finish it first (olss-fast search --resume / fit_olss_scheduler(resume=True))"
        )

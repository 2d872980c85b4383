"""Multi-process recording and search with ``torch.distributed``.

Under ``torchrun --nproc_per_node=K`` (one node or several), :func:`~olss_fast.fit.recording.record_trajectories`,
:func:`~olss_fast.fit.orchestration.fit_olss_scheduler` and ``olss-fast search`` split the work between the processes and combine
the results with collectives; nothing here hand-rolls communication.

**Sharding rule (deterministic, by whole batches).** The work items (prompts × seeds, :func:`make_work_items`) are
cut into the *same* batches a single process would make (``items[k·bs : (k+1)·bs]``, ``bs = batch_size``), and
batch k goes to rank ``k % world_size`` (:func:`shard_batches`). Each item is therefore computed in exactly the batch
composition of a single-process run, so its trajectory is bitwise the same (batch-size-dependent kernels cannot make
it differ) and only the order in which the per-batch float64 Gram matrices are summed changes: the all-reduced
statistics equal the single-process ones to float64 rounding (≈1e-16 relative). With fewer batches than ranks some
ranks record nothing (a warning is logged); use a smaller batch size to keep every process busy.

**Reduction.** Each rank streams its batches into a local float64 :class:`~olss_fast.core.stats.GramStats`; the Gram
matrices and the sample counts are then summed with ``all_reduce`` (NCCL on GPUs, gloo on CPU).

**Search.** Every rank holds the all-reduced statistics; rank 0 runs the path search and broadcasts the schedules
(or its ``ValueError``) to the others.

**Refinement.** The student-in-the-loop re-fit is sharded the same way: refinement batch k (of the refinement items,
in single-process batch order) is evaluated by rank ``k % world_size``, and the per-step model outputs are combined
by an all-reduce of zero-padded tensors (an exact all-gather: ``x + 0 == x``). Every rank then holds the same
outputs, runs the same small float64 fit, and uses rank 0's coefficients (broadcast each step), so the refined
schedule equals a single-process run's to float64 rounding.

**Output.** Only rank 0 (:attr:`DistContext.is_main`) writes result files; the others return the same results.

The process group is created from the torchrun environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) when ``WORLD_SIZE > 1`` and no group exists yet; an existing group is used as is.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch

from olss_fast.core import ranges
from olss_fast.core.stats import GramStats

logger = logging.getLogger(__name__)

T_ = TypeVar("T_")

__all__ = [
    "DistContext", "LOCAL", "init_distributed", "resolve_context", "shard_batches", "make_batches",
    "all_reduce_stats", "gather_by_sum", "broadcast_object", "agree_on_error", "shutdown_distributed",
]

# whether this module created the process group (and so may destroy it)
_OWNS_GROUP = False


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly trivial) process group.

    Attributes:
        rank: this process's global rank.
        world_size: number of processes (1 = not distributed).
        backend: the process group's backend ("nccl", "gloo", ...) or None when not distributed.
        comm_device: the device collective tensors must live on (CUDA for NCCL, CPU otherwise).
    """

    rank: int = 0
    world_size: int = 1
    backend: str | None = None
    comm_device: str = "cpu"

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes results."""
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank}/{self.world_size}" if self.enabled else "single process"

    # ------------------------------------------------------------------ thin collective wrappers
    def barrier(self) -> None:
        """Wait for every rank (no-op when not distributed)."""
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()


#: the single-process context
LOCAL = DistContext()


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not an integer") from None


def init_distributed(backend: str | None = None) -> DistContext:
    """The current process group's context, creating the group from the torchrun environment if needed.

    Args:
        backend: backend to use when a group has to be created (default: "nccl" when CUDA is available, else
            "gloo"). Ignored when a group already exists.

    Returns:
        :data:`LOCAL` when not distributed (``WORLD_SIZE`` unset or 1 and no process group).
    """
    global _OWNS_GROUP
    import torch.distributed as dist

    if not dist.is_available():
        if _env_world_size() > 1:
            raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
        return LOCAL
    if not dist.is_initialized():
        if _env_world_size() <= 1:
            return LOCAL
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ValueError(
                f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {missing} are not set: launch with torchrun "
                "(or initialise torch.distributed yourself)"
            )
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, init_method="env://")
        _OWNS_GROUP = True
        logger.info("initialised torch.distributed (%s): rank %d of %d", backend, dist.get_rank(),
                    dist.get_world_size())
    world = dist.get_world_size()
    if world <= 1:
        return DistContext(rank=0, world_size=1, backend=str(dist.get_backend()), comm_device="cpu")
    be = str(dist.get_backend())
    comm = f"cuda:{torch.cuda.current_device()}" if "nccl" in be else "cpu"
    return DistContext(rank=dist.get_rank(), world_size=world, backend=be, comm_device=comm)


def resolve_context(distributed: bool | DistContext | None) -> DistContext:
    """The context for an API call's ``distributed=`` argument.

    ``None`` (default): distributed when a process group exists or the torchrun environment says so;
    ``False``: this process only (no collectives); ``True``: like None, but ``ValueError`` when not under
    torchrun/torch.distributed; a :class:`DistContext` is returned as is.
    """
    if isinstance(distributed, DistContext):
        return distributed
    if distributed is False:
        return LOCAL
    ctx = init_distributed()
    if distributed is True and not ctx.enabled:
        raise ValueError(
            "distributed=True but this is a single process: launch with torchrun --nproc_per_node=K "
            "(WORLD_SIZE > 1) or initialise torch.distributed first"
        )
    return ctx


def shutdown_distributed() -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    global _OWNS_GROUP
    import torch.distributed as dist

    if _OWNS_GROUP and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _OWNS_GROUP = False


# ---------------------------------------------------------------------------------------------- sharding
def make_batches(items: Sequence[T_], batch_size: int) -> list[list[T_]]:
    """The batches a single process makes: ``items[k·bs : (k+1)·bs]`` for k = 0, 1, …"""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [list(items[s : s + batch_size]) for s in range(0, len(items), batch_size)]


def shard_batches(items: Sequence[T_], batch_size: int, ctx: DistContext = LOCAL) -> list[tuple[int, list[T_]]]:
    """``(k, batch)`` pairs of this rank: single-process batch k goes to rank ``k % world_size``."""
    batches = make_batches(items, batch_size)
    if ctx.enabled and len(batches) < ctx.world_size and ctx.is_main:
        logger.warning(
            "%d batch(es) for %d processes: %d process(es) will record nothing (use a smaller batch size)",
            len(batches), ctx.world_size, ctx.world_size - len(batches),
        )
    return [(k, b) for k, b in enumerate(batches) if k % ctx.world_size == ctx.rank]


# ---------------------------------------------------------------------------------------------- collectives
def broadcast_object(obj: T_, ctx: DistContext, src: int = 0) -> T_:
    """Rank ``src``'s (picklable) object on every rank."""
    if not ctx.enabled:
        return obj
    import torch.distributed as dist

    box = [obj if ctx.rank == src else None]
    device = torch.device(ctx.comm_device) if "cuda" in ctx.comm_device else None
    dist.broadcast_object_list(box, src=src, device=device)
    return box[0]


def all_gather_object(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's (picklable) object, in rank order."""
    if not ctx.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def agree_on_error(error: str | None, ctx: DistContext) -> None:
    """Collective error check: if any rank passes a message, every rank raises ``ValueError`` with it.

    Keeps ranks from diverging (one raising while the others wait in a collective) on validation errors.
    """
    if not ctx.enabled:
        if error:
            raise ValueError(error)
        return
    errors = all_gather_object(error, ctx)
    bad = [(r, e) for r, e in enumerate(errors) if e]
    if bad:
        if len({e for _, e in bad}) == 1:
            raise ValueError(bad[0][1])
        raise ValueError("; ".join(f"rank {r}: {e}" for r, e in bad))


def gather_by_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """All-gather by summation: each rank passes a tensor that is zero outside the entries it owns.

    Exact (adding zeros does not round), and it needs no uneven-size all-gather. Returns a new tensor on the
    input's device.
    """
    if not ctx.enabled:
        return tensor
    import torch.distributed as dist

    buf = tensor.detach().to(ctx.comm_device).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(tensor.device)


def all_reduce_stats(stats: GramStats, ctx: DistContext, sample_shape: Sequence[int] | None = None) -> GramStats:
    """Sum per-rank :class:`GramStats` (Gram matrices and sample counts) in place; every rank gets the total.

    Ranks that recorded nothing take part with zeros; ``sample_shape`` (or another rank's) gives their shape.
    ``ValueError`` if the ranks recorded different teachers, models, timesteps or sample shapes.
    """
    if not ctx.enabled:
        return stats
    import torch.distributed as dist

    info = {
        "timesteps": [float(t) for t in stats.timesteps], "teacher": stats.teacher, "model": stats.model,
        "prediction_type": stats.prediction_type,
        "sample_shape": list(stats.sample_shape) if stats.sample_shape is not None else None, "dtype": stats.dtype,
        "items": stats.items,
    }
    infos = all_gather_object(info, ctx)
    error = None
    ref = infos[0]
    for r, other in enumerate(infos[1:], start=1):
        for key in ("timesteps", "teacher", "model", "prediction_type"):
            if other[key] != ref[key]:
                error = f"rank {r} recorded a different {key} than rank 0: {other[key]!r} vs {ref[key]!r}"
    shapes = {tuple(i["sample_shape"]) for i in infos if i["sample_shape"] is not None}
    if len(shapes) > 1:
        error = f"ranks recorded different sample shapes: {sorted(shapes)}"
    agree_on_error(error, ctx)
    if not shapes:
        if sample_shape is None:
            raise ValueError("no rank recorded any sample")
        shapes = {tuple(sample_shape)}
    shape = shapes.pop()
    dtype = next((i["dtype"] for i in infos if i["dtype"] is not None), None)
    if stats.gram is None:
        channels = shape[0] if len(shape) >= 2 else 1
        stats.gram = torch.zeros(channels, stats.num_vectors, stats.num_vectors, dtype=torch.float64,
                                 device=stats.device)
        stats.sample_shape = tuple(shape)
        stats.dtype = dtype
    buf = stats.gram.to(ctx.comm_device).contiguous()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    stats.gram = buf.to(stats.device)
    count = torch.tensor([stats.num_samples], dtype=torch.int64, device=ctx.comm_device)
    dist.all_reduce(count, op=dist.ReduceOp.SUM)
    stats.num_samples = int(count.item())
    if all(i["items"] is not None for i in infos):  # the ranks' item sets are disjoint by the sharding rule
        stats.items = functools.reduce(ranges.union, [part["items"] for part in infos], [])
    else:
        stats.items = None
    return stats


def broadcast_stats(stats: GramStats | None, ctx: DistContext, src: int = 0) -> GramStats:
    """Rank ``src``'s statistics on every rank (header by object broadcast, Gram matrix by tensor broadcast)."""
    if not ctx.enabled:
        if stats is None:
            raise ValueError("no statistics to broadcast")
        return stats
    import torch.distributed as dist

    header = broadcast_object(stats.header() if ctx.rank == src and stats is not None else None, ctx, src)
    if header is None:
        raise ValueError(f"rank {src} has no statistics to broadcast")
    shape = header["sample_shape"]
    channels = shape[0] if shape and len(shape) >= 2 else 1
    out = GramStats(header["timesteps"], teacher=header["teacher"], model=header["model"],
                    prediction_type=header["prediction_type"], context=header.get("context") or {})
    m = out.num_vectors
    buf = (stats.gram.to(ctx.comm_device).contiguous() if ctx.rank == src
           else torch.empty(channels, m, m, dtype=torch.float64, device=ctx.comm_device))
    dist.broadcast(buf, src=src)
    out.gram = buf.to(out.device)
    out.num_samples = int(header["num_samples"])
    out.sample_shape = tuple(shape) if shape else None
    out.dtype = header["dtype"]
    out.meta = header["meta"]
    out.items = header["items"]
    return out

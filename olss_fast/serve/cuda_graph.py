"""CUDA-graph capture machinery for the fixed-step OLSS loop (import as ``olss_fast.serve.cuda_graph``).

A few-step OLSS sampler is a static program: text encoder → n × (UNet → fused step) → VAE decode, with every shape
known in advance. Captured once as a CUDA graph it replays with a single launch, which removes the per-kernel launch
overhead that dominates an eager UNet at batch 1-2 (docs/design.md, "Fast paths").

This module is independent of diffusers: it captures any zero-argument callable that reads and writes tensors held in
:class:`StaticBuffers`, keeps captured programs in a small LRU :class:`GraphCache`, and refuses to copy inputs of the
wrong shape or dtype into a captured program (so a graph is never silently reused for another shape).

Rules a captured program must follow (PyTorch CUDA-graph semantics): no host synchronisation (``.item()``,
``.cpu()``, data-dependent shapes), no CPU→GPU copies of fresh CPU tensors, every tensor it reads lives at a fixed
address (copy new inputs into the static buffers before each replay), and outputs allocated during capture are
overwritten by the next replay (clone them before handing them out).
"""
from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from typing import Any, Callable, Generic, Hashable, Iterator, Mapping, Optional, TypeVar

import torch

logger = logging.getLogger(__name__)

__all__ = ["CapturedGraph", "GraphCache", "StaticBuffers", "capture_cuda_graph", "tensor_signature"]

T = TypeVar("T")
V = TypeVar("V")


def tensor_signature(tensors: Mapping[str, torch.Tensor]) -> tuple:
    """A hashable description (name, shape, dtype, device) of a dict of tensors, sorted by name."""
    return tuple(
        (name, tuple(t.shape), str(t.dtype), str(t.device)) for name, t in sorted(tensors.items())
    )


class StaticBuffers:
    """Fixed-address tensors that a captured program reads; new values are copied in before every replay.

    Built from example tensors (shape, dtype and device are taken from them, values are not). :meth:`load` copies
    new values in and raises ``ValueError`` on any name, shape or dtype mismatch — it never reshapes or re-allocates,
    so the addresses baked into a captured graph stay valid.
    """

    def __init__(self, examples: Mapping[str, torch.Tensor]) -> None:
        self._tensors: dict[str, torch.Tensor] = {
            name: torch.empty_like(t, memory_format=torch.contiguous_format) for name, t in examples.items()
        }
        self.signature = tensor_signature(self._tensors)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def items(self) -> Any:
        return self._tensors.items()

    def load(self, values: Mapping[str, torch.Tensor]) -> None:
        """Copy ``values`` into the buffers (exact names, shapes and dtypes required)."""
        if set(values) != set(self._tensors):
            raise ValueError(
                f"static inputs mismatch: the captured program reads {sorted(self._tensors)}, got {sorted(values)}"
            )
        for name, value in values.items():
            buf = self._tensors[name]
            if tuple(value.shape) != tuple(buf.shape) or value.dtype != buf.dtype:
                raise ValueError(
                    f"static input {name!r} was captured as {list(buf.shape)} {buf.dtype}, got "
                    f"{list(value.shape)} {value.dtype}; a new shape needs a new capture"
                )
        for name, value in values.items():
            self._tensors[name].copy_(value, non_blocking=True)


def capture_cuda_graph(
    fn: Callable[[], T],
    *,
    warmup_iters: int = 2,
    pool: Optional[Any] = None,
    device: Optional[torch.device] = None,
) -> tuple[torch.cuda.CUDAGraph, T]:
    """Warm ``fn`` up on a side stream, then capture one call of it in a CUDA graph.

    Warm-up runs first (``warmup_iters`` calls on a side stream, as PyTorch recommends) so that lazy initialisation
    — cuBLAS/cuDNN handles and autotuning, Triton compilation, ``torch.compile`` — happens outside the capture.

    Returns:
        ``(graph, outputs)``: ``outputs`` is what the captured call returned; its tensors live in the graph's memory
        pool and are rewritten by every ``graph.replay()``.
    """
    if not torch.cuda.is_available():
        raise ValueError("CUDA-graph capture needs a CUDA device")
    if device is not None and torch.device(device).type != "cuda":
        raise ValueError(f"CUDA-graph capture needs a CUDA device, got {device}")
    with torch.cuda.device(device) if device is not None else contextlib.nullcontext():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(int(warmup_iters), 1)):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs = fn()
        torch.cuda.synchronize()
    return graph, outputs


class CapturedGraph(Generic[T]):
    """A captured zero-argument program plus its static inputs and outputs.

    Attributes:
        key: the cache key it was captured for (shape/dtype description).
        inputs: the :class:`StaticBuffers` the program reads.
        outputs: what the captured call returned (rewritten by every replay).
        state: anything else the program needs to keep alive (its work buffers).

    ``pool`` (``torch.cuda.graph_pool_handle()``) lets several graphs share one memory pool. That is safe when they
    replay one at a time on one stream, every output is copied out before another graph replays, and every tensor
    that must survive between replays is allocated before capture (outside the pool) — as the OLSS runner does.
    """

    def __init__(
        self,
        key: Hashable,
        fn: Callable[[], T],
        inputs: StaticBuffers,
        *,
        state: Any = None,
        warmup_iters: int = 2,
        device: Optional[torch.device] = None,
        pool: Optional[Any] = None,
    ) -> None:
        self.key = key
        self.inputs = inputs
        self.state = state
        self._fn = fn
        self.graph, self.outputs = capture_cuda_graph(fn, warmup_iters=warmup_iters, pool=pool, device=device)
        logger.debug("captured a CUDA graph for %s", key)

    def replay(self, values: Mapping[str, torch.Tensor]) -> T:
        """Copy ``values`` into the static inputs (shape-checked), replay, and return the (static) outputs."""
        self.inputs.load(values)
        self.graph.replay()
        return self.outputs


class GraphCache(Generic[V]):
    """A small least-recently-used cache ``key -> value`` (captured graphs, or eager work buffers)."""

    def __init__(self, max_size: int = 4) -> None:
        if int(max_size) < 1:
            raise ValueError(f"the graph cache needs room for at least one entry, got max_size={max_size}")
        self.max_size = int(max_size)
        self._entries: "OrderedDict[Hashable, V]" = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def keys(self) -> list[Hashable]:
        """Keys from least to most recently used."""
        return list(self._entries)

    def get(self, key: Hashable) -> Optional[V]:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return value

    def put(self, key: Hashable, value: V) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_size:
            old, _ = self._entries.popitem(last=False)
            self.evictions += 1
            logger.info("evicted the least recently used captured program %s", old)

    def clear(self) -> None:
        self._entries.clear()

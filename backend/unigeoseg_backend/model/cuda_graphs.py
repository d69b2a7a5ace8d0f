"""CUDA graphs for fixed-shape calls: one capture per shape, then one launch per call.

At batch 1 the UniGeoSeg forward is a few thousand small kernels (Swin's windows, the
deformable-attention levels, Phi's 24 layers, nine decoder layers); on a GPU their launch
overhead, not their arithmetic, sets the latency. A captured graph replays all of them with
one launch. Each call site (image side, language model, mask decoder) is captured once per
input shape and replayed afterwards: the inputs are copied into the graph's static buffers,
the graph is replayed, and the outputs are cloned out of the graph's memory so that the
caller may keep them (the embedding cache does) while the graph runs again.

A function can be captured only if it neither reads device values back to the host nor copies
host memory to the device; the model code keeps those out of its forward passes. If a capture
fails anyway (an unexpected synchronisation inside a library), that key falls back to the
eager call, with one warning, and is not tried again.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

#: Eager runs before a capture: kernel selection, lazy initialisation and allocator warm-up
#: must happen outside the graph.
WARMUP_RUNS = 2

#: Keys whose calls are counted before capture (the oldest are forgotten beyond this).
_MAX_COUNTED_KEYS = 1024


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]


class CudaGraphCache:
    """Captured graphs by key, least recently used evicted beyond ``max_graphs``.

    All graphs share one memory pool. That is safe because replays are sequential on one
    stream and outputs are cloned before the next replay.

    Under capture, transformers skips its data-dependent shortcuts (``is_tracing`` includes
    stream capture) and builds the attention mask explicitly, so the language model's graph
    may take another attention kernel than the eager call: outputs agree to rounding, not
    bit for bit.

    A key is captured the second time it is seen, not the first: a capture costs a few
    forward passes, which one-off shapes (the ragged last batch of a whole-raster run, a
    prompt asked once) would never repay.

    Args:
        device: the CUDA device the graphs run on.
        max_graphs: graphs kept (each holds its inputs, outputs and activations' memory).
        capture_after: calls of a key before it is captured (1: capture on first use).
    """

    def __init__(self, device: torch.device, max_graphs: int = 16,
                 capture_after: int = 2) -> None:
        if torch.device(device).type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.device = torch.device(device)
        self.max_graphs = max_graphs
        self._pool = torch.cuda.graph_pool_handle()
        self._graphs: OrderedDict[Hashable, _Captured] = OrderedDict()
        self._failed: set[Hashable] = set()
        self.capture_after = capture_after
        self._calls: OrderedDict[Hashable, int] = OrderedDict()  # of keys not captured yet
        self.captures = 0  #: graphs captured so far (a benchmark reads it)

    def run(self, key: Hashable, fn: Callable[..., Sequence[Tensor]],
            inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """``fn(*inputs)`` through the graph captured for ``key`` (captured on first use).

        ``key`` must determine every input's shape and dtype and everything ``fn`` does
        besides its tensor inputs (task, sequence layout, ...). ``fn`` returns a flat
        sequence of tensors.
        """
        with torch.inference_mode():
            if key in self._failed:
                return tuple(fn(*inputs))
            captured = self._graphs.get(key)
            if captured is None:
                calls = self._calls.pop(key, 0) + 1
                if calls < self.capture_after:
                    self._calls[key] = calls
                    while len(self._calls) > _MAX_COUNTED_KEYS:
                        self._calls.popitem(last=False)
                    return tuple(fn(*inputs))
                captured = self._capture(key, fn, inputs)
                if captured is None:
                    return tuple(fn(*inputs))
            self._graphs.move_to_end(key)
            for static, value in zip(captured.inputs, inputs, strict=True):
                static.copy_(value, non_blocking=True)
            captured.graph.replay()
            return tuple(out.clone() for out in captured.outputs)

    def _capture(self, key: Hashable, fn: Callable[..., Sequence[Tensor]],
                 inputs: Sequence[Tensor]) -> _Captured | None:
        static = tuple(x.detach().clone() for x in inputs)
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    fn(*static)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                outputs = tuple(fn(*static))
        except Exception as exc:  # a library synchronised inside fn: run that key eagerly
            self._failed.add(key)
            logger.warning("CUDA graph capture failed for %s (%s: %s); running it eagerly",
                           key, type(exc).__name__, exc)
            torch.cuda.synchronize(self.device)
            # An aborted capture leaves its private pool unusable for later captures (the
            # allocator asserts): start a new one. Graphs already captured keep theirs.
            self._pool = torch.cuda.graph_pool_handle()
            return None
        captured = _Captured(graph, static, outputs)
        self._graphs[key] = captured
        self.captures += 1
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return captured

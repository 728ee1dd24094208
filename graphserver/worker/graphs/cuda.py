"""The CUDA side of graph capture: handles, and the capturers the graph managers drive.

Capture uses thread-local capture mode (the request thread keeps launching work meanwhile).
torch.cuda.graph() is avoided on purpose: its __enter__ synchronizes the whole device, which would
stall the concurrent replays. Each graph gets its own (empty) memory pool: the steps allocate
nothing, and a pool shared across graphs trips an allocator assert in torch once every graph using
it has been reset.
"""
from __future__ import annotations

import threading
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class GraphHandle:
    """One key's graph. Keys whose steps launch identically share one executable."""
    graph: "torch.cuda.CUDAGraph"
    signature: tuple
    shared: bool          # True when this key reused an executable captured for another key

    def replay(self) -> None:
        self.graph.replay()     # on the caller's current stream


class CudaGraphCapturer:
    """Captures one step per key into a torch.cuda.CUDAGraph on its own stream.

    By default the step is the session step, runner.decode_step(attn_max_len=key), whose launch
    signature is runner.step_signature(key); the batched manager passes step=/signature= for
    runner.decode_batch(bucket, attn_max_len) with key (bucket, attn_max_len).

    Sharing: the decode step's launches depend on the length only through the attention split
    count (the kernels read the exact length from device memory), so graphs of lengths with the
    same runner.step_signature(key) are identical. A key whose signature is already captured
    gets that executable (refcounted) instead of a new capture: capture cost is paid once per
    split count, not once per token, which is what lets exact-length capture outrun replay.
    """

    def __init__(self, runner, device: torch.device, tracer=None, share: bool = True,
                 keep_idle: int = 16, step=None, signature=None, label: str = "T"):
        self.runner = runner
        self.step = step or step_of(runner, "seq")
        self.signature = signature or runner.step_signature
        self.label = label
        self.device = device
        self.tracer = tracer
        self.share = share
        self.stream = torch.cuda.Stream(device=device)
        self._mem_before = torch.cuda.memory_reserved(device)
        self._bound = False
        self._lock = threading.Lock()
        self._by_sig: dict[tuple, list] = {}      # signature -> [graph, refcount]
        # Executables no key uses any more, kept (most recent last) so a later session at those
        # lengths finds them ready: a few MB each against a 2-4 ms capture.
        self.keep_idle = keep_idle
        self._idle: list[tuple] = []

    def on_thread_start(self) -> None:
        torch.cuda.set_device(self.device)

    def try_share(self, key: int) -> Optional[GraphHandle]:
        """A handle on an existing executable with key's launch signature, or None."""
        if not self.share:
            return None
        sig = self.signature(key)
        with self._lock:
            entry = self._by_sig.get(sig)
            if entry is None:
                return None
            entry[1] += 1
            if sig in self._idle:
                self._idle.remove(sig)
            return GraphHandle(entry[0], sig, shared=True)

    def capture(self, key: int) -> GraphHandle:
        handle = self.try_share(key)
        if handle is not None:
            return handle
        sig = self.signature(key)
        graph = torch.cuda.CUDAGraph()
        rng = (self.tracer.range(f"capture {self.label}={key}", "capture") if self.tracer
               else nullcontext())
        with rng, torch.cuda.stream(self.stream):
            if not self._bound:       # the cuBLAS handle must exist before any capture begins
                self.runner.bind_stream()
                self._bound = True
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.step(key)
            finally:
                graph.capture_end()
        with self._lock:
            if self.share:
                self._by_sig[sig] = [graph, 1]
        return GraphHandle(graph, sig, shared=False)

    def release(self, handle: GraphHandle) -> None:
        # cudaGraphExecDestroy on an in-flight graph frees it once it completes (CUDA docs),
        # so eviction never has to wait for the replay stream.
        with self._lock:
            entry = self._by_sig.get(handle.signature) if self.share else None
            if entry is not None and entry[0] is handle.graph:
                entry[1] -= 1
                if entry[1] > 0:
                    return
                self._idle.append(handle.signature)
                if len(self._idle) <= self.keep_idle:
                    return
                oldest = self._idle.pop(0)
                graph = self._by_sig.pop(oldest)[0]
            else:
                graph = handle.graph
        graph.reset()

    def purge(self) -> None:
        """Destroy the idle executables kept for reuse."""
        with self._lock:
            idle, self._idle = self._idle, []
            graphs = [self._by_sig.pop(sig)[0] for sig in idle]
        for g in graphs:
            g.reset()

    def memory_bytes(self) -> int:
        return max(0, torch.cuda.memory_reserved(self.device) - self._mem_before)


def step_of(runner, kind: str):
    """What a graph of each kind runs: the session step ("seq", key = length) or the batched
    step ("batch", key = (bucket, length))."""
    if kind == "seq":
        return lambda key: runner.decode_step(attn_max_len=key)
    if kind == "batch":
        return lambda key: runner.decode_batch(*key)
    raise ValueError(f"unknown graph kind {kind!r}")


def capturer_for(runner, device: torch.device, kind: str, tracer=None) -> CudaGraphCapturer:
    """The capturer of one kind of step graph over this runner (see step_of)."""
    if kind == "seq":
        return CudaGraphCapturer(runner, device, tracer, step=step_of(runner, kind))
    return CudaGraphCapturer(runner, device, tracer, label="B,L", step=step_of(runner, kind),
                             signature=lambda key: runner.batch_signature(*key))

"""Tensor parallelism over N ranks of one host (`--tp N`).

Rank 0 is the server process: it runs the scheduler, the sessions and the RPCs, and holds shard 0
of the model. Ranks 1..N-1 are worker processes started here; each holds its own shard (weights
and KV heads, see custom_kernels.weights._hf_targets for the rules) and runs exactly the runner
calls rank 0 runs, in the same order, with the same host arguments. The model's only
communication is the all-reduce the runner does after the o-proj and the down-proj
(ModelRunner.all_reduce); everything else is replicated, so every rank ends a step with the same
logits and samples the same token, and only rank 0 reads results back.

How the calls travel: rank 0's RunnerProxy sends (method, arguments) down one multiprocessing
pipe per worker before running the call itself. A pipe rather than a collective broadcast: an idle
server may wait for hours (a collective would time out), and a worker whose server died sees
end-of-file and exits instead of lingering.

Collectives: gloo on the CPU, bound to 127.0.0.1; NCCL on CUDA (rank r on cuda:r). The rendezvous
is a file in a private temp dir, so no port is chosen or bound for it. The NCCL path is written
but has not run yet (no multi-GPU machine in CI). Step graphs are captured and replayed on every
rank in step (tp_graphs.py).

Hot reload: every rank stages its own shard of the new checkpoint on a thread while serving goes
on ("stage"); when rank 0 has staged and validated its shard it asks the workers for theirs
("check", the one call a worker answers); then either all copy into their arenas in the same
place of the call order ("commit") or all drop what they staged ("drop").
"""
from __future__ import annotations

import contextlib
import datetime
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from custom_kernels.weights import Shard, load_weights, shard_config, shard_divisibility_problem

from ..errors import ConfigError, DeadlineExceeded
from .model_runner import ModelRunner
from .reload import copy_into, stage_checkpoint
from .tp_graphs import WorkerGraphs

# How long one collective (and the rendezvous) may wait for the other ranks. Every rank enters a
# step's all-reduces together, so a wait this long means a rank died or hung.
COLLECTIVE_TIMEOUT_S = 300.0
READY_POLL_S = 0.5

# Runner calls that touch the device: mirrored to every worker. Anything else (reading io,
# kv, weights, signatures) is answered by rank 0's own runner.
MIRRORED_RUNNER = frozenset({"prefill", "prefill_kv", "decode_step", "decode_batch",
                             "load_session", "set_sampling", "sample_pending", "restore_logits"})
MIRRORED_BATCH = frozenset({"fill", "upload"})


def check_tp(cfg: Any, tp: int) -> None:
    """ConfigError (one line naming the counts) when the model does not split into tp ranks."""
    problem = shard_divisibility_problem(cfg, tp)
    if problem:
        raise ConfigError(f"--tp {tp}: {problem}")


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a rank needs to build its runner (picklable: it travels to spawned workers)."""
    source: Any                 # prepare.ModelSource (weights and the full ModelConfig)
    device_type: str            # "cpu" | "cuda"
    dtype: torch.dtype
    seed: int
    world: int
    max_len: int
    kv_blocks: int
    block_size: int
    prefill_chunk: int
    max_num_seqs: int
    batch_invariant: bool
    init_file: str              # the rendezvous file (file:// store)

    def device(self, rank: int) -> torch.device:
        return torch.device("cuda", rank) if self.device_type == "cuda" else torch.device("cpu")


def init_group(spec: WorkerSpec, rank: int):
    """Join the process group of spec.world ranks (NCCL on CUDA, gloo on 127.0.0.1 otherwise).

    Returns, on CUDA, a second NCCL group for the all-reduces inside graph captures (see
    make_all_reduce); None on the CPU, which captures no graphs."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    kwargs: dict[str, Any] = {}
    if spec.device_type == "cuda":
        backend = "nccl"
        # No user-buffer registration in captured collectives: NCCL requires every rank to pass
        # registered buffers once one does, and a worker whose capture failed replays that step
        # eagerly (tp_graphs.py). Set before the communicators exist; a user's value wins.
        os.environ.setdefault("NCCL_GRAPH_REGISTER", "0")
        torch.cuda.set_device(spec.device(rank))
        kwargs["device_id"] = spec.device(rank)
    else:
        backend = "gloo"
        opts = dist.ProcessGroupGloo._Options()
        # Loopback only: the ranks are processes of one host, nothing else may connect.
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        kwargs["pg_options"] = opts
    dist.init_process_group(backend, init_method="file://" + spec.init_file, rank=rank,
                            world_size=spec.world, timeout=timeout, **kwargs)
    if spec.device_type != "cuda":
        return None
    # Every rank creates it, in the same order, right after the default group, and runs one
    # all-reduce on it now: the communicator's setup allocates and synchronizes, which a
    # capturing thread may not do, so it must not wait for the first capture.
    capture_group = dist.new_group(backend="nccl")
    warm = torch.ones(1, device=spec.device(rank))
    dist.all_reduce(warm, group=capture_group)
    torch.cuda.synchronize(spec.device(rank))
    return capture_group


def make_all_reduce(capture_group) -> Callable[[torch.Tensor], None]:
    """The runner's all-reduce (in place, sum). Inside a graph capture it goes through
    capture_group: the capture thread and the request side's eager steps then never use one
    communicator, or its internal stream, at the same time."""
    import torch.distributed as dist

    def all_reduce(t: torch.Tensor) -> None:
        capturing = capture_group is not None and torch.cuda.is_current_stream_capturing()
        dist.all_reduce(t, group=capture_group if capturing else None)
    return all_reduce


def build_runner(spec: WorkerSpec, rank: int, capture_group=None) -> ModelRunner:
    """Rank `rank`'s shard of the weights, its runner on the shard config, the all-reduce hook."""
    cfg = spec.source.config
    device = spec.device(rank)
    weights = load_weights(spec.source, cfg, device, spec.dtype, seed=spec.seed,
                           shard=Shard(rank, spec.world))
    runner = ModelRunner(shard_config(cfg, spec.world), weights, max_len=spec.max_len,
                         kv_blocks=spec.kv_blocks, block_size=spec.block_size,
                         prefill_chunk=spec.prefill_chunk, max_num_seqs=spec.max_num_seqs,
                         batch_invariant=spec.batch_invariant)
    runner.all_reduce = make_all_reduce(capture_group)
    return runner


def worker_main(spec: WorkerSpec, rank: int, conn) -> None:
    """A worker rank: build the shard, say ready, then run each mirrored call until told to stop
    (None) or until the server's end of the pipe closes."""
    import torch.distributed as dist

    if spec.device_type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)        # as rank 0 (engine/core.py): one thread per rank
    stream = torch.cuda.Stream(spec.device(rank)) if spec.device_type == "cuda" else None
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        _serve(spec, rank, conn)


def _serve(spec: WorkerSpec, rank: int, conn) -> None:
    import torch.distributed as dist

    try:
        capture_group = init_group(spec, rank)
        runner = build_runner(spec, rank, capture_group)
        runner.bind_stream()
        staged = _StagedReload(spec, rank)
        graphs = WorkerGraphs(runner, spec.device(rank), log=lambda m: print(f"tp{rank}: {m}", file=sys.stderr))
        conn.send(("ready", None))
    except BaseException as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        raise
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:        # the server is gone
                return
            if msg is None:
                return
            target, method, args, kwargs = msg
            if target == "reload":
                answer = getattr(staged, method)(runner, *args)
                if answer is not None:
                    conn.send(answer)
                continue
            if target == "graphs":
                getattr(graphs, method)(*args)
                continue
            obj = runner if target == "runner" else runner.batch
            getattr(obj, method)(*args, **kwargs)
    except BaseException:
        # A failed call leaves rank 0 waiting in a collective; exiting closes this rank's
        # connections so rank 0's collective fails instead of waiting for the timeout.
        traceback.print_exc(file=sys.stderr)
        os._exit(1)
    finally:
        graphs.close()
        if dist.is_initialized():
            dist.destroy_process_group()


class _StagedReload:
    """A worker's side of a reload: its shard of the new checkpoint, staged on a thread."""

    def __init__(self, spec: WorkerSpec, rank: int):
        self.spec, self.rank = spec, rank
        self._thread: Optional[threading.Thread] = None
        self._weights = None
        self._error: Optional[str] = None

    def stage(self, runner: ModelRunner, path: str) -> None:
        self.drop(runner)

        def load():
            try:
                self._weights = stage_checkpoint(path, self.spec.source.config, self.spec.dtype,
                                                 Shard(self.rank, self.spec.world))
            except BaseException as e:      # reported to rank 0 by check()
                self._error = f"{type(e).__name__}: {e}"

        self._thread = threading.Thread(target=load, name=f"reload-stage-tp{self.rank}", daemon=True)
        self._thread.start()

    def check(self, runner: ModelRunner) -> tuple:
        """("staged", None) once the shard is in host memory, or ("staged", why it is not)."""
        if self._thread is None:
            return ("staged", "nothing was staged")
        self._thread.join()
        return ("staged", self._error)

    def commit(self, runner: ModelRunner) -> None:
        self._thread.join()
        copy_into(runner.w, self._weights)   # on this rank's stream, before any later call
        self.drop(runner)

    def drop(self, runner: ModelRunner) -> None:
        if self._thread is not None:
            self._thread.join()
        self._thread, self._weights, self._error = None, None, None


class TPGroup:
    """Rank 0's side: starts the worker processes, joins the group, sends them calls."""

    def __init__(self, spec_without_file: dict, world: int, log: Callable[[str], None]):
        """spec_without_file: WorkerSpec's fields but world and init_file (chosen here)."""
        self.log = log
        self.dir = tempfile.mkdtemp(prefix="graphserver-tp-")
        self.spec = WorkerSpec(**spec_without_file, world=world,
                               init_file=os.path.join(self.dir, "rendezvous"))
        ctx = multiprocessing.get_context("spawn")     # fork after torch threads is unsafe
        self.conns = []
        self.procs = []
        self._send_lock = threading.Lock()
        self.capture_group = None
        try:
            for rank in range(1, world):
                ours, theirs = ctx.Pipe()
                p = ctx.Process(target=worker_main, args=(self.spec, rank, theirs),
                                name=f"graphserver-tp{rank}", daemon=True)
                p.start()
                theirs.close()
                self.conns.append(ours)
                self.procs.append(p)
            self.capture_group = init_group(self.spec, 0)
        except BaseException:
            self.close()
            raise

    def wait_ready(self) -> None:
        """Wait until every worker has built its shard (RuntimeError if one failed or died)."""
        for rank, conn, p in self._ranks():
            status, detail = self._answer(rank, conn, p, "while loading")
            if status != "ready":
                raise RuntimeError(f"tensor-parallel rank {rank} failed to load: {detail}")

    def _ranks(self):
        return zip(range(1, len(self.conns) + 1), self.conns, self.procs)

    @staticmethod
    def _answer(rank: int, conn, p, doing: str) -> tuple:
        """A worker's next message; RuntimeError if it exits first."""
        while not conn.poll(READY_POLL_S):
            if not p.is_alive():
                raise RuntimeError(f"tensor-parallel rank {rank} exited with code {p.exitcode} {doing}")
        return conn.recv()

    # -- reload (every rank its own shard; see the module docstring) --

    def reload_stage(self, path: str) -> None:
        self.send("reload", "stage", (path,), {})

    def reload_check(self) -> list[str]:
        """Wait for every worker's staging; one line per rank whose shard could not be staged."""
        self.send("reload", "check", (), {})
        problems = []
        for rank, conn, p in self._ranks():
            _, error = self._answer(rank, conn, p, "while staging a reload")
            if error:
                problems.append(f"rank {rank}: {error}")
        return problems

    def reload_commit(self) -> None:
        self.send("reload", "commit", (), {})

    def reload_drop(self) -> None:
        self.send("reload", "drop", (), {})

    def send(self, target: str, method: str, args: tuple, kwargs: dict) -> None:
        msg = (target, method, args, kwargs)
        # Two threads send: the request side and a graph manager's capture thread (tp_graphs.py).
        # Under one lock every worker sees the messages in one order, and none interleave.
        with self._send_lock:
            for rank, conn in enumerate(self.conns, start=1):
                try:
                    conn.send(msg)
                except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
                    raise RuntimeError(f"tensor-parallel rank {rank} is gone") from None

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the workers (then kill any that do not exit) and leave the group."""
        import torch.distributed as dist

        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        for conn in self.conns:
            conn.close()
        self.conns, self.procs = [], []
        if dist.is_initialized():
            dist.destroy_process_group()
        shutil.rmtree(self.dir, ignore_errors=True)


class _BatchProxy:
    """runner.batch on rank 0: fill / upload go to every rank, the rest is rank 0's."""

    def __init__(self, batch, group: TPGroup):
        self._batch, self._group = batch, group

    def __getattr__(self, name: str):
        attr = getattr(self._batch, name)
        if name not in MIRRORED_BATCH:
            return attr

        def mirrored(*args, **kwargs):
            self._group.send("batch", name, args, kwargs)
            return attr(*args, **kwargs)
        return mirrored


class RunnerProxy:
    """Rank 0's runner under TP: the engine calls it as a ModelRunner. Device-side calls are sent
    to the workers first (so they run concurrently on GPUs), then run on rank 0's shard."""

    def __init__(self, runner: ModelRunner, group: TPGroup):
        self._runner, self._group = runner, group
        self.batch = _BatchProxy(runner.batch, group)

    def __getattr__(self, name: str):
        attr = getattr(self._runner, name)
        if name not in MIRRORED_RUNNER:
            return attr

        def mirrored(*args, **kwargs):
            # A probe is rank 0's own callback (parity scripts): the workers run without one.
            sent = {k: v for k, v in kwargs.items() if k != "probe"}
            self._group.send("runner", name, args, sent)
            return attr(*args, **kwargs)
        return mirrored

    def prefill(self, input_ids: list[int], block_table: list[int], start_pos: int = 0,
                probe=None, deadline: Optional[float] = None) -> None:
        # The deadline is checked once, before the prefill: between chunks rank 0 would stop
        # while the workers went on, and the next all-reduce would pair up the wrong calls.
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded("prefill passed its deadline before it started")
        self._group.send("runner", "prefill", (input_ids, block_table, start_pos), {})
        self._runner.prefill(input_ids, block_table, start_pos, probe=probe)

    @property
    def local(self) -> ModelRunner:
        return self._runner

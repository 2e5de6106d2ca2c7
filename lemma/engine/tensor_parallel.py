"""Tensor parallelism: the engine's process is rank 0 and runs the scheduler, tokenizer and sampler;
ranks 1..N-1 are worker processes that hold one shard of the model and of the KV pool each (their KV
heads only) and run every forward in lockstep.

Per forward, rank 0 broadcasts the inputs once — the decode step's fixed-shape tensors (tokens,
positions, page-open modes, tables) or a prefill's tokens and page tables — then every rank runs the
same code on its shard; the model's all-reduces and the logits gather keep them in step. Page ids are
decided on rank 0 and are the same on every rank, so no rank keeps a free list but rank 0. Eviction is
per (layer, KV head) and each rank holds whole KV heads, so each rank evicts for its heads on its own:
the policy needs no communication.

gloo on CPU, NCCL on CUDA (one GPU per rank). A worker that dies ends the next step with a LemmaError
naming its rank; a collective waits at most COLLECTIVE_TIMEOUT.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lemma.errors import LemmaError

COLLECTIVE_TIMEOUT = timedelta(seconds=60)


def check_world(world: object, config: Any, device: torch.device, compile: object) -> None:
    """Refuse a tensor_parallel size the model or the machine cannot take, before any process starts."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise LemmaError(f"tensor_parallel must be an integer >= 1, got {world!r}")
    if world == 1:
        return
    if config.num_kv_heads % world:
        raise LemmaError(f"tensor_parallel={world} does not divide the model's {config.num_kv_heads} KV heads "
                         f"(and {config.num_heads} query heads); use a divisor of {config.num_kv_heads}")
    visible = torch.cuda.device_count() if device.type == "cuda" else (os.cpu_count() or 1)
    if world > visible:
        kind = "CUDA GPUs" if device.type == "cuda" else "CPU cores"
        raise LemmaError(f"tensor_parallel={world} is more than the {visible} {kind} visible here")
    if compile:
        raise LemmaError("compile is not supported with tensor_parallel > 1 yet (the step holds collectives)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int, device: torch.device) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)


def rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else device


class Cluster:
    """Rank 0's handle on the workers: start them, send them each forward's inputs, stop them."""

    def __init__(self, world: int, processes: list[Any]):
        self.world, self.processes = world, processes
        self.stopped = False  # no more commands (stopped, or a worker died)
        self.closed = False  # workers gone and this process's group destroyed

    @classmethod
    def start(cls, world: int, device: torch.device, worker_args: dict[str, Any]) -> "Cluster":
        """Spawn ranks 1..world-1 (each loads its shard) and join them as rank 0."""
        if dist.is_initialized():
            raise LemmaError("another tensor-parallel engine is running in this process; close() it first")
        port, context = _free_port(), mp.get_context("spawn")
        processes = [context.Process(target=worker_main, args=(rank, world, port, device, worker_args),
                                     name=f"lemma-tp-rank{rank}", daemon=True) for rank in range(1, world)]
        for process in processes:
            process.start()
        cluster = cls(world, processes)
        try:
            _join(0, world, port, rank_device(device, 0))
        except Exception as exc:
            cluster.stop()
            raise LemmaError(f"tensor-parallel workers did not start ({exc})") from None
        return cluster

    def check_alive(self, grace: float = 0.0) -> None:
        """LemmaError naming the first worker that is gone (after waiting up to `grace` s for one to end)."""
        for process in self.processes if grace else ():
            process.join(grace / len(self.processes))
        for rank, process in enumerate(self.processes, 1):
            if not process.is_alive():
                self.stopped = True
                raise LemmaError(f"tensor-parallel worker rank {rank} died (exit code {process.exitcode}); "
                                 f"the engine cannot continue, start a new one")

    def send(self, command: tuple) -> None:
        """Broadcast one forward's command and inputs (CPU copies) to every worker."""
        if self.stopped:
            raise LemmaError("the tensor-parallel engine was stopped")
        self.check_alive()
        try:
            dist.broadcast_object_list([_on(command, torch.device("cpu"))], src=0)
        except RuntimeError:
            self.check_alive(grace=2.0)
            raise

    def stop(self) -> None:
        """Tell the workers to exit, wait briefly, then make sure they are gone. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if not self.stopped and all(p.is_alive() for p in self.processes):
            try:
                dist.broadcast_object_list([("stop",)], src=0)
            except RuntimeError:
                pass
        self.stopped = True
        for process in self.processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
        if dist.is_initialized():
            dist.destroy_process_group()


def _on(value: Any, device: torch.device) -> Any:
    """value with every tensor in it (tuples, lists, dataclasses) copied to device. A copy, not a view:
    pickling a view of the decode state's buffers would send the whole buffer."""
    if isinstance(value, torch.Tensor):
        return value.to(device, copy=True)
    if isinstance(value, (list, tuple)):
        return type(value)(_on(v, device) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _on(getattr(value, f.name), device) for f in dataclasses.fields(value)
                                             if isinstance(getattr(value, f.name), torch.Tensor)})
    return value


def worker_main(rank: int, world: int, port: int, device: torch.device, args: dict[str, Any]) -> None:
    """A worker rank: load its shard and pool, then run every forward rank 0 sends until told to stop."""
    from lemma.engine.pool import KVPool
    from lemma.engine.runner import ModelRunner
    from lemma.models.loader import load_model
    from lemma.models.shard import Shard

    device = rank_device(device, rank)
    torch.set_num_threads(args["threads"])
    try:
        _join(rank, world, port, device)
        shard = Shard(rank, world)
        model = load_model(Path(args["model_dir"]), device, args["dtype"], shard)
        model.pack_weights()  # as rank 0's Engine does
        c = model.config
        pool = KVPool(c.num_layers, shard.size(c.num_kv_heads), c.head_dim, args["num_pages"], args["dtype"], device)
        runner = ModelRunner(model, pool, args["attention"], args["max_batch"])
    except Exception as exc:  # noqa: BLE001 - reported, then the process ends (rank 0 names the rank)
        print(f"lemma tensor-parallel rank {rank}: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    with torch.inference_mode():
        while True:
            box: list[Any] = [None]
            try:
                dist.broadcast_object_list(box, src=0)
            except RuntimeError:  # rank 0 went away (killed, or exited without stop): nothing left to serve
                sys.exit(0)
            command = _on(box[0], device)
            if command[0] == "stop":
                break
            if command[0] == "decode":
                _, policies, steps = command
                runner.decode_step(policies, False, steps)
            elif command[0] == "prefill":
                runner.prefill_forward(*command[1])
            elif command[0] == "replay":
                runner.replay_forward(command[1], *command[2])
    dist.destroy_process_group()

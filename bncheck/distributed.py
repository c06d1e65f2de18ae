"""Recomputation across the processes ``torchrun`` starts: each rank runs its share of the sample data and the ranks'
exact moments are merged, so the result is the one a single process gets over the same samples.

torchrun gives every process its ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; bncheck joins
the default process group with them (gloo on CPU, NCCL on CUDA). After each checkpoint's pass every rank sends what
it measured (or the error that stopped it) to every other, and all merge the parts in rank order in float64: every
rank ends with the same result, and a failure in one rank is the same one-line error in all of them, so no rank is
left waiting. Needs torch, imported lazily.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

from bncheck.errors import BncheckError, ConfigError

# what torchrun (torch.distributed.run) sets for every process it starts
ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
BACKENDS = ("gloo", "nccl")
# How long a rank waits for the others at a merge: a pass over the data in the slowest rank must fit in it.
MERGE_TIMEOUT = timedelta(hours=2)

Part = TypeVar("Part")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks torchrun started."""

    rank: int
    world_size: int
    local_rank: int
    # None: gloo on CPU, NCCL on CUDA
    backend: str | None = None

    @property
    def leader(self) -> bool:
        """Rank 0: the one that prints the report and writes files."""
        return self.rank == 0

    def device(self, device: str) -> str:
        """The device this rank runs on: ``cuda`` becomes this rank's local GPU."""
        return f"cuda:{self.local_rank}" if device == "cuda" else device

    def join(self, device: str) -> None:
        """Join the default process group, unless the program already has (a library caller's own)."""
        import torch
        import torch.distributed as dist

        if not dist.is_available():
            raise ConfigError("this torch build has no torch.distributed; run bncheck without torchrun")
        if dist.is_initialized():
            return
        backend = self.backend or ("nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(self.device(device)))
        try:
            dist.init_process_group(backend=backend, timeout=MERGE_TIMEOUT)
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(f"cannot join the process group ({backend}): {str(exc).splitlines()[0]}") from exc
        _JOINED.append(self)

    def combine(self, part: Part | BncheckError) -> list[Part]:
        """Every rank's part in rank order, on every rank. When any rank failed, every rank raises that rank's
        error (the lowest rank's, when several did), naming the rank."""
        import torch.distributed as dist

        parts: list[Part | BncheckError | None] = [None] * self.world_size
        dist.all_gather_object(parts, part)
        for rank, got in enumerate(parts):
            if isinstance(got, BncheckError):
                raise type(got)(f"rank {rank}: {got}")
        return [got for got in parts if got is not None and not isinstance(got, BncheckError)]


# the process group bncheck joined (at most one), left by ``leave`` once everything is printed
_JOINED: list[Ranks] = []


def leave() -> None:
    """Leave the process group bncheck joined, if it did, once every rank has finished: torchrun stops the other
    ranks as soon as one exits with a non-zero code, so a rank that exits early could cut rank 0 off before it
    prints the report or the error they share. Call after the output is flushed."""
    if not _JOINED:
        return
    import torch.distributed as dist

    _JOINED.clear()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def from_environment(environ: Mapping[str, str] = os.environ, *, backend: str | None = None) -> Ranks | None:
    """The ranks torchrun describes in the environment, or None when bncheck was not started by it."""
    if not all(name in environ for name in ENVIRONMENT):
        if backend is not None:
            raise ConfigError("--backend applies under torchrun (torchrun --nproc-per-node N -m bncheck ...)")
        return None
    try:
        rank, world, local = (int(environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    if not 0 <= rank < world:
        raise ConfigError(f"RANK {rank} is not below WORLD_SIZE {world}")
    if backend is not None and backend not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    return Ranks(rank=rank, world_size=world, local_rank=local, backend=backend)

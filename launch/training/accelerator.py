"""Accelerator setup, named random streams, and the end-of-run check that all ranks agree."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Iterable

import torch

from foundation import derived_seed
from launch.training.config import RunConfig

log = logging.getLogger(__name__)


def setup_accelerator(run: RunConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    cpu = run.cpu or not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=run.mixed_precision,
        # Accumulation is done by the training step itself (no_sync on all but the last micro-batch),
        # so accelerate's own micro-step counter never has to be checkpointed.
        gradient_accumulation_steps=1,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=run.process_group_timeout_s))],
    )
    refuse_sharded_strategies(accelerator.distributed_type, DistributedType)
    if torch.cuda.is_available() and not cpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    logging.basicConfig(
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return accelerator


def refuse_sharded_strategies(distributed_type, kinds) -> None:
    """Refuse FSDP, DeepSpeed (every ZeRO stage) and Megatron-LM with a message, before any work.

    Our checkpoints are written by rank 0 from whole weights and a whole optimizer state (DDP keeps
    both identical on every rank). FSDP and ZeRO-3 shard the weights, ZeRO-1/2 shard the optimizer
    state: rank 0 would save only its own shard and a resume would silently continue from a wrong
    optimizer state. ``kinds`` is accelerate's ``DistributedType``.
    """
    names = {kinds.FSDP: "FSDP", kinds.DEEPSPEED: "DeepSpeed", kinds.MEGATRON_LM: "Megatron-LM"}
    if distributed_type in names:
        raise SystemExit(
            f"{names[distributed_type]} shards the weights or the optimizer state across processes, but this "
            "pipeline's checkpoints hold them whole (rank 0 writes them), so exact resume would break. Use DDP "
            "(`accelerate config` -> multi-GPU, no DeepSpeed/FSDP): it fits SD-1.5-sized UNets on one GPU in bf16; "
            "lower --run.batch-size and raise --run.grad-accum-steps, or add --gradient-checkpointing, for memory."
        )


def make_generators(seed: int, rank: int, names: Iterable[str], device: str | torch.device = "cpu") -> dict[str, torch.Generator]:
    """One independent generator per named random stream and process.

    Seeds are derived from (seed, name, rank), so streams never overlap, each rank draws different
    noise, and adding a stream does not shift the others.
    """
    out = {}
    for name in names:
        g = torch.Generator(device=device)
        g.manual_seed(derived_seed(seed, name, rank))
        out[name] = g
    return out


@torch.no_grad()
def check_ranks_in_sync(accelerator, module: torch.nn.Module, what: str) -> None:
    """Raise unless every process holds the same weights (DDP promises it; a desync is a bug to catch).

    Compares a float64 sum and sum of squares of all parameters across ranks: one tiny gather.
    """
    params = [p.detach().double() for p in module.parameters()]
    local = torch.stack([sum(p.sum() for p in params), sum(p.square().sum() for p in params)])
    everyone = accelerator.gather(local.to(accelerator.device).unsqueeze(0))  # [world, 2]
    if not torch.equal(everyone, everyone[:1].expand_as(everyone)):
        raise RuntimeError(f"{what}: the processes hold different weights {everyone.tolist()}; DDP went out of sync")
    if accelerator.num_processes > 1:
        log.info("%s: weights identical on all %d processes", what, accelerator.num_processes)

"""Accelerator setup, named random streams, and the end-of-run check that all ranks agree."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from datetime import timedelta
from typing import Iterable

import torch

from foundation import derived_seed
from launch.training.config import RunConfig

log = logging.getLogger(__name__)


def setup_accelerator(run: RunConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    refuse_requested_sharding(os.environ)  # before accelerate builds a plugin (on a CPU its FSDP plugin just fails)
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


# What `accelerate launch --use_fsdp / --use_deepspeed / --use_megatron_lm` (or `accelerate config`) sets.
SHARDING_REQUESTS = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
                     "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}
_TRUE = ("1", "true", "yes", "y", "on", "t")


def refuse_requested_sharding(environ: Mapping[str, str]) -> None:
    """Refuse a launch that asked for FSDP, DeepSpeed or Megatron-LM, before the Accelerator exists.

    On a CPU machine accelerate 1.15 cannot build its FSDP plugin ("no available devices") and
    `--use_fsdp` would end in that error; with our message the user learns what to use instead.
    """
    for variable, name in SHARDING_REQUESTS.items():
        if environ.get(variable, "").strip().lower() in _TRUE:
            _refuse(name)


def refuse_sharded_strategies(distributed_type, kinds) -> None:
    """Refuse FSDP, DeepSpeed (every ZeRO stage) and Megatron-LM with a message, before any work.

    Our checkpoints are written by rank 0 from whole weights and a whole optimizer state (DDP keeps
    both identical on every rank). FSDP and ZeRO-3 shard the weights, ZeRO-1/2 shard the optimizer
    state: rank 0 would save only its own shard and a resume would silently continue from a wrong
    optimizer state. ``kinds`` is accelerate's ``DistributedType``.
    """
    names = {kinds.FSDP: "FSDP", kinds.DEEPSPEED: "DeepSpeed", kinds.MEGATRON_LM: "Megatron-LM"}
    if distributed_type in names:
        _refuse(names[distributed_type])


def _refuse(name: str) -> None:
    raise SystemExit(
        f"{name} shards the weights or the optimizer state across processes, but this pipeline's checkpoints "
        "hold them whole (rank 0 writes them), so exact resume would break. Use DDP (`accelerate launch "
        "--multi_gpu`, or `accelerate config` -> multi-GPU without DeepSpeed/FSDP): every GPU then holds the whole "
        "UNet and its AdamW state (16 bytes per parameter: about 14 GB for SD-1.5's 860 M, before activations); "
        "for memory lower --run.batch-size and raise --run.grad-accum-steps, or add --gradient-checkpointing."
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

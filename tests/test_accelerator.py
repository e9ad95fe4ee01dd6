"""Distributed strategies whose sharding our whole-weight checkpoints cannot hold are refused."""

from __future__ import annotations

import pytest
from accelerate.utils import DistributedType

from launch.training.accelerator import refuse_sharded_strategies


@pytest.mark.parametrize("kind,name", [(DistributedType.FSDP, "FSDP"), (DistributedType.DEEPSPEED, "DeepSpeed"),
                                       (DistributedType.MEGATRON_LM, "Megatron-LM")])
def test_sharding_strategies_are_refused_with_a_message(kind, name):
    with pytest.raises(SystemExit, match=f"{name} shards .* Use DDP"):
        refuse_sharded_strategies(kind, DistributedType)


@pytest.mark.parametrize("kind", [DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU])
def test_ddp_and_single_process_pass(kind):
    refuse_sharded_strategies(kind, DistributedType)

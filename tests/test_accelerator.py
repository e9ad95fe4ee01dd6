"""Distributed strategies whose sharding our whole-weight checkpoints cannot hold are refused: when
accelerate reports one, and when the launch asked for one (the only way FSDP shows on a CPU)."""

from __future__ import annotations

import pytest
from accelerate.utils import DistributedType

from launch.training.accelerator import refuse_requested_sharding, refuse_sharded_strategies
from tiny import run, two_process_command


@pytest.mark.parametrize("kind,name", [(DistributedType.FSDP, "FSDP"), (DistributedType.DEEPSPEED, "DeepSpeed"),
                                       (DistributedType.MEGATRON_LM, "Megatron-LM")])
def test_sharding_strategies_are_refused_with_a_message(kind, name):
    with pytest.raises(SystemExit, match=f"{name} shards .* Use DDP"):
        refuse_sharded_strategies(kind, DistributedType)


@pytest.mark.parametrize("kind", [DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU])
def test_ddp_and_single_process_pass(kind):
    refuse_sharded_strategies(kind, DistributedType)


@pytest.mark.parametrize("variable, name", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"),
                                            ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM")])
def test_a_launch_that_asks_for_sharding_is_refused_before_the_accelerator_exists(variable, name):
    with pytest.raises(SystemExit, match=f"{name} shards .* Use DDP"):
        refuse_requested_sharding({variable: "true"})
    refuse_requested_sharding({variable: "false"})
    refuse_requested_sharding({})


@pytest.mark.slow
def test_accelerate_launch_use_fsdp_with_two_cpu_processes_exits_with_the_message(tmp_path):
    # On a CPU accelerate 1.15 cannot build its FSDP plugin at all ("no available devices"), so FSDP
    # itself cannot run here; what the README promises is this refusal, from the real launcher.
    two = two_process_command("launch/train_ldm.py", "--preset", "tiny", "--data.source", tmp_path,
                              "--run.output-dir", tmp_path / "out")
    cmd = [*two[:2], "--use_fsdp", *[a for a in two[2:] if a != "--multi_gpu"]]  # --use_fsdp excludes --multi_gpu
    proc = run(cmd, check=False, timeout=600)  # two cold imports of torch+diffusers on a busy 2-core machine
    assert proc.returncode != 0
    assert "FSDP shards the weights or the optimizer state" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "out" / "checkpoints").exists()

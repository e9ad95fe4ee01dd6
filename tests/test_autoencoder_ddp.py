"""The loss API under real 2-process DDP (gloo, CPU), used the way the training loop uses it.

The autoencoder (with its output log-variance) and the discriminator are wrapped separately; the
generator step calls the *wrapped* discriminator with its parameters frozen, then the
discriminator step calls it again. Each rank sees different images, so identical weights after
the steps prove that DDP synced every gradient, the log-variance's included.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from autoencoder import AUTOENCODER_PRESETS, TrainableAutoencoder, build_autoencoder
from autoencoder.discriminator import build_discriminator
from autoencoder.losses import AUTOENCODER_LOSS_PRESETS, AutoencoderLoss

WORLD = 2


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def _train(rank: int, init_file: str, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    assert dist.get_world_size() == WORLD
    cfg = dataclasses.replace(AUTOENCODER_LOSS_PRESETS["tiny"], discriminator_start_step=1)
    torch.manual_seed(0)  # same initial weights on both ranks
    raw = TrainableAutoencoder(build_autoencoder(AUTOENCODER_PRESETS["tiny"]))
    raw_disc = build_discriminator(cfg.discriminator)
    model, disc, loss_fn = DDP(raw), DDP(raw_disc), AutoencoderLoss(cfg)
    opt_g = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(100 + rank)  # different images per rank
    noise = torch.Generator().manual_seed(200 + rank)
    logvar0 = raw.output_logvar.item()
    for step in range(3):
        x = torch.rand(2, 3, 32, 32, generator=data) * 2 - 1
        gan_on = loss_fn.discriminator_active(step)
        out = model(x, generator=noise)
        loss, _ = loss_fn.generator_loss(x, out.reconstruction, out.posterior, out.output_logvar, step,
                                         raw.last_layer() if gan_on else None, disc if gan_on else None)
        loss.backward()
        assert all(p.grad is None for p in raw_disc.parameters())
        if gan_on:
            loss_d, _ = loss_fn.discriminator_loss(x, out.reconstruction, step, disc)
            loss_d.backward()
            opt_d.step()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)
    weights = {"model": _flat(raw), "disc": _flat(raw_disc)}
    gathered = {k: [torch.empty_like(v) for _ in range(WORLD)] for k, v in weights.items()}
    for k, v in weights.items():
        dist.all_gather(gathered[k], v)
    results[rank] = {
        "same_model": torch.equal(*gathered["model"]),
        "same_disc": torch.equal(*gathered["disc"]),
        "logvar_moved": raw.output_logvar.item() != logvar0,
    }
    dist.destroy_process_group()


def test_two_process_ddp_keeps_every_rank_identical(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_train, args=(str(tmp_path / "init"), results), nprocs=WORLD, join=True)
        results = dict(results)
    assert sorted(results) == [0, 1]
    for rank, r in results.items():
        assert r == {"same_model": True, "same_disc": True, "logvar_moved": True}, (rank, r)

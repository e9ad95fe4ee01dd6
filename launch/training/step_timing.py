"""What a training step and a latent-cache build cost on this machine, measured in a few seconds.

A time-capped run (the demo) plans its step count from these, so that its LR schedule ends when its
minutes do: on a CPU twice as slow a cosine planned for a fixed count would stop half-way, at a
high learning rate, with an EMA that never settled.
"""

from __future__ import annotations

import time

import torch

from ldm.unet import UNetConfig, build_unet


def unet_step_seconds(cfg: UNetConfig, *, text_width: int, text_tokens: int, latent_channels: int, latent_size: int,
                      batch_size: int, channels_last: bool = False, optimizer: str = "adamw", steps: int = 6,
                      warmup: int = 2, seed: int = 0) -> float:
    """Median seconds of a stage-3 step (forward, MSE, backward, train_ldm's optimizer, EMA lerp) on random inputs."""
    from launch.training.optim import make_unet_optimizer

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = build_unet(cfg, cross_attention_dim=text_width, latent_channels=latent_channels)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = make_unet_optimizer(net, optimizer, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01, muon_momentum=0.95,
                              device=torch.device("cpu"))
    shadow = [p.detach().clone() for p in params]
    x = torch.randn(batch_size, latent_channels, latent_size, latent_size, generator=g)
    t = torch.randint(0, 1000, (batch_size,), generator=g)
    context = torch.randn(batch_size, text_tokens, text_width, generator=g)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        net(x, t, encoder_hidden_states=context).sample.square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(shadow, [p.detach() for p in params], 0.01)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@torch.inference_mode()
def cache_seconds_per_image(vae: torch.nn.Module, text_encoder, *, resolution: int, flip: bool,
                            batch_size: int = 32, rounds: int = 2, seed: int = 0) -> float:
    """Seconds the latent + text cache build spends per image: the autoencoder's encoder on the image
    (and its mirror with ``flip``) and the text encoder on one caption, as ldm.cache.encode does."""
    g = torch.Generator().manual_seed(seed)
    param = next(vae.parameters())
    pixels = torch.rand(batch_size, 3, resolution, resolution, generator=g).mul(2).sub(1).to(param.device, param.dtype)
    views = torch.cat([pixels, pixels.flip(-1)]) if flip else pixels
    captions = [f"caption number {i}" for i in range(batch_size)]
    times = []
    for _ in range(rounds + 1):  # the first round warms up
        start = time.perf_counter()
        vae.encode(views)
        if text_encoder is not None:
            text_encoder.encode(captions)
        times.append(time.perf_counter() - start)
    return min(times[1:]) / batch_size

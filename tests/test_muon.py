"""--optimizer muon: Newton-Schulz orthogonalisation, which parameters it takes, a run that resumes bitwise."""

from __future__ import annotations

import json

import pytest
import torch

from launch.training.muon import MuonAdamW, muon_parameters, orthogonalise
from tiny import sha256

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.mark.parametrize("shape", [(8, 40), (40, 8), (3, 12, 30), (16, 16)])
def test_orthogonalise_flattens_every_singular_value_and_keeps_the_singular_vectors(shape):
    gen = torch.Generator().manual_seed(0)
    *batch, rows, cols = shape
    k = min(rows, cols)
    u = torch.linalg.qr(torch.randn(*batch, rows, k, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(*batch, cols, k, generator=gen)).Q
    spread = torch.logspace(0, 1.7, k)  # singular values from 1 to 50
    g = u @ torch.diag_embed(spread.expand(*batch, k)) @ v.mT
    o = orthogonalise(g)
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.6 and s.max() < 1.2, s  # all pulled near 1; plain normalisation would leave them near 0
    # The same singular vectors: o = U f(S) V^T with f > 0, so g^T o (or o g^T) is symmetric positive definite.
    inner = g.mT @ o if shape[-2] >= shape[-1] else o @ g.mT
    assert torch.allclose(inner, inner.mT, atol=1e-2 * inner.abs().max())
    assert torch.linalg.eigvalsh(inner).min() > 0


def test_muon_takes_hidden_matrices_and_kernels_and_leaves_edges_biases_and_norms_to_adamw():
    from ldm.unet import UNET_PRESETS, build_unet

    net = build_unet(UNET_PRESETS["tiny"], cross_attention_dim=32, latent_channels=4)
    muon, adamw = muon_parameters(net.named_parameters())
    names = {id(p): n for n, p in net.named_parameters()}
    assert {names[id(p)] for p in adamw} >= {"conv_in.weight", "conv_out.weight", "conv_in.bias"}
    assert all(p.ndim == 1 for p in adamw if not names[id(p)].startswith(("conv_in.", "conv_out.")))
    assert all(p.ndim >= 2 for p in muon) and any(p.ndim == 4 for p in muon) and any(p.ndim == 2 for p in muon)
    assert len(muon) + len(adamw) == len(list(net.parameters()))


def test_lora_adapters_are_stepped_by_adamw():
    from ldm.lora import LoRAConfig, add_lora
    from ldm.unet import UNET_PRESETS, build_unet

    net = build_unet(UNET_PRESETS["tiny"], cross_attention_dim=32, latent_channels=4)
    add_lora(net, LoRAConfig(rank=2))
    muon, adamw = muon_parameters(net.named_parameters())
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert muon == [] and len(adamw) == len(trainable) > 0 and all(p.ndim == 2 for p in adamw)


def test_muon_steps_kernels_by_an_orthogonal_update_at_adamws_rms_and_adamw_the_rest():
    torch.manual_seed(0)
    conv, bias = torch.nn.Parameter(torch.randn(6, 3, 3, 3)), torch.nn.Parameter(torch.zeros(6))
    opt = MuonAdamW([conv], [bias], lr=0.1, betas=(0.9, 0.999), weight_decay=0.0, momentum=0.0)
    before = conv.detach().clone()
    conv.grad, bias.grad = torch.randn_like(conv) * 1e-3, torch.ones(6)
    opt.step()
    update = (before - conv.detach()).reshape(6, 27) / (0.1 * 0.2 * 27 ** 0.5)
    s = torch.linalg.svdvals(update)
    assert s.min() > 0.6 and s.max() < 1.2  # orthogonalised, whatever the gradient's scale
    assert torch.allclose(bias.detach(), torch.full((6,), -0.1), atol=1e-4)  # AdamW's first step: -lr * sign
    assert set(opt.state[conv]) == {"step", "momentum_buffer"} and "exp_avg" in opt.state[bias]


def test_muon_run_resumes_bitwise(captioned_images, tiny_autoencoder, tmp_path):
    from launch.train_ldm import TrainLDMConfig, main

    def args(out, *extra):
        return ["--preset", "tiny", "--data.source", str(captioned_images), "--vae", str(tiny_autoencoder),
                "--text-encoder", "minilm", "--run.output-dir", str(out), "--optimizer", "muon", "--channels-last", *extra]

    main(args(tmp_path / "straight"))
    main(args(tmp_path / "split", "--run.max-steps", "4"))
    main(args(tmp_path / "split"))
    assert sha256(tmp_path / "straight" / "pipeline" / UNET_WEIGHTS) == sha256(tmp_path / "split" / "pipeline" / UNET_WEIGHTS)
    meta = json.loads((tmp_path / "split" / "checkpoints" / "step_00000004" / "optim-unet.json").read_text())
    assert [g["muon"] for g in meta["param_groups"]] == [True, False]
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "train"]
    assert all(map(torch.isfinite, torch.tensor(losses)))

    with pytest.raises(ValueError, match="muon_momentum"):
        TrainLDMConfig(muon_momentum=1.0)


def test_an_fp16_grad_scaler_unscales_before_muon_sees_the_gradients():
    """Fused AdamW takes scaled gradients from a GradScaler and unscales them in its kernel; Muon's
    momentum would then accumulate gradients x 1024. The scaler must unscale first."""

    def train(scaler):
        w, b = torch.nn.Parameter(torch.ones(4, 6)), torch.nn.Parameter(torch.zeros(4))
        opt = MuonAdamW([w], [b], lr=0.1, betas=(0.9, 0.999), weight_decay=0.0, fused=True)
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            loss = ((x @ w.T + b) ** 2).mean()
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            opt.zero_grad()
        return w.detach(), b.detach(), opt.state[w]["momentum_buffer"]

    plain, scaled = train(None), train(torch.amp.GradScaler("cpu", init_scale=1024.0))
    for a, b in zip(plain, scaled):
        assert torch.allclose(a, b, atol=1e-5)

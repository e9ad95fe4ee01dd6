"""benchmarks/unet_cpu_options.py runs each variant's step and prints one row per variant (no timings asserted)."""

from __future__ import annotations

import sys

import pytest
import torch


def test_every_variant_row_is_printed_and_the_step_trains(monkeypatch, capsys):
    from benchmarks import unet_cpu_options as bench

    monkeypatch.setattr(sys, "argv", ["unet_cpu_options", "--preset", "tiny", "--batch-size", "1", "--steps", "1", "--warmup", "0",
                                      "--variants", "plain,channels_last_input,fused,channels_last_muon"])
    bench.main()
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == ["plain", "channels_last_input", "fused", "channels_last_muon"]


def test_a_step_changes_the_weights_and_an_unknown_variant_is_refused():
    from benchmarks import unet_cpu_options as bench
    from ldm.objective import DIFFUSION_PRESETS, DiffusionObjective
    from ldm.unet import build_unet

    torch.manual_seed(0)
    base = build_unet("tiny", cross_attention_dim=8)
    v = bench.make_variant("channels_last", base)
    before = [p.detach().clone() for p in v.unet.parameters()]
    bench.step(v, DiffusionObjective(DIFFUSION_PRESETS["sd"]), torch.randn(2, 4, 8, 8), torch.randn(2, 5, 8),
               torch.Generator().manual_seed(0))
    assert any(not torch.equal(a, b) for a, b in zip(before, v.unet.parameters()))
    with pytest.raises(SystemExit, match="unknown variant"):
        bench.make_variant("turbo", base)

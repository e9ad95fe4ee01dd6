"""Bad values stop the command at parse time with a message naming the field (issue 15 item 5).

Each config checks all of its own fields in ``__post_init__``; tyro turns the ValueError into a
usage error (exit 2) that shows the message, before anything is loaded or trained.
"""

from __future__ import annotations

import json

import pytest

from ldm.cli import ConfigError, parse_config


def parse_error(module: str, args: list[str], capsys) -> str:
    import importlib

    mod = importlib.import_module(module)
    cls = {"launch.train_ldm": "TrainLDMConfig", "launch.train_vae": "TrainVAEConfig"}[module]
    with pytest.raises(SystemExit) as exc:
        parse_config(getattr(mod, cls), mod.PRESETS, ["--preset", "tiny", *args])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    return " ".join((captured.err + captured.out).replace("│", " ").split())


@pytest.mark.parametrize("args, expected", [
    (["--run.max-steps", "0"], "max_steps=0 must be at least 1"),
    (["--run.max-steps", "-5"], "max_steps=-5 must be at least 1"),
    (["--run.checkpoint-every", "0"], "checkpoint_every=0 must be at least 1"),
    (["--run.log-every", "0"], "log_every=0 must be at least 1"),
    (["--run.batch-size", "0"], "batch_size=0 must be at least 1"),
    (["--run.grad-accum-steps", "0"], "grad_accum_steps=0 must be at least 1"),
    (["--run.keep-last", "0"], "keep_last=0 must be at least 1"),
    (["--run.num-workers", "-1"], "num_workers=-1 must be at least 0"),
    (["--run.ema-decay", "1.0"], "ema_decay=1.0 must be in [0, 1)"),
    (["--run.max-grad-norm", "nan"], "max_grad_norm=nan must be a finite number"),
    (["--run.max-train-minutes", "-1"], "max_train_minutes=-1.0 must be a finite number >= 0"),
    (["--run.lr-schedule-steps", "4"], "lr_schedule_steps=4 must be 0 or at least max_steps=8"),
    (["--run.lr-schedule-steps", "-1"], "lr_schedule_steps=-1 must be at least 0"),
    (["--run.ema-sigma-rel", "0.5"], "ema_sigma_rel=0.5 must be in [0, 0.28)"),
    (["--lr", "nan"], "lr=nan must be a positive number"),
    (["--lr", "0"], "lr=0.0 must be a positive number"),
    (["--adam-betas", "0.9", "1.0"], "adam_betas=(0.9, 1.0) must be two numbers in [0, 1)"),
    (["--weight-decay", "-0.1"], "weight_decay=-0.1 must be a finite number >= 0"),
    (["--p-uncond", "1.5"], "p_uncond=1.5 must be in [0, 1]"),
    (["--val-every", "0"], "val_every=0 must be at least 1"),
    (["--sample-every", "0"], "sample_every=0 must be at least 1"),
    (["--sample-steps", "0"], "sample_steps=0 must be at least 1"),
    (["--sample-guidance", "1", "inf"], "sample_guidance=(1.0, inf) must be finite numbers"),
    (["--sampler", "nope"], "sampler='nope' must be one of"),
    (["--unet.layers-per-block", "0"], "layers_per_block=0 must be at least 1"),
    (["--unet.block-out-channels", "16", "32", "64"], "attention_levels has 2 entries but block_out_channels has 3"),
    (["--diffusion.schedule.beta-start", "0.02"], "beta_start=0.02 and beta_end=0.012 must satisfy"),
    (["--diffusion.schedule.num-train-timesteps", "1"], "num_train_timesteps must be at least 2"),
    (["--diffusion.min-snr-gamma", "-1"], "min_snr_gamma must be positive"),
    (["--data.resolution", "31"], "data.resolution=31 must be a multiple of 2"),  # tiny UNet: 2 levels
    (["--data.max-aspect-ratio", "nan"], "max_aspect_ratio=nan must be at least 1"),
    (["--data.min-image-side", "0"], "min_image_side=0 must be at least 1"),
])
def test_train_ldm_refuses_bad_values_at_parse_time(args, expected, capsys):
    assert expected in parse_error("launch.train_ldm", args, capsys)


@pytest.mark.parametrize("args, expected", [
    (["--data.resolution", "33"], "data.resolution=33 must be a multiple of the autoencoder's downsampling factor 2"),
    (["--disc-lr", "-1"], "disc_lr=-1.0 must be a positive number"),
    (["--loss.kl-weight", "nan"], "kl_weight must be a finite number >= 0"),
    (["--loss.discriminator.n-layers", "0"], "n_layers"),
    (["--model.latent-channels", "0"], "latent_channels must be >= 1"),
    (["--stats-samples", "-1"], "stats_samples=-1 must be at least 0"),
    (["--run.checkpoint-every", "0"], "checkpoint_every=0 must be at least 1"),
])
def test_train_vae_refuses_bad_values_at_parse_time(args, expected, capsys):
    assert expected in parse_error("launch.train_vae", args, capsys)


def test_a_bad_value_in_a_config_file_is_a_config_error_naming_the_file(tmp_path):
    from launch.train_ldm import PRESETS, TrainLDMConfig

    path = tmp_path / "c.json"
    path.write_text(json.dumps({"run": {"max_steps": 0}}))
    with pytest.raises(ConfigError, match=r"c\.json.*max_steps=0 must be at least 1"):
        parse_config(TrainLDMConfig, PRESETS, ["--preset", "tiny", "--config", str(path)])


def test_every_preset_is_valid():
    from launch.train_ldm import PRESETS as LDM
    from launch.train_vae import PRESETS as VAE

    for preset in [*LDM.values(), *VAE.values()]:
        type(preset).__post_init__(preset)


@pytest.mark.parametrize("content, expected", [
    ({"run": {"max_steps": "10"}}, r"run\.max_steps: expected int, got '10'"),
    ({"run": 5}, r"run: expected a mapping of RunConfig fields, got 5"),
    ({"lr": True}, r"lr: expected float, got True"),
    ({"cache_dir": ["a"]}, r"cache_dir: \['a'\] fits none of"),
    ({"unet": {"layers_per_block": 1.5}}, r"unet\.layers_per_block: expected int, got 1\.5"),
])
def test_a_config_file_value_of_the_wrong_type_is_refused(tmp_path, content, expected):
    from launch.train_ldm import PRESETS, TrainLDMConfig

    path = tmp_path / "c.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=expected):
        parse_config(TrainLDMConfig, PRESETS, ["--preset", "tiny", "--config", str(path)])


def test_a_saved_config_json_still_loads_as_a_config_file(tmp_path):
    from launch.train_ldm import PRESETS, TrainLDMConfig
    from ldm.cli import to_dict

    cfg = PRESETS["sd15"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(to_dict(cfg)))
    assert parse_config(TrainLDMConfig, PRESETS, ["--preset", "tiny", "--config", str(path)]) == cfg

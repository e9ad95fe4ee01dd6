"""A rerun in a run's folder is compared with the run's own record before any weight is loaded.

Refused: another autoencoder (same shape or not), text encoder, model shape, objective or data.
Applied and logged: steps, cadence, workers. Refused unless --run.allow-changes names them, then
applied and recorded in config_history.jsonl: lr, batch size. config.json keeps the first config.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from launch.training.resume_check import ResumeDecision, compare, kind_of
from tiny import run as run_command
from tiny import tiny_autoencoder_dir, two_process_command

# -- classification ------------------------------------------------------------------------------


@pytest.mark.parametrize("key, old, new, kind", [
    ("run.max_steps", 8, 16, "live"),
    ("run.checkpoint_every", 4, 2, "live"),
    ("run.num_workers", 0, 2, "live"),
    ("vae", "a/model", "b/model", "live"),  # the path: its fingerprint decides
    ("lr", 1e-4, 2e-4, "override"),
    ("run.batch_size", 4, 8, "override"),
    ("run.ema_decay", 0.99, 0.999, "override"),
    ("run.ema_decay", 0.0, 0.999, "refused"),
    ("run.seed", 0, 1, "refused"),
    ("unet.block_out_channels", [16, 32], [32, 64], "refused"),
    ("data.source", "a", "b", "refused"),
    ("data.cache_dir", None, "x", "live"),
    ("data.max_bad_fraction", 0.05, 0.1, "override"),
    ("diffusion.schedule.prediction_type", "epsilon", "v_prediction", "refused"),
    ("stages.autoencoder.latent_channels", 4, 8, "refused"),
    ("stages.text_encoder.weights_sha256", "a", "b", "refused"),
    ("stages.text_encoder.source", "minilm", "/moved/minilm", "live"),
    ("model.latent_channels", 4, 8, "refused"),
    ("cache_latents", False, True, "refused"),
    ("lora_rank", 0, 4, "refused"),
    ("optimizer", "adamw", "muon", "refused"),
    ("muon_momentum", 0.95, 0.9, "override"),
    ("decoder_only", False, True, "refused"),
    ("loss.discriminator.channels", 64, 32, "refused"),
    ("loss.kl_weight", 1e-6, 1e-5, "override"),
    ("stages.text_encoder.dtype", "float32", "bfloat16", "override"),
])
def test_each_kind_of_change(key, old, new, kind):
    assert kind_of(key, old, new) == kind


def test_a_run_recorded_before_the_optimizer_field_resumes_as_adamw_and_refuses_muon():
    old = {"config": {"lr": 1e-3}}
    assert compare(old, {"config": {"lr": 1e-3, "optimizer": "adamw", "muon_momentum": 0.95}}).changes == []
    [change] = compare(old, {"config": {"lr": 1e-3, "optimizer": "muon", "muon_momentum": 0.95}}).changes
    assert (change.key, change.old, change.kind) == ("optimizer", "adamw", "refused")


def test_allow_changes_matches_dotted_names_last_parts_or_all():
    old = {"config": {"lr": 1e-4, "run": {"batch_size": 4, "max_steps": 8}}, "stages": {}}
    new = {"config": {"lr": 2e-4, "run": {"batch_size": 8, "max_steps": 16}}, "stages": {}}
    assert {c.key for c in compare(old, new).needs_override} == {"lr", "run.batch_size"}
    assert {c.key for c in compare(old, new, ["lr", "batch_size"]).needs_override} == set()
    assert {c.key for c in compare(old, new, ["run.batch_size"]).needs_override} == {"lr"}
    assert compare(old, new, ["all"]).needs_override == []
    assert {c.key for c in compare(old, new, ["all"]).applied} == {"lr", "run.batch_size", "run.max_steps"}


def test_refused_changes_cannot_be_allowed_and_the_message_names_old_and_new():
    old = {"config": {"unet": {"layers_per_block": 1}}, "stages": {"autoencoder": {"latent_channels": 4}}}
    new = {"config": {"unet": {"layers_per_block": 2}}, "stages": {"autoencoder": {"latent_channels": 8}}}
    decision = compare(old, new, ["all"])
    message = decision.problem("runs/x", "step_00000004")
    assert "unet.layers_per_block: 1 -> 2" in message and "stages.autoencoder.latent_channels: 4 -> 8" in message
    assert "--run.allow-changes" not in message
    assert ResumeDecision().problem("runs/x", "step_1") is None


# -- end to end: stage 3 ---------------------------------------------------------------------------


def ldm_args(images, vae, out, *extra):
    return ["--preset", "tiny", "--data.source", str(images), "--vae", str(vae), "--text-encoder", "minilm",
            "--run.output-dir", str(out), "--sample-every", "100", "--val-every", "100", *extra]


@pytest.fixture(scope="module")
def ldm_run(tmp_path_factory, captioned_images, tiny_autoencoder):
    """A stage-3 run stopped at step 4 (read only: copy it with ``fork``)."""
    from launch.train_ldm import main

    out = tmp_path_factory.mktemp("ldm_run") / "run"
    main(ldm_args(captioned_images, tiny_autoencoder, out, "--run.max-steps", "4"))
    return out


def fork(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def checkpoint_names(run):
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def refused(main, args) -> str:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code not in (0, None)
    return str(exc.value)


@pytest.mark.parametrize("change, expected", [
    ("other_vae", "stages.autoencoder.weights_sha256"),
    ("wide_vae", "stages.autoencoder.latent_channels: 4 -> 8"),
    ("text_encoder", "stages.text_encoder.max_length: 77 -> 16"),
    ("unet", "unet.block_out_channels: [16, 32] -> [16, 48]"),
    ("objective", 'diffusion.schedule.prediction_type: "epsilon" -> "v_prediction"'),
    ("data", "data.flip: false -> true"),
    ("cache", "cache_latents: false -> true"),
])
def test_a_change_that_makes_the_checkpoint_meaningless_is_refused_before_loading(
        ldm_run, captioned_images, tiny_autoencoder, tmp_path, change, expected):
    from launch.train_ldm import main

    run = fork(ldm_run, tmp_path)
    vae, extra = tiny_autoencoder, []
    if change == "other_vae":
        vae = tiny_autoencoder_dir(tmp_path / "other_vae", captioned_images, seed=1)
    elif change == "wide_vae":
        vae = tiny_autoencoder_dir(tmp_path / "wide_vae", captioned_images, latent_channels=8)
    elif change == "text_encoder":
        extra = ["--text-encoder", "minilm?max_length=16"]
    elif change == "unet":
        extra = ["--unet.block-out-channels", "16", "48"]
    elif change == "objective":
        extra = ["--diffusion.schedule.prediction-type", "v_prediction"]
    elif change == "data":
        extra = ["--data.flip"]
    elif change == "cache":
        extra = ["--cache-latents"]
    config_before = (run / "config.json").read_bytes()
    message = refused(main, ldm_args(captioned_images, vae, run, "--run.max-steps", "8", *extra))
    assert expected in message, message
    assert "no flag overrides them" in message and "size mismatch" not in message
    assert (run / "config.json").read_bytes() == config_before, "config.json must keep naming the run's own stages"
    assert checkpoint_names(run) == checkpoint_names(ldm_run)
    assert not (run / "cache").exists(), "refused before the latent cache was touched"


def test_lr_and_batch_size_need_allow_changes_then_are_applied_and_recorded(
        ldm_run, captioned_images, tiny_autoencoder, tmp_path):
    from launch.train_ldm import main

    run = fork(ldm_run, tmp_path)
    changed = ldm_args(captioned_images, tiny_autoencoder, run, "--run.max-steps", "6", "--lr", "0.001",
                       "--run.batch-size", "2", "--run.log-every", "1")
    message = refused(main, changed)
    assert "--run.allow-changes lr run.batch_size" in message and "lr: 0.0002 -> 0.001" in message
    assert "run.batch_size: 4 -> 2" in message

    main(changed + ["--run.allow-changes", "lr", "batch_size"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    after = [r for r in rows if r["kind"] == "train" and r["step"] > 4]
    assert [r["step"] for r in after] == [5, 6]
    assert all(r["lr"] == pytest.approx(1e-3) for r in after), "the accepted --lr must be the one trained with"
    history = [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 4 and history[-1]["resumed_from"] == "step_00000004"
    assert history[-1]["changes"]["lr"] == {"old": 0.0002, "new": 0.001, "kind": "override"}
    assert history[-1]["changes"]["run.max_steps"]["kind"] == "live"
    assert json.loads((run / "config.json").read_text())["lr"] == 0.0002, "config.json keeps the run's first config"
    recorded = json.loads((run / "checkpoints" / "step_00000006" / "run.json").read_text())
    assert recorded["config"]["lr"] == 0.001  # the next resume compares with what was trained last


def test_live_changes_are_applied_and_the_export_clears_a_killed_exports_leftovers(
        ldm_run, captioned_images, tiny_autoencoder, tmp_path, capsys):
    from launch.train_ldm import main

    run = fork(ldm_run, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:  # a kill after step 5 was logged, in the middle of a line
        f.write(json.dumps({"step": 5, "kind": "train", "loss": 9.0}) + '\n{"step": 6, "ki')
    leftover = run / ".pipeline.tmp-deadbeef"  # what a kill during the pipeline export leaves
    (leftover / "unet").mkdir(parents=True)
    (leftover / "unet" / "config.json").write_text("{}")
    main(ldm_args(captioned_images, tiny_autoencoder, run, "--run.max-steps", "6", "--run.checkpoint-every", "1",
                  "--run.keep-last", "3"))
    out = capsys.readouterr().out
    assert "changed since step_00000004: run.max_steps: 4 -> 6" in out
    assert "run.checkpoint_every: 4 -> 1" in out
    assert checkpoint_names(run) == ["step_00000004", "step_00000005", "step_00000006"]
    assert not leftover.exists() and (run / "pipeline" / "finished.json").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # every line parses
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert steps == [2, 4, 6], "each logged step once (log-every 2), the killed run's rows replaced"
    assert all(r.get("loss") != 9.0 for r in rows)


def test_every_checkpoint_damaged_stops_with_what_to_do(ldm_run, captioned_images, tiny_autoencoder, tmp_path):
    from launch.train_ldm import main

    run = fork(ldm_run, tmp_path)
    for folder in (run / "checkpoints").iterdir():
        (folder / "manifest.json").write_bytes(b"\xff\xfe not json")
    message = refused(main, ldm_args(captioned_images, tiny_autoencoder, run, "--run.max-steps", "8"))
    assert "every checkpoint" in message and "move that folder away" in message
    assert checkpoint_names(run) == checkpoint_names(ldm_run), "nothing may be written over a damaged run"


def test_a_resolution_the_factors_do_not_divide_is_refused_before_training(
        captioned_images, tiny_autoencoder, tmp_path):
    from launch.train_ldm import main

    # tiny autoencoder: factor 2; tiny UNet: 2 levels, a further 2 -> multiples of 4.
    message = refused(main, ldm_args(captioned_images, tiny_autoencoder, tmp_path / "run", "--data.resolution", "34"))
    assert "resolution 34 must be a multiple of 4" in message and "--data.resolution 32 or 36" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


# -- end to end: stage 1 ---------------------------------------------------------------------------


def test_autoencoder_run_refuses_another_shape_and_needs_the_flag_for_batch_size(captioned_images, tmp_path):
    from launch.train_vae import main

    run = tmp_path / "vae"
    args = ["--preset", "tiny", "--data.source", str(captioned_images), "--run.output-dir", str(run)]
    main(args + ["--run.max-steps", "4"])
    message = refused(main, args + ["--run.max-steps", "6", "--model.latent-channels", "8"])
    assert "model.latent_channels: 4 -> 8" in message and "size mismatch" not in message
    message = refused(main, args + ["--run.max-steps", "6", "--run.batch-size", "2"])
    assert "--run.allow-changes run.batch_size" in message
    leftover = run / ".model.tmp-deadbeef"  # what a kill during the model export leaves
    leftover.mkdir()
    main(args + ["--run.max-steps", "6", "--run.batch-size", "2", "--run.allow-changes", "run.batch_size"])
    assert not leftover.exists()
    history = [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["changes"]["run.batch_size"] == {"old": 4, "new": 2, "kind": "override"}
    assert (run / "model" / "finished.json").is_file()


def test_a_second_launch_into_a_folder_being_trained_is_refused(ldm_run, captioned_images, tiny_autoencoder, tmp_path):
    import subprocess
    import sys

    from launch.train_ldm import main

    run = fork(ldm_run, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); f.write('pid 4242 on elsewhere'); "
         "f.flush(); fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)", str(run / ".run.lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        message = refused(main, ldm_args(captioned_images, tiny_autoencoder, run, "--run.max-steps", "8"))
        assert "being trained by another process (pid 4242 on elsewhere)" in message
        assert checkpoint_names(run) == checkpoint_names(ldm_run)
    finally:
        holder.kill()
        holder.wait()
    main(ldm_args(captioned_images, tiny_autoencoder, run, "--run.max-steps", "5"))  # the lock died with its holder
    assert checkpoint_names(run)[-1] == "step_00000005"


class _Stub:
    """The accelerator methods the resume check uses, for one process."""

    process_index, num_processes, is_main_process = 0, 1, True

    def __init__(self):
        self.printed = []

    def print(self, *args):
        self.printed.append(" ".join(map(str, args)))

    def wait_for_everyone(self):
        pass

    def end_training(self):
        pass


def test_a_checkpoint_from_before_records_is_compared_with_config_json(tmp_path):
    from launch.training.checkpoint import CheckpointManager, TrainState
    from launch.training.config import RunConfig
    from launch.training.resume_check import ResumeRefused
    from launch.training.run import check_resume
    from ldm.cli import to_dict

    run = RunConfig(output_dir=tmp_path, max_steps=8)
    model = torch.nn.Linear(2, 2)
    CheckpointManager(tmp_path / "checkpoints", _Stub()).save(TrainState(modules={"m": model}, step=3))
    (tmp_path / "config.json").write_text(json.dumps({"lr": 0.1, "run": to_dict(run)}))
    acc = _Stub()
    with pytest.raises(ResumeRefused, match=r"lr: 0\.1 -> 0\.2"):
        check_resume(acc, run, config={"lr": 0.2, "run": to_dict(run)}, stages={"autoencoder": {"x": 1}})
    check_resume(acc, run, config={"lr": 0.1, "run": to_dict(run)}, stages={"autoencoder": {"x": 1}})
    assert any("records no fingerprint of autoencoder" in line for line in acc.printed)


@pytest.mark.slow
def test_two_processes_refuse_a_changed_lr_together_then_accept_it(captioned_images, tmp_path):
    out = tmp_path / "vae"
    args = lambda *x: two_process_command("launch/train_vae.py", "--preset", "tiny", "--data.source",
                                          str(captioned_images), "--run.output-dir", str(out), *x)
    run_command(args("--run.max-steps", "4"))
    refused_run = run_command(args("--run.max-steps", "6", "--lr", "0.002"), check=False, timeout=180)
    assert refused_run.returncode != 0, "every rank must stop, none may hang"
    assert "lr: 0.001 -> 0.002" in refused_run.stderr
    run_command(args("--run.max-steps", "6", "--lr", "0.002", "--run.allow-changes", "lr"))
    state = json.loads((out / "checkpoints" / "step_00000006" / "state.json").read_text())
    assert state["world_size"] == 2


def test_history_lines_stay_whole_after_a_cut_line(tmp_path):
    from launch.training.resume_check import HISTORY_FILE, append_history

    (tmp_path / HISTORY_FILE).write_text('{"step": 4, "chan')  # a kill in the middle of an append
    old = {"config": {"run": {"max_steps": 4}}}
    append_history(tmp_path, 4, "step_00000004", compare(old, {"config": {"run": {"max_steps": 8}}}))
    append_history(tmp_path, 8, "step_00000008", compare(old, {"config": {"run": {"max_steps": 9}}}))
    lines = (tmp_path / HISTORY_FILE).read_text().splitlines()
    assert len(lines) == 3 and lines[0] == '{"step": 4, "chan'
    assert json.loads(lines[1])["changes"]["run.max_steps"] == {"old": 4, "new": 8, "kind": "live"}
    assert json.loads(lines[2])["step"] == 8


def test_accepted_hyperparameters_replace_the_checkpoints_and_an_unchanged_resume_keeps_its_numbers(tmp_path):
    from launch.training.checkpoint import CheckpointManager, TrainState
    from launch.training.config import RunConfig
    from launch.training.optim import make_lr_schedule
    from launch.training.resume_check import remember_hyperparameters, restore_hyperparameters

    def build(lr, betas, max_steps=20):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 3)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=0.01)
        sched = make_lr_schedule(opt, RunConfig(warmup_steps=2, max_steps=max_steps, lr_schedule="cosine"))
        return TrainState(modules={"m": model}, optimizers={"m": opt}, shared={"lr": sched}), opt, sched

    state, opt, sched = build(0.1, (0.9, 0.999))
    for _ in range(5):
        state.modules["m"](torch.ones(1, 3)).sum().backward()
        opt.step()
        sched.step()
        state.step += 1
    saved_lr = opt.param_groups[0]["lr"]
    CheckpointManager(tmp_path, _Stub()).save(state)

    for lr, betas, expect_lr in ((0.1, (0.9, 0.999), saved_lr), (0.2, (0.5, 0.9), 2 * saved_lr)):
        resumed, ropt, rsched = build(lr, betas)
        remembered = remember_hyperparameters(resumed.optimizers)
        CheckpointManager(tmp_path, _Stub()).resume(resumed)
        restore_hyperparameters(resumed.optimizers, resumed.shared.values(), remembered)
        group = ropt.param_groups[0]
        assert group["betas"] == betas and group["initial_lr"] == lr
        assert group["lr"] == pytest.approx(expect_lr, rel=1e-12) and rsched.get_last_lr() == [group["lr"]]
        if lr == 0.1:
            assert group["lr"] == saved_lr  # bitwise: an unchanged resume is not perturbed

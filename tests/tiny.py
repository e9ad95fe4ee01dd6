"""Tiny stand-ins for the stages and tiny runs of the entry points, shared by the tests.

Plain functions, so that module-scoped fixtures and scripts started as subprocesses can call them
with their own folders and sizes; `conftest.py` wraps the common cases as fixtures. Everything is
random-initialised from a fixed seed and written by the project's own code (or by transformers and
diffusers), so a builder called twice writes the same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:  # imported where used: the data tests need none of the model libraries
    from transformers import CLIPTokenizer, PreTrainedModel

    from ldm.objective import NoiseScheduleConfig
    from ldm.pipeline import LatentDiffusionPipeline

ROOT = Path(__file__).resolve().parent.parent
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 210, 40)}
MAX_LENGTH = 12  # tokens of the tiny text encoders
WIDTH = 32  # their hidden size
# A tiny open_clip model (image and text towers) for the evaluation's CLIP score and features.
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


# ----- data -------------------------------------------------------------------------------------


def make_captioned_folder(folder: Path, n: int = 24, size: int = 32, seed: int = 0) -> Path:
    """Coloured discs and squares on white with sidecar captions ("a red disc")."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    names = list(COLOURS)
    for i in range(n):
        colour = names[i % len(names)]
        shape = "disc" if (i // len(names)) % 2 == 0 else "square"
        img = np.full((size, size, 3), 255, np.uint8)
        cy, cx = rng.integers(size // 3, 2 * size // 3, size=2)
        r = size // 4
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        inside = disc if shape == "disc" else (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
        img[inside] = COLOURS[colour]
        Image.fromarray(img).save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}.txt").write_text(f"a {colour} {shape}", encoding="utf-8")
    return folder


# ----- stage stand-ins --------------------------------------------------------------------------


def tiny_clip_dir(root: Path) -> Path:
    """CLIPTextModel + CLIPTokenizer with a byte-level vocabulary and no merges (chars are tokens)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    out = root / "clip"
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_LENGTH)
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_LENGTH, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_bert_dir(root: Path) -> Path:
    """A BERT-family encoder (bidirectional, padding masked) with a letters-only WordPiece vocab."""
    from transformers import BertConfig, BertModel, BertTokenizer

    out = root / "bert"
    out.mkdir(parents=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(letters) + ["##" + c for c in letters]
    (out / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(out / "vocab.txt"), model_max_length=MAX_LENGTH)
    config = BertConfig(
        vocab_size=len(words), hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_LENGTH,
    )  # fmt: skip
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with 0.05 N(0, 1) (seed 0) added to every parameter, so that no LayerNorm or bias is
    left a trivial identity that would hide a wrong layer or a missing weight."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def letter_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer over lowercase letters with a few merges, 16 positions (byte-level: other
    characters become <|endoftext|>, which also pads, as in SD 1 and OpenAI's CLIP)."""
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": len(letters) + i for i, c in enumerate(letters)})
    merges = [("a", "t</w>"), ("c", "at</w>"), ("o", "g</w>"), ("d", "og</w>"), ("t", "h"), ("th", "e</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=16)


def save_perturbed(model: PreTrainedModel, tokenizer: object, folder: Path) -> Path:
    """``perturbed(model)`` and its tokenizer saved together as an ``hf:`` folder."""
    perturbed(model).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_encoder_dirs(root: Path) -> dict[str, Path]:
    """The text-encoder tests' three ``hf:`` folders, 3 layers and width 32 each, every weight perturbed:
    ``clip`` (``letter_clip_tokenizer``), ``t5`` (ByT5 bytes, no declared maximum length) and ``bert``
    (a 14-word vocabulary, 24 tokens)."""
    from transformers import BertConfig, BertModel, BertTokenizer, ByT5Tokenizer, CLIPTextConfig, CLIPTextModel
    from transformers import T5Config, T5EncoderModel

    clip_tok = letter_clip_tokenizer()
    clip = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=2, max_position_embeddings=16, hidden_act="gelu",
                       bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
                       pad_token_id=clip_tok.pad_token_id)  # fmt: skip
    )
    t5 = T5EncoderModel(T5Config(vocab_size=384, d_model=32, d_kv=16, d_ff=64, num_layers=3, num_heads=2))
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "the", "cat", "dog", "sat", "on", "##s"]
    (root / "vocab.txt").write_text("\n".join(words) + "\n")
    bert_tok = BertTokenizer(vocab=str(root / "vocab.txt"), model_max_length=24)
    bert = BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=32))  # fmt: skip
    return {
        "clip": save_perturbed(clip, clip_tok, root / "clip"),
        "t5": save_perturbed(t5, ByT5Tokenizer(), root / "t5"),
        "bert": save_perturbed(bert, bert_tok, root / "bert"),
    }


def tiny_autoencoder_dir(folder: Path, images: Path | None = None, seed: int = 0, **changes: object) -> Path:
    """Stage 1's ``tiny`` autoencoder (f2, random from ``seed``) saved by stage 1's own code into
    ``folder``; ``changes`` replace fields of the preset (``latent_channels=8``).

    With ``images`` its latent statistics are measured on them and folded, as training does;
    without, the statistics are the identity (mean 0, std 1)."""
    from autoencoder import AUTOENCODER_PRESETS, LatentContract, build_autoencoder, save_autoencoder
    from autoencoder.latents import LatentStatistics, fold_latent_statistics

    torch.manual_seed(seed)
    cfg = dataclasses.replace(AUTOENCODER_PRESETS["tiny"], **changes)
    vae = build_autoencoder(cfg).eval()
    if images is None:
        channels = cfg.latent_channels
        contract = LatentContract(latent_mean=(0.0,) * channels, latent_std=(1.0,) * channels, folded=True,
                                  autoencoder_config=cfg, num_values=1)  # fmt: skip
    else:
        pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(images.glob("*.png"))])
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1  # [N, 3, H, W] in [-1, 1]
        stats = LatentStatistics(cfg.latent_channels)
        with torch.no_grad():
            stats.update_from_posterior(vae.encode(x).latent_dist, generator=torch.Generator().manual_seed(0))
        contract = fold_latent_statistics(vae, stats, cfg)
    save_autoencoder(vae, contract, folder)
    return folder


def tiny_pipeline(
    root: Path,
    encoder: str = "clip",
    schedule: NoiseScheduleConfig | None = None,
    null: str = "empty",
    seed: int = 0,
    vae: Path | None = None,
    sample_size: int | None = None,
    **unet_fields,
) -> LatentDiffusionPipeline:
    """An untrained tiny ``LatentDiffusionPipeline`` in memory, built the way the training script
    builds one; its text encoder is written to ``root/clip`` (or ``root/bert``), its autoencoder
    to ``root/vae`` unless ``vae`` names one. ``sample_size`` and ``unet_fields`` override the UNet preset's."""
    from text_encoder import load_text_encoder

    from ldm.objective import NoiseScheduleConfig
    from ldm.pipeline import LatentDiffusionPipeline
    from ldm.unet import UNET_PRESETS, build_unet

    encoder_dir = tiny_clip_dir(root) if encoder == "clip" else tiny_bert_dir(root)
    text_encoder = load_text_encoder(f"hf:{encoder_dir}", null=null)
    unet_config = dataclasses.replace(UNET_PRESETS["tiny"], **unet_fields)
    if sample_size is not None:
        unet_config = dataclasses.replace(unet_config, sample_size=sample_size)
    torch.manual_seed(seed)
    unet = build_unet(unet_config, cross_attention_dim=text_encoder.hidden_size, latent_channels=4).eval()
    return LatentDiffusionPipeline.from_parts(
        unet, vae or tiny_autoencoder_dir(root / "vae"), text_encoder, schedule or NoiseScheduleConfig(),
        unet_config=unet_config, training_config={"max_steps": 0, "p_uncond": 0.1},
    )  # fmt: skip


# ----- processes and files ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_process_command(script: str, *args: object) -> list[str]:
    """The one way the tests start a 2-process run: ``accelerate launch --multi_gpu`` of ``script``
    (a path from the repository root) on 2 CPU processes, which accelerate joins in a gloo group."""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    return [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            str(ROOT / script), *map(str, args)]  # fmt: skip


def run(cmd: list[str], timeout: int = 300, check: bool = True, **popen: object) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the repository root on one thread, offline; with ``check`` a failure raises
    with the ends of both streams."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **popen)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def sha256(path: Path) -> str:
    """Independent of the project's own hashing, which some of the tests check."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def flip_bits(path: Path, offset: int, mask: int) -> None:
    """XOR the byte at ``offset`` (negative: from the end) with ``mask`` in place: a damaged file."""
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))

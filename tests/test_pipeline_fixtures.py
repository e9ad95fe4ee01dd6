"""Tiny stand-ins for the other stages (a CLIP or BERT text encoder, an f2 autoencoder) and a tiny
pipeline built from them; used by the pipeline, generate and stock-diffusers tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from autoencoder import AUTOENCODER_PRESETS, LatentContract, build_autoencoder, save_autoencoder
from transformers import BertConfig, BertModel, BertTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from ldm.objective import NoiseScheduleConfig
from ldm.pipeline import LatentDiffusionPipeline
from ldm.unet import UNET_PRESETS, build_unet

MAX_LENGTH = 12
WIDTH = 32


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models on a shared 2-core machine run ~10x faster on one thread than on two
    (measured: 0.04 s vs 0.5 s per tiny UNet call under load). Restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_clip_dir(root: Path) -> Path:
    """CLIPTextModel + CLIPTokenizer with a byte-level vocabulary and no merges (chars are tokens)."""
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


def tiny_vae_dir(root: Path) -> Path:
    """Stage 1's ``tiny`` autoencoder (f2) saved by stage 1's own code, statistics folded (identity)."""
    cfg = AUTOENCODER_PRESETS["tiny"]
    torch.manual_seed(0)
    contract = LatentContract(
        latent_mean=(0.0,) * 4, latent_std=(1.0,) * 4, folded=True, autoencoder_config=cfg, num_values=1
    )
    save_autoencoder(build_autoencoder(cfg), contract, root / "vae")
    return root / "vae"


def tiny_pipeline(
    root: Path,
    encoder: str = "clip",
    schedule: NoiseScheduleConfig | None = None,
    null: str = "empty",
    seed: int = 0,
) -> LatentDiffusionPipeline:
    """An untrained tiny pipeline in memory, built the way the training script builds one."""
    from text_encoder import load_text_encoder

    encoder_dir = tiny_clip_dir(root) if encoder == "clip" else tiny_bert_dir(root)
    text_encoder = load_text_encoder(f"hf:{encoder_dir}", null=null)
    torch.manual_seed(seed)
    unet = build_unet("tiny", cross_attention_dim=text_encoder.hidden_size, latent_channels=4).eval()
    return LatentDiffusionPipeline.from_parts(
        unet, tiny_vae_dir(root), text_encoder, schedule or NoiseScheduleConfig(),
        unet_config=UNET_PRESETS["tiny"], training_config={"max_steps": 0, "p_uncond": 0.1},
    )  # fmt: skip


def test_tiny_text_encoders_pad_to_max_length(tmp_path):
    from text_encoder import load_text_encoder

    for encoder_dir in (tiny_clip_dir(tmp_path), tiny_bert_dir(tmp_path)):
        te = load_text_encoder(f"hf:{encoder_dir}")
        hidden = te.encode(["a cat", "a red flag"]).hidden
        assert hidden.shape == (2, MAX_LENGTH, WIDTH)
        assert not torch.allclose(hidden[0], hidden[1])

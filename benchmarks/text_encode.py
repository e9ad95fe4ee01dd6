"""Prompts per second of each text encoder backend in fp32 and bf16, and what bf16 costs in accuracy.

    .venv/bin/python benchmarks/text_encode.py [--batch-size 64] [--batches 3] [--threads 0]

open_clip, CLIP and T5 use randomly initialised models of a realistic but CPU-sized width (the
ViT-B/32 text tower, t5-small), saved to a temporary folder and loaded through the same spec a
user would write; MiniLM is the real all-MiniLM-L6-v2 from the installed wheel. Each backend is
loaded twice (dtype=fp32 and dtype=bf16); the timed batches alternate between the two. The error
columns compare the bf16 hidden states with the fp32 ones over the prompts' own tokens (padding
positions are conditioning too, and are reported separately): max abs error, the same relative to
the largest fp32 magnitude, and the mean cosine similarity per token. Then the same for the
autoencoder's latents (posterior mean, ``autoencoder.frozen.FrozenEncoder``; random weights of the
``tiny`` and ``small`` presets, 64 px noise-and-gradient images), relative to the latents' std.
Prints numbers, asserts nothing.

Measured on the shared 2-core Xeon (AVX512-BF16 + AVX512-FP16, no AMX; torch 2.14.1, `--threads 1`,
batch 64, 3 timed batches, load average ~11 from other jobs, so read the fp32/bf16 ratio within a
line, not the absolute rates):

    backend                     fp32 / bf16 prompts/s   bf16 error on prompt tokens          padding max
    openclip ViT-B/32 text      4.9 / 3.4   (0.69x)     max 0.075 (1.7% of max |h|), cos 0.99994   0.079
    hf CLIP ViT-B/32 text       4.0 / 3.1   (0.78x)     max 0.071 (1.6%), cos 0.99995              0.078
    hf T5 t5-small, ByT5        9.3 / 6.1   (0.66x)     max 0.062 (1.4%), cos 0.99997              0.061
    minilm (real weights)      16.1 / 11.0  (0.68x)     max 0.049 (0.8%), cos 0.99994              0.363
    autoencoder tiny  latents: bf16 max abs error 0.0173 (8.7% of the latents' std 0.199), mean 0.0019
    autoencoder small latents: bf16 max abs error 0.0174 (7.0% of the latents' std 0.248), mean 0.0023

So on this CPU bf16 is ~1.3-1.5x *slower* (AVX512-BF16 without AMX; text_encoder/precision.py has
the matmul rates), which is why dtype=auto stays fp32 here. The error is small on prompt tokens but
not on BERT-style padding positions (MiniLM: 0.36, the null prompt "" among them), which the UNet
also sees: a run must not mix the two precisions, and the fingerprint keeps them apart.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from text_encoder import load_text_encoder

WORDS = "a photo of the small red cat dog sitting on wooden table in garden under blue sky at sunset".split()


@dataclasses.dataclass
class BenchConfig:
    batch_size: int = 64
    batches: int = 3
    """Timed batches per backend (after one warm-up batch)."""
    threads: int = 0
    """torch intra-op threads; 0 keeps torch's default."""


def _prompts(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 30, (n,), generator=g)  # captions of 3-30 words, a few cut at 77 tokens
    return [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (int(k),), generator=g)) for k in lengths]


def _openclip_spec(root: Path) -> str:
    import open_clip
    from safetensors.torch import save_file

    root.mkdir(parents=True)
    cfg = {"embed_dim": 512, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32,
           "patch_size": 16}, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8,
           "layers": 12}}  # fmt: skip
    (root / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    model = open_clip.create_model(f"local-dir:{root}", load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "open_clip_model.safetensors"))
    return f"openclip:local-dir:{root}?layer=penultimate"


def _clip_spec(root: Path) -> str:
    import open_clip
    from transformers import CLIPTextConfig, CLIPTextModel

    from text_encoder.openclip_backend import clip_tokenizer_from_open_clip

    config = CLIPTextConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8)
    CLIPTextModel(config).save_pretrained(root)
    clip_tokenizer_from_open_clip(open_clip.get_tokenizer("ViT-B-32"), 77).save_pretrained(root)
    return f"hf:{root}"


def _t5_spec(root: Path) -> str:
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    config = T5Config(vocab_size=384, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8)
    T5EncoderModel(config).save_pretrained(root)
    ByT5Tokenizer().save_pretrained(root)
    return f"hf:{root}?max_length=77"


def _measure(spec: str, cfg: BenchConfig) -> str:
    """One line: fp32 and bf16 prompts/s (batches alternate) and the bf16 error (see the docstring)."""
    encoders = {d: load_text_encoder(spec, batch_size=cfg.batch_size, dtype=d) for d in ("fp32", "bf16")}
    for te in encoders.values():
        te.encode(_prompts(cfg.batch_size, seed=99))  # warm-up
    seconds = {d: 0.0 for d in encoders}
    for i in range(cfg.batches):
        prompts = _prompts(cfg.batch_size, seed=i)
        for d, te in encoders.items():
            start = time.perf_counter()
            te.encode(prompts)
            seconds[d] += time.perf_counter() - start
    prompts = _prompts(cfg.batch_size, seed=0)
    ref, low = encoders["fp32"].encode(prompts), encoders["bf16"].encode(prompts)
    err = (low.hidden.float() - ref.hidden).abs()  # [B, L, D]
    tokens = ref.mask.bool()  # [B, L]
    scale = ref.hidden[tokens].abs().max().item()
    cosine = torch.nn.functional.cosine_similarity(low.hidden.float()[tokens], ref.hidden[tokens], dim=-1).mean()
    pad = err[~tokens].max().item() if (~tokens).any() else float("nan")
    te = encoders["fp32"]
    n = cfg.batch_size * cfg.batches
    return (f"fp32 {n / seconds['fp32']:7.1f}  bf16 {n / seconds['bf16']:7.1f} prompts/s;  bf16 error on tokens: max "
            f"{err[tokens].max().item():.3f} ({err[tokens].max().item() / scale:.1%} of max |h|), cos {cosine:.5f}; "
            f"padding max {pad:.3f}  ({type(te.model).__name__} "
            f"{sum(p.numel() for p in te.model.parameters()) / 1e6:.0f}M, L={te.max_length})")


def _autoencoder_error(preset: str) -> str:
    """bf16 vs fp32 posterior mean of a random-weight autoencoder preset, relative to the latents' std."""
    from autoencoder import AUTOENCODER_PRESETS, build_autoencoder
    from autoencoder.frozen import FrozenEncoder

    torch.manual_seed(0)
    vae = build_autoencoder(AUTOENCODER_PRESETS[preset]).eval()
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(-1, 1, 64).view(1, 1, 1, 64)
    x = (0.5 * ramp + 0.5 * torch.rand(16, 3, 64, 64, generator=g) * 2 - 0.5).clamp(-1, 1)  # [16, 3, 64, 64]
    ref = FrozenEncoder(vae, torch.float32).encode(x).latent_dist.mean
    low = FrozenEncoder(vae, torch.bfloat16).encode(x).latent_dist.mean
    err = (low - ref).abs()
    return (f"autoencoder {preset:5s} latents (posterior mean {tuple(ref.shape[1:])}): bf16 max abs error "
            f"{err.max().item():.4f}, mean {err.mean().item():.5f}; latent std {ref.std().item():.3f} "
            f"(max error = {err.max().item() / ref.std().item():.1%} of it)")


def main() -> None:
    import tyro

    cfg = tyro.cli(BenchConfig)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    print(f"text encoders, batch {cfg.batch_size}, {cfg.batches} timed batches, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        builders = {"openclip (ViT-B/32 text, random)": _openclip_spec, "hf CLIP (ViT-B/32 text, random)": _clip_spec,
                    "hf T5 (t5-small size, ByT5 bytes, random)": _t5_spec}  # fmt: skip
        specs = {name: build(Path(tmp) / str(i)) for i, (name, build) in enumerate(builders.items())}
        specs["minilm (real all-MiniLM-L6-v2)"] = "minilm"
        for name, spec in specs.items():
            print(f"{name:42s} {_measure(spec, cfg)}", flush=True)
    for preset in ("tiny", "small"):
        print(_autoencoder_error(preset), flush=True)


if __name__ == "__main__":
    main()

"""Prompts per second of each text encoder backend on this machine (tokenisation + forward, no grad).

    .venv/bin/python benchmarks/text_encode.py [--batch-size 64] [--batches 3] [--threads 0]

open_clip, CLIP and T5 use randomly initialised models of a realistic but CPU-sized width (the
ViT-B/32 text tower, t5-small), saved to a temporary folder and loaded through the same spec a
user would write; MiniLM is the real all-MiniLM-L6-v2 from the installed wheel. Prints numbers,
asserts nothing.
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


def _measure(spec: str, cfg: BenchConfig) -> tuple[float, str]:
    te = load_text_encoder(spec, batch_size=cfg.batch_size)
    te.encode(_prompts(cfg.batch_size, seed=99))  # warm-up
    prompts = _prompts(cfg.batch_size * cfg.batches)
    start = time.perf_counter()
    te.encode(prompts)
    elapsed = time.perf_counter() - start
    params = sum(p.numel() for p in te.model.parameters()) / 1e6
    return len(prompts) / elapsed, f"{type(te.model).__name__} {params:.0f}M params, L={te.max_length}"


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
            rate, what = _measure(spec, cfg)
            print(f"{name:45s} {rate:8.1f} prompts/s   ({what})", flush=True)


if __name__ == "__main__":
    main()

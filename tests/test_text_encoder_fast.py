"""Stage 2 made cheap on the fly: one tokenisation, each distinct prompt encoded once, inference mode,
the compute precision (``dtype=``/``auto``) and what it does to the fingerprint and the export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_text_encoder import PROMPTS, SPECS

from text_encoder import (
    FingerprintMismatch,
    TextEncoderSpecError,
    check_fingerprint,
    fastest_frozen_dtype,
    load_text_encoder,
    parse_spec,
    resolve_dtype,
)
from text_encoder.precision import cpu_has_amx
from text_encoder.tokens import tokenize


@pytest.fixture(scope="module")
def encoders(tiny_dirs: dict[str, Path]) -> dict[str, object]:
    return {name: load_text_encoder(spec.format(**tiny_dirs)) for name, spec in SPECS.items()}


def _prompts_around_the_limit(te) -> list[str]:
    """Prompts of exactly max_length tokens (not cut), the next longer prefix (cut), far more (cut)."""
    text = "the cat sat on a dog " * 40

    def length(p: str) -> int:
        return len(te.tokenizer(p, verbose=False)["input_ids"])

    prefixes = [text[:n].strip() for n in range(1, len(text))]
    exact = next(p for p in prefixes if length(p) == te.max_length)
    over = next(p for p in prefixes if length(p) > te.max_length)
    return [exact, over, text, "a cat"]


@pytest.mark.parametrize("name", list(SPECS))
def test_one_tokenisation_gives_the_stock_ids_and_the_truncation_count(encoders: dict, name: str) -> None:
    te = encoders[name]
    prompts = PROMPTS + _prompts_around_the_limit(te)
    tokens = tokenize(te.tokenizer, prompts, te.max_length)
    stock = te.tokenizer(prompts, padding="max_length", max_length=te.max_length, truncation=True,
                         return_tensors="pt")  # what diffusers' encode_prompt runs
    assert torch.equal(tokens.ids, stock["input_ids"]) and torch.equal(tokens.mask, stock["attention_mask"])
    lengths = [len(ids) for ids in te.tokenizer(prompts, verbose=False)["input_ids"]]
    assert tokens.truncated == [n > te.max_length for n in lengths]
    assert tokens.truncated[-4:] == [False, True, True, False]  # exactly max_length tokens is not cut


def test_tokenizer_runs_once_per_chunk_and_counts_every_occurrence(tiny_dirs: dict[str, Path]) -> None:
    te = load_text_encoder(SPECS["bert"].format(**tiny_dirs), batch_size=2)
    calls = []
    tokenizer_call = type(te.tokenizer).__call__

    def counting(self, *args, **kwargs):
        calls.append(args[0] if args else kwargs.get("text"))
        return tokenizer_call(self, *args, **kwargs)

    type(te.tokenizer).__call__ = counting
    try:
        long = "cat " * 100
        te.encode(["a cat", long, long, "a cat", "the dog"])
    finally:
        type(te.tokenizer).__call__ = tokenizer_call
    assert calls == [["a cat", long], ["the dog"]]  # 3 distinct prompts in chunks of 2, once each
    assert (te.num_prompts, te.num_truncated) == (5, 2)


@pytest.mark.parametrize("name", ["clip", "t5", "bert"])
def test_repeated_prompts_are_encoded_once_and_scattered_back(encoders: dict, name: str) -> None:
    te = encoders[name]
    prompts = ["a cat", "", "the dog", "a cat", "", "a cat"]
    seen = []
    hook = te.model.register_forward_hook(lambda module, args, kwargs_out: seen.append(args[0].shape[0]))
    try:
        out = te.encode(prompts)
    finally:
        hook.remove()
    assert seen == [3]  # one forward over the 3 distinct prompts
    one_by_one = [te.encode([p]) for p in prompts]
    for i, single in enumerate(one_by_one):
        torch.testing.assert_close(out.hidden[i : i + 1], single.hidden, rtol=0, atol=1e-6)
        torch.testing.assert_close(out.pooled[i : i + 1], single.pooled, rtol=0, atol=1e-6)
        assert torch.equal(out.mask[i : i + 1], single.mask)
    assert not out.hidden.is_inference() and not out.pooled.is_inference()  # autograd may save them
    head = torch.nn.Linear(te.hidden_size, 1)
    head(out.hidden).sum().backward()  # an inference tensor here would raise
    assert head.weight.grad is not None


def test_dtype_option_in_the_spec_or_as_a_keyword(tiny_dirs: dict[str, Path]) -> None:
    cfg = parse_spec("hf:x?dtype=bf16")
    assert cfg.dtype == "bfloat16" and cfg.to_spec() == "hf:x?dtype=bfloat16"
    assert parse_spec(cfg.to_spec()) == cfg and parse_spec("hf:x?dtype=auto").dtype == "auto"
    assert parse_spec("hf:x").dtype is None and parse_spec("hf:x").to_spec() == "hf:x"
    for bad in ["hf:x?dtype=int8", "hf:x?dtype="]:
        with pytest.raises(TextEncoderSpecError, match="dtype"):
            parse_spec(bad)
    bert = tiny_dirs["bert"]
    assert load_text_encoder(f"hf:{bert}?dtype=bf16").dtype == torch.bfloat16
    assert load_text_encoder(f"hf:{bert}", dtype=torch.bfloat16).dtype == torch.bfloat16
    assert load_text_encoder(f"hf:{bert}").dtype == torch.float32  # neither given: fp32
    assert load_text_encoder(f"hf:{bert}?dtype=auto").dtype == fastest_frozen_dtype("cpu")
    with pytest.raises(TextEncoderSpecError, match="both in the spec"):
        load_text_encoder(f"hf:{bert}?dtype=bf16", dtype="fp32")
    # a caller's default (train_ldm: "auto") applies only where the user named no dtype
    assert load_text_encoder(f"hf:{bert}", default_dtype="bf16").dtype == torch.bfloat16
    assert load_text_encoder(f"hf:{bert}?dtype=fp32", default_dtype="bf16").dtype == torch.float32


def test_auto_precision_is_bf16_only_where_it_is_faster() -> None:
    assert fastest_frozen_dtype("cpu") == (torch.bfloat16 if cpu_has_amx() else torch.float32)
    assert fastest_frozen_dtype("meta") == torch.float32  # MPS, XPU, ...: fp32
    if not torch.cuda.is_available():
        assert fastest_frozen_dtype("cuda") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16 and resolve_dtype(torch.float16, "cpu") == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("half-ish", "cpu")


@pytest.mark.parametrize("name", ["clip", "bert"])
def test_precision_changes_dtype_alone_in_the_fingerprint(tiny_dirs: dict[str, Path], name: str) -> None:
    spec = SPECS[name].format(**tiny_dirs)
    fp32, bf16 = load_text_encoder(spec), load_text_encoder(spec, dtype="bf16")
    with pytest.raises(FingerprintMismatch) as caught:  # a cache or a training run: never mixed
        check_fingerprint(fp32.fingerprint, bf16.fingerprint, "the embedding cache")
    assert caught.value.fields == ["dtype"]
    check_fingerprint(fp32.fingerprint, bf16.fingerprint, "a pipeline sampled in bf16", ignore=("dtype",))
    cast = load_text_encoder(spec).to(dtype=torch.bfloat16)  # fp32 -> bf16: the same weights, rounded
    assert cast.fingerprint == bf16.fingerprint
    assert torch.equal(cast.encode(PROMPTS).hidden, bf16.encode(PROMPTS).hidden)
    back = load_text_encoder(spec, dtype="bf16").to(dtype=torch.float32)  # bf16 -> fp32: rounded fp32 weights
    assert back.fingerprint["dtype"] == "float32"
    assert back.fingerprint["weights_sha256"] != fp32.fingerprint["weights_sha256"]


def test_bf16_encoder_exports_float32_weights_that_reload_to_the_same_function(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    te = load_text_encoder(SPECS["clip"].format(**tiny_dirs), dtype="bf16")
    before = te.encode(PROMPTS).hidden
    te.export_transformers(tmp_path)
    assert te.dtype == torch.bfloat16 and torch.equal(te.encode(PROMPTS).hidden, before)  # unchanged by export
    assert json.loads((tmp_path / "text_encoder" / "config.json").read_text())["dtype"] == "float32"
    with safe_open(str(tmp_path / "text_encoder" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}  # stock diffusers loads fp32
    again = load_text_encoder(f"hf:{tmp_path}", dtype="bf16")
    assert torch.equal(again.encode(PROMPTS).hidden, before)  # the bf16 values, held exactly in fp32
    in_fp32 = load_text_encoder(f"hf:{tmp_path}")
    check_fingerprint(again.fingerprint, in_fp32.fingerprint, "the exported pipeline", ignore=("dtype",))
    torch.testing.assert_close(in_fp32.encode(PROMPTS).hidden, before.float(), rtol=0.05, atol=0.05)

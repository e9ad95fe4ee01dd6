"""``openclip:...``: any open_clip text tower, converted once to a transformers ``CLIPTextModel``.

open_clip's text tower and transformers' ``CLIPTextModel`` are the same network (pre-LN causal
transformer, learned absolute positions, final LayerNorm), with different parameter layouts:

    open_clip                                   CLIPTextModel
    token_embedding.weight                      embeddings.token_embedding.weight
    positional_embedding            [L, D]      embeddings.position_embedding.weight
    resblocks.i.attn.in_proj_*      [3D, D]     encoder.layers.i.self_attn.{q,k,v}_proj.*  (split in 3)
    resblocks.i.attn.out_proj.*                 encoder.layers.i.self_attn.out_proj.*
    resblocks.i.ln_1 / ln_2                     encoder.layers.i.layer_norm1 / layer_norm2
    resblocks.i.mlp.c_fc / c_proj               encoder.layers.i.mlp.fc1 / fc2
    ln_final                                    final_layer_norm

``layer=penultimate`` (SD 2) runs all but the last resblock, then ln_final: a CLIPTextModel with
``num_hidden_layers = n - 1`` computes exactly that. The tokenizer becomes a ``CLIPTokenizer`` built
from open_clip's own BPE vocab, padding with id 0 as open_clip does (its token is "!", as in SD 2's
published tokenizer), so padded positions get the same hidden states too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from text_encoder.backend import LoadedEncoder, freeze, resolve_max_length
from text_encoder.spec import TextEncoderConfig

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
_PREFERRED_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "model.safetensors")
_PICKLE_FILES = ("open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth", "pytorch_model.bin")
# Plain prompts on which open_clip's tokenizer and the converted CLIPTokenizer must agree exactly.
_PROBE_PROMPTS = ("a photo of a cat", "Two DOGS, playing in the snow at 5 pm.", "")


def load_openclip(cfg: TextEncoderConfig, device: torch.device | str, dtype: torch.dtype) -> LoadedEncoder:
    """Build the open_clip model, check its text tower converts exactly, return it as transformers."""
    import open_clip

    model_name, weights, revision, quick_gelu = _resolve(cfg)
    with _without_random_init_warning():
        oc_model = open_clip.create_model(
            model_name, pretrained=None, load_weights=False, pretrained_text=False, force_quick_gelu=quick_gelu
        )
    open_clip.load_checkpoint(oc_model, str(weights), strict=True, weights_only=True)
    oc_tokenizer = open_clip.get_tokenizer(model_name)
    tower = getattr(oc_model, "text", oc_model)  # CustomTextCLIP keeps it in .text, CLIP inline
    context_length = int(tower.positional_embedding.shape[0])
    tokenizer = clip_tokenizer_from_open_clip(oc_tokenizer, context_length)
    model = convert_text_tower(oc_model, cfg.layer, tokenizer.bos_token_id, tokenizer.eos_token_id)
    del oc_model, tower  # the vision tower and the open_clip copy are not needed any more
    max_length = resolve_max_length(cfg.max_length or context_length, tokenizer, model, cfg.name)
    _check_tokenizers_agree(oc_tokenizer, tokenizer, max_length, cfg.name)
    tokenizer.model_max_length = max_length
    source = cfg.name + (f"@{cfg.pretrained}" if cfg.pretrained else "")
    model, weights_sha256 = freeze(model, device, dtype)
    return LoadedEncoder(
        model=model,
        tokenizer=tokenizer,
        max_length=max_length,
        revision=revision,
        source=source,
        weights_sha256=weights_sha256,
    )


@contextlib.contextmanager
def _without_random_init_warning() -> Iterator[None]:
    """open_clip warns "initialized randomly" when it builds the model; our weights load right after."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _resolve(cfg: TextEncoderConfig) -> tuple[str, Path, str | None, bool]:
    """(open_clip model name, local weights file, Hub revision, force quick_gelu) for a spec."""
    name = cfg.name
    if name.startswith("local-dir:"):
        folder, revision = Path(name[len("local-dir:") :]).expanduser(), None
    elif name.startswith("hf-hub:"):
        folder, revision = _hub_folder(name[len("hf-hub:") :], cfg.revision, cfg.allow_pickle)
    else:
        return _resolve_registered(cfg)
    _refuse_unconvertible_config(_local_dir_config(folder), name)
    return f"local-dir:{folder}", _checkpoint_in_folder(folder, cfg.allow_pickle), revision, False


def _resolve_registered(cfg: TextEncoderConfig) -> tuple[str, Path, None, bool]:
    """An arch from open_clip's registry with ``@FILE`` or ``@TAG`` (downloaded by open_clip)."""
    import open_clip

    name, tags = cfg.name, open_clip.list_pretrained_tags_by_model(cfg.name)
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ValueError(
            f"open_clip has no model config named {name!r}; register yours with open_clip.add_model_config(PATH) "
            "or use openclip:local-dir:FOLDER (with open_clip_config.json)"
        )
    _refuse_unconvertible_config(model_cfg, name)
    if not cfg.pretrained:
        raise ValueError(f"openclip:{name} needs weights: add @TAG (one of {tags}) or @/path/to/weights.safetensors")
    if os.path.isfile(cfg.pretrained):
        return name, _check_weights_file(Path(cfg.pretrained), cfg.allow_pickle), None, False
    tag_cfg = open_clip.get_pretrained_cfg(name, cfg.pretrained)
    if not tag_cfg:
        raise ValueError(f"{cfg.pretrained!r} is neither a file nor a pretrained tag of {name}; known tags: {tags}")
    try:
        weights = Path(open_clip.download_pretrained(tag_cfg))
    except Exception as e:  # open_clip retries, then raises a bare FileNotFoundError or RuntimeError
        raise FileNotFoundError(
            f"could not fetch the weights of openclip:{name}@{cfg.pretrained} (needs the Hugging Face Hub "
            f"once, then its cache): {e}"
        ) from e
    # The tag's metadata says which activation these weights were trained with (OpenAI's: QuickGELU).
    quick_gelu = bool(tag_cfg.get("quick_gelu", False)) and not model_cfg.get("quick_gelu", False)
    return name, _check_weights_file(weights, cfg.allow_pickle), None, quick_gelu


def _local_dir_config(folder: Path) -> dict:
    path = folder / "open_clip_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no open_clip_config.json; is it an open_clip model folder?")
    data = json.loads(path.read_text(encoding="utf-8"))
    return data.get("model_cfg", data)


def _refuse_unconvertible_config(model_cfg: dict, name: str) -> None:
    """Refuse from the config alone what cannot convert, before building (or downloading) anything."""
    text_cfg = model_cfg.get("text_cfg", {})
    hf_name = text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name")
    if hf_name:
        raise ValueError(
            f"open_clip model {name} uses a transformers text tower or tokenizer ({hf_name}) that has no "
            "CLIPTextModel equivalent; only open_clip's own CLIP-style text transformer can be converted"
        )
    if text_cfg.get("no_causal_mask") or text_cfg.get("embed_cls"):
        raise ValueError(
            f"open_clip model {name} has a bidirectional or class-token text tower (SigLIP/CoCa style); "
            "only causal CLIP-style text transformers convert to CLIPTextModel"
        )


def _checkpoint_in_folder(folder: Path, allow_pickle: bool) -> Path:
    names = _PREFERRED_FILES + (_PICKLE_FILES if allow_pickle else ())
    for name in names:
        if (folder / name).is_file():
            return _check_weights_file(folder / name, allow_pickle)
    shards = sorted(folder.glob("*.safetensors"))
    if len(shards) == 1:
        return shards[0]
    hint = "" if allow_pickle else " (pickle-based weights are refused unless you add ?allow_pickle=true)"
    raise FileNotFoundError(f"no single open_clip weights file among {[p.name for p in shards]} in {folder}{hint}")


def _hub_folder(repo: str, revision: str | None, allow_pickle: bool) -> tuple[Path, str]:
    from huggingface_hub import hf_hub_download, list_repo_files

    try:
        files = set(list_repo_files(repo, revision=revision))
    except Exception as e:
        raise FileNotFoundError(f"could not list Hub repo {repo} ({type(e).__name__}: {e})") from e
    names = _PREFERRED_FILES + (_PICKLE_FILES if allow_pickle else ())
    weights = next((n for n in names if n in files), None)
    if weights is None:
        raise FileNotFoundError(f"Hub repo {repo} has none of {list(names)}")
    config = Path(hf_hub_download(repo, "open_clip_config.json", revision=revision))
    hf_hub_download(repo, weights, revision=revision)
    return config.parent, config.parent.name  # the snapshot folder is named after the commit


def _check_weights_file(path: Path, allow_pickle: bool) -> Path:
    if path.suffix == ".safetensors":
        return path
    if path.suffix in _PICKLE_SUFFIXES:
        if allow_pickle:
            return path  # open_clip.load_checkpoint loads it with torch.load(weights_only=True)
        raise ValueError(
            f"{path} is a pickle-based weights file; convert it to .safetensors, or add ?allow_pickle=true "
            "to load it with torch.load(weights_only=True)"
        )
    raise ValueError(f"{path}: unsupported weights format {path.suffix!r}; use .safetensors")


def clip_tokenizer_from_open_clip(oc_tokenizer: object, context_length: int) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` with open_clip's BPE vocab and merges, padding with id 0 like open_clip."""
    from open_clip.tokenizer import SimpleTokenizer

    if not isinstance(oc_tokenizer, SimpleTokenizer) or oc_tokenizer.reduction_fn is not None:
        raise ValueError(
            f"only open_clip's CLIP BPE tokenizer (SimpleTokenizer) can be converted, not {type(oc_tokenizer).__name__}"
        )
    if len(oc_tokenizer.all_special_ids) != 2:
        raise ValueError("open_clip tokenizers with extra special tokens cannot be converted to CLIPTokenizer")
    vocab = dict(oc_tokenizer.encoder)
    # transformers' CLIPTokenizer knows the two specials by OpenAI's names; the ids stay the same.
    vocab["<|startoftext|>"] = vocab.pop(oc_tokenizer.decoder[oc_tokenizer.sot_token_id])
    vocab["<|endoftext|>"] = vocab.pop(oc_tokenizer.decoder[oc_tokenizer.eot_token_id])
    merges = [pair for pair, _ in sorted(oc_tokenizer.bpe_ranks.items(), key=lambda kv: kv[1])]
    pad_token = oc_tokenizer.decoder[0]  # open_clip pads with id 0 ("!")
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=context_length)


def _check_tokenizers_agree(oc_tokenizer: object, tokenizer: CLIPTokenizer, max_length: int, name: str) -> None:
    ours = tokenizer(list(_PROBE_PROMPTS), padding="max_length", max_length=max_length, truncation=True)
    theirs = oc_tokenizer(list(_PROBE_PROMPTS), context_length=max_length)  # [P, max_length]
    if torch.tensor(ours["input_ids"]).ne(theirs).any():
        raise ValueError(
            f"open_clip's tokenizer for {name} cleans or splits text differently from CLIPTokenizer "
            "(e.g. a 'canonicalize' or case-keeping text cleaner); it cannot be exported faithfully"
        )


def convert_text_tower(oc_model: nn.Module, layer: str, bos_token_id: int, eos_token_id: int) -> CLIPTextModel:
    """Copy open_clip's text transformer into a float32 ``CLIPTextModel`` (see the module docstring)."""
    tower = getattr(oc_model, "text", oc_model)
    blocks = list(tower.transformer.resblocks)
    _check_convertible(tower, oc_model, blocks)
    keep = len(blocks) - (1 if layer == "penultimate" else 0)
    if keep < 1:
        raise ValueError("layer=penultimate needs a text tower with at least 2 blocks")
    width = tower.token_embedding.embedding_dim
    config = CLIPTextConfig(
        vocab_size=tower.token_embedding.num_embeddings,
        hidden_size=width,
        intermediate_size=blocks[0].mlp.c_fc.out_features,
        num_hidden_layers=keep,
        num_attention_heads=blocks[0].attn.num_heads,
        max_position_embeddings=tower.positional_embedding.shape[0],
        hidden_act=_activation_name(blocks[0].mlp.gelu),
        layer_norm_eps=tower.ln_final.eps,
        attention_dropout=0.0,
        pad_token_id=0,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        projection_dim=width,  # unused by CLIPTextModel; the open_clip projection is not exported
    )
    model = CLIPTextModel(config)
    state = {
        "embeddings.token_embedding.weight": tower.token_embedding.weight,
        "embeddings.position_embedding.weight": tower.positional_embedding,
        "final_layer_norm.weight": tower.ln_final.weight,
        "final_layer_norm.bias": tower.ln_final.bias,
    }
    for i, block in enumerate(blocks[:keep]):
        state.update(_block_state(block, f"encoder.layers.{i}."))
    text = getattr(model, "text_model", model)  # transformers < 5 nests the modules one level deeper
    text.load_state_dict({k: v.detach().float().clone() for k, v in state.items()}, strict=True)
    return model


def _block_state(block: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    q, k, v = block.attn.in_proj_weight.chunk(3, dim=0)  # fused [3D, D] -> three [D, D]
    qb, kb, vb = block.attn.in_proj_bias.chunk(3, dim=0)
    pairs = {
        "self_attn.q_proj": (q, qb),
        "self_attn.k_proj": (k, kb),
        "self_attn.v_proj": (v, vb),
        "self_attn.out_proj": (block.attn.out_proj.weight, block.attn.out_proj.bias),
        "layer_norm1": (block.ln_1.weight, block.ln_1.bias),
        "layer_norm2": (block.ln_2.weight, block.ln_2.bias),
        "mlp.fc1": (block.mlp.c_fc.weight, block.mlp.c_fc.bias),
        "mlp.fc2": (block.mlp.c_proj.weight, block.mlp.c_proj.bias),
    }
    state = {}
    for name, (weight, bias) in pairs.items():
        state[f"{prefix}{name}.weight"] = weight
        state[f"{prefix}{name}.bias"] = bias
    return state


def _check_convertible(tower: nn.Module, oc_model: nn.Module, blocks: list[nn.Module]) -> None:
    """Refuse, with a reason, every open_clip text-tower feature that CLIPTextModel does not have."""
    from open_clip.transformer import ResidualAttentionBlock

    reasons = []
    if getattr(tower, "cls_emb", None) is not None:
        reasons.append("an appended class token (CoCa)")
    mask = getattr(tower, "attn_mask", getattr(oc_model, "attn_mask", None))
    n = tower.positional_embedding.shape[0]
    causal = torch.full((n, n), float("-inf")).triu_(1)
    if mask is None or getattr(tower, "use_pad_mask", False) or not torch.equal(mask.float().cpu(), causal):
        reasons.append("a non-causal attention mask")
    for block in blocks:
        if type(block) is not ResidualAttentionBlock:
            reasons.append(f"custom attention blocks ({type(block).__name__})")
        elif not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
            reasons.append("layer scale")
        elif block.attn.in_proj_weight is None or block.attn.in_proj_bias is None or hasattr(block, "ln_1_kv"):
            reasons.append("attention without a fused, biased in-projection")
    norms = [tower.ln_final] + [m for b in blocks for m in (getattr(b, "ln_1", None), getattr(b, "ln_2", None))]
    if any(not isinstance(m, nn.LayerNorm) or m.eps != tower.ln_final.eps for m in norms):
        reasons.append("norm layers other than LayerNorm with one shared eps")
    if reasons:
        raise ValueError(
            "this open_clip text tower cannot be converted to CLIPTextModel: it uses " + ", ".join(sorted(set(reasons)))
        )


def _activation_name(act: nn.Module) -> str:
    """transformers' ACT2FN name for open_clip's MLP activation (QuickGELU for OpenAI's weights)."""
    from open_clip.transformer import QuickGELU

    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}[act.approximate]
    raise ValueError(f"open_clip text MLP activation {act!r} has no transformers equivalent")

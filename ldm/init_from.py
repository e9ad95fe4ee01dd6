"""Stage 3 from earlier weights: the UNet of a pipeline folder (ours or stock) or of a ``unet/`` folder.

    train_ldm.py --init-from runs/ldm_256/pipeline        one of our pipelines (ldm_manifest.json)
    train_ldm.py --init-from sd15/                        a stock StableDiffusionPipeline folder
    train_ldm.py --init-from sd15/unet                    a bare UNet2DConditionModel folder
    train_ldm.py --init-from hf:ORG/NAME                  a Hub pipeline (its unet/; ?revision=COMMIT)

The architecture comes from SRC's ``unet/config.json``. Before a weight is trained, the stages around
it are checked: the UNet's cross-attention width against the text encoder's, its in/out channels
against the autoencoder's latent channels (refused, naming both numbers); with our manifest, the
autoencoder (weights sha256 and folded statistics: the UNet learned that latent space) and the text
encoder fingerprints; for a stock pipeline, its ``vae/`` weights against the source this run's
autoencoder was imported from, and its ``text_encoder/`` against this run's encoder. What cannot be
checked is returned as warnings for the training script to print.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusers import UNet2DConditionModel
from text_encoder import FrozenTextEncoder, check_fingerprint

from foundation import sha256_file
from ldm.manifest import MANIFEST_NAME, read_manifest, verify_files
from ldm.unet import UNetConfig, unet_kwargs

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


class InitFromError(ValueError):
    """An --init-from source that is missing, unreadable, or does not fit this run's stages."""


@dataclass(frozen=True)
class UNetSource:
    """Where an --init-from spec points, and what it carries besides the UNet."""

    spec: str
    kind: str  # "our_pipeline" | "stock_pipeline" | "unet_folder"
    unet_dir: Path
    pipeline_dir: Path | None = None
    manifest: dict[str, Any] | None = None
    repo_id: str | None = None
    revision: str | None = None
    unet_sha256: dict[str, str] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """JSON-ready provenance for the new run's manifest."""
        return {"spec": self.spec, "kind": self.kind, "repo_id": self.repo_id, "revision": self.revision,
                "manifest_id": self.manifest["manifest_id"] if self.manifest else None,
                "unet_sha256": self.unet_sha256}


def _is_unet_dir(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8")).get("_class_name") == "UNet2DConditionModel"
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def _unet_weights(unet_dir: Path, spec: str) -> dict[str, str]:
    files = sorted(unet_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in unet_dir.iterdir() if p.suffix in (".bin", ".pt", ".ckpt"))
        raise InitFromError(
            f"--init-from {spec}: {unet_dir} has no .safetensors weights"
            + (f" (only {pickles}: pickle files are never loaded; convert them to safetensors)" if pickles else "")
        )
    return {p.name: sha256_file(p) for p in files}


def _download_hub(spec: str) -> tuple[Path, str, str]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    body, _, query = spec[len("hf:"):].partition("?")
    revision = dict(p.split("=", 1) for p in query.split("&") if "=" in p).get("revision")
    repo_id = body.strip("/")
    try:
        index = Path(hf_hub_download(repo_id, "model_index.json", revision=revision))
        for name in ("unet/config.json", f"unet/{UNET_WEIGHTS}"):
            hf_hub_download(repo_id, name, revision=revision)
    except (EntryNotFoundError, LocalEntryNotFoundError) as e:
        raise InitFromError(
            f"--init-from {spec}: {repo_id} has no model_index.json + unet/ (or, offline, they are not in the Hugging "
            f"Face cache: run once with internet access, or give a downloaded folder). {e}"
        ) from None
    return index.parent, repo_id, index.parent.name  # files sit under snapshots/<commit>/


def resolve_unet_source(spec: str) -> UNetSource:
    """Classify an --init-from spec (module docstring); our manifests are verified file by file."""
    repo_id = revision = None
    if str(spec).startswith("hf:"):
        path, repo_id, revision = _download_hub(str(spec))
    else:
        path = Path(spec).expanduser()
    if not path.is_dir():
        raise InitFromError(f"--init-from {spec}: no such folder (give a pipeline folder, a unet/ folder or hf:ORG/NAME)")
    if _is_unet_dir(path):
        return UNetSource(str(spec), "unet_folder", path, unet_sha256=_unet_weights(path, spec))
    if not (path / "model_index.json").is_file() or not _is_unet_dir(path / "unet"):
        raise InitFromError(
            f"--init-from {spec}: {path} is neither a pipeline folder (model_index.json + unet/) nor a "
            "UNet2DConditionModel folder (config.json with _class_name UNet2DConditionModel)"
        )
    manifest = None
    if (path / MANIFEST_NAME).is_file():
        manifest = read_manifest(path)
        verify_files(path, manifest)  # a changed weight must not seed a new run silently
    return UNetSource(str(spec), "our_pipeline" if manifest else "stock_pipeline", path / "unet", pipeline_dir=path,
                      manifest=manifest, repo_id=repo_id, revision=revision,
                      unet_sha256=_unet_weights(path / "unet", spec))


def load_unet(source: UNetSource, cross_attention_dim: int, latent_channels: int) -> UNet2DConditionModel:
    """SRC's UNet in float32, after refusing a text width or latent channel count that does not fit."""
    config = json.loads((source.unet_dir / "config.json").read_text(encoding="utf-8"))
    check_widths(config, cross_attention_dim, latent_channels, source.spec)
    unet = UNet2DConditionModel.from_pretrained(source.unet_dir, use_safetensors=True)
    return unet.float().train()


def check_widths(config: dict[str, Any], cross_attention_dim: int, latent_channels: int, spec: str) -> None:
    width = config.get("cross_attention_dim")
    if width != cross_attention_dim:
        raise InitFromError(
            f"--init-from {spec}: its UNet cross-attends to text of width {width}, but this run's text encoder "
            f"outputs width {cross_attention_dim}. Use the text encoder SRC was trained with."
        )
    for key in ("in_channels", "out_channels"):
        if config.get(key) != latent_channels:
            raise InitFromError(
                f"--init-from {spec}: its UNet has {key}={config.get(key)}, but this run's autoencoder has "
                f"{latent_channels} latent channels. Use an autoencoder with {config.get(key)} latent channels."
            )


def unet_config_from(config: dict[str, Any]) -> UNetConfig | None:
    """Our ``UNetConfig`` for a diffusers UNet config, or None when it has features ours cannot express."""
    down = config.get("down_block_types", ())
    heads = config.get("attention_head_dim")
    if isinstance(heads, (list, tuple)):
        heads = heads[0] if len(set(heads)) == 1 else None
    if heads is None or not all(b in ("CrossAttnDownBlock2D", "DownBlock2D") for b in down):
        return None
    pooled = config.get("addition_embed_type") == "text"
    try:
        ours = UNetConfig(
            block_out_channels=tuple(config["block_out_channels"]),
            attention_levels=tuple(b == "CrossAttnDownBlock2D" for b in down),
            layers_per_block=config["layers_per_block"], num_heads=heads,
            transformer_layers_per_block=config.get("transformer_layers_per_block", 1),
            use_linear_projection=config.get("use_linear_projection", False),
            norm_num_groups=config.get("norm_num_groups", 32), sample_size=config.get("sample_size", 64),
            pooled_text=pooled, scale_shift=config.get("resnet_time_scale_shift") == "scale_shift",
            **({"pooled_text_heads": config.get("addition_embed_type_num_heads", 64)} if pooled else {}),
        )
    except (ValueError, TypeError, KeyError):
        return None
    rebuilt = {**_init_defaults(), **unet_kwargs(ours, config["cross_attention_dim"], config["in_channels"])}
    same = all(_plain(rebuilt[k]) == _plain(config.get(k, rebuilt[k])) for k in rebuilt if k != "sample_size")
    return ours if same else None


def _init_defaults() -> dict[str, Any]:
    params = inspect.signature(UNet2DConditionModel.__init__).parameters
    return {k: p.default for k, p in params.items() if k != "self" and p.default is not inspect.Parameter.empty}


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def check_stages(
    source: UNetSource,
    latent_contract: dict[str, Any],
    text_encoder: FrozenTextEncoder,
    allow_new_autoencoder: bool = False,
) -> list[str]:
    """Refuse stages SRC's UNet was not trained with; return warnings for what could not be checked."""
    if source.manifest is not None:
        return _check_against_manifest(source, latent_contract, text_encoder, allow_new_autoencoder)
    if source.kind == "unet_folder":
        return [f"--init-from {source.spec} is a bare unet/ folder: which autoencoder latents and which text encoder "
                "it was trained with cannot be checked (only the widths were)"]
    return _check_stock_pipeline(source, latent_contract, text_encoder, allow_new_autoencoder)


def _autoencoder_differs(spec: str, what: str, allow: bool) -> list[str]:
    message = (f"--init-from {spec}: {what}; the UNet learned that autoencoder's latent space. Pass "
               "--allow-new-autoencoder to fine-tune it on this run's latents anyway.")
    if not allow:
        raise InitFromError(message)
    return [message.split(" Pass ")[0] + " (allowed by --allow-new-autoencoder)"]


def _check_against_manifest(source, latent_contract, text_encoder, allow) -> list[str]:
    theirs = source.manifest["autoencoder"]["latent_contract"]
    warnings = []
    fields = ("weights_sha256", "latent_mean", "latent_std")
    differing = [k for k in fields if _plain(theirs.get(k)) != _plain(latent_contract.get(k))]
    if differing:
        warnings += _autoencoder_differs(
            source.spec, f"its UNet was trained on another autoencoder's latents ({', '.join(differing)} differ from "
            "this run's --vae)", allow)
    check_fingerprint(source.manifest["text_encoder"]["training_fingerprint"], text_encoder.fingerprint,
                      context=f"the UNet in --init-from {source.spec}", ignore=("dtype",))
    return warnings


def _check_stock_pipeline(source, latent_contract, text_encoder, allow) -> list[str]:
    from text_encoder import load_text_encoder

    warnings = []
    imported = latent_contract.get("source")
    vae_weights = source.pipeline_dir / "vae" / "diffusion_pytorch_model.safetensors"
    if imported is None:
        warnings += _autoencoder_differs(
            source.spec, "this run's --vae was trained here (train_vae.py), not imported from SRC's vae/", allow)
    elif vae_weights.is_file() and list(imported["weights_sha256"].values()) != [sha256_file(vae_weights)]:
        warnings += _autoencoder_differs(
            source.spec, f"this run's --vae was imported from {imported['spec']}, whose weights differ from SRC's vae/",
            allow)
    elif not vae_weights.is_file():
        warnings.append(f"--init-from {source.spec} has no vae/ weights: the autoencoder cannot be checked")
    elif imported.get("normalization") != "source":
        warnings.append(
            f"--init-from {source.spec}: same autoencoder weights, but this run folds the latent statistics measured "
            "on your data, not SRC's scaling_factor/shift_factor: the UNet starts on latents scaled differently from "
            "those it was trained on. import_vae.py --normalization source keeps them identical.")
    if (source.pipeline_dir / "text_encoder").is_dir():
        theirs = load_text_encoder(f"hf:{source.pipeline_dir}", null=text_encoder.config.null)
        check_fingerprint(theirs.fingerprint, text_encoder.fingerprint,
                          context=f"the UNet in --init-from {source.spec} (its text_encoder/)", ignore=("dtype",))
    else:
        warnings.append(f"--init-from {source.spec} has no text_encoder/: the text encoder cannot be checked")
    return warnings


@dataclass
class InitialUNet:
    """What ``train_ldm.py --init-from`` starts from."""

    unet: UNet2DConditionModel
    config: UNetConfig  # SRC's architecture in our terms
    source: UNetSource
    warnings: list[str]


def unet_from_source(spec: str, text_encoder: FrozenTextEncoder, latent_contract: dict[str, Any],
                     latent_channels: int, sample_size: int, allow_new_autoencoder: bool = False) -> InitialUNet:
    """Resolve, check (widths first, then stage fingerprints) and load SRC's UNet for a new run.

    ``sample_size`` (this run's resolution in latents) replaces SRC's: it only sets the default
    image size of the exported pipeline, which a resolution schedule changes on purpose.
    """
    source = resolve_unet_source(spec)
    config = json.loads((source.unet_dir / "config.json").read_text(encoding="utf-8"))
    check_widths(config, text_encoder.hidden_size, latent_channels, spec)
    warnings = check_stages(source, latent_contract, text_encoder, allow_new_autoencoder)
    unet = load_unet(source, text_encoder.hidden_size, latent_channels)
    unet.register_to_config(sample_size=sample_size)
    ours = unet_config_from(dict(unet.config))
    if ours is None:  # the run's config, resume check and manifest describe the UNet by a UNetConfig
        raise InitFromError(
            f"--init-from {spec}: its UNet uses features UNetConfig cannot express (block types other than "
            "(CrossAttn)Down/UpBlock2D, per-level head counts as in SD 2.x, or other non-default options); "
            "only UNets of that family can be continued for now")
    return InitialUNet(unet, ours, source, warnings)

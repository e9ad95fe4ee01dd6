"""LPIPS (Zhang et al. 2018) as a frozen perceptual loss and metric, built without network access.

The ``lpips`` package ships its calibrated linear layers, but its VGG/AlexNet/SqueezeNet trunk comes
from torchvision, which downloads ImageNet weights on first use. Offline machines cannot, so we
never let lpips or torchvision download or unpickle anything: we build LPIPS with a random trunk,
then load

* the linear layers from the files inside the ``lpips`` package, and
* the trunk from torchvision's weight cache (``$TORCH_HOME/hub/checkpoints/<file>``) or an explicit
  file, raising a clear error when that file is missing,

both with ``torch.load(weights_only=True)``. ``backbone="random"`` keeps the random trunk: only
for tests, which check that gradients flow through the loss.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import lpips
import torch
from torch import nn
from torchvision.models import AlexNet_Weights, SqueezeNet1_1_Weights, VGG16_Weights

# The trunks lpips 0.1 builds with torchvision's legacy ``pretrained=True``, i.e. IMAGENET1K_V1.
_TRUNK_WEIGHTS = {
    "vgg": VGG16_Weights.IMAGENET1K_V1,
    "alex": AlexNet_Weights.IMAGENET1K_V1,
    "squeeze": SqueezeNet1_1_Weights.IMAGENET1K_V1,
}


class PerceptualWeightsMissing(FileNotFoundError):
    """The ImageNet trunk weights LPIPS needs are not on this machine."""


def trunk_weights_file(net: str = "vgg", backbone_file: str | Path | None = None) -> Path:
    """Where the ImageNet trunk weights for ``net`` are expected (they may not exist)."""
    if net not in _TRUNK_WEIGHTS:
        raise ValueError(f"LPIPS net must be one of {sorted(_TRUNK_WEIGHTS)}, got {net!r}")
    if backbone_file is not None:
        return Path(backbone_file)
    file_name = _TRUNK_WEIGHTS[net].url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def perceptual_weights_available(net: str = "vgg", backbone_file: str | Path | None = None) -> bool:
    return trunk_weights_file(net, backbone_file).is_file()


def _missing_message(net: str, path: Path) -> str:
    url = _TRUNK_WEIGHTS[net].url
    return (
        f"LPIPS ({net}) needs torchvision's ImageNet weights at {path}, and that file does not exist. "
        f"This machine cannot download them. On a machine with internet, fetch {url} "
        f"and copy it to {path} (or pass its path as perceptual_backbone_file), "
        "or turn the perceptual loss off with perceptual_weight=0."
    )


def _load_linear_layers(model: lpips.LPIPS, net: str) -> None:
    path = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # ``lins.<i>`` is lpips's ModuleList alias of ``lin<i>``; the files store one of the two names.
    not_trunk = [k for k in missing if not k.startswith(("net.", "scaling_layer.", "lins."))]
    lin_count = len(model.lins)
    loaded = sum(1 for i in range(lin_count) if f"lin{i}.model.1.weight" in state or f"lins.{i}.model.1.weight" in state)
    if not_trunk or unexpected or loaded != lin_count:
        raise RuntimeError(f"LPIPS linear weights {path} do not fit: missing {not_trunk}, unexpected {unexpected}")


def _load_trunk(model: lpips.LPIPS, net: str, path: Path) -> None:
    if not path.is_file():
        raise PerceptualWeightsMissing(_missing_message(net, path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    # lpips splits torchvision's ``features`` Sequential into slices that keep the original
    # indices as module names: ``net.slice2.5.weight`` is torchvision's ``features.5.weight``.
    trunk = {}
    for name, tensor in model.net.state_dict().items():
        source = "features." + name.split(".", 1)[1]
        if source not in state or state[source].shape != tensor.shape:
            raise RuntimeError(f"{path} is not torchvision's {net} ImageNet checkpoint: no {source} of shape {tuple(tensor.shape)}")
        trunk[name] = state[source]
    model.net.load_state_dict(trunk, strict=True)


class PerceptualLoss(nn.Module):
    """Frozen LPIPS distance: images [B, 3, H, W] in [-1, 1] (x2) -> [B] distances.

    Always in eval mode (LPIPS has dropout before its linear layers) and never trainable, whatever
    ``.train()`` the enclosing module is put in.
    """

    def __init__(self, model: lpips.LPIPS) -> None:
        super().__init__()
        self.lpips = model.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:
        return super().train(False)

    def forward(self, images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        return self.lpips(images, reference, normalize=False).flatten()


def build_perceptual_loss(
    net: str = "vgg",
    backbone: Literal["imagenet", "random"] = "imagenet",
    backbone_file: str | Path | None = None,
) -> PerceptualLoss:
    """LPIPS with calibrated linear layers and an ImageNet (or, for tests, random) trunk."""
    if backbone not in ("imagenet", "random"):
        raise ValueError(f"LPIPS backbone must be 'imagenet' or 'random', got {backbone!r}")
    path = trunk_weights_file(net, backbone_file)
    if backbone == "imagenet" and not path.is_file():
        raise PerceptualWeightsMissing(_missing_message(net, path))
    with warnings.catch_warnings():
        # lpips passes torchvision the deprecated ``pretrained=False``; nothing is downloaded.
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False)
    _load_linear_layers(model, net)
    if backbone == "imagenet":
        _load_trunk(model, net, path)
    return PerceptualLoss(model)

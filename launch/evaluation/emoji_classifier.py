"""A tiny CNN that names an emoji's subcategory and category (from ``emoji.json``), for
benchmarks/demo_quality.py and in-training quality checks.

It is trained once on the training split with augmentation (shifts, zoom, rotation, blur, colour
jitter, noise: generated images are never pixel-exact copies) and cached as safetensors under a
name derived from the data and the training settings, so the same data always reuses one file and
other data never does. 64-pixel inputs, 0.16 M parameters: about 3-6 minutes on 2 CPU cores, once.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from data import DataConfig, open_records
from data.decode import BadSample
from data.sample import CENTER_DRAWS, make_sample
from foundation import write_bytes_atomic

FORMAT = "ldm-emoji-classifier/1"


@dataclass(frozen=True)
class ClassifierConfig:
    """How the emoji classifier is built and trained (part of its cache key)."""

    resolution: int = 64
    """Input side in pixels; other image sizes are resized to it."""
    width: int = 16
    """Channels of the first convolution (the others are 2x and 4x this)."""
    feature_dim: int = 128
    """Width of the pooled features: the space the Frechet distance is measured in."""
    epochs: int = 60
    """Passes over the training split's emoji (one image of each base emoji and its skin-tone variants per pass)."""
    batch_size: int = 64
    """Images per optimizer step."""
    lr: float = 4e-3
    """Peak AdamW learning rate of the one-cycle schedule."""
    weight_decay: float = 5e-4
    """AdamW weight decay."""
    label_smoothing: float = 0.1
    """Cross-entropy label smoothing (both heads)."""
    category_weight: float = 0.5
    """Weight of the category loss beside the subcategory loss."""
    augment: bool = True
    """Train on randomly shifted, zoomed, rotated, blurred, colour-jittered and noised copies."""
    seed: int = 0
    """Seeds the initial weights, the data order and the augmentation."""


@dataclass
class LabelledImages:
    """Images with their emoji labels: uint8 [N, 3, R, R], one caption and label pair per image."""

    images: torch.Tensor
    captions: list[str]
    subcategory: list[str]
    category: list[str]
    base: list[bool]
    """False for skin-tone variants."""
    sort_order: list[int]
    group: list[str]
    """The base emoji an image belongs to (itself, or the one a skin-tone variant varies)."""


def load_labelled(source: str, resolution: int) -> LabelledImages:
    """Every sample of ``source`` (e.g. runs/demo/data/train) with its ``category``/``subcategory``
    metadata, centre-cropped to ``resolution`` the way training sees it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-image tensor ops: extra threads only add sync (10x slower on a busy 2-core box)
    try:
        return _load_labelled(source, resolution)
    finally:
        torch.set_num_threads(threads)


def _load_labelled(source: str, resolution: int) -> LabelledImages:
    cfg = DataConfig(source=source, resolution=resolution)
    images, captions, sub, cat, base, order, group = [], [], [], [], [], [], []
    bad: list[str] = []
    for record in open_records(cfg)[1]:
        meta = record.metadata
        if "subcategory" not in meta or "category" not in meta:
            raise ValueError(f"{source}: sample {record.key} has no category/subcategory metadata; the emoji "
                             "benchmark needs the set written by `python launch/prepare_data.py --emoji DIR`")
        try:
            sample = make_sample(record, cfg, CENTER_DRAWS, augment=False)
        except BadSample as e:
            bad.append(f"{record.key}: {e}")
            continue
        images.append(sample["image"].add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8))
        captions.append(sample["caption"])
        sub.append(meta["subcategory"])
        cat.append(meta["category"])
        base.append(meta.get("skin_tone") is None)
        order.append(int(meta.get("sort_order", len(order))))
        group.append(str(meta.get("base", record.key)))
    if not images:
        raise ValueError(f"{source} holds no usable samples ({len(bad)} bad, e.g. {bad[:1]})")
    return LabelledImages(torch.stack(images), captions, sub, cat, base, order, group)


def to_input(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float [B, 3, R, R] in [-1, 1]."""
    x = images.float().div(127.5).sub(1)
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", antialias=True, align_corners=False)
    return x.clamp(-1, 1)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random geometric + photometric copies of x [B, 3, R, R] in [-1, 1] (white background = 1)."""
    b, r = x.shape[0], x.shape[-1]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(b, generator=g)
    angle, scale = u(-0.2, 0.2), u(0.8, 1.15)
    flip = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, u(-0.12, 0.12)], -1),
                         torch.stack([sin * flip, cos, u(-0.12, 0.12)], -1)], 1)  # [B, 2, 3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x - 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 1  # pad white
    # Blur: down to a random size and back (one size per batch), as a soft generated image looks.
    side = int(torch.randint(r // 3, r + 1, (1,), generator=g))
    if side < r:
        x = F.interpolate(F.interpolate(x, size=(side, side), mode="bilinear", antialias=True), size=(r, r),
                          mode="bilinear")
    gray = x.mean(1, keepdim=True)
    x = gray + (x - gray) * u(0.7, 1.3)[:, None, None, None]  # saturation
    x = x * u(0.8, 1.2)[:, None, None, None] + u(-0.15, 0.15)[:, None, None, None]  # contrast, brightness
    x = x + torch.randn(x.shape, generator=g) * u(0.0, 0.1)[:, None, None, None]
    return x.clamp(-1, 1)


class EmojiClassifier(nn.Module):
    """Conv stages 64 -> 32 -> 16 -> 8 -> 4 px, global average pool, two linear heads."""

    def __init__(self, cfg: ClassifierConfig, subcategories: list[str], categories: list[str]):
        super().__init__()
        self.cfg, self.subcategories, self.categories = cfg, list(subcategories), list(categories)
        w = cfg.width
        layers: list[nn.Module] = []
        for c_in, c_out, stride in [(3, w, 2), (w, 2 * w, 2), (2 * w, 2 * w, 1), (2 * w, 4 * w, 2),
                                    (4 * w, 4 * w, 1), (4 * w, cfg.feature_dim, 2)]:
            layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.sub_head = nn.Linear(cfg.feature_dim, len(subcategories))
        self.cat_head = nn.Linear(cfg.feature_dim, len(categories))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))  # [B, feature_dim]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = F.dropout(self.features(x), 0.2, self.training)
        return self.sub_head(f), self.cat_head(f)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """uint8 images [N, 3, H, W] -> {"subcategory": [N] ids, "category": [N] ids, "features": [N, D]}."""
        self.eval()
        out: dict[str, list[torch.Tensor]] = {"subcategory": [], "category": [], "features": []}
        for chunk in images.split(batch_size):
            f = self.features(to_input(chunk, self.cfg.resolution))
            out["features"].append(f)
            out["subcategory"].append(self.sub_head(f).argmax(-1))
            out["category"].append(self.cat_head(f).argmax(-1))
        return {k: torch.cat(v) for k, v in out.items()}

    def label_ids(self, names: list[str], kind: str) -> torch.Tensor:
        """Class ids of ``names`` (-1 for a name the classifier never saw: never counted as recognised)."""
        vocab = {n: i for i, n in enumerate(self.subcategories if kind == "subcategory" else self.categories)}
        return torch.tensor([vocab.get(n, -1) for n in names], dtype=torch.long)


def data_key(data: LabelledImages, cfg: ClassifierConfig) -> str:
    """sha256 of the images, labels and training settings: the classifier's cache identity."""
    h = hashlib.sha256(FORMAT.encode())
    h.update(json.dumps(asdict(cfg), sort_keys=True).encode())
    h.update(data.images.contiguous().numpy().tobytes())
    h.update(json.dumps([data.subcategory, data.category, data.group]).encode())
    return h.hexdigest()


def epoch_order(groups: list[str], g: torch.Generator) -> torch.Tensor:
    """One random member of every group, in random order: each base emoji counts once per epoch,
    however many skin-tone variants it has (they are 55% of the emoji set, nearly all in one category)."""
    members: dict[str, list[int]] = {}
    for i, name in enumerate(groups):
        members.setdefault(name, []).append(i)
    picks = torch.tensor([m[int(torch.randint(len(m), (1,), generator=g))] for m in members.values()])
    return picks[torch.randperm(len(picks), generator=g)]


def train_classifier(data: LabelledImages, cfg: ClassifierConfig, log=print) -> EmojiClassifier:
    """Train from scratch on ``data`` (skin-tone variants share their base emoji's turn); deterministic in ``cfg.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # nn.Module initialisers use the global RNG: fork it, never disturb the caller's
        model = EmojiClassifier(cfg, sorted(set(data.subcategory)), sorted(set(data.category)))
    sub, cat = model.label_ids(data.subcategory, "subcategory"), model.label_ids(data.category, "category")
    x_all = to_input(data.images, cfg.resolution)
    g = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(set(data.group)) / cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                pct_start=0.15)
    model.train()
    for epoch in range(cfg.epochs):
        order = epoch_order(data.group, g)
        total, correct = 0.0, 0
        for idx in order.split(cfg.batch_size):
            x = augment(x_all[idx], g) if cfg.augment else x_all[idx]
            sub_logits, cat_logits = model(x)
            loss = F.cross_entropy(sub_logits, sub[idx], label_smoothing=cfg.label_smoothing) + cfg.category_weight * \
                F.cross_entropy(cat_logits, cat[idx], label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            correct += int((sub_logits.argmax(-1) == sub[idx]).sum())
        log(f"emoji classifier epoch {epoch + 1}/{cfg.epochs}: loss {total / len(order):.3f}, "
            f"augmented subcategory accuracy {correct / len(order):.3f}")
    return model.eval()


def save_classifier(model: EmojiClassifier, path: Path, key: str) -> None:
    meta = {"format": FORMAT, "config": json.dumps(asdict(model.cfg)), "data_key": key,
            "subcategories": json.dumps(model.subcategories), "categories": json.dumps(model.categories)}
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    write_bytes_atomic(path, safetensors.torch.save(tensors, metadata=meta))


def load_classifier(path: Path) -> EmojiClassifier:
    """A classifier file written by ``save_classifier`` (its config and class names are in the header)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; benchmarks/demo_quality.py trains and caches one")
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an emoji classifier (format {meta.get('format')!r}, expected {FORMAT!r})")
    cfg = ClassifierConfig(**json.loads(meta["config"]))
    model = EmojiClassifier(cfg, json.loads(meta["subcategories"]), json.loads(meta["categories"]))
    model.load_state_dict(safetensors.torch.load_file(str(path)))
    return model.eval()


def cached_classifier(data: LabelledImages, cfg: ClassifierConfig, cache_dir: Path, log=print) -> tuple[EmojiClassifier, Path]:
    """The classifier for ``data`` and ``cfg``: loaded from ``cache_dir`` when trained before, else trained and saved."""
    key = data_key(data, cfg)
    path = Path(cache_dir) / f"emoji_classifier-{key[:16]}.safetensors"
    if path.is_file():
        log(f"emoji classifier: cached {path}")
        return load_classifier(path), path
    log(f"emoji classifier: training on {len(data.images)} images -> {path}")
    model = train_classifier(data, cfg, log=log)
    save_classifier(model, path, key)
    return model, path

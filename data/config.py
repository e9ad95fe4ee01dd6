"""The data layer's one config: where the images come from and how they become training samples."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from data.captions import TagShuffle


class DataConfigError(ValueError):
    """A data config or `--data` spec that cannot work; the message says what to change."""


# PIL format names we open. Anything else (EPS runs Ghostscript, PSD/ICO/... are rarely training
# data) is refused before a decoder is chosen.
DEFAULT_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# File name extensions that mark an image in a folder or a shard member, in order of preference when
# one shard sample carries several.
DEFAULT_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")


@dataclass(frozen=True)
class DataConfig:
    """Captioned images in, one sample format out. `source` is the `--data` spec (see data/spec.py)."""

    source: str = ""
    """The --data spec: a folder, a save_to_disk folder, parquet/arrow files, hf:NAME, or shards."""
    resolution: int = 256
    """Side of the square training image, in pixels."""
    crop: Literal["center", "random"] = "random"
    """Where to cut the square after resizing the shorter side to `resolution`."""
    flip: bool = False
    """Mirror half of the images horizontally (off by default: text in images gets mirrored too)."""

    image_column: str = "image"
    """Image column of a `datasets` dataset (Image feature or bytes)."""
    caption_column: str = "text"
    """Caption column of a `datasets` dataset or folder metadata file, and the .json field of a shard sample without .txt."""
    key_column: str | None = None
    """Column holding a unique sample key in a `datasets` dataset; default: the row index."""
    split: str = "train"
    """Split to read from a DatasetDict or a hub dataset."""
    cache_dir: str | None = None
    """Where `datasets` caches parquet and hub data as arrow; default: the datasets cache."""

    missing_caption: Literal["skip", "empty"] = "skip"
    """An image without any caption is skipped (and counted), or trained on as unconditional."""
    shuffle_tags: bool = False
    """Tag-style captions ("1girl, solo, red hair"): permute the tags of each sample anew every epoch (training only, not with the latent cache)."""
    keep_tags: int = 0
    """With shuffle_tags: the first this many tags stay in place (e.g. a trigger word or the subject)."""
    tag_separator: str = ","
    """With shuffle_tags: what separates tags; they are joined again with it and one space."""
    max_image_pixels: int = 64_000_000
    """Images declaring more pixels than this are refused before decoding (decompression bombs)."""
    min_image_side: int = 16
    """Images with a shorter side below this are skipped as too small."""
    max_aspect_ratio: float = 10.0
    """Images longer than this many times their width (or the reverse) are skipped."""
    background: tuple[int, int, int] = (255, 255, 255)
    """RGB colour that transparent pixels are composited onto."""
    image_formats: tuple[str, ...] = DEFAULT_IMAGE_FORMATS
    """PIL format names that may be opened; others are refused unopened."""
    image_extensions: tuple[str, ...] = DEFAULT_IMAGE_EXTENSIONS
    """File or shard member extensions that are treated as images."""
    resample: Literal["bicubic", "bilinear"] = "bicubic"
    """Resize filter, antialiased on downscales (torch's kernels, equal to PIL's within one level)."""
    jpeg_draft: bool = True
    """Let libjpeg decode large JPEGs at 1/2, 1/4 or 1/8 scale when that still covers `resolution`."""

    max_bad_fraction: float = 0.05
    """Abort when more than this fraction of the samples seen by a process were unusable..."""
    bad_fraction_min_seen: int = 500
    """...once at least this many samples were seen (a few bad ones early are no verdict)."""
    shuffle_block: int = 256
    """Shard samples are read in blocks of this many and shuffled within the block (1 = shard order)."""
    allow_pipe_urls: bool = False
    """Allow `pipe:` shard URLs. They run a shell command, so only for specs you wrote yourself."""

    buckets: tuple[str, ...] = ()
    """Aspect-ratio buckets instead of square crops: a preset (sdxl: SDXL's ratios at resolution**2 pixels) and/or WxH sizes, sides multiples of 64."""
    sources: tuple[str, ...] = ()
    """Several sources mixed, instead of `source`: each SPEC or SPEC#weight=3&caption_column=alt (see data/mix.py)."""
    balance_by: str | None = None
    """A metadata field (a class label, a base id...): sample so each distinct value is drawn about equally often,
    instead of in proportion to its number of images (latent cache only; its value is stored in the cache)."""
    balance_power: float = 1.0
    """With balance_by: a sample's weight is 1 / (images of its value) ** power (1: every value equal; 0.5:
    shares in proportion to the square root of their sizes; 0: no balancing)."""

    def __post_init__(self) -> None:
        if any(isinstance(e, dict) for e in self.sources):  # --config objects -> their entry strings
            from data.mix import format_source_entry

            entries = tuple(format_source_entry(e) if isinstance(e, dict) else e for e in self.sources)
            object.__setattr__(self, "sources", entries)
        if isinstance(self.buckets, str):  # "sdxl" in a --config file
            object.__setattr__(self, "buckets", (self.buckets,))
        problems = self.problems()
        if problems:
            raise DataConfigError("Invalid data config: " + "; ".join(problems) + ".")

    def problems(self) -> list[str]:
        """Every field that is out of range, as a sentence fragment that says what is allowed."""
        out = []
        if self.resolution < 8:
            out.append(f"resolution={self.resolution} must be at least 8")
        if self.crop not in ("center", "random"):
            out.append(f"crop={self.crop!r} must be 'center' or 'random'")
        if self.resample not in ("bicubic", "bilinear"):
            out.append(f"resample={self.resample!r} must be 'bicubic' or 'bilinear'")
        if self.missing_caption not in ("skip", "empty"):
            out.append(f"missing_caption={self.missing_caption!r} must be 'skip' or 'empty'")
        if self.keep_tags < 0:
            out.append(f"keep_tags={self.keep_tags} must be >= 0")
        if not self.tag_separator:
            out.append("tag_separator must not be empty (e.g. ',' or ';')")
        if self.max_image_pixels < 1:
            out.append("max_image_pixels must be positive")
        if not self.max_aspect_ratio >= 1.0:  # also refuses nan
            out.append(f"max_aspect_ratio={self.max_aspect_ratio} must be at least 1")
        if self.min_image_side < 1:
            out.append(f"min_image_side={self.min_image_side} must be at least 1")
        if len(self.background) != 3 or not all(0 <= int(c) <= 255 for c in self.background):
            out.append(f"background={self.background} must be three integers in 0..255")
        if self.balance_by is not None and not self.balance_by.strip():
            out.append("balance_by must name a metadata field (or be left unset)")
        if not 0.0 <= self.balance_power <= 1.0:  # also refuses nan
            out.append(f"balance_power={self.balance_power} must be in [0, 1]")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            out.append(f"max_bad_fraction={self.max_bad_fraction} must be in [0, 1]")
        if self.bad_fraction_min_seen < 1:
            out.append("bad_fraction_min_seen must be at least 1")
        if self.shuffle_block < 1:
            out.append("shuffle_block must be at least 1")
        if not self.image_formats or not self.image_extensions:
            out.append("image_formats and image_extensions must not be empty")
        from data.buckets import bucket_problems
        from data.mix import mix_problems

        out.extend(bucket_problems(self.buckets))
        if self.sources and self.source:
            out.append("give either source (--data SPEC) or sources (--data.sources SPEC SPEC ...), not both; "
                       "for one source of a mix use cfg.with_source(SPEC)")
        out.extend(mix_problems(self.sources))
        return out

    def tag_shuffle(self) -> TagShuffle | None:
        """The tag-shuffling rule training samples get, or None when shuffle_tags is off."""
        from data.captions import TagShuffle

        return TagShuffle(keep=self.keep_tags, separator=self.tag_separator) if self.shuffle_tags else None

    def shuffles_tags(self) -> bool:
        """Whether this config or any source of its mix shuffles tags (the latent cache cannot)."""
        from data.mix import parse_source_entry

        return self.shuffle_tags or any(parse_source_entry(e).data_config(self).shuffle_tags for e in self.sources)

    def with_source(self, spec: str) -> DataConfig:
        """This config reading `spec` alone (e.g. validation data), whatever `source`/`sources` were."""
        return dataclasses.replace(self, source=spec, sources=())

    def replace(self, **changes: object) -> DataConfig:
        return dataclasses.replace(self, **changes)

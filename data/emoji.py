"""The demo dataset: Noto emoji (64x64 PNGs) from the npm package emoji-datasource-google 16.0.0.

3,786 images: 1,911 base emoji and 1,875 skin-tone variants. Images: Apache-2.0 (Google Noto
Emoji); package: MIT. Captions are the lower-cased Unicode names, variants named like CLDR does
("waving hand sign: medium skin tone"); category, subcategory and short names go into the metadata.
With captions="variants" each training image stores a list of captions instead (see
`caption_variants`), one of which the loader picks per epoch; the name stays the first (what the
recognisability benchmark's prompts use), and validation images keep the name alone.
Every tenth base emoji (in the package's sort order), with all its skin-tone variants, is held out
for validation, so no emoji leaks between the splits; except the emoji the demo's sample grid asks
for (`SHOWCASE`): when one of them is due, the next base emoji is held out in its place, so the grid
shows what the model learned rather than asking for an image it never saw.
"""

from __future__ import annotations

import base64
import hashlib
import json
import tarfile
import urllib.request
from pathlib import Path
from typing import Any, Literal

from data.sample import RawRecord

PACKAGE = "emoji-datasource-google"
VERSION = "16.0.0"
TARBALL_URL = f"https://registry.npmjs.org/{PACKAGE}/-/{PACKAGE}-{VERSION}.tgz"
# `npm view emoji-datasource-google@16.0.0 dist.integrity`: the registry's published sha512.
INTEGRITY = "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A=="
IMAGE_FOLDER = "package/img/google/64/"
LICENSE_NOTE = "Images: Noto Emoji, Apache-2.0 (Google). Package emoji-datasource-google: MIT (iamcal)."
SKIN_TONES = {
    "1F3FB": "light skin tone",
    "1F3FC": "medium-light skin tone",
    "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone",
    "1F3FF": "dark skin tone",
}
VALIDATION_EVERY = 10
# Base emoji (unified codes) the demo grid prompts for that the every-tenth rule would hold out:
# flag: france, flag: japan, waving hand (with its skin tones). Kept in training.
SHOWCASE = frozenset({"1F1EB-1F1F7", "1F1EF-1F1F5", "1F44B"})
SPLIT_RULE = f"every {VALIDATION_EVERY}th base emoji held out, the next one for a showcase emoji " + ",".join(sorted(SHOWCASE))
"""Recorded in the prepared folder's settings: a folder split another way is rebuilt, not reused."""
CaptionStyle = Literal["name", "variants"]
CAPTION_STYLES: tuple[str, ...] = ("name", "variants")
FLAG_SUBCATEGORIES = ("country-flag", "subdivision-flag")


def integrity_of(data: bytes) -> str:
    """npm's Subresource Integrity string: 'sha512-' + base64 of the SHA-512 digest."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode("ascii")


def fetch_tarball(download_dir: Path, url: str = TARBALL_URL, integrity: str = INTEGRITY) -> Path:
    """The package tarball, downloaded once into `download_dir` and checked against `integrity`."""
    path = download_dir / url.rsplit("/", 1)[-1]
    if path.is_file() and integrity_of(path.read_bytes()) == integrity:
        return path
    download_dir.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url, timeout=120) as response:  # noqa: S310 - fixed https URL
        data = response.read()
    actual = integrity_of(data)
    if actual != integrity:
        raise RuntimeError(
            f"Downloaded {url} but its sha512 is {actual}, not the published {integrity}: the download "
            "is corrupt or was tampered with. Delete it and retry; report it if it persists."
        )
    partial = path.with_suffix(".part")
    partial.write_bytes(data)
    partial.replace(path)
    return path


def read_package(tarball: Path) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """(emoji.json entries, {image file name: PNG bytes}) read straight from the tarball, nothing
    extracted to disk."""
    entries, images = None, {}
    with tarfile.open(tarball, "r:gz") as tar:
        for info in tar:
            if not info.isreg():
                continue
            if info.name == "package/emoji.json":
                entries = json.loads(tar.extractfile(info).read())  # type: ignore[union-attr]
            elif info.name.startswith(IMAGE_FOLDER) and info.name.endswith(".png"):
                images[info.name[len(IMAGE_FOLDER):]] = tar.extractfile(info).read()  # type: ignore[union-attr]
    if entries is None:
        raise RuntimeError(f"{tarball} holds no package/emoji.json: is it {PACKAGE}@{VERSION}?")
    return entries, images


def skin_tone_name(variation: str) -> str:
    """'1F3FB-1F3FD' -> 'light skin tone, medium skin tone'; the same tone twice is named once."""
    tones = [SKIN_TONES[code] for code in variation.upper().split("-")]
    return tones[0] if len(set(tones)) == 1 else ", ".join(tones)


def caption_variants(entry: dict[str, Any], tone: str | None = None) -> list[str]:
    """Every caption of one image, built from its emoji.json entry (``tone``: its skin tone's name).

    In this order, duplicates dropped: the lower-cased name, so prompts phrased like the training
    names stay in distribution (emoji.json holds Unicode names: "heavy black heart", not CLDR's
    "red heart"); for a flag named "X Flag" also CLDR's "flag: x"; each short name with underscores
    and hyphens as spaces ("thumbsup", "flag jp"); then the name followed by its subcategory and
    category words ("heavy black heart, heart, smileys & emotion"). A skin tone follows the name
    part of each ("wave: medium skin tone").
    """
    suffix = f": {tone}" if tone else ""
    name = entry["name"].lower()
    names = [name]
    if entry.get("subcategory") in FLAG_SUBCATEGORIES and name.endswith(" flag"):
        names.append("flag: " + name[: -len(" flag")])
    names += [" ".join(short.replace("_", " ").replace("-", " ").split()) for short in entry.get("short_names") or []]
    variants = [n + suffix for n in names if n]
    words = [" ".join(str(entry[k]).lower().replace("-", " ").split()) for k in ("subcategory", "category") if entry.get(k)]
    if words:
        variants.append(", ".join([name + suffix, *words]))
    return list(dict.fromkeys(variants))  # the first of each, in order


def emoji_records(entries: list[dict[str, Any]], images: dict[str, bytes], captions: CaptionStyle = "name",
                  keep_in_train: frozenset[str] = SHOWCASE) -> tuple[list[RawRecord], list[RawRecord]]:
    """(train, validation) records: every Google image of every base emoji and skin-tone variant.

    Every VALIDATION_EVERY-th base emoji goes to validation, unless its unified code is in
    ``keep_in_train``: then the next base emoji not in it goes in its place (the split keeps its size).

    ``captions``: "name" gives each image its lower-cased name (with the skin tone) as its caption;
    "variants" gives each training image the list ``caption_variants`` builds (whose first entry is
    that same name). Validation images keep the name alone either way: a held-out loss measured on
    the names stays comparable between runs trained with and without variants (a deterministic pass
    over list captions would otherwise fix a random variant per image).
    """
    if captions not in CAPTION_STYLES:
        raise ValueError(f"captions={captions!r} must be one of {', '.join(CAPTION_STYLES)}")
    train: list[RawRecord] = []
    val: list[RawRecord] = []
    base = sorted((e for e in entries if e.get("has_img_google")), key=lambda e: e["sort_order"])
    owed = 0  # held-out places due but not yet filled (their emoji was kept in training)
    for n, entry in enumerate(base):
        owed += n % VALIDATION_EVERY == VALIDATION_EVERY - 1
        held_out = owed > 0 and entry["unified"] not in keep_in_train
        owed -= held_out
        split, style = (val, "name") if held_out else (train, captions)
        shared = {"category": entry["category"], "subcategory": entry["subcategory"],
                  "short_names": entry["short_names"], "base": entry["unified"], "sort_order": entry["sort_order"]}
        split.append(_record(entry, _caption(entry, None, style), {**shared, "skin_tone": None}, images))
        for variation, variant in sorted(entry.get("skin_variations", {}).items()):
            if variant.get("has_img_google"):
                tone = skin_tone_name(variation)
                split.append(_record(variant, _caption(entry, tone, style), {**shared, "skin_tone": tone}, images))
    return train, val


def _caption(entry: dict[str, Any], tone: str | None, style: CaptionStyle) -> str | list[str]:
    if style == "name":
        return entry["name"].lower() + (f": {tone}" if tone else "")
    return caption_variants(entry, tone)


def _record(entry: dict[str, Any], caption: str | list[str], metadata: dict[str, Any], images: dict[str, bytes]) -> RawRecord:
    file_name = entry["image"]
    record = RawRecord(key=file_name.rsplit(".", 1)[0], origin=f"{PACKAGE}@{VERSION}", caption=caption,
                       metadata={**metadata, "unified": entry["unified"]})
    record.image = images.get(file_name)
    if record.image is None:
        record.problem = ("missing_file", f"{IMAGE_FOLDER}{file_name} is not in the package")
    return record

"""Every field of every entry point's config shows its own help text in --help.

tyro takes a field's help from the string literal right after it; a field without one silently
gets a comment from above it, and a comment above one field is also given to the fields right
below it ("grouped comments"), which is how `--unet.layers-per-block` once showed the text of
`attention_levels`. So: every field must have its own docstring, tyro must show exactly that, and
no two fields of one config may show the same text.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import textwrap
import types
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def entry_points() -> dict[str, str]:
    """{module: config class} of every command: each file of launch/ and ldm/ that calls parse_config(CLS, ...)."""
    found = {}
    for path in sorted([*(ROOT / "launch").glob("*.py"), *(ROOT / "ldm").glob("*.py")]):
        if path.parent.name == "ldm" and path.name == "cli.py":
            continue
        match = re.search(r"parse_config\(\s*(\w+)", path.read_text(encoding="utf-8"))
        if match:
            found[f"{path.parent.name}.{path.stem}"] = match.group(1)
    return found


ENTRY_POINTS = entry_points()


def _nested_dataclasses(tp) -> list[type]:
    """Dataclass types a field's annotation holds (X, X | None, tuple[X, ...])."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return [tp]
    if typing.get_origin(tp) in (typing.Union, types.UnionType, tuple, list):
        return [c for arg in typing.get_args(tp) for c in _nested_dataclasses(arg)]
    return []


def config_classes() -> list[type]:
    seen: list[type] = []

    def walk(cls: type) -> None:
        if cls in seen:
            return
        seen.append(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            for sub in _nested_dataclasses(hints[f.name]):
                walk(sub)

    for module, name in ENTRY_POINTS.items():
        walk(getattr(importlib.import_module(module), name))
    return seen


def own_docstrings(cls: type) -> dict[str, str | None]:
    """{field: the string literal directly after it in the class body, or None}."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    out: dict[str, str | None] = {}
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            nxt = body[i + 1] if i + 1 < len(body) else None
            is_doc = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)
            out[node.target.id] = nxt.value.value if is_doc else None
    return out


def _norm(text: str | None) -> str:
    return re.sub(r"\s+", " ", text or "").strip()


CLASSES = config_classes()


def test_the_walk_reaches_every_command_and_the_nested_configs():
    assert {"launch.train_vae", "launch.train_ldm", "launch.prepare_data", "launch.evaluate", "launch.demo",
            "launch.import_vae", "ldm.generate"} <= set(ENTRY_POINTS)
    names = {c.__name__ for c in CLASSES}
    assert {"RunConfig", "DataConfig", "UNetConfig", "NoiseScheduleConfig", "DiffusionConfig", "AutoencoderConfig",
            "AutoencoderLossConfig", "DiscriminatorConfig"} <= names


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_field_has_its_own_help(cls):
    from tyro._docstrings import get_field_docstring

    docs = own_docstrings(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    missing = [name for name in fields if not docs.get(name)]
    assert not missing, f"{cls.__name__}: fields without a docstring on the line after them: {missing}"
    shown = {name: _norm(get_field_docstring(cls, name, ())) for name in fields}
    wrong = {name: shown[name] for name in fields if shown[name] != _norm(docs[name])}
    assert not wrong, f"{cls.__name__}: --help shows another text than the field's docstring: {wrong}"
    dupes = {text: [n for n in fields if shown[n] == text] for text in set(shown.values())}
    dupes = {t: ns for t, ns in dupes.items() if len(ns) > 1}
    assert not dupes, f"{cls.__name__}: fields sharing one help text: {dupes}"


def test_help_output_shows_each_fields_own_text(capsys):
    """The rendered --help, for the two fields the issue named."""
    from launch.train_ldm import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = re.sub(r"[│\s]+", " ", capsys.readouterr().out)
    layers = text.split("--unet.layers-per-block INT", 1)[1][:200]
    assert "ResNet" in layers and "Which levels get transformer blocks" not in layers
    prediction = text.split("--diffusion.schedule.prediction-type", 1)[1][:300]
    assert "What the network predicts" in prediction and "Lin et al." not in prediction

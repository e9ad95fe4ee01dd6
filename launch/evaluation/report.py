"""What an evaluation leaves behind: metrics.json, the guidance trade-off plot, and a console summary.

metrics.json (one file per evaluation; every metric is a number or {"skipped": reason})::

    task             "text_to_image" | "autoencoder"
    feature_spaces   {name: {description, dim, weights, notes} | {"skipped": reason}}
    clip_score       {model, definition, weights} | {"skipped": reason}      (text_to_image)
    results          one entry per guidance scale (text_to_image) or one entry (autoencoder):
                     {"fid": {space: value}, "kid": {space: {mean, std, subset_size}}, ...}
    skipped          {"fid/kid [space]": reason, "clip_score": reason, ...}: everything not computed
    notes            what the numbers can and cannot be compared with
    + sampler, steps, seed, seeds, num_images, manifest_id, prompts, real_images, num_processes
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

FID_LABELS = {"inception": "FID (Inception)", "vae": "FD (our autoencoder)", "openclip": "FD (open_clip image)"}


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def collect_skipped(report: dict[str, Any]) -> dict[str, str]:
    """Every metric that was not computed, with its reason, in one flat mapping."""
    out = {}
    for name, label in report.get("feature_spaces", {}).items():
        if "skipped" in label:
            out[f"fid/kid [{name}]"] = label["skipped"]
    for key in ("clip_score", "lpips", "real_images"):
        value = report.get(key)
        if isinstance(value, dict) and "skipped" in value:
            out[key] = value["skipped"]
    for row in report.get("results", []):
        for metric in ("fid", "kid"):
            for name, value in row.get(metric, {}).items():
                if isinstance(value, dict) and "skipped" in value and f"fid/kid [{name}]" not in out:
                    out[f"{metric} [{name}]"] = value["skipped"]
    return out


def plot_tradeoff(report: dict[str, Any], out: Path) -> Path | None:
    """FID against CLIP score across guidance scales, one panel per feature space (the Imagen / SD
    trade-off plot); FID against guidance scale when there is no CLIP score. None: nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    spaces = [s for s in report["feature_spaces"] if any(is_number(r["fid"].get(s)) for r in rows)]
    if not spaces:
        return None
    with_clip = all(is_number(r.get("clip_score")) for r in rows)
    fig, axes = plt.subplots(1, len(spaces), figsize=(max(6.4, 4.4 * len(spaces)), 4.0), squeeze=False)
    for ax, space in zip(axes[0], spaces):
        points = [(r["clip_score"] if with_clip else r["guidance_scale"], r["fid"][space], r["guidance_scale"])
                  for r in rows if is_number(r["fid"].get(space))]  # fmt: skip
        xs, ys, _ = zip(*points)
        ax.plot(xs, ys, "o-", lw=1.2)
        for x, y, g in points:
            ax.annotate(f"w={g:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(f"CLIP score ({report['clip_score']['model']})" if with_clip else "guidance scale")
        ax.set_ylabel(FID_LABELS.get(space, space))
        ax.grid(alpha=0.3)
    title = ("FID vs CLIP score across guidance scales" if with_clip
             else "Fréchet distance vs guidance scale: CLIP score unavailable (see metrics.json)")
    fig.suptitle(f"{title}\n{report.get('num_real', 0)} real / {rows[0].get('num_generated', 0)} generated images, "
                 f"{report['sampler']}, {report['steps']} steps", fontsize=9)  # fmt: skip
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A few lines for the console: the numbers per row, then every skipped metric and why."""
    lines = []
    for row in report["results"]:
        head = f"guidance {row['guidance_scale']:g}: " if "guidance_scale" in row else ""
        parts = [f"{FID_LABELS.get(s, s)} {v:.3f}" for s, v in row.get("fid", {}).items() if is_number(v)]
        parts += [f"KID[{s}] {v['mean']:.4f}" for s, v in row.get("kid", {}).items() if "mean" in v]
        parts += [f"{k} {row[k]:.3f}" for k in ("clip_score", "psnr", "ssim", "lpips") if is_number(row.get(k))]
        lines.append(head + (", ".join(parts) or "no metric computed"))
    lines += [f"skipped {name}: {reason}" for name, reason in report["skipped"].items()]
    return lines

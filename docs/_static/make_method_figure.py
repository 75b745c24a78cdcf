"""Draw the Gene-DML overview figure of docs/method.md (``docs/_static/method_overview.png``).

Run once from the repository root after changing the figure, and commit the PNG:

    python docs/_static/make_method_figure.py

The H&E crops come from the HER2ST demo section B4 shipped with the package (no network).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

import genedml_sd as gd

OUT = Path(__file__).with_name("method_overview.png")

# colours: image pathway blue, gene pathway orange, losses red, frozen grey
C_IMG, C_IMG_DARK = "#dbe9f6", "#2f6ea6"
C_GENE, C_GENE_DARK = "#fde6cf", "#c0661a"
C_LOSS = "#b8323a"
C_FROZEN = "#e6e6e6"
C_FUSE = "#e3f1e0"
C_FUSE_DARK = "#3c8a3a"


def box(ax, x, y, w, h, text, face, edge, *, size=9.5, weight="normal", style="round,pad=0,rounding_size=0.012"):
    """A rounded box with centred text; (x, y) is the lower-left corner in axes units."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=style, fc=face, ec=edge, lw=1.3, zorder=2))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, weight=weight, zorder=3, wrap=True)


def arrow(ax, start, end, color="0.25", *, style="-|>", lw=1.3, ls="-", rad=0.0, text=None, text_offset=(0, 0.012)):
    """Draw an arrow from ``start`` to ``end`` (axes fraction), optionally labelled."""
    ax.add_patch(
        FancyArrowPatch(
            start,
            end,
            arrowstyle=style,
            mutation_scale=11,
            color=color,
            lw=lw,
            ls=ls,
            connectionstyle=f"arc3,rad={rad}",
            zorder=1,
        )
    )
    if text:
        mx, my = (start[0] + end[0]) / 2 + text_offset[0], (start[1] + end[1]) / 2 + text_offset[1]
        ax.text(mx, my, text, ha="center", va="bottom", fontsize=9.5, color=color, zorder=3)


def slide_crops():
    """Whole-slide thumbnail with spots, and the neighbour (560 µm) and local (112 µm) crops of one spot."""
    (b4,) = gd.datasets.her2st_demo(["B4"])
    image = b4["B4_he"]
    um0 = gd.io.get_pixel_size(b4, "B4_he")
    full = np.moveaxis(np.asarray(image["scale0"]["image"].values), 0, -1)
    thumb = np.moveaxis(np.asarray(image["scale2"]["image"].values), 0, -1)
    from genedml_sd._spatial import spots_to_pixels

    xy = spots_to_pixels(b4, "B4_spots", "B4_he", 0)  # spot centres in scale0 pixels
    centre = xy.mean(axis=0)
    pick = xy[np.argmin(((xy - centre) ** 2).sum(axis=1))]

    def crop(side_um):
        half = int(round(side_um / um0 / 2))
        cx, cy = int(round(pick[0])), int(round(pick[1]))
        return full[cy - half : cy + half, cx - half : cx + half]

    scale_thumb = full.shape[1] / thumb.shape[1]
    return thumb, xy / scale_thumb, pick / scale_thumb, crop(560.0), crop(112.0), um0 * scale_thumb


def _trim(path: Path, margin: int = 12) -> None:
    """Crop the white border of a PNG (the drawing axes span the whole figure)."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    ink = np.asarray(image.convert("L")) < 250
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    box = (
        max(cols[0] - margin, 0),
        max(rows[0] - margin, 0),
        min(cols[-1] + margin + 1, image.width),
        min(rows[-1] + margin + 1, image.height),
    )
    image.crop(box).save(path, optimize=True)


def main() -> None:
    """Render the overview figure to ``method_overview.png`` next to this script."""
    thumb, spots_t, pick_t, neigh, local, um_thumb = slide_crops()

    fig = plt.figure(figsize=(11.5, 6.6), dpi=150)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")

    # ---------------------------------------------------------------- inputs at three scales
    ax.text(0.015, 0.915, "Inputs per spot (three scales)", fontsize=12.5, weight="bold", va="top")
    rows = {"local": 0.72, "neighbour": 0.51, "global": 0.30}  # vertical centres of the three rows
    size = 0.165  # image panel height in figure units
    aspect = fig.get_figwidth() / fig.get_figheight()

    def image_axes(yc, w_over_h=1.0):
        h = size
        w = h * w_over_h / aspect
        return fig.add_axes([0.03, yc - h / 2, w, h]), w

    a_local, w_local = image_axes(rows["local"])
    a_local.imshow(local)
    a_local.set_xticks([])
    a_local.set_yticks([])
    for s in a_local.spines.values():
        s.set_color(C_IMG_DARK)
        s.set_linewidth(2)

    a_nb, w_nb = image_axes(rows["neighbour"])
    a_nb.imshow(neigh)
    n = neigh.shape[0]
    for k in range(1, 5):
        a_nb.axhline(k * n / 5, color="w", lw=0.9)
        a_nb.axvline(k * n / 5, color="w", lw=0.9)
    a_nb.add_patch(Rectangle((2 * n / 5, 2 * n / 5), n / 5, n / 5, fill=False, ec=C_IMG_DARK, lw=2))
    a_nb.set_xticks([])
    a_nb.set_yticks([])

    th_aspect = thumb.shape[1] / thumb.shape[0]
    a_gl, w_gl = image_axes(rows["global"], th_aspect)
    a_gl.imshow(thumb)
    a_gl.scatter(spots_t[:, 0], spots_t[:, 1], s=2.5, c="#1f1f1f", alpha=0.6, lw=0)
    a_gl.scatter([pick_t[0]], [pick_t[1]], s=28, facecolor="none", edgecolor=C_IMG_DARK, lw=1.8)
    a_gl.set_xticks([])
    a_gl.set_yticks([])

    labels = {
        "local": "local tile\n112 µm",
        "neighbour": "5 x 5 grid\n560 µm",
        "global": "global:\nall spots",
    }
    x_label = 0.03 + max(w_local, w_nb, w_gl) + 0.008
    for key, yc in rows.items():
        ax.text(x_label, yc, labels[key], fontsize=10, va="center")

    # ---------------------------------------------------------------- frozen encoder
    enc_x, enc_w = 0.255, 0.09
    box(
        ax,
        enc_x,
        0.22,
        enc_w,
        0.64,
        "frozen\nencoder\n(UNI,\nViT-L/16)\n\none vector\nper tile\n\ncached\non disk",
        C_FROZEN,
        "0.35",
        size=10.5,
    )
    for yc in rows.values():
        arrow(ax, (x_label + 0.07, yc), (enc_x - 0.004, yc))

    # ---------------------------------------------------------------- per-scale projections
    px, pw, ph = 0.385, 0.16, 0.1
    proj_text = {
        "local": "Linear(D, 512)",
        "neighbour": "Linear + 5x5 position\n2 x self-attention\nmean pool, Linear",
        "global": "Linear + µm position\ntransformer over\nall N spots, Linear",
    }
    dims = {"local": "1 x D", "neighbour": "25 x D", "global": "N x D"}
    ax.text(px + pw / 2, 0.915, "Per-scale projection", fontsize=12.5, weight="bold", ha="center", va="top")
    for key, yc in rows.items():
        box(ax, px, yc - ph / 2, pw, ph, proj_text[key], C_IMG, C_IMG_DARK, size=10.5)
        arrow(ax, (enc_x + enc_w + 0.004, yc), (px - 0.004, yc), text=dims[key])

    # ---------------------------------------------------------------- fusion
    fx, fw = 0.585, 0.105
    ax.text(fx + fw / 2, 0.915, "Scale fusion", fontsize=12.5, weight="bold", ha="center", va="top")
    box(ax, fx, 0.22, fw, 0.64, "", C_FUSE, C_FUSE_DARK)
    ax.text(fx + fw / 2, 0.85, "self-attention\nover the 3\nscale tokens", ha="center", va="top", fontsize=10)
    token_names = {"local": "I'$_L$", "neighbour": "I'$_N$", "global": "I'$_G$"}
    for key, yc in rows.items():
        arrow(ax, (px + pw + 0.004, yc), (fx - 0.004, yc), text="I$_" + key[0].upper() + "$")
        box(ax, fx + 0.025, yc - 0.032, fw - 0.05, 0.064, token_names[key], "white", C_FUSE_DARK, size=10)

    # ---------------------------------------------------------------- head
    hx, hw = 0.725, 0.125
    ax.text(hx + hw / 2, 0.915, "Prediction", fontsize=12.5, weight="bold", ha="center", va="top")
    box(ax, hx, 0.425, hw, 0.17, "head\nconcat, Linear\n→ G genes", C_IMG, C_IMG_DARK, size=10.5)
    arrow(ax, (fx + fw + 0.004, 0.51), (hx - 0.004, 0.51))
    box(ax, 0.88, 0.445, 0.105, 0.13, "predicted\nexpression\n(G genes)", "white", C_IMG_DARK, size=10.5)
    arrow(ax, (hx + hw + 0.004, 0.51), (0.876, 0.51))
    ax.text(0.9325, 0.43, "L$_{pred}$ = MSE", color=C_LOSS, ha="center", va="top", fontsize=10.5, weight="bold")

    # ---------------------------------------------------------------- gene pathway (training only)
    gy = 0.025
    gh = 0.115
    ax.text(0.015, 0.19, "Gene pathway (training only)", fontsize=12.5, weight="bold", va="top", color=C_GENE_DARK)
    box(ax, 0.015, gy, 0.165, gh, "measured\nexpression\n(G genes)", C_GENE, C_GENE_DARK, size=10.5)
    box(
        ax,
        0.215,
        gy,
        0.30,
        gh,
        "gene encoder: MLP + FFN\n→ gene embedding E (512-d)",
        C_GENE,
        C_GENE_DARK,
        size=10.5,
    )
    arrow(ax, (0.184, gy + gh / 2), (0.211, gy + gh / 2))

    # losses
    lx, lw_ = 0.585, 0.40
    box(
        ax,
        lx,
        gy,
        lw_,
        gh + 0.045,
        "",
        "#fbeaea",
        C_LOSS,
    )
    ax.text(
        lx + 0.012,
        gy + gh + 0.03,
        "multi-scale instance loss: each scale token I'$_s$\n"
        "    vs. gene embedding E (soft-target contrastive)\n"
        "cross-level instance-group loss: image vs. gene\n"
        "    k-means clusters of the batch (k = 18)\n"
        "total = instance + 0.8 x group + MSE",
        fontsize=10,
        va="top",
        color="0.1",
    )
    arrow(ax, (0.519, gy + gh / 2), (lx - 0.004, gy + gh / 2), color=C_GENE_DARK, text="E")
    arrow(ax, (fx + fw / 2, 0.216), (fx + fw / 2, gy + gh + 0.049), color=C_FUSE_DARK, text=None)
    ax.text(fx + fw / 2 + 0.008, 0.203, "I'$_L$, I'$_N$, I'$_G$", color=C_FUSE_DARK, fontsize=9.5, va="center")

    fig.savefig(OUT, dpi=150, facecolor="white")
    _trim(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

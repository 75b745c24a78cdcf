"""Build the small HER2ST demo shipped in ``genedml_sd/datasets/data/her2st_demo``.

Run from the repository root with the full data next to it::

    python scripts/make_her2st_demo.py ../shared/data/her2st

For each section: crop the H&E to the spots' bounding box plus a 300 µm margin (the neighbour region
reaches 280 µm from a spot centre), downscale by 2 (0.69 -> ~1.38 µm/px), save as JPEG (quality 75),
rewrite the spot file's pixel positions relative to the crop (still in original-image pixels, so the
index's ``coord_to_image_scale`` is the downscale factor), and keep the genes detected in >= 10 % of
the spots of at least one demo section (so the default gene selection,
which needs >= 10 % detection in the training spots, sees every candidate).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

SECTIONS = ["B4", "C2", "C3", "C4"]
DOWNSCALE = 2
MARGIN_UM = 300.0
MIN_DETECTION = 0.10
OUT = Path(__file__).resolve().parents[1] / "src" / "genedml_sd" / "datasets" / "data" / "her2st_demo"


def main(src: Path) -> None:
    """Write the demo folder from the HER2ST folder ``src``."""
    Image.MAX_IMAGE_PIXELS = None
    index = pd.read_csv(src / "sections.csv", index_col="section")
    counts = {s: pd.read_csv(src / index.loc[s, "counts_path"], sep="\t", index_col=0) for s in SECTIONS}
    keep = sorted(set().union(*[c.columns[(c > 0).mean() >= MIN_DETECTION] for c in counts.values()]))
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in SECTIONS:
        m = index.loc[s]
        sel = pd.read_csv(src / m.spotfile_path, sep="\t")
        margin = MARGIN_UM / m.um_per_px_original  # original px
        x0 = max(int(sel.pixel_x.min() - margin), 0)
        y0 = max(int(sel.pixel_y.min() - margin), 0)
        with Image.open(src / m.image_path) as im:
            x1 = min(int(sel.pixel_x.max() + margin), im.width)
            y1 = min(int(sel.pixel_y.max() + margin), im.height)
            crop = im.crop((x0, y0, x1, y1))
            small = crop.resize(((x1 - x0) // DOWNSCALE, (y1 - y0) // DOWNSCALE), Image.Resampling.LANCZOS)
        scale_x, scale_y = small.width / (x1 - x0), small.height / (y1 - y0)
        small.save(OUT / f"{s}.jpg", quality=75)
        sel["pixel_x"] = sel.pixel_x - x0
        sel["pixel_y"] = sel.pixel_y - y0
        sel.to_csv(OUT / f"{s}_selection.tsv", sep="\t", index=False)
        c = counts[s].reindex(columns=keep, fill_value=0).astype(np.int32)
        c.to_csv(OUT / f"{s}.tsv.gz", sep="\t", compression={"method": "gzip", "mtime": 0})
        rows.append(
            {
                "section": s,
                "patient": s[0],
                "has_image": True,
                "image_path": f"{s}.jpg",
                "counts_path": f"{s}.tsv.gz",
                "spotfile_path": f"{s}_selection.tsv",
                "coord_to_image_scale_x": round(scale_x, 6),
                "coord_to_image_scale_y": round(scale_y, 6),
                "crop_origin_x_original_px": x0,
                "crop_origin_y_original_px": y0,
                "um_per_px_image": round(m.um_per_px_original / scale_x, 4),
            }
        )
        print(s, small.size, f"{(OUT / f'{s}.jpg').stat().st_size / 1e6:.2f} MB")
    pd.DataFrame(rows).to_csv(OUT / "sections.csv", index=False)
    print(f"{len(keep)} genes kept; total {sum(p.stat().st_size for p in OUT.iterdir()) / 1e6:.1f} MB in {OUT}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

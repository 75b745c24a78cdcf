"""Write the encoder table of docs/encoders.md from the registry (``--check``: fail if it is stale).

Usage: ``python scripts/encoder_table.py [--check]``. The table sits between the markers
``<!-- encoder-table:start -->`` and ``<!-- encoder-table:end -->``; tests/test_encoder_zoo.py
checks that it matches :func:`genedml_sd.encoders.list_encoders`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "encoders.md"
START, END = "<!-- encoder-table:start -->", "<!-- encoder-table:end -->"
_NAMED = {
    (0.485, 0.456, 0.406): "ImageNet",
    (0.5, 0.5, 0.5): "0.5",
    (0.48145466, 0.4578275, 0.40821073): "OpenAI CLIP",
    (0.0, 0.0, 0.0): "none",
}


def _norm(mean: tuple[float, ...], std: tuple[float, ...]) -> str:
    name = _NAMED.get(tuple(mean))
    if name is not None and not (name == "0.5" and tuple(std) != (0.5, 0.5, 0.5)):
        return name
    return f"mean ({', '.join(map(str, mean))}), std ({', '.join(map(str, std))})"


def _yes(v: object) -> str:
    return "not stated" if v is None else ("yes" if v else "no")


def _pool(pool: str, builder: str, pools: dict[str, str]) -> str:
    if pool == "token" and builder != "timm":
        return "model output"  # e.g. CONCH's attentional pooler, stain-texture's descriptors
    return pools.get(pool, pool)


def render() -> str:
    """The markdown table of the package's encoders (width, input, pooling, normalisation, licence).

    Only the default entries: encoders registered at run time (by users, or by tests) are not listed.
    """
    from genedml_sd.encoders import list_encoders
    from genedml_sd.encoders._zoo import ZOO

    df = list_encoders().loc[[spec.name for spec, _ in ZOO]]
    pools = {"token": "class token", "avg": "average", "cls+mean": "class + mean patch"}
    lines = [
        "| name | D | input px | pooling | normalisation | licence | gated | commercial use |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in df.iterrows():
        lines.append(
            f"| `{name}` | {r['embed_dim']} | {r['input_px']} | {_pool(r['pool'], r['builder'], pools)} | "
            f"{_norm(r['mean'], r['std'])} | {r['licence'] or 'not stated'} | {_yes(r['gated'])} | "
            f"{_yes(r['commercial'])} |"
        )
    return "\n".join(lines)


def current(text: str) -> str:
    """The table currently between the markers of ``text``."""
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def main(argv: list[str] | None = None) -> int:
    """Rewrite (or, with ``--check``, verify) the table in docs/encoders.md."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the table is stale")
    args = parser.parse_args(argv)
    text = DOC.read_text()
    table = render()
    if args.check:
        stale = current(text) != table
        if stale:
            print(f"{DOC} is stale: run python scripts/encoder_table.py", file=sys.stderr)
        return int(stale)
    head, rest = text.split(START, 1)
    DOC.write_text(f"{head}{START}\n{table}\n{END}{rest.split(END, 1)[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where corr_top's LMVSD masks fall for each kind of RefShapes expression, on a given CLIP.

    .venv/bin/python benchmarks/mask_hits.py --weights data/pretrained/tiny-rn-refshapes.pt --json mask_hits.json

For every val expression of `data/prepared/refshapes` it draws the corr_top mask exactly as the
LMVSD branch does (`correlation_cells`: 50 % of 12 px cells, scored against the expression's
sentence feature) on the value-path and on the attention-pool features, and reports the hit rate
(masked area on the referred object / masked area) against chance (the object's share of the
image), per kind of expression: attributes only ("the large red circle"), positional ("the
leftmost shape") and relational ("the square left of the red circle"). The zero-shot `mask_hit` of
the `pretrain` stage uses the object's own attribute phrase instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch

from cmmasksd.data import PreparedSplit, RefSegDataset
from cmmasksd.data.refshapes import parse
from cmmasksd.model.factory import create_clip
from cmmasksd.model.backbone import ClipBackbone
from cmmasksd.model.mask_stats import MaskStats
from cmmasksd.model.masksd import cell_grid, correlation_cells


def kind_of(text: str) -> str:
    query = parse(text)
    return "relational" if query.relation else "positional" if query.positional else "attributes"


@torch.no_grad()
def mask_hits(weights: str | None, prepared: Path, clip_name: str, cell: int, ratio: float) -> dict:
    clip = create_clip(clip_name, weights).eval()  # registers the tiny CLIP configs; loads a local file strictly
    backbone = ClipBackbone(clip)
    split = PreparedSplit(prepared)
    texts = pd.read_parquet(prepared / "sentences.parquet")["text"].tolist()
    kinds = [kind_of(t) for t in texts]
    stats: dict[tuple[str, str], MaskStats] = {}
    loader = torch.utils.data.DataLoader(RefSegDataset(split, train=False), batch_size=128)
    for batch in loader:
        vis, txt = backbone.encode_image(batch["image"]), backbone.encode_text(batch["tokens"])
        batch_kinds = [kinds[i] for i in batch["sentence_idx"].tolist()]
        for features, dense in (("values", vis.values), ("attention", vis.joint)):
            cells = correlation_cells(dense, txt.sentence, cell_grid(vis.grid, backbone.patch_stride, cell), ratio,
                                      "corr_top", 1.0)
            for kind in ("all", *set(batch_kinds)):
                keep = torch.tensor([kind in ("all", k) for k in batch_kinds])
                stats.setdefault((features, kind), MaskStats()).add_lmvsd(cells[keep], batch["mask"][keep])
    counts = pd.Series(kinds).value_counts().to_dict()
    return {"weights": weights, "cell": cell, "ratio": ratio, "expressions": {"all": len(kinds), **counts},
            "hits": {f"{features}/{kind}": {k.removeprefix("mask/lmvsd_"): round(v, 4) for k, v in s.metrics().items()}
                     for (features, kind), s in sorted(stats.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="data/pretrained/tiny-rn-refshapes.pt", help="'none' for random init")
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared/refshapes/val"))
    parser.add_argument("--clip", default="tiny-rn")
    parser.add_argument("--cell", type=int, default=12)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    result = mask_hits(None if args.weights == "none" else args.weights, args.prepared, args.clip, args.cell, args.ratio)
    for name, hit in result["hits"].items():
        print(f"{name:22s} hit {hit['hit']:.4f}  chance {hit['chance']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

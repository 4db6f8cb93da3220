"""The per-kind table: every variant's mIoU on each kind of expression, against CRIS on the same kind.

Guided masks should help where the words name what the object looks like (RefShapes' `attribute`
expressions) more than where they name where it is (`positional`, `relational`); one overall number
hides that. The kinds come with each trial's per-expression table (`cmmasksd.data.kinds`); each
cell's interval is that of `cmmasksd.stats` on the kind's expressions alone (seeds x images), so a
kind with few expressions gets the wide interval it deserves. Real data has one kind: no table.
"""

from __future__ import annotations

import pandas as pd

from cmmasksd.metrics import ious
from cmmasksd.stats import compare_tables, seed_summary
from pipeline.report.load import KIND_COLUMN
from pipeline.report.tables import LONG_COLUMNS, Section, Sweep, long_table

KINDS_TABLE = "kinds"


def kinds_section(sweep: Sweep) -> Section | None:
    """mIoU (mean, std over seeds) per variant, split and kind; the delta to CRIS with its interval.
    None when the trials logged no kinds or only one."""
    records = []
    for split in sweep.splits:
        base = long_table(sweep.baseline, split) if sweep.baseline else None
        for variant in sweep.ordered():
            long = long_table(variant, split)
            if long is None or KIND_COLUMN not in long:
                return None
            for kind in sorted(long[KIND_COLUMN].unique()):
                rows = long[long[KIND_COLUMN] == kind]
                per_seed = rows.assign(iou=ious(rows["inter"].to_numpy(), rows["union"].to_numpy()))
                mean, std = seed_summary(per_seed.groupby("seed")["iou"].mean())
                record = {"table": KINDS_TABLE, "split": split, "row": variant.name, "col": kind,
                          "variant": variant.name, "metric": "miou", "mean": mean, "std": std,
                          "n": len(variant.seeds), "best": False}
                if base is not None and variant is not sweep.baseline and KIND_COLUMN in base:
                    result = compare_tables(base[base[KIND_COLUMN] == kind], rows, metrics=("miou",),
                                            n_boot=sweep.n_boot, seed=sweep.seed)["miou"]
                    record |= {k: getattr(result, k) for k in ("delta", "ci_low", "ci_high", "p_value", "significant",
                                                               "seed_variance_measured", "boot_low", "boot_high",
                                                               "p_boot", "t_low", "t_high")}
                records.append(record)
    table = pd.DataFrame(records).reindex(columns=LONG_COLUMNS)
    if table.empty or table["col"].nunique() < 2:
        return None
    return Section(KINDS_TABLE, "mIoU per expression kind", table)


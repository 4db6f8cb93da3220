"""Expression kinds, so that diagnostics and mIoU can be read per kind of expression.

On RefShapes the generator's grammar says how an expression names its object: by attributes alone
("the small red circle", "the larger square"), by an extreme position ("the leftmost circle"), or
by a relation to another object ("the circle left of the square"). Masks guided by CLIP's
sentence-patch similarity should help the first kind most. Real data has no such labels: every
expression there is one kind, `all`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cmmasksd.data.refshapes import Query, parse

REFSHAPES_KINDS = ("attribute", "positional", "relational")
ONE_KIND = ("all",)


def kind_of(query: Query) -> str:
    if query.relation is not None:
        return "relational"
    return "positional" if query.extreme is not None else "attribute"


def expression_kinds(texts: Sequence[str]) -> tuple[tuple[str, ...], np.ndarray]:
    """(kind names, each text's index into them): RefShapes' kinds when every text is in its grammar,
    else the one kind `all`."""
    try:
        kinds = [kind_of(parse(text)) for text in texts]
    except ValueError:
        return ONE_KIND, np.zeros(len(texts), dtype=np.int64)
    return REFSHAPES_KINDS, np.array([REFSHAPES_KINDS.index(k) for k in kinds], dtype=np.int64)

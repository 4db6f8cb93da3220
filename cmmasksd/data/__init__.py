"""Data: the refer annotation layout, RefShapes, letterboxing, the prepared format, datasets."""

from cmmasksd.data.dataset import RefSegDataset
from cmmasksd.data.letterbox import LetterboxMeta, letterbox_image, letterbox_mask, unletterbox
from cmmasksd.data.prepared import (
    PrepareReport,
    clip_tokenizer,
    format_reports,
    prepare_dataset,
    prepare_split,
)
from cmmasksd.data.refer import (
    CountCheck,
    Refer,
    ReferFormatError,
    ReferObject,
    ReferSample,
    check_official_counts,
    format_count_checks,
)
from cmmasksd.data.refshapes import RefShapesConfig, generate_refshapes, refshapes_stats
from cmmasksd.data.safe_pickle import UnsafePickleError, load_pickle
from cmmasksd.data.sampler import EpochBatchSampler, epoch_order
from cmmasksd.data.split import PreparedSplit

__all__ = [
    "CountCheck",
    "EpochBatchSampler",
    "LetterboxMeta",
    "PrepareReport",
    "PreparedSplit",
    "RefSegDataset",
    "RefShapesConfig",
    "Refer",
    "ReferFormatError",
    "ReferObject",
    "ReferSample",
    "UnsafePickleError",
    "check_official_counts",
    "clip_tokenizer",
    "epoch_order",
    "format_count_checks",
    "format_reports",
    "generate_refshapes",
    "letterbox_image",
    "letterbox_mask",
    "load_pickle",
    "prepare_dataset",
    "prepare_split",
    "refshapes_stats",
    "unletterbox",
]

"""The real datasets the project knows, one entry each (shared/spec/data.md).

An entry says where a refer dataset's annotations come from (mirrors and checks), its published
split sizes (checked after preprocessing), and the published mIoU the report shows beside ours.
Adding a dataset is one entry here, plus its `preprocess.<name>` settings in params.yaml (the
image size and text length are experiment choices, not facts about the data). The COCO train2014
images that every refer dataset links to are one more source, `IMAGES`.

The checksums of the refer zips are third-party figures: params.yaml may override mirrors and
checks per source (`cmmasksd.io.with_settings`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cmmasksd.data.refer import COUNT_KINDS
from cmmasksd.io.sources import Source

_REFER_HOST = "https://bvisionweb1.cs.unc.edu/licheng/referit/data"

SplitSizes = dict[str, dict[str, int | None]]  # split -> {refs, images, expressions}; None: not published


def _counts(refs: int, images: int, expressions: int | None) -> dict[str, int | None]:
    return dict(zip(COUNT_KINDS, (refs, images, expressions)))


def refer_zip(name: str, archive_stamp: str, size: int, sha256: str, splits: tuple[str, ...]) -> Source:
    """A refer annotation zip: the original host (offline since 2022), then its web-archive copy."""
    url = f"{_REFER_HOST}/{name}.zip"
    return Source(name=name, urls=(url, f"https://web.archive.org/web/{archive_stamp}id_/{url}"), sha256=sha256,
                  md5=None, size=size, archive_root=name,
                  expected_files=("instances.json", *(f"refs({split}).p" for split in splits)))


@dataclass(frozen=True)
class Dataset:
    """One refer dataset: its annotation source and what was published about it."""

    source: Source
    split_sizes: dict[str, SplitSizes] = field(default_factory=dict)  # split_by -> published sizes
    published_miou: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> split -> mIoU (%)

    @property
    def name(self) -> str:
        return self.source.name


# Published mIoU: CRIS (CVPR 2022, CLIP RN101) and CM-MaskSD (TMM 2024, as quoted by secondary sources,
# whose mIoU/oIoU labels are mixed).
DATASETS: dict[str, Dataset] = {
    dataset.name: dataset
    for dataset in (
        Dataset(
            refer_zip("refcoco", "20220413011718", 53_993_993,
                      "7f924bb7ed8dc4568058e4ff626281918d56e5206f4c868c5a80f088f38c8bf0", ("unc", "google")),
            {"unc": {"train": _counts(42_404, 16_994, 120_624), "val": _counts(3_811, 1_500, 10_834),
                     "testA": _counts(1_975, 750, 5_657), "testB": _counts(1_810, 750, 5_095)}},
            {"CRIS (RN101)": {"val": 70.47, "testA": 73.18, "testB": 66.10},
             "CM-MaskSD": {"val": 74.89, "testA": 77.54, "testB": 71.28}},
        ),
        Dataset(
            refer_zip("refcoco+", "20220413011656", 45_613_210,
                      "5f1238112d63199e68da54a28f201471909b21ded7ed79a57d51b4c1443c6b45", ("unc",)),
            {"unc": {"train": _counts(42_278, 16_992, 120_191), "val": _counts(3_805, 1_500, 10_758),
                     "testA": _counts(1_975, 750, 5_726), "testB": _counts(1_798, 750, 4_889)}},
            {"CRIS (RN101)": {"val": 62.27, "testA": 68.08, "testB": 53.68},
             "CM-MaskSD": {"val": 67.47, "testA": 71.80, "testB": 59.91}},
        ),
        Dataset(
            refer_zip("refcocog", "20220413012904", 56_712_951,
                      "3d1f7e5b2ff2205940bf59de55f861f5f2cc1403fb980669933a7f9af1aa8211", ("umd", "google")),
            {"umd": {"train": _counts(42_226, 21_899, 80_512), "val": _counts(2_573, 1_300, 4_896),
                     "test": _counts(5_023, 2_600, 9_602)},
             "google": {"train": _counts(44_822, 24_698, None), "val": _counts(5_000, 4_650, None)}},
            {"CRIS (RN101)": {"val": 59.87, "test": 60.36}, "CM-MaskSD": {"val": 66.53, "test": 66.63}},
        ),
    )
}

IMAGES = Source(
    name="coco_train2014",
    urls=("http://images.cocodataset.org/zips/train2014.zip",),
    sha256=None,
    md5="0da8c0bd3d6becc4dcb32757491aca88",
    size=None,  # about 13 GB; the MD5 is the authoritative check
    archive_root="train2014",
    # 82,783 images: check the first one, which tells train2014 from any other folder.
    expected_files=("COCO_train2014_000000000009.jpg",),
)

SOURCES: dict[str, Source] = {**{name: d.source for name, d in DATASETS.items()}, IMAGES.name: IMAGES}


def get_source(name: str) -> Source:
    """The catalogue's source `name`, with an error that lists the known names."""
    try:
        return SOURCES[name]
    except KeyError:
        raise KeyError(f"unknown data source {name!r}; known: {', '.join(SOURCES)}") from None


def split_sizes(dataset: str, split_by: str) -> SplitSizes | None:
    """The published split sizes of `dataset` split by `split_by`; None where none were published."""
    entry = DATASETS.get(dataset)
    return entry.split_sizes.get(split_by) if entry else None

import json
import pickle

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from cmmasksd.data.refer import Refer, ReferFormatError
from cmmasksd.data.safe_pickle import load_pickle

SQUARE = [2.0, 2.0, 6.0, 2.0, 6.0, 6.0, 2.0, 6.0]
OTHER_SQUARE = [10.0, 1.0, 14.0, 1.0, 14.0, 5.0, 10.0, 5.0]


def _write_layout(root, annotations, refs, height=8, width=16):
    root.mkdir(exist_ok=True)
    image = {"id": 7, "file_name": "COCO_train2014_000000000007.jpg", "height": height, "width": width}
    instances = {"images": [image],
                 "annotations": annotations, "categories": [{"id": 1, "name": "thing", "supercategory": "x"}]}
    (root / "instances.json").write_text(json.dumps(instances))
    (root / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))


def _ann(ann_id, segmentation):
    return {"id": ann_id, "image_id": 7, "category_id": 1, "segmentation": segmentation, "bbox": [0, 0, 1, 1],
            "area": 1.0, "iscrowd": 0}


def _ref(ref_id, ann_id, split="train", sentences=None):
    sentences = sentences or [{"tokens": ["a"], "raw": "A thing", "sent": "a thing", "sent_id": 10 * ref_id}]
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": 7, "category_id": 1, "split": split,
            "sent_ids": [s["sent_id"] for s in sentences], "file_name": f"COCO_train2014_000000000007_{ann_id}.jpg",
            "sentences": sentences}


def test_refshapes_objects_and_samples(refshapes_root):
    refer = Refer(refshapes_root, "unc")
    refs = load_pickle(refshapes_root / "refs(unc).p")
    assert refer.splits() == ["testA", "testB", "train", "val"]
    objects = refer.objects("val")
    val_refs = [r for r in refs if r["split"] == "val"]
    assert [o.ref_id for o in objects] == [r["ref_id"] for r in val_refs]
    samples = refer.samples("val")
    assert len(samples) == sum(len(r["sentences"]) for r in val_refs)
    first = samples[0]
    assert first.sentence == val_refs[0]["sentences"][0]["sent"]
    assert first.file_name == f"COCO_train2014_{first.image_id:012d}.jpg"  # from instances.json, not the ref
    assert refer.image_path(first).is_file()
    mask = refer.mask(first.ann_id)
    assert mask.dtype == bool and mask.shape == (first.height, first.width) and mask.any()
    with pytest.raises(KeyError, match="no split 'test'"):
        refer.objects("test")


def test_polygons_union_and_rle_forms_agree(tmp_path):
    polygons = [SQUARE, OTHER_SQUARE]
    expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, 8, 16))).astype(bool)
    compressed = mask_utils.encode(np.asfortranarray(expected.astype(np.uint8)))
    uncompressed_counts, run, value = [], 0, False
    for pixel in expected.flatten(order="F"):  # column-major runs, starting with zeros
        if pixel != value:
            uncompressed_counts.append(run)
            run, value = 0, pixel
        run += 1
    uncompressed_counts.append(run)
    annotations = [
        _ann(1, polygons),
        _ann(2, {"size": [8, 16], "counts": compressed["counts"].decode()}),
        _ann(3, {"size": [8, 16], "counts": uncompressed_counts}),
        _ann(4, [SQUARE, [1.0, 1.0, 3.0, 3.0]]),  # a 2-point "polygon" (would be read as a bbox) is ignored
    ]
    _write_layout(tmp_path / "d", annotations, [_ref(i, i) for i in range(1, 5)])
    refer = Refer(tmp_path / "d", "unc")
    for ann_id in (1, 2, 3):
        np.testing.assert_array_equal(refer.mask(ann_id), expected)
        rle = refer.rle(ann_id)
        assert isinstance(rle["counts"], str) and json.loads(json.dumps(rle)) == rle
    assert refer.mask(1).sum() == expected.sum() > refer.mask(4).sum() > 0


def test_sentence_falls_back_to_raw_and_decodes_python2_utf8(tmp_path):
    sentences = [{"tokens": ["x"], "raw": "the big one", "sent_id": 1},
                 {"tokens": ["x"], "raw": "", "sent": "caf\xc3\xa9 table", "sent_id": 2}]  # py2 bytes via latin1
    _write_layout(tmp_path / "d", [_ann(1, [SQUARE])], [_ref(0, 1, sentences=sentences)])
    assert [s.sentence for s in Refer(tmp_path / "d", "unc").samples("train")] == ["the big one", "café table"]


def test_missing_file(tmp_path):
    _write_layout(tmp_path / "d", [_ann(1, [SQUARE])], [_ref(0, 1)])
    (tmp_path / "d" / "refs(unc).p").unlink()
    with pytest.raises(ReferFormatError, match=r"refs\(unc\)\.p: missing"):
        Refer(tmp_path / "d", "unc")


def test_ref_with_unknown_ann_id(tmp_path):
    _write_layout(tmp_path / "d", [_ann(1, [SQUARE])], [_ref(0, 1), _ref(5, 99)])
    expected = r"refs\(unc\)\.p: ref 5: ann_id 99 is not an annotation id in .*instances\.json"
    with pytest.raises(ReferFormatError, match=expected):
        Refer(tmp_path / "d", "unc")


def test_ref_missing_keys(tmp_path):
    ref = _ref(3, 1)
    del ref["sentences"]
    _write_layout(tmp_path / "d", [_ann(1, [SQUARE])], [ref])
    with pytest.raises(ReferFormatError, match=r"record 0 \(ref_id 3\): expected keys .*sentences"):
        Refer(tmp_path / "d", "unc")


def test_annotation_missing_segmentation(tmp_path):
    ann = _ann(1, [SQUARE])
    del ann["segmentation"]
    _write_layout(tmp_path / "d", [ann], [_ref(0, 1)])
    with pytest.raises(ReferFormatError, match=r"instances\.json: annotations\[0\] \(id 1\): expected keys"):
        Refer(tmp_path / "d", "unc")

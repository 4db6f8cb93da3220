import json
import pickle
import shutil

import numpy as np
import pytest
from PIL import Image

from cmmasksd.data.letterbox import letterbox_image, letterbox_mask
from cmmasksd.data.prepared import clip_tokenizer, prepare_split
from cmmasksd.data.refer import Refer
from cmmasksd.data.safe_pickle import load_pickle
from cmmasksd.data.split import PreparedSplit


def test_round_trip_equals_refer(refshapes_root, prepared_root):
    refer = Refer(refshapes_root, "unc")
    tokenizer = clip_tokenizer(17)
    for split_name in refer.splits():
        split = PreparedSplit(prepared_root / split_name)
        objects = refer.objects(split_name)
        assert split.n_objects == len(objects)
        assert split.n_sentences == len(refer.samples(split_name))
        assert split.n_images == len({o.image_id for o in objects})
        assert split.manifest["counts"]["skipped"] == 0
        assert (split.size, split.word_len, split.name) == (64, 17, split_name)
        for obj_idx, obj in enumerate(objects):
            row = split.objects.iloc[obj_idx]
            assert (row.ref_id, row.ann_id, row.category_id) == (obj.ref_id, obj.ann_id, obj.category_id)
            image_idx = int(row.image_idx)
            pixels, meta = letterbox_image(Image.open(refer.image_path(obj)), 64)
            assert split.meta(image_idx) == meta
            np.testing.assert_array_equal(split.image(image_idx), pixels)
            np.testing.assert_array_equal(split.mask(obj_idx), letterbox_mask(refer.mask(obj.ann_id), meta))
            np.testing.assert_array_equal(split.gt_mask(obj_idx), refer.mask(obj.ann_id))
            sents = split.sentences_of(obj_idx)
            assert [split.sentences.text[i] for i in sents] == [text for _, text in obj.sentences]
            assert [split.sentences.sent_id[i] for i in sents] == [sent_id for sent_id, _ in obj.sentences]
            assert all(split.sentences.object_idx[i] == obj_idx for i in sents)
            expected_tokens = tokenizer([text for _, text in obj.sentences]).numpy()
            np.testing.assert_array_equal(np.stack([split.tokens(i) for i in sents]), expected_tokens)


def test_arrays_are_memory_mapped_and_typed(prepared_root):
    split = PreparedSplit(prepared_root / "val")
    assert isinstance(split._images, np.memmap) and split._images.dtype == np.uint8
    assert split._masks.shape == (split.n_objects, 64, 8)
    assert split.tokens(0).dtype == np.int32 and split.tokens(0).shape == (17,)
    assert split.mask(0).dtype == np.uint8 and split.mask(0).shape == (64, 64)
    assert json.loads((prepared_root / "val" / "skipped.json").read_text()) == []


def test_truncation_keeps_eot_last():
    text = "the small red circle left of the big blue square"
    tokens = clip_tokenizer(5)([text])[0].tolist()
    full = clip_tokenizer(17)([text])[0].tolist()
    assert full[11:] == [49407] + [0] * 5  # 10 words fit in 17: not truncated
    assert tokens == full[:4] + [49407]  # SOT and the first three words, then EOT


def _break_copy(src, dst):
    """A copy of the raw layout with one bad record of each kind; returns their ref_ids."""
    shutil.copytree(src, dst)
    refer = Refer(dst, "unc")
    objects = refer.objects("val")
    by_image = {}
    for obj in objects:
        by_image.setdefault(obj.image_id, []).append(obj)
    images = list(by_image.values())
    missing, corrupt = images[0], images[1]
    refer.image_path(missing[0]).unlink()
    corrupt_path = refer.image_path(corrupt[0])
    corrupt_path.write_bytes(corrupt_path.read_bytes()[:200])  # truncated JPEG
    empty_mask = images[2][0]
    blank = next(o for objs in images[3:] for o in objs if len(o.sentences) >= 2)  # keeps one expression

    instances = json.loads((dst / "instances.json").read_text())
    for ann in instances["annotations"]:
        if ann["id"] == empty_mask.ann_id:
            ann["segmentation"] = [[5.0, 5.0, 5.0, 5.0, 5.0, 5.0]]  # degenerate: no area
    (dst / "instances.json").write_text(json.dumps(instances))
    refs = load_pickle(dst / "refs(unc).p")
    for ref in refs:
        if ref["ref_id"] == blank.ref_id:
            ref["sentences"][0]["sent"] = "   "
    (dst / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return {"missing": missing, "corrupt": corrupt, "empty_mask": empty_mask, "blank": blank}


def test_bad_records_are_skipped_and_listed(refshapes_root, tmp_path):
    bad = _break_copy(refshapes_root, tmp_path / "raw")
    refer = Refer(tmp_path / "raw", "unc")
    report = prepare_split(refer, "val", tmp_path / "prepared", 64, 17, progress=False)
    skipped = json.loads((report.split_dir / "skipped.json").read_text())
    assert skipped == report.skipped

    def reasons(ref_id):
        return [s["reason"] for s in skipped if s["ref_id"] == ref_id]

    assert all(reasons(o.ref_id) == ["missing image file"] for o in bad["missing"])
    assert all(reasons(o.ref_id)[0].startswith("bad image") for o in bad["corrupt"])
    assert reasons(bad["empty_mask"].ref_id) == [f"empty mask (annotation {bad['empty_mask'].ann_id})"]
    blank = bad["blank"]
    assert [s for s in skipped if s["ref_id"] == blank.ref_id] == [
        {"ref_id": blank.ref_id, "sent_id": blank.sentences[0][0], "image_id": blank.image_id,
         "file": str(refer.refs_path), "reason": "empty expression"}
    ]

    lost_objects = len(bad["missing"]) + len(bad["corrupt"]) + 1
    split = PreparedSplit(report.split_dir)  # truncated arrays agree with the tables
    assert split.n_objects == len(refer.objects("val")) - lost_objects == report.n_objects
    assert split.n_images == len({o.image_id for o in refer.objects("val")}) - 2
    kept = set(split.objects.ref_id)
    assert not kept & {o.ref_id for o in bad["missing"] + bad["corrupt"] + [bad["empty_mask"]]}
    assert "   " not in set(split.sentences.text)
    last = split.n_objects - 1
    np.testing.assert_array_equal(split.gt_mask(last), refer.mask(int(split.objects.ann_id.iat[last])))


def test_nothing_left_is_an_error(refshapes_root, tmp_path):
    shutil.copytree(refshapes_root, tmp_path / "raw", ignore=shutil.ignore_patterns("*.jpg"))
    with pytest.raises(ValueError, match=r"prepared/val: no usable record in split 'val' .*missing image file"):
        prepare_split(Refer(tmp_path / "raw", "unc"), "val", tmp_path / "prepared", 64, 17, progress=False)


def test_reader_refuses_incomplete_split(prepared_root, tmp_path):
    shutil.copytree(prepared_root / "val", tmp_path / "val")
    (tmp_path / "val" / "manifest.json").unlink()
    with pytest.raises(ValueError, match="manifest.json missing"):
        PreparedSplit(tmp_path / "val")


def test_size_must_be_a_multiple_of_8(refshapes_root, tmp_path):
    with pytest.raises(ValueError, match="multiple of 8"):
        prepare_split(Refer(refshapes_root, "unc"), "val", tmp_path, 60, 17, progress=False)


def test_split_of_an_older_format_is_named_with_both_versions(prepared_root, tmp_path):
    shutil.copytree(prepared_root / "val", tmp_path / "val")
    manifest = json.loads((tmp_path / "val" / "manifest.json").read_text())
    (tmp_path / "val" / "manifest.json").write_text(json.dumps({**manifest, "format_version": 0}))
    with pytest.raises(ValueError, match=r"val/manifest\.json: format_version 0, expected 1; prepare the split again"):
        PreparedSplit(tmp_path / "val")


def test_splits_prepared_at_another_size_or_word_len_are_named(refshapes_root, prepared_root, tiny_config, tmp_path):
    from cmmasksd.config import build_config
    from cmmasksd.train import open_splits

    shutil.copytree(prepared_root, tmp_path / "prepared")
    shutil.rmtree(tmp_path / "prepared" / "val")
    prepare_split(Refer(refshapes_root, "unc"), "val", tmp_path / "prepared", 64, 22, progress=False)
    config = build_config(tiny_config(data__prepared_dir=str(tmp_path / "prepared")))
    with pytest.raises(ValueError, match=r"prepared/val: prepared at size 64, word_len 22, but .*prepared/train at "
                                         r"size 64, word_len 17"):
        open_splits(config)

import pickle

import numpy as np
import torch
from torch.utils.data import DataLoader

from cmmasksd.data.dataset import RefSegDataset
from cmmasksd.data.split import PreparedSplit


def _split(prepared_root):
    return PreparedSplit(prepared_root / "train")


def test_train_items_are_objects(prepared_root):
    split = _split(prepared_root)
    ds = RefSegDataset(split, train=True)
    assert len(ds) == split.n_objects
    item = ds[5]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 64, 64)
    assert item["tokens"].dtype == torch.long and item["tokens"].shape == (17,)
    assert item["mask"].dtype == torch.float32 and item["mask"].shape == (1, 64, 64)
    assert item["object_idx"] == 5 and item["sentence_idx"] in split.sentences_of(5)
    image_idx = split.object_image[5]
    np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), split.image(image_idx))
    np.testing.assert_array_equal(item["mask"][0].numpy(), split.mask(5))
    np.testing.assert_array_equal(item["tokens"].numpy(), split.tokens(item["sentence_idx"]))
    assert set(item["mask"].unique().tolist()) == {0.0, 1.0}


def test_expression_draw_depends_on_seed_and_epoch_only(prepared_root):
    split = _split(prepared_root)
    ds = RefSegDataset(split, train=True, seed=3)
    multi = [i for i in range(split.n_objects) if len(split.sentences_of(i)) > 1]
    draws = {}
    for epoch in range(4):
        ds.set_epoch(epoch)
        draws[epoch] = [ds[i]["sentence_idx"] for i in multi]
    assert len({tuple(d) for d in draws.values()}) > 1  # the choice changes between epochs
    ds.set_epoch(2)
    assert [ds[i]["sentence_idx"] for i in multi] == draws[2]
    loader = DataLoader(ds, batch_size=8, num_workers=2)
    by_workers = torch.cat([batch["sentence_idx"] for batch in loader]).tolist()
    assert by_workers == [ds[i]["sentence_idx"] for i in range(len(ds))]


def test_eval_items_are_expressions(prepared_root):
    split = _split(prepared_root)
    ds = RefSegDataset(split, train=False)
    assert len(ds) == split.n_sentences
    items = [ds[i] for i in range(len(ds))]
    assert [it["sentence_idx"] for it in items] == list(range(split.n_sentences))
    assert all(it["sentence_idx"] in split.sentences_of(it["object_idx"]) for it in items)


def test_blank_text_and_max_items(prepared_root):
    ds = RefSegDataset(_split(prepared_root), train=False, blank_text=True, max_items=3)
    assert len(ds) == 3
    assert ds[2]["tokens"].tolist() == [49406, 49407] + [0] * 15


def test_pickles_without_the_arrays(prepared_root):
    ds = RefSegDataset(_split(prepared_root), train=True, seed=3)
    ds.set_epoch(2)
    data = pickle.dumps(ds)
    assert len(data) < 10_000  # workers reopen the memmaps
    copy = pickle.loads(data)
    assert len(copy) == len(ds)
    for i in range(len(ds)):  # same items, and the same expression draws (seed and epoch kept)
        mine, theirs = ds[i], copy[i]
        assert (theirs["object_idx"], theirs["sentence_idx"]) == (mine["object_idx"], mine["sentence_idx"])
        assert all(torch.equal(theirs[key], mine[key]) for key in ("image", "tokens", "mask"))

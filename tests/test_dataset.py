import pickle

import numpy as np
import torch
from torch.utils.data import DataLoader

from cmmasksd.data.dataset import RefSegDataset
from cmmasksd.data.kinds import ONE_KIND, REFSHAPES_KINDS, expression_kinds
from cmmasksd.data.refshapes import parse
from cmmasksd.data.sampler import EpochBatchSampler
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
    draws = {epoch: [ds[epoch, i]["sentence_idx"] for i in multi] for epoch in range(4)}
    assert len({tuple(d) for d in draws.values()}) > 1  # the choice changes between epochs
    assert [ds[2, i]["sentence_idx"] for i in multi] == draws[2]
    assert [ds[i]["sentence_idx"] for i in multi] == draws[0]  # a bare index is epoch 0


def test_persistent_workers_draw_each_epochs_expressions(prepared_root):
    """Workers started once for the run (persistent) still draw a new expression each epoch,
    the same as in the main process, because the epoch comes with every key."""
    ds = RefSegDataset(_split(prepared_root), train=True, seed=3)
    sampler = EpochBatchSampler(len(ds), 8, seed=3)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=2, persistent_workers=True)
    seen = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(loader)
        order = [i for batch in sampler for _, i in batch]
        assert torch.cat([b["object_idx"] for b in batches]).tolist() == order
        assert torch.cat([b["sentence_idx"] for b in batches]).tolist() == [ds[epoch, i]["sentence_idx"] for i in order]
        seen.append(torch.cat([b["sentence_idx"] for b in batches]).sort().values.tolist())
    assert len({tuple(s) for s in seen}) > 1


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
    data = pickle.dumps(ds)
    assert len(data) < 10_000  # workers reopen the memmaps
    copy = pickle.loads(data)
    assert len(copy) == len(ds)
    for i in range(len(ds)):  # same items, and the same expression draws (the seed is kept)
        mine, theirs = ds[2, i], copy[2, i]
        assert (theirs["object_idx"], theirs["sentence_idx"]) == (mine["object_idx"], mine["sentence_idx"])
        assert all(torch.equal(theirs[key], mine[key]) for key in ("image", "tokens", "mask"))


def test_items_carry_the_expression_kind_from_the_refshapes_grammar(prepared_root):
    split = _split(prepared_root)
    names, codes = split.kinds
    assert names == REFSHAPES_KINDS and set(codes.tolist()) == {0, 1, 2}  # the tiny data has all three
    for text, code in zip(split.sentences["text"], codes):
        query = parse(text)
        want = "relational" if query.relation else "positional" if query.extreme else "attribute"
        assert names[code] == want
    ds = RefSegDataset(split, train=False)
    assert [ds[i]["kind"] for i in range(10)] == codes[:10].tolist()


def test_real_expressions_are_one_kind():
    names, codes = expression_kinds(["the red circle", "man in a blue shirt on the left", "left guy"])
    assert names == ONE_KIND and codes.tolist() == [0, 0, 0]
    names, codes = expression_kinds(["the red circle", "the leftmost square"])
    assert names == REFSHAPES_KINDS and codes.tolist() == [0, 1]

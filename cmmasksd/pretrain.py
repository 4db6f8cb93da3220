"""`pretrain(config)`: a CLIP trained contrastively on RefShapes captions, the default's `openai`.

CM-MaskSD reads CLIP's patch-word alignment to choose its masks, and the paper always starts
from pretrained CLIP; the embedded default has no such weights, so it makes its own. Both towers
train with open_clip's `ClipLoss` on scene and object pairs (`cmmasksd.data.captions`), and the
result is a plain open_clip state dict (`open_clip.create_model(name, pretrained=path)` loads it).
Like a training run it is a pure function of its config and resumes from `last.pt` after every
epoch. `zero_shot` measures what was learnt, on val scenes, against the initial (random) weights:
attribute classification of single objects, scene caption retrieval, and the LMVSD mask hit rate
of `corr_top` (masked area on the named object against the object's share of the image).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.loss import ClipLoss
from torch.utils.data import DataLoader
from tqdm import tqdm

from cmmasksd.config import PretrainConfig
from cmmasksd.data.captions import CaptionPairs, Scene, load_scenes
from cmmasksd.data.refshapes import COLOURS, SHAPES, SIZES
from cmmasksd.io.checkpoint import read_resume_state, save_checkpoint
from cmmasksd.model.factory import create_clip
from cmmasksd.model.backbone import ClipBackbone
from cmmasksd.model.mask_stats import MaskStats
from cmmasksd.model.masksd import cell_grid, correlation_cells

log = logging.getLogger(__name__)
PROMPTS = [f"a {size} {colour} {shape}" for shape in SHAPES for colour in COLOURS for size in SIZES]


def _fingerprint(cfg: PretrainConfig) -> str:
    dumped = cfg.model_dump(mode="json", exclude={"threads", "out", "work_dir", "mask_cell", "mask_ratio"})
    return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:12]


def _param_groups(clip: torch.nn.Module, weight_decay: float) -> list[dict]:
    """As open_clip's trainer: no decay on gains, biases, norms, embeddings' scales and logit_scale."""
    def exempt(name: str, p: torch.nn.Parameter) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in clip.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if exempt(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exempt(n, p)], "weight_decay": weight_decay}]


def _cosine_with_warmup(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def pretrain(cfg: PretrainConfig) -> dict:
    """Train, write `cfg.out`, and return the metrics (zero-shot of the result and of the initial weights)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    clip = create_clip(cfg.clip)  # registers the tiny CLIP configs, so open_clip's tokenizer finds them
    backbone = ClipBackbone(clip)  # wraps, does not copy: its `normalize` is CLIP's preprocessing
    tokenizer = open_clip.get_tokenizer(cfg.clip)
    size = clip.visual.image_size
    size = size if isinstance(size, int) else size[0]
    train_set = CaptionPairs(load_scenes(cfg.raw_dir, cfg.train_split, size, cfg.split_by), tokenizer, cfg.seed)
    val_scenes = load_scenes(cfg.raw_dir, cfg.val_split, size, cfg.split_by)
    control = zero_shot(backbone, val_scenes, tokenizer, cfg.mask_cell, cfg.mask_ratio)  # the initial weights

    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{cfg.raw_dir}: {len(train_set)} training pairs, fewer than one batch of {cfg.batch_size}")
    optimizer = torch.optim.AdamW(_param_groups(clip, cfg.weight_decay), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _cosine_with_warmup(cfg.warmup_steps, cfg.epochs * steps_per_epoch))
    loss_fn = ClipLoss()

    last_path = Path(cfg.work_dir) / f"{cfg.clip}-{_fingerprint(cfg)}" / "last.pt"
    start_epoch, history, train_time = 0, [], 0.0
    state = read_resume_state(last_path, ("clip", "optimizer", "schedule", "rng_cpu", "epoch", "history", "train_time_s"))
    if state is not None:
        clip.load_state_dict(state["clip"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng_cpu"])
        start_epoch, history, train_time = state["epoch"], state["history"], state["train_time_s"]
        log.info("resumed %s at epoch %d", last_path, start_epoch)

    epochs = tqdm(range(start_epoch, cfg.epochs), desc="pretrain", initial=start_epoch, total=cfg.epochs, disable=None)
    for epoch in epochs:
        clip.train()
        train_set.set_epoch(epoch)
        loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(cfg.seed * 10_007 + epoch))
        start, total = time.perf_counter(), 0.0
        for batch in tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=None):
            images = clip.encode_image(backbone.normalize(batch["image"]), normalize=True)
            texts = clip.encode_text(batch["tokens"], normalize=True)
            loss = loss_fn(images, texts, clip.logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                clip.logit_scale.clamp_(0, math.log(100))  # as open_clip's trainer
            total += float(loss.detach())
        train_time += time.perf_counter() - start
        history.append({"epoch": epoch + 1, "loss": total / steps_per_epoch, "lr": optimizer.param_groups[1]["lr"]})
        save_checkpoint({"clip": clip.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                      "rng_cpu": torch.get_rng_state(), "epoch": epoch + 1, "history": history,
                      "train_time_s": train_time}, last_path)
        epochs.set_postfix(loss=f"{history[-1]['loss']:.3f}")

    save_checkpoint(clip.state_dict(), Path(cfg.out))
    return {
        "pretrained": zero_shot(backbone, val_scenes, tokenizer, cfg.mask_cell, cfg.mask_ratio),
        "random_init": control,
        "chance": {"object_top1": 1 / len(PROMPTS), "scene_top1": 1 / len(val_scenes),
                   "mask_hit": control["mask_chance"]},
        "train_time_s": train_time, "epochs": cfg.epochs, "steps": cfg.epochs * steps_per_epoch,
        "train_pairs": len(train_set), "history": history,
    }


@torch.no_grad()
def zero_shot(backbone: ClipBackbone, scenes: list[Scene], tokenizer, mask_cell: int, mask_ratio: float,
              batch_size: int = 128) -> dict[str, float]:
    """What the towers know, on `scenes`, without any training for it.

    - object_top1: each single-object image against the 36 "a {size} {colour} {shape}" prompts;
    - scene_top1: each scene against every scene's caption (right when the chosen caption is its own text);
    - mask_hit / mask_chance: `corr_top` LMVSD cells for each object's phrase on its full scene, at
      `mask_ratio` on `mask_cell` px cells: masked area on the object / masked area, against the object's
      share; scored on the value-path features (`masksd.correlation: values`), and as `mask_hit_attention`
      on CRIS's attention-pool map.
    """
    clip = backbone.clip
    was_training = clip.training
    clip.eval()

    def image_features(images: list) -> torch.Tensor:
        out = [clip.encode_image(backbone.normalize(_stack(images[i:i + batch_size])), normalize=True)
               for i in range(0, len(images), batch_size)]
        return torch.cat(out)

    def text_features(texts: list[str]) -> torch.Tensor:
        return torch.cat([clip.encode_text(tokenizer(texts[i:i + batch_size]), normalize=True)
                          for i in range(0, len(texts), batch_size)])

    pairs = [(scene, k) for scene in scenes for k in range(len(scene.objects))]
    objects = image_features([scene.isolate(k) for scene, k in pairs])
    labels = torch.tensor([PROMPTS.index(f"a {scene.objects[k].phrase}") for scene, k in pairs])
    object_top1 = (objects @ text_features(PROMPTS).T).argmax(1).eq(labels).float().mean()

    captions = [scene.caption() for scene in scenes]
    chosen = (image_features([s.image for s in scenes]) @ text_features(captions).T).argmax(1).tolist()
    scene_top1 = sum(captions[j] == captions[i] for i, j in enumerate(chosen)) / len(scenes)

    stats = {"values": MaskStats(), "attention": MaskStats()}
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        vis = backbone.encode_image(_stack([scene.image for scene, _ in chunk]))
        sentence = clip.encode_text(tokenizer([f"a {scene.objects[k].phrase}" for scene, k in chunk]))
        grid = cell_grid(vis.grid, backbone.patch_stride, mask_cell)
        gt = torch.from_numpy(np.stack([scene.objects[k].mask for scene, k in chunk]).astype(np.float32))[:, None]
        for name, dense in (("values", vis.values), ("attention", vis.joint)):
            stats[name].add_lmvsd(correlation_cells(dense, sentence, grid, mask_ratio, "corr_top", 1.0), gt)
    hits = {name: s.metrics() for name, s in stats.items()}
    clip.train(was_training)
    return {"object_top1": float(object_top1), "scene_top1": float(scene_top1),
            "mask_hit": hits["values"]["mask/lmvsd_hit"], "mask_hit_attention": hits["attention"]["mask/lmvsd_hit"],
            "mask_chance": hits["values"]["mask/lmvsd_chance"]}


def _stack(images: list) -> torch.Tensor:
    return torch.stack([torch.from_numpy(im.copy()).permute(2, 0, 1) for im in images])

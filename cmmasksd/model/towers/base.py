"""The interface `ClipBackbone` drives an image tower through, and the registry that picks one."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VisualFeatures:
    levels: list[torch.Tensor]  # [f8, f16, f32]: B x C_i x S/8, S/16, S/32
    joint: torch.Tensor  # B x embed_dim x gh x gw: patch features in CLIP's joint space
    grid: tuple[int, int]  # (gh, gw): the patch grid a `patch_mask` refers to
    values: torch.Tensor  # B x embed_dim x gh x gw: each patch's value path into the joint space
    pooled: torch.Tensor | None = None  # B x embed_dim: CLIP's image embedding (what its contrastive loss saw)


class VisualTower(ABC):
    """How `ClipBackbone` runs one family of open_clip image towers (`clip.visual`) for CRIS.

    A tower keeps plain settings only, never modules or tensors: CLIP's weights stay in
    `backbone.clip`, and what a family adds (`new_layers`, the visual mask token) is registered on
    the backbone itself. So state-dict keys do not depend on this class, checkpoints keep loading,
    and `deepcopy` / `.to()` of the model need nothing from it. `encode` gets the backbone to reach
    them.
    """

    name: ClassVar[str]  # the family, in messages: "ResNet"
    masking: ClassVar[str]  # how it hides a masked cell, in messages: "zeroes its masked cells"
    supports_drop: ClassVar[bool] = False  # can encode the visible patches alone (`vit_masking: drop`)
    patch_stride: int  # pixels per cell of the native grid (`VisualFeatures.grid`)
    level_dims: tuple[int, int, int]  # channels of the stride 8, 16 and 32 levels, for CRIS's neck
    mask_token_dim: int | None = None  # width of the learned visual mask token; None: masking needs none

    @abstractmethod
    def __init__(self, visual: nn.Module, embed_dim: int, vit_layers: tuple[int, int, int]):
        """Read the sizes from `visual` (keep no reference to it); `vit_layers` is the model config's
        choice of blocks for the three levels, which a family without blocks ignores."""

    def new_layers(self) -> dict[str, nn.Module]:
        """Layers the family adds beside CLIP (fresh init), registered on the backbone under these names."""
        return {}

    def check_mask_cell(self, cell: int | None) -> None:
        """Raise ValueError if LMVSD cannot mask cells of `cell` px (None: the native grid).

        By default any cell that tiles the input will do (`masksd.cell_grid` checks that per batch).
        """

    @abstractmethod
    def encode(self, backbone: nn.Module, x: torch.Tensor, patch_mask: torch.Tensor | None,
               drop: bool, fill: str = "zero") -> VisualFeatures:
        """Normalised B x 3 x S x S images -> `VisualFeatures`, with the B x gh x gw `patch_mask`
        (True = masked) applied as this family masks; `drop` is True only if `supports_drop`;
        `fill` (`masksd.fill`) is what a family that hides pixels puts in a masked cell."""


_TOWERS: dict[type[nn.Module], type[VisualTower]] = {}


def register_tower(visual_type: type[nn.Module], tower: type[VisualTower]) -> None:
    """Drive open_clip image towers of `visual_type` (and of its subclasses) with `tower`."""
    _TOWERS[visual_type] = tower


def tower_for(visual: nn.Module) -> type[VisualTower]:
    """The tower class registered for `visual`'s type, or for the nearest of its base classes."""
    for cls in type(visual).__mro__:
        if cls in _TOWERS:
            return _TOWERS[cls]
    known = ", ".join(f"{t.__name__} ({tower.name})" for t, tower in _TOWERS.items())
    raise TypeError(f"no visual tower family for an open_clip {type(visual).__name__} image tower; known: {known}. "
                    "A new family is a VisualTower registered with cmmasksd.model.towers.register_tower")


def resize_pos_embed(pos: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """Resize a [1 + h*w, C] positional embedding (leading class/mean token) to another grid, bicubic."""
    if tuple(src) == tuple(dst):
        return pos
    grid = pos[1:].reshape(1, src[0], src[1], -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=dst, mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], grid.flatten(2)[0].T])

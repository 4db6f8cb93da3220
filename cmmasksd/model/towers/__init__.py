"""Image tower families: one `VisualTower` per kind of open_clip image tower, picked by its type.

To add a family (say a timm ConvNeXt through open_clip's `TimmModel`), implement `VisualTower`
in a module of its own and register it below, against the open_clip module type it drives.
"""

from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer

from cmmasksd.model.towers.base import VisualFeatures, VisualTower, register_tower, tower_for
from cmmasksd.model.towers.resnet import ResNetTower
from cmmasksd.model.towers.vit import ViTTower

register_tower(ModifiedResNet, ResNetTower)
register_tower(VisionTransformer, ViTTower)

__all__ = ["ResNetTower", "ViTTower", "VisualFeatures", "VisualTower", "register_tower", "tower_for"]

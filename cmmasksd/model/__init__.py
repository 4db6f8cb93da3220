"""The model: CRIS on open_clip towers, wrapped by CM-MaskSD's masked self-distillation branches."""

from cmmasksd.config import get_model_config, list_models
from cmmasksd.model.backbone import ClipBackbone, TextFeatures, VisualFeatures
from cmmasksd.model.cris import CRIS
from cmmasksd.model.factory import (
    create_clip,
    create_cris,
    create_model,
    load_clip_weights,
    parameter_report,
)
from cmmasksd.model.masksd import CMMaskSD

__all__ = [
    "CMMaskSD",
    "CRIS",
    "ClipBackbone",
    "TextFeatures",
    "VisualFeatures",
    "create_clip",
    "create_cris",
    "create_model",
    "get_model_config",
    "list_models",
    "load_clip_weights",
    "parameter_report",
]

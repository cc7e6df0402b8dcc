"""Everything that touches a model: loading, the exact decomposition, ONNX export and runtime."""
from models.registry import (LoadedModel, ModelError, encode_texts, default_bank, load_model,
                             model_from_row)
from models.decompose import (Decomposer, Decomposition, decompose, decompose_components, decomposer,
                              resolve_layers)
from models.images import ImageError, load_image, thumbnail_jpeg, to_rgb

__all__ = [
    "LoadedModel", "ModelError", "encode_texts", "default_bank", "load_model", "model_from_row",
    "Decomposer", "Decomposition", "decompose", "decompose_components", "decomposer", "resolve_layers",
    "ImageError", "load_image", "thumbnail_jpeg", "to_rgb",
]

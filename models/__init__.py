"""Everything that touches a model: loading, the exact decomposition, ONNX export and runtime."""
from models.registry import (TOY_DIR, LoadedModel, ModelError, encode_texts, encode_tokens, default_bank, load_model, load_state,
                             model_from_row, toy_architectures)
from models.decompose import (Decomposer, Decomposition, decompose, decompose_components, decomposer,
                              resolve_layers)
from models.images import ImageError, load_image, pixels_to_tensor, thumbnail_jpeg, to_rgb

__all__ = [
    "TOY_DIR", "LoadedModel", "ModelError", "encode_texts", "encode_tokens", "default_bank", "load_model", "load_state", "model_from_row", "toy_architectures",
    "Decomposer", "Decomposition", "decompose", "decompose_components", "decomposer", "resolve_layers",
    "ImageError", "load_image", "pixels_to_tensor", "thumbnail_jpeg", "to_rgb",
]

"""Everything that touches a model: loading, the exact decomposition and the maps built on it
(MATH.md §1, §2, §6), text encoding, ONNX export and runtime.

    decompose(lm, images, layers, *, tokens, components) -> Decomposition    (models.decompose)
    second_order(lm, images, layer, *, phi) -> SecondOrder                    (models.neurons, MATH.md §10)
    maps.topic_map / head_map / layer_index / upsample                       (models.maps)
    model_view(lm, image) -> the model's crop of an image                    (models.images)
    tower(visual) -> the image tower's adapter (blocks, readout)             (models.towers)
"""
from models.registry import (TOY_DIR, LoadedModel, ModelError, encode_texts, encode_tokens, default_bank, load_model,
                             load_state, model_from_row, toy_architectures)
from models.decompose import Decomposer, Decomposition, decompose, resolve_layers
from models.neurons import SecondOrder, SecondOrderLens, second_order
from models.images import ImageError, load_image, model_view, pixels_to_tensor, thumbnail_jpeg, to_rgb
from models import maps
from models.towers import UnsupportedTower, position_embedding, tower

__all__ = [
    "TOY_DIR", "LoadedModel", "ModelError", "encode_texts", "encode_tokens", "default_bank", "load_model",
    "load_state", "model_from_row", "toy_architectures",
    "Decomposer", "Decomposition", "decompose", "resolve_layers",
    "SecondOrder", "SecondOrderLens", "second_order",
    "ImageError", "load_image", "model_view", "pixels_to_tensor", "thumbnail_jpeg", "to_rgb",
    "maps", "tower", "position_embedding", "UnsupportedTower",
]

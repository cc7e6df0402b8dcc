"""Everything that touches a model: loading, the exact decomposition and the maps built on it
(MATH.md §1, §2, §6), text encoding, ONNX export and runtime.

    decompose(lm, images, layers, *, tokens, components) -> Decomposition    (models.decompose)
    second_order(lm, images, layer, *, phi) -> SecondOrder                    (models.neurons, MATH.md §10)
    maps.topic_map / head_map / layer_index / upsample                       (models.maps)
    model_view(lm, image) -> the model's crop of an image                    (models.images)
    tower(visual) -> the image tower's adapter (blocks, readout)             (models.towers)

The names below are imported on first use (PEP 562): ``import models`` itself loads neither torch
nor open_clip, so a dashboard page that only reads the warehouse (or loads an image) never pays
their import (about 5 CPU-s), and ``models.similarity`` / ``models.images`` stay numpy and Pillow.
"""
from __future__ import annotations

import importlib
import sys
import types

# name -> the submodule that defines it
_EXPORTS = {
    "models.registry": ["TOY_DIR", "LoadedModel", "ModelError", "encode_texts", "encode_tokens", "default_bank",
                        "load_model", "load_state", "model_from_row", "toy_architectures"],
    "models.decompose": ["Decomposer", "Decomposition", "decompose"],
    "models.layers": ["resolve_layers"],
    "models.images": ["ImageError", "load_image", "model_view", "model_view_box", "pixels_to_tensor",
                      "thumbnail_jpeg", "to_rgb"],
    "models.towers": ["UnsupportedTower", "position_embedding", "tower"],
    "models.neurons": ["SecondOrder", "SecondOrderLens", "second_order"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
_SUBMODULES = {"maps", "registry", "decompose", "images", "similarity", "hashing", "onnx", "bench", "layers",
               "towers", "neurons"}

__all__ = [name for names in _EXPORTS.values() for name in names] + ["maps"]


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"models.{name}")
    else:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Importing a submodule binds it on its package, so `import models.decompose` would put the module
    where the function `models.decompose` belongs (an eager __init__ rebinds it after; a lazy one
    cannot). Such a binding of an exported name is ignored: the name stays the function."""

    def __setattr__(self, name, value):
        if name in _WHERE and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

"""Live analyses of one image: the Streamlit caching glue around models/ (MATH.md §6.2, §6.3,
and the query side of §6.1, §6.4).

Models are loaded once per process (st.cache_resource keyed by the model spec); the per-token
decomposition of an image is computed once per (model, image) and kept, so changing the text
or the heads only costs a matrix product. The maths is in models/: models.decompose,
models.maps (the per-patch map and its upsampling), models.model_view (the model's crop).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import streamlit as st
from PIL import Image

import models
from models import maps

Head = tuple[int, int]


def spec_key(row: dict) -> tuple:
    """What identifies a model's weights in a warehouse `models` row (the cache key of its load)."""
    return tuple(str(row.get(k)) for k in ("model_id", "arch", "pretrained", "source", "checkpoint_path", "seed"))


@st.cache_resource(show_spinner="Loading the model (once per server process) ...", max_entries=4)
def load(key: tuple, _row: dict) -> models.LoadedModel:
    """The model of a warehouse row, loaded once per process."""
    return models.model_from_row(_row)


def model(row: dict) -> models.LoadedModel:
    """The loaded model of a warehouse row; on a page, a model that cannot be loaded (weights not
    in the cache offline, checkpoint moved) stops the page with the loader's explanation."""
    try:
        return load(spec_key(row), row)
    except models.ModelError as exc:
        if not st.runtime.exists():
            raise
        st.error(f"This analysis runs {row['model_id']} live, and the model cannot be loaded here: {exc}")
        st.stop()


@st.cache_resource(show_spinner=False, max_entries=8)
def _decompose_tokens(key: tuple, image_key: str, layers: tuple, _lm, _image) -> models.Decomposition:
    x = _lm.preprocess(_image)[None]                        # [1, 3, S, S]
    return models.decompose(_lm, x, layers=list(layers), tokens=True)


def decompose_image(row: dict, image: Image.Image, image_key: str) -> models.Decomposition:
    """Per-token decomposition of one image over the model's analysed layers (cached per image).

    head_tokens: [1, L', H, T, d], head_cls: [1, L', H, d]; layers = row['analysed_layers'].
    """
    lm = model(row)
    return _decompose_tokens(spec_key(row), image_key, tuple(int(l) for l in row["analysed_layers"]), lm, image)


@st.cache_data(show_spinner=False, max_entries=256)
def _encode(key: tuple, texts: tuple[str, ...], _row: dict) -> np.ndarray:
    return models.encode_texts(load(key, _row), list(texts)).numpy()


def text_vectors(row: dict, texts: Sequence[str]) -> np.ndarray:
    """Unit text embeddings [M, d] (float32), cached per (model, texts)."""
    return _encode(spec_key(row), tuple(texts), row)


def text_vector(row: dict, text: str) -> tuple[np.ndarray, str]:
    """(t_hat [d], source) for one text: the warehouse's stored embedding when the text is in a
    bank (no text tower run), else encoded live; both are the model's unit text embedding."""
    from dashboard.data import q
    from warehouse import queries
    stored = q(queries.stored_text_vector, row["model_id"], text)
    if stored is not None:
        return stored, "stored text embedding"
    return text_vectors(row, [text])[0], "encoded live"


@st.cache_resource(show_spinner="Loading the model (once per server process) ...", max_entries=4)
def _loadable(key: tuple, _row: dict):
    """The model of a row, or None when it cannot be loaded here (remembered, not retried per rerun)."""
    try:
        return load(key, _row)
    except models.ModelError:
        return None


def model_view(row: dict, image: Image.Image) -> Image.Image:
    """The part of the image the model of `row` sees: models.model_view (the model's own
    preprocess resize and crop, no normalisation), RGB [S, S].

    Pages that only show the query image (neighbours of a warehouse image, scored from stored
    rows) must not stop when the model cannot be loaded here: they then show the image as it is."""
    lm = _loadable(spec_key(row), row)
    return image if lm is None else models.model_view(lm, image)


def topic_map(row: dict, image: Image.Image, image_key: str, heads: Sequence[Head], t_hat) -> np.ndarray:
    """MATH.md §6.2: the map of text `t_hat` over `heads` for an image on the patch grid, [gh, gw]
    (models.maps.upsample stretches it over model_view's crop)."""
    lm = model(row)
    return maps.topic_map(decompose_image(row, image, image_key), heads, t_hat, lm.grid)


def head_vectors(row: dict, image: Image.Image, image_key: str, heads: Sequence[Head]) -> np.ndarray:
    """c[l,h] of an image for each head, float32 [len(heads), d] (the query side of §6.1 and §6.4)."""
    dec = decompose_image(row, image, image_key)
    idx = maps.layer_index(dec.layers, heads)
    return np.stack([dec.head_cls[0, j, h].numpy() for j, h in idx]).astype(np.float32)


def query_head_vectors(row: dict, choice, heads: Sequence[Head]) -> np.ndarray:
    """c[l,h] of the query image, [len(heads), d]: stored rows for a warehouse image (exactly what
    its neighbours were scored with), a live decomposition for an upload."""
    if choice.image_id is not None:
        from dashboard.data import q
        from warehouse import queries
        return q(queries.image_head_vectors, row["model_id"], choice.image_id, list(heads))
    return head_vectors(row, choice.image, choice.key, heads)

"""Live analyses of one image: the Streamlit caching glue around models/ (MATH.md §6.2, §6.3,
and the query side of §6.1, §6.4).

Models are loaded once per process (a process-wide cache keyed by the model spec, which the server's
warm-up fills with the default model, dashboard/warm.py); the per-token
decomposition of an image is computed once per (model, image) and kept, so changing the text
or the heads only costs a matrix product. The maths is in models/: models.decompose,
models.maps (the per-patch map and its upsampling), models.model_view (the model's crop).
`breakdown` (the match page) turns one image's whole decomposition and a text into the bars of
every component's direct share of cos(image, text).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image

import models
from dashboard.safe_text import plain


Head = tuple[int, int]


def spec_key(row: dict) -> tuple:
    """What identifies a model's weights in a warehouse `models` row (the cache key of its load)."""
    return tuple(str(row.get(k)) for k in ("model_id", "arch", "pretrained", "source", "checkpoint_path", "seed"))


_LOADED: "OrderedDict[tuple, models.LoadedModel]" = OrderedDict()
_LOAD_LOCK = threading.Lock()
MAX_MODELS = 4


def loaded(key: tuple) -> bool:
    """Whether the model of ``key`` (spec_key) is loaded in this process."""
    return key in _LOADED


def load(key: tuple, _row: dict) -> models.LoadedModel:
    """The model of a warehouse row, loaded once per process (the last MAX_MODELS kept). A plain
    process-wide cache, not Streamlit's: dashboard/warm.py loads the default model into it in a
    background thread when the server starts, before any page asks."""
    with _LOAD_LOCK:                            # one load at a time: a page waits for the warm-up's load
        if key not in _LOADED:
            _LOADED[key] = models.model_from_row(_row)
            while len(_LOADED) > MAX_MODELS:
                _LOADED.popitem(last=False)
        _LOADED.move_to_end(key)
        return _LOADED[key]


def model(row: dict) -> models.LoadedModel:
    """The loaded model of a warehouse row; on a page, a model that cannot be loaded (weights not
    in the cache offline, checkpoint moved) stops the page with the loader's explanation."""
    key = spec_key(row)
    try:
        if loaded(key) or not st.runtime.exists():
            return load(key, row)
        with st.spinner("Loading the model (once per server process) ..."):
            return load(key, row)
    except models.ModelError as exc:
        if not st.runtime.exists():
            raise
        st.error(plain(f"This analysis runs {row['model_id']} live, and the model cannot be loaded here: {exc}"))
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


def model_view_box(row: dict, image: Image.Image):
    """(the model's crop [S, S] RGB, its box in the image's pixels or None): models.model_view_box with the
    model of `row` (which maps need loaded anyway)."""
    return models.model_view_box(model(row), image)


def topic_map(row: dict, image: Image.Image, image_key: str, heads: Sequence[Head], t_hat) -> np.ndarray:
    """MATH.md §6.2: the map of text `t_hat` over `heads` for an image on the patch grid, [gh, gw]
    (models.maps.upsample stretches it over model_view's crop)."""
    lm = model(row)
    return models.maps.topic_map(decompose_image(row, image, image_key), heads, t_hat, lm.grid, prefix=lm.tower.prefix)


def head_vectors(row: dict, image: Image.Image, image_key: str, heads: Sequence[Head]) -> np.ndarray:
    """c[l,h] of an image for each head, float32 [len(heads), d] (the query side of §6.1 and §6.4)."""
    dec = decompose_image(row, image, image_key)
    idx = models.maps.layer_index(dec.layers, heads)
    return np.stack([dec.head_cls[0, j, h].numpy() for j, h in idx]).astype(np.float32)


def query_head_vectors(row: dict, choice, heads: Sequence[Head]) -> np.ndarray:
    """c[l,h] of the query image, [len(heads), d]: stored rows for a warehouse image (exactly what
    its neighbours were scored with), a live decomposition for an upload."""
    if choice.image_id is not None:
        from dashboard.data import q
        from warehouse import queries
        return q(queries.image_head_vectors, row["model_id"], choice.image_id, list(heads))
    return head_vectors(row, choice.image, choice.key, heads)


# --------------------------------------------------------------------------- which heads make this match?

@st.cache_resource(show_spinner=False, max_entries=8)
def _decompose_components(key: tuple, image_key: str, _lm, _image) -> models.Decomposition:
    x = _lm.preprocess(_image)[None]                        # [1, 3, S, S]
    return models.decompose(_lm, x, layers="all", components=True)


def decompose_components(row: dict, image: Image.Image, image_key: str) -> models.Decomposition:
    """The whole decomposition of one image (MATH.md §1, §2; cached per image): head_cls of every
    layer [1, L, H, d], mlp and attn_bias [1, L, d], embedding_term [1, d]; they sum to the unit
    embedding."""
    return _decompose_components(spec_key(row), image_key, model(row), image)


KINDS = ("head", "attention of a layer", "MLP", "out-proj biases", "embedding term", "pool MLP")


@dataclass
class Breakdown:
    """Every component's direct share of cos(image, text) (MATH.md §1): `components` sums to `cos`.

    components: one row per bar, highest share first: rank, component, kind (KINDS), layer, head
        (NaN unless a head), share (float64); every head of an analysed layer is one row, the heads
        of another layer one row per layer, each layer's MLP one row, the out-proj biases of all
        layers one row, the embedding term (class token and positions through ln_post, and its
        bias) one row, and for a tower whose attention pool ends in an MLP (SigLIP, PE-Core: MAP)
        the pool MLP's term (`pool_mlp`, not linear in the others) one row.
    layers: per layer and part ('attention heads', 'MLP', 'out-proj bias'): its share.
    cos: cos(image, text) from the model's own embedding; sum_of_bars: components.share.sum().
    embedding: the unit image embedding [d] (float32).
    """
    components: pd.DataFrame
    layers: pd.DataFrame
    cos: float
    sum_of_bars: float
    embedding: np.ndarray


def breakdown_of(dec: models.Decomposition, t_hat, analysed_layers: Sequence[int]) -> Breakdown:
    """The bars of one decomposed image (a Decomposition with components, layers 'all') for a text."""
    t = np.asarray(t_hat, dtype=np.float64).ravel()
    emb = dec.embedding[0].double().cpu().numpy()
    norm = float(np.linalg.norm(emb) * np.linalg.norm(t))          # |img| |t| (both 1 up to float32)
    heads = dec.head_cls[0].double().cpu().numpy() @ t / norm       # [L, H]
    mlp = dec.mlp[0].double().cpu().numpy() @ t / norm              # [L]
    bias = dec.attn_bias[0].double().cpu().numpy() @ t / norm       # [L]
    embed = float(dec.embedding_term[0].double().cpu().numpy() @ t / norm)
    pool_mlp = None if dec.pool_mlp is None else float(dec.pool_mlp[0].double().cpu().numpy() @ t / norm)
    analysed = {int(l) for l in analysed_layers}
    n_layers, n_heads = heads.shape
    rows = []
    for l in range(n_layers):
        if l in analysed:
            rows += [(f"L{l}.H{h}", "head", l, h, heads[l, h]) for h in range(n_heads)]
        else:
            rows.append((f"L{l} attention ({n_heads} heads, not analysed)", "attention of a layer", l, None,
                         heads[l].sum()))
    rows += [(f"L{l} MLP", "MLP", l, None, mlp[l]) for l in range(n_layers)]
    rows.append(("out-proj biases (all layers)", "out-proj biases", None, None, bias.sum()))
    rows.append(("embedding term (patch and prefix tokens, positions, final norm biases)", "embedding term", None,
                 None, embed))
    if pool_mlp is not None:
        rows.append(("pool MLP (the attention pool's MLP: pool_mlp)", "pool MLP", None, None, pool_mlp))
    comp = pd.DataFrame(rows, columns=["component", "kind", "layer", "head", "share"])
    comp = comp.sort_values("share", ascending=False, kind="stable").reset_index(drop=True)
    comp.insert(0, "rank", np.arange(1, len(comp) + 1))
    per_layer = pd.DataFrame(
        [(l, part, float(v)) for l in range(n_layers)
         for part, v in (("attention heads", heads[l].sum()), ("MLP", mlp[l]), ("out-proj bias", bias[l]))],
        columns=["layer", "part", "share"])
    return Breakdown(comp, per_layer, float(emb @ t / norm), float(comp.share.sum()), emb.astype(np.float32))


def breakdown(row: dict, image: Image.Image, image_key: str, t_hat) -> Breakdown:
    """Which heads make this match: every analysed head's and every layer's direct share of
    cos(image, text) for one image, from its cached whole decomposition (only the text changes
    cost a matrix product)."""
    return breakdown_of(decompose_components(row, image, image_key), t_hat, row["analysed_layers"])


# --------------------------------------------------------------------------- neurons (MATH.md §10)

@st.cache_resource(show_spinner=False, max_entries=8)
def _neuron_trace(key: tuple, image_key: str, layers: tuple, _lm, _image):
    from models.neurons import lens_for
    x = _lm.preprocess(_image)[None]                        # [1, 3, S, S]
    return lens_for(_lm, list(layers)).trace(x)


def _trace(row: dict, image: Image.Image, image_key: str, layers: Sequence[int]):
    """(lens, trace) of one image for MLP layers `layers` (cached per image and layer set)."""
    from models.neurons import lens_for
    lm = model(row)
    layers = tuple(sorted(set(int(l) for l in layers)))
    return lens_for(lm, list(layers)), _neuron_trace(spec_key(row), image_key, layers, lm, image)


def neuron_map(row: dict, image: Image.Image, image_key: str, layer: int, neuron: int, direction) -> tuple[np.ndarray, float]:
    """The per-patch map of one neuron's second-order effect along a unit direction (its pc or a
    text): (grid [gh, gw] of each patch's part of phi_n . direction, the prefix tokens' part: the class
    token's, 0 for a tower without one)."""
    import torch
    lens, tr = _trace(row, image, image_key, [layer])
    te = lens.token_effect(tr, int(layer), int(neuron), torch.as_tensor(np.asarray(direction, dtype=np.float64)))[0]
    lm = model(row)
    gh, gw = lm.grid
    prefix = lm.tower.prefix                        # tokens before the patches: 1 (class token), 0 (MAP towers)
    return te[prefix:].reshape(gh, gw).double().numpy(), float(te[:prefix].sum())


def neurons_behind(row: dict, image: Image.Image, image_key: str, head: Head, t_hat, k: int = 12) -> tuple[pd.DataFrame, float]:
    """The neurons behind head (l', h)'s share of cos(image, text): every neuron of every MLP layer
    before l' with its share (alpha[n, k] (u[n, k] . t_hat), MATH.md §10), largest |share| first, at
    most k rows (layer, neuron, share); and the sum over all those neurons."""
    import torch
    if int(head[0]) < 1:
        return pd.DataFrame(columns=["layer", "neuron", "share"]), 0.0
    lens, tr = _trace(row, image, image_key, range(int(head[0])))
    t = torch.as_tensor(np.asarray(t_hat, dtype=np.float64).ravel())
    shares = lens.head_shares(tr, (int(head[0]), int(head[1])), t)
    frames = [pd.DataFrame({"layer": l, "neuron": np.arange(v.shape[1]), "share": v[0].double().numpy()})
              for l, v in shares.items()]
    df = pd.concat(frames, ignore_index=True)
    total = float(df.share.sum())
    df = df.reindex(df.share.abs().sort_values(ascending=False, kind="stable").index).head(k).reset_index(drop=True)
    return df, total

"""Links that never lie: a permalink's parameters are checked before a page shows anything.

Pages are addressed by query parameters: ``model`` (every page), ``head`` (a head name, ``L3.H1``; on
the head page also a head index beside ``layer``), ``layer`` (the head page) and ``image`` (the match
page); on the neuron pages ``layer`` is an MLP layer and ``neuron`` a neuron index. A link that names a model the warehouse does not hold, a head or layer the model does not
have (or did not analyse), or an image the model did not embed would otherwise fall back silently to
another object under the asked-for URL. ``check_link`` instead stops the page with what was asked,
what exists, and a link to the nearest valid page; the URL stays as it was asked.
"""
from __future__ import annotations

import difflib
from typing import Optional

import pandas as pd
import streamlit as st

from dashboard import nav
from dashboard.data import q
from warehouse import head_name, parse_head, queries

PARAMS = ("model", "layer", "head", "image", "neuron")
NEURON_PAGES = (nav.NEURON, nav.NEURON_ATLAS, nav.NEURON_TEXT)     # ``layer`` there: an MLP layer


def nearest_model(asked: str, ids: list[str], default: str) -> str:
    """The model id most like ``asked`` (difflib), else ``default``."""
    close = difflib.get_close_matches(asked, ids, n=1, cutoff=0.3)
    return close[0] if close else default


def nearest_head(layer: Optional[int], head: Optional[int], analysed: list[int], n_heads: int) -> tuple[int, int]:
    """The analysed head nearest to (layer, head): the closest analysed layer (the later one on a tie),
    the head index clamped to the model's; the last analysed head when nothing is known."""
    if layer is None:
        layer = analysed[-1]
    near = min(analysed, key=lambda a: (abs(a - layer), -a))
    h = n_heads - 1 if head is None else min(max(int(head), 0), n_heads - 1)
    return near, h


def _int(value) -> Optional[int]:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def _heads_text(row: dict) -> str:
    layers = [int(l) for l in row["analysed_layers"]]
    span = f"layers {layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else \
        "layers " + ", ".join(map(str, layers))
    return (f"{row['model_id']} has {row['layers']} layers x {row['heads']} heads; analysed: {span}, heads "
            f"0-{int(row['heads']) - 1} ({head_name(layers[0], 0)} .. {head_name(layers[-1], int(row['heads']) - 1)})")


def refuse(page: str, asked: str, problem: str, exists: str, nearest: dict, nearest_label: str) -> None:
    """Stop the page: what the link asked for, why it cannot be shown, what exists, and a link to the
    nearest valid page (``page`` with the ``nearest`` query)."""
    st.error(f"This link asks for {asked}, which {problem}. Nothing else is shown under this address.",
             icon=":material/link_off:")
    st.markdown(f"**What exists:** {exists}")
    st.page_link(page, label=f"Open the nearest valid page: {nearest_label}", query_params=nearest,
                 icon=":material/arrow_forward:")
    st.stop()


def check_link(page: str, models: pd.DataFrame, default_model: str) -> None:
    """Check the current URL's parameters for ``page`` (a nav path) against the warehouse; stop the
    page with ``refuse`` when one names something that is not there. Returns when all are valid."""
    params = {k: st.query_params.get(k) for k in PARAMS}
    if not any(v is not None for v in params.values()):
        return
    ids = [str(m) for m in models.model_id]
    model = params["model"]
    if model is not None and model not in ids:
        near = nearest_model(model, ids, default_model)
        refuse(page, f"the model '{model}'", "is not in this warehouse",
               f"the warehouse holds {len(ids)} model(s): " + ", ".join(f"`{m}`" for m in ids) + ".",
               {"model": near}, f"{nav.TITLES[page]} of {near}")
    model = model if model is not None else st.session_state.get("_atlas_model")
    if model not in ids:
        model = default_model
    if page in NEURON_PAGES:
        _check_neuron_link(page, model, params["layer"], params["neuron"])
        return
    row = q(queries.model_row, model)
    analysed, n_heads = [int(l) for l in row["analysed_layers"]], int(row["heads"])
    layer, head = params["layer"], params["head"]
    if layer is not None or head is not None:
        if layer is not None:                          # the head page: ?layer=5&head=3
            l, h = _int(layer), _int(head)
            asked = f"layer {layer!r}, head {head!r} of {model}"
        else:                                          # ?head=L5.H3 (the head page also takes a name)
            try:
                l, h = parse_head(head)
            except ValueError:
                l = h = None
            asked = f"the head '{head}' of {model}"
        problem = None
        if l is None or h is None:
            problem = "is not a head address (write it as ?head=L<layer>.H<head>, or ?layer=N&head=M on the " \
                      "head page; 0-based)"
        elif not 0 <= l < int(row["layers"]) or not 0 <= h < n_heads:
            problem = f"does not exist in {model}"
        elif l not in analysed:
            problem = f"was not analysed (no head embeddings, texts or labels are stored for layer {l})"
        if problem:
            nl, nh = nearest_head(l, h, analysed, n_heads)
            if page == nav.PROPERTY_NN:     # a head stands for its property there: the page picks one instead
                refuse(page, asked, problem, _heads_text(row) + ".", {"model": model},
                       f"{nav.TITLES[page]} of {model}, choosing a property")
            near = {"model": model, "layer": str(nl), "head": str(nh)} if page == nav.HEAD else \
                {"model": model, "head": head_name(nl, nh)}
            refuse(page, asked, problem, _heads_text(row) + ".", near,
                   f"{nav.TITLES[page]} of {head_name(nl, nh)} of {model}")
    image = params["image"]
    if image is not None and not q(queries.image_embedded, model, image):
        ims = list(q(queries.images, model).image_id)
        if not ims:
            refuse(page, f"the image '{image}'", f"is not embedded for {model}",
                   f"{model} has no embedded image.", {"model": model}, f"{nav.TITLES[page]} of {model}")
        near = (difflib.get_close_matches(image, ims, n=1, cutoff=0.3) or [ims[0]])[0]
        keep = {k: v for k, v in st.query_params.to_dict().items() if k not in ("image",)} | {"model": model}
        refuse(page, f"the image '{image}'", f"is not embedded for {model}",
               f"{model} has {len(ims):,} embedded images" + (" (the first 5,000 listed)" if len(ims) >= 5000 else "")
               + f", e.g. `{ims[0]}` .. `{ims[-1]}`.", keep | {"image": near},
               f"{nav.TITLES[page]} with the image {near}")


def _check_neuron_link(page: str, model: str, layer, neuron) -> None:
    """A neuron page's ``layer`` (an analysed MLP layer) and ``neuron`` (0-based, below the layer's width)."""
    if layer is None and neuron is None:
        return
    layers = q(queries.neuron_layers, model)
    analysed = [int(l) for l in layers.layer]
    title = nav.TITLES[page]
    if not analysed:
        refuse(page, f"MLP layer {layer!r} of {model}", "has no analysed neurons",
               f"{model} has no analysed MLP layer (`python -m etl neurons --model ...` analyses one).",
               {"model": model}, f"{title} of {model}")
    width = {int(r.layer): int(r.n_neurons) for r in layers.itertuples()}
    exists = f"{model} has neurons analysed in MLP layer(s) " + ", ".join(
        f"{l} ({width[l]:,} neurons, 0-{width[l] - 1})" for l in analysed) + "."
    l = analysed[0] if layer is None else _int(layer)
    n = None if neuron is None else _int(neuron)
    asked = f"MLP layer {layer!r}" + (f", neuron {neuron!r}" if neuron is not None else "") + f" of {model}"
    problem = None
    if l is None:
        problem = "is not a layer number (0-based)"
    elif l not in analysed:
        problem = "was not analysed for neurons"
    elif neuron is not None and (n is None or not 0 <= n < width[l]):
        problem = f"is not a neuron of that layer (0-{width[l] - 1})"
    if problem:
        nl = l if l in analysed else min(analysed, key=lambda a: (abs(a - (l if l is not None else 0)), -a))
        near = {"model": model, "layer": str(nl)}
        if page == nav.NEURON:
            near["neuron"] = str(min(max(n if n is not None else 0, 0), width[nl] - 1))
        refuse(page, asked, problem, exists, near, f"{title} of MLP layer {nl} of {model}")

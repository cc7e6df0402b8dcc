"""Small widgets every page shares: the warehouse guard, the model picker, head addressing
(`L11.H3`), head-set and image inputs (uploads included), the heatmap overlay, thumbnails,
and CSV downloads.

Cross-page state is kept in a few named session keys (`_atlas_model`, `_atlas_head`); links
carry `?model=...&head=L11.H3`, which the pickers consume once and then forget.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image

from dashboard import nav
from dashboard.links import check_link
from dashboard.data import fill_commands, q, stamp, warehouse_path
from dashboard.safe_text import code, plain  # noqa: F401  (w.plain, w.code for pages)
from warehouse import head_name, parse_head, queries  # noqa: F401  (w.head_name, w.parse_head for pages)

Head = tuple[int, int]
MAX_UPLOAD_MB = 20
NEG, MID, POS = (59, 76, 192), (247, 247, 247), (180, 4, 38)   # diverging scale: towards B / 0 / towards A
PALETTE = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#eeca3b", "#b279a2", "#ff9da6",
           "#9d755d", "#a0cbe8", "#ffbf79", "#8cd17d", "#86bcb6", "#f1ce63", "#d4a6c8", "#fabfd2",
           "#d7b5a6", "#79706e", "#bab0ac", "#499894"]                  # tableau20-like, one per property
NOT_A_PROPERTY = {"mixed": "#c9c9c9", "unlabelled": "#dedede", "not analysed": "#f0f0f0"}  # greys, in this order
HEAD_MODES = ("one head", "a layer", "a property's heads", "all analysed heads")


# --------------------------------------------------------------------------- head addressing

def consume_link(name: str) -> Optional[str]:
    """A `?name=value` query parameter from a link: remembered in the session, then removed from the URL."""
    value = st.query_params.get(name)
    if value is not None:
        del st.query_params[name]
        st.session_state[f"_atlas_{name}"] = value
    return value


# --------------------------------------------------------------------------- warehouse and model

def require_warehouse() -> dict:
    """Stop the page with the exact fill command when the warehouse is missing or holds no model."""
    path = warehouse_path()
    summary = q(queries.warehouse_summary)
    if summary["missing"] or summary["models"] == 0:
        what = "does not exist yet" if summary["missing"] else "holds no model yet"
        st.warning(f"The warehouse {code(path)} {what}. Fill it with the demo (toy model on 2,000 generated "
                   "scenes, a few minutes on CPU), then reload this page:")
        st.code("\n".join(fill_commands(path)[:1]), language="bash")
        st.caption("or, for this warehouse file directly:")
        st.code(fill_commands(path)[1], language="bash")
        st.stop()
    return summary


def _remember_model() -> None:
    st.session_state["_atlas_model"] = st.session_state["atlas_model_picker"]


def default_model(df) -> str:
    """The model a session opens on: the most recently built trained model (any source but
    random init), else the first model by name."""
    trained = df[df.source != "random"]
    if trained.empty:
        return str(df.model_id.iloc[0])
    return str(trained.sort_values("created_at", kind="stable").model_id.iloc[-1])


def model_picker() -> dict:
    """The sidebar model picker (same on every page); returns the chosen `models` row as a dict."""
    require_warehouse()
    df = q(queries.models)
    ids = list(df.model_id)
    check_link(st.session_state.get("_atlas_page", nav.ATLAS), df, default_model(df))
    consume_link("model")
    # a link to one head: head pickers open on it, in this run only (a page without a head picker
    # must not leave the flag for the next page)
    st.session_state["_atlas_head_link_new"] = consume_link("head") is not None
    current = st.session_state.get("_atlas_model")
    if current not in ids:
        current = default_model(df)
    st.session_state["_atlas_model"] = current
    st.session_state["atlas_model_picker"] = current
    info = {r.model_id: r for r in df.itertuples()}
    st.sidebar.selectbox(
        "Model", ids, key="atlas_model_picker", on_change=_remember_model,
        format_func=lambda m: f"{m}  ({info[m].n_images} images)",
        help="Every model in the warehouse; the choice follows you across pages.")
    st.sidebar.caption(f"Warehouse: {code(warehouse_path())}")
    return q(queries.model_row, current)


def analysed_heads(row: dict) -> list[Head]:
    return [(int(l), h) for l in row["analysed_layers"] for h in range(int(row["heads"]))]


def head_labels(row: dict) -> dict[Head, str]:
    g = q(queries.head_grid, row["model_id"])
    return {(int(r.layer), int(r.head)): r.property for r in g.itertuples()}


def _remember_head(key: str) -> None:
    st.session_state["_atlas_head"] = st.session_state[key]


def one_head_picker(row: dict, key: str, label: str = "Head") -> Head:
    """A selectbox over the analysed heads, `L11.H3 · colors`, on the session's current head.

    The current head (`_atlas_head`) is shared by every page and set by links and grid clicks.
    The widget key is per model (`<key>@<model_id>`): the option labels carry that model's labels.
    """
    names = [head_name(*h) for h in analysed_heads(row)]
    labels = head_labels(row)
    wkey = f"{key}@{row['model_id']}"
    st.session_state.pop("_atlas_head_link_new", None)
    want = st.session_state.get("_atlas_head")
    st.session_state[wkey] = want if want in names else names[-1]
    st.session_state["_atlas_head"] = st.session_state[wkey]
    choice = st.selectbox(label, names, key=wkey, on_change=_remember_head, args=(wkey,),
                          format_func=lambda n: f"{n} · {labels.get(parse_head(n), '')}")
    return parse_head(choice)


def head_set_picker(row: dict, key: str, modes: Sequence[str] = HEAD_MODES) -> tuple[list[Head], str]:
    """Choose heads: one head, a layer, a property's heads, or all analysed -> (heads, description)."""
    linked = st.session_state.pop("_atlas_head_link_new", False)
    if linked and modes[0] == "one head":
        st.session_state[f"{key}_mode"] = "one head"
    mode = st.radio("Heads", list(modes), key=f"{key}_mode", horizontal=True)
    if mode == "one head":
        l, h = one_head_picker(row, f"{key}_head")
        return [(l, h)], head_name(l, h)
    if mode == "a layer":
        layers = [int(l) for l in row["analysed_layers"]]
        if st.session_state.get(f"{key}_layer") not in layers:      # a fresh page: the current head's layer
            try:
                current = parse_head(st.session_state.get("_atlas_head") or "")[0]
            except ValueError:
                current = None
            st.session_state[f"{key}_layer"] = current if current in layers else layers[-1]
        layer = st.selectbox("Layer", layers, key=f"{key}_layer", format_func=lambda l: f"layer {l}")
        return [(layer, h) for h in range(int(row["heads"]))], f"all heads of layer {layer}"
    if mode == "a property's heads":
        props = q(queries.properties, row["model_id"])
        if props.empty:
            st.info("No head of this model is labelled yet; run `python -m etl label` or pick another head set.")
            st.stop()
        names = [p for p in props.property if p not in NOT_A_PROPERTY]           # 'mixed' is no property
        if not names:
            st.info("No head of this model carries a property label (every labelled head is 'mixed'); "
                    "pick another head set.")
            st.stop()
        counts = dict(zip(props.property, props.n_heads))
        prop = st.selectbox("Property", names, key=f"{key}_prop@{row['model_id']}",
                            format_func=lambda p: f"{p} ({plural(int(counts[p]), 'head')})")
        ph = q(queries.property_heads, row["model_id"], prop)
        heads = [(int(r.layer), int(r.head)) for r in ph.itertuples()]
        return heads, (f"the {plural(len(heads), 'head')} labelled '{prop}': "
                       + ", ".join(head_name(*h) for h in heads))
    heads = analysed_heads(row)
    return heads, f"all {len(heads)} analysed heads (layers {', '.join(map(str, row['analysed_layers']))})"


def head_page_params(model_id: str, layer: int, head: int) -> dict:
    """The query of a head's permalink: /head?model=...&layer=...&head=..."""
    return {"model": model_id, "layer": str(int(layer)), "head": str(int(head))}


def head_page_link(model_id: str, layer: int, head: int, label: Optional[str] = None) -> None:
    """A link to the head page (its permalink) of one head."""
    st.page_link(nav.HEAD, label=label or f"{nav.TITLES[nav.HEAD]} page of {head_name(layer, head)} (permalink)",
                 query_params=head_page_params(model_id, layer, head), icon=":material/center_focus_strong:")


def head_links(model_id: str, layer: int, head: int, prop: Optional[str] = None, head_page: bool = True) -> None:
    """Links from a head to its head page and every analysis of it (pages open with this model and head chosen)."""
    if head_page:
        head_page_link(model_id, layer, head)
    params = {"model": model_id, "head": head_name(layer, head)}
    for page in (nav.TOPIC, nav.CONTRASTIVE, nav.IMAGE_NN, nav.TEXT_NN):
        st.page_link(page, label=f"{nav.TITLES[page]} of {head_name(layer, head)}", query_params=params)
    if has_property(prop):      # the property page searches by a property's heads: only a real label leads there
        st.page_link(nav.PROPERTY_NN, label=f"{nav.TITLES[nav.PROPERTY_NN]} by '{plain(prop)}', the label of "
                     f"{head_name(layer, head)}", query_params=params)
    else:
        st.caption(f"{nav.TITLES[nav.PROPERTY_NN]}: {head_name(layer, head)} is {plain(prop or 'unlabelled')}, so it "
                   "names no property to search by.")


def has_property(prop: Optional[str]) -> bool:
    """Whether a head label is a property (not 'mixed', 'unlabelled', 'not analysed' or missing)."""
    return bool(prop) and prop not in NOT_A_PROPERTY


# --------------------------------------------------------------------------- examples that show something

def example_head(heads: Sequence[Head]) -> Optional[Head]:
    """The head a page's first example is about: the one head chosen, else the session's current head
    when it is among the chosen ones, else the last chosen."""
    if not heads:
        return None
    try:
        current = parse_head(st.session_state.get("_atlas_head") or "")
    except ValueError:
        current = None
    return heads[0] if len(heads) == 1 else current if current in heads else heads[-1]


def set_example_defaults(row: dict, heads: Sequence[Head], text_keys: Sequence[str], image_key: str) -> None:
    """First visit of a page: its text inputs (``text_keys``, in order) start on the example head's first
    TextSpan texts and its image picker (``image_key``) on the image that head pushes most towards the
    first one, so the first map shows what the head carries (a fixed 'a red object' on the first image
    drew a nearly empty map). Inputs the user has set are left alone."""
    head = example_head(heads)
    if head is None or all(k in st.session_state for k in (*text_keys, image_key)):
        return
    texts = q(queries.head_texts, row["model_id"], *head)
    for key, text in zip(text_keys, list(texts.text) if len(texts) else []):
        st.session_state.setdefault(key, str(text))
    if image_key not in st.session_state:
        top = q(queries.head_top_images, row["model_id"], head[0], head[1], 1)
        if len(top):
            st.session_state[image_key] = str(top.image_id.iloc[0])


# --------------------------------------------------------------------------- neurons

def neuron_name(layer: int, neuron: int) -> str:
    """'L9.N1234': neuron 1234 of MLP layer 9 (0-based), as every neuron page names it."""
    return f"L{int(layer)}.N{int(neuron)}"


def analysed_neuron_layers(model_id: str) -> pd.DataFrame:
    """The model's analysed MLP layers (`neuron_layers` rows); with none, the page says how to analyse
    one and stops (every neuron page starts here)."""
    layers = q(queries.neuron_layers, model_id)
    if layers.empty:
        st.info("No neuron of this model is analysed yet. Run the second-order lens over its images, e.g.")
        st.code(f"python -m etl neurons --model {model_id} --dataset shapes:2000:seed=0", language="bash")
        st.stop()
    return layers


def neuron_page_params(model_id: str, layer: int, neuron: int) -> dict:
    """The query of a neuron's permalink: /neuron?model=...&layer=...&neuron=..."""
    return {"model": model_id, "layer": str(int(layer)), "neuron": str(int(neuron))}


def neuron_page_url(model_id: str, layer: int, neuron: int) -> str:
    """The neuron page's permalink relative to any page (for link columns and chart hrefs)."""
    from urllib.parse import urlencode
    return f"{nav.URLS[nav.NEURON]}?{urlencode(neuron_page_params(model_id, layer, neuron))}"


def neuron_page_link(model_id: str, layer: int, neuron: int, label: Optional[str] = None) -> None:
    """A link to one neuron's page (its permalink)."""
    st.page_link(nav.NEURON, label=label or f"Neuron page of {neuron_name(layer, neuron)} (permalink)",
                 query_params=neuron_page_params(model_id, layer, neuron), icon=":material/blur_on:")


def plain_thumbnails(df: pd.DataFrame, caption, columns: int = 8) -> None:
    """Thumbnails of image rows, each captioned by ``caption(row)`` as plain text (escaped with
    dashboard.safe_text's ``plain``: st.image renders captions as Markdown)."""
    rows = list(df.itertuples())
    for start in range(0, len(rows), columns):
        cols = st.columns(columns)
        for col, r in zip(cols, rows[start:start + columns]):
            if getattr(r, "thumbnail", None) is not None:
                col.image(bytes(r.thumbnail), caption=plain(caption(r)), width="stretch")


# --------------------------------------------------------------------------- images

@dataclass
class ImageChoice:
    image: Image.Image          # RGB
    key: str                    # identifies the pixels (cache key of the live decomposition)
    caption: str
    image_id: Optional[str]     # warehouse image id, None for uploads
    faithful: bool = True       # False: a warehouse image shown from its thumbnail (the original is gone)
    note: str = ""              # where a warehouse image's pixels came from


def _load_warehouse_image(image_id: str):
    """The embedded pixels of a warehouse image (dashboard.originals.resolve), else its thumbnail."""
    from dashboard.originals import resolve
    rec = q(queries.image_record, image_id)
    return resolve(rec), f"{image_id} ({describe(rec) or 'no label'})"


def image_input(row: dict, key: str) -> Optional[ImageChoice]:
    """An image from the warehouse or an upload; shows a clear message (not a traceback) for bad files."""
    import models
    source = st.radio("Image", ["warehouse image", "upload"], key=f"{key}_source", horizontal=True)
    if source == "upload":
        up = st.file_uploader(f"Upload an image (any format Pillow reads, at most {MAX_UPLOAD_MB} MB)",
                              key=f"{key}_upload", max_upload_size=MAX_UPLOAD_MB)
        if up is None:
            st.info("Upload an image to analyse it, or choose a warehouse image.")
            return None
        data = up.getvalue()
        if len(data) > MAX_UPLOAD_MB * 2**20:
            st.error(f"{plain(up.name)}: {len(data) / 2**20:.1f} MB is over the {MAX_UPLOAD_MB} MB upload "
                     "limit; resize or recompress it.")
            return None
        try:
            img = models.load_image(data)
        except models.ImageError as exc:
            st.error(plain(f"{up.name}: {str(exc).removeprefix('upload: ')}"))
            return None
        return ImageChoice(img, "upload:" + hashlib.sha1(data).hexdigest(), up.name, None)
    ims = q(queries.images, row["model_id"])
    if ims.empty:
        st.info("No image is embedded for this model; upload one instead.")
        return None
    labels = {r.image_id: describe(r) for r in ims.itertuples()}
    image_id = st.selectbox("Warehouse image", list(ims.image_id), key=f"{key}_image",
                            format_func=lambda i: f"{i}  {labels.get(i, '')}")
    try:
        resolved, caption = _load_warehouse_image(image_id)
    except models.ImageError as exc:
        st.error(plain(exc))
        return None
    if resolved.faithful:
        st.caption(f"Live map on the {plain(resolved.note)}: it decomposes the stored embedding exactly.")
    else:
        st.warning(f"Not the embedded image: {plain(resolved.note)}.", icon=":material/warning:")
        caption += " — from its stored thumbnail"
    return ImageChoice(resolved.image, f"warehouse:{image_id}:{resolved.source}:{stamp(warehouse_path())}",
                       caption, image_id, resolved.faithful, resolved.note)


# --------------------------------------------------------------------------- heatmaps

def colorize(values: np.ndarray, vmax: float) -> tuple[np.ndarray, np.ndarray]:
    """Diverging colours on one symmetric scale [-vmax, vmax]: (rgb uint8 [..., 3], alpha [..., 1] in 0..1)."""
    v = np.clip(np.asarray(values, dtype=np.float64) / max(float(vmax), 1e-12), -1.0, 1.0)[..., None]
    pos, neg, mid = (np.array(c, dtype=np.float64) for c in (POS, NEG, MID))
    rgb = np.where(v >= 0, mid + (pos - mid) * v, mid + (neg - mid) * (-v))
    return rgb.round().astype(np.uint8), np.abs(v)


def overlay(image: Image.Image, heat: np.ndarray, vmax: float, size: int = 320, opacity: float = 0.8,
            floor: float = 0.25) -> Image.Image:
    """The map drawn on the image itself (both at `size` px).

    heat: the patch grid [gh, gw] of the model's crop (each patch becomes one block, aligned with the
    patch it is the share of) or an already upsampled map. Diverging colours on [-vmax, vmax]; the
    colour's alpha is opacity * (floor + (1 - floor) * |v| / vmax), so weak patches stay visible but
    let the image through, strong ones cover it."""
    base = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float64)
    h = np.asarray(Image.fromarray(np.asarray(heat, dtype=np.float32), mode="F").resize((size, size), Image.NEAREST))
    rgb, a = colorize(h, vmax)
    a = opacity * (floor + (1 - floor) * a)
    out = base * (1 - a) + rgb * a
    gh, gw = np.asarray(heat).shape
    if gh <= 64 and gw <= 64:                                  # faint patch borders on a patch grid
        img = out.clip(0, 255)
        for k in range(1, gh):
            img[round(k * size / gh), :, :] = img[round(k * size / gh), :, :] * 0.85
        for k in range(1, gw):
            img[:, round(k * size / gw), :] = img[:, round(k * size / gw), :] * 0.85
        out = img
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def overlay_on_original(image: Image.Image, box, heat: np.ndarray, vmax: float, width: int = 480,
                        opacity: float = 0.8, floor: float = 0.25) -> Image.Image:
    """The whole image (scaled to ``width`` px on its long side) with the model's crop outlined, the
    rest dimmed, and the patch-grid map drawn in place: patch (r, c) fills its own box in the image
    (models.maps.patch_boxes of the crop's ``box`` from models.model_view_box), coloured as ``overlay``
    colours it on the crop."""
    from PIL import ImageDraw
    from models.maps import patch_boxes
    img = image.convert("RGB")
    f = width / max(img.size)
    w, h = max(1, round(img.size[0] * f)), max(1, round(img.size[1] * f))
    base = np.asarray(img.resize((w, h), Image.BICUBIC), dtype=np.float64)
    grid = np.asarray(heat, dtype=np.float64)
    boxes = patch_boxes(box, grid.shape) * f                               # [gh, gw, 4] display pixels
    x0, y0, x1, y1 = (float(v) * f for v in box)
    inside = np.zeros((h, w), dtype=bool)
    inside[max(0, round(y0)):max(0, round(y1)), max(0, round(x0)):max(0, round(x1))] = True
    out = np.where(inside[..., None], base, base * 0.45 + 255 * 0.2)     # outside the crop: dimmed
    rgb, a = colorize(grid, vmax)                                         # [gh, gw, 3], [gh, gw, 1]
    a = opacity * (floor + (1 - floor) * a)
    for r in range(grid.shape[0]):
        for c in range(grid.shape[1]):
            bx0, by0, bx1, by1 = (int(round(v)) for v in boxes[r, c])
            bx0, by0, bx1, by1 = max(bx0, 0), max(by0, 0), min(bx1, w), min(by1, h)
            if bx1 > bx0 and by1 > by0:
                cell = out[by0:by1, bx0:bx1]
                out[by0:by1, bx0:bx1] = cell * (1 - a[r, c]) + rgb[r, c] * a[r, c]
    pic = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    ImageDraw.Draw(pic).rectangle([round(x0), round(y0), round(x1) - 1, round(y1) - 1], outline=(20, 20, 20), width=2)
    return pic


def map_views(image: Image.Image, crop: Image.Image, box, grid: np.ndarray, vmax: float, caption: str,
              low: str = "away from the text", high: str = "towards the text") -> None:
    """The map on the whole image (the crop outlined, the map in place) beside the model's crop with the
    map, then the legend; without a box (an unusual preprocess) the crop view alone."""
    if box is not None:
        a, b = st.columns([3, 2])
        a.image(overlay_on_original(image, box, grid, vmax),
                caption=f"{caption}: the whole image; the outlined square is what the model sees")
        b.image(overlay(crop, grid, vmax, size=320), caption="the model's crop, one block per patch")
    else:
        st.image(overlay(crop, grid, vmax, size=320), caption=f"{caption} (the model's crop, one block per patch)")
    st.image(legend(vmax, low, high, width=320))


def legend(vmax: float, low: str = "away from the text", high: str = "towards the text",
           width: int = 320) -> Image.Image:
    """A colour bar for overlay: the full range -vmax .. 0 .. +vmax with its numbers and meanings."""
    from PIL import ImageDraw
    bar_h, pad = 14, 4
    img = Image.new("RGB", (width, bar_h + 34), (255, 255, 255))
    v = np.linspace(-vmax, vmax, width)
    rgb, _ = colorize(v, vmax)
    img.paste(Image.fromarray(np.repeat(rgb[None], bar_h, axis=0)), (0, 0))
    d = ImageDraw.Draw(img)
    y = bar_h + pad
    d.text((0, y), f"-{vmax:.4g}", fill=(30, 30, 30))
    d.text((width // 2 - 3, y), "0", fill=(30, 30, 30))
    d.text((width - 6 * len(f"+{vmax:.4g}") - 2, y), f"+{vmax:.4g}", fill=(30, 30, 30))
    d.text((0, y + 14), low, fill=tuple(NEG))
    d.text((width - 6 * len(high) - 2, y + 14), high, fill=tuple(POS))
    return img


def small_multiples(crop: Image.Image, maps: dict, vmax: float, columns: int = 4, size: int = 200) -> None:
    """One overlay per head (name -> patch grid), all on the same scale [-vmax, vmax]."""
    items = list(maps.items())
    for start in range(0, len(items), columns):
        cols = st.columns(columns)
        for col, (name, g) in zip(cols, items[start:start + columns]):
            col.image(overlay(crop, g, vmax, size=size), caption=f"{name}: sum {float(np.sum(g)):+.4f}")


def grid_chart(grid: np.ndarray, vmax: float, title: str) -> alt.Chart:
    """The patch-grid map as an Altair heatmap with its colour legend on the symmetric scale."""
    gh, gw = grid.shape
    df = pd.DataFrame([(r, c, float(grid[r, c])) for r in range(gh) for c in range(gw)],
                      columns=["row", "col", "value"])
    scale = alt.Scale(domain=[-vmax, 0, vmax], range=["#%02x%02x%02x" % c for c in (NEG, MID, POS)])
    return (alt.Chart(df, title=title).mark_rect()
            .encode(x=alt.X("col:O", axis=None), y=alt.Y("row:O", axis=None),
                    color=alt.Color("value:Q", scale=scale, title="share"),
                    tooltip=["row", "col", alt.Tooltip("value:Q", format=".5f")])
            .properties(width=260, height=260))


# --------------------------------------------------------------------------- charts built once per warehouse version

def chart(key: str, build, deps: tuple = (), container=None, **kw):
    """``st.altair_chart(build(), key=key, **kw)``, with the chart's Vega-Lite spec (data included, as
    Arrow) built once per warehouse version and ``deps`` (the page inputs the chart depends on) and
    kept in memory and on disk (dashboard/cache.py): building Altair charts is most of the Metrics
    page's time, and a restarted server reads them back. The spec is what ``st.altair_chart`` itself
    sends (Streamlit's own conversion), so the chart drawn is the same."""
    import copy
    from streamlit.elements.vega_charts import _convert_altair_to_vega_lite_spec
    from dashboard import cache
    spec = copy.deepcopy(cache.built(f"chart-{key}", tuple(deps), lambda: _convert_altair_to_vega_lite_spec(build())))
    return (container or st).vega_lite_chart(sized(spec, kw.get("width") == "stretch"), key=key, **kw)


def sized(spec: dict, stretch: bool) -> dict:
    """``spec`` with an autosize that keeps its plot whole. Streamlit's default for a single or layered
    view is 'fit': the whole chart, axis labels and legend included, squeezed into the spec's height,
    so rotated model names or a legend leave the plot a few pixels tall (every box of a boxplot on one
    line). 'fit-x' (stretched: the width follows the column) or 'pad' (the spec's own plot size) keeps
    the height for the plot and adds the labels around it. Facets and concatenations, and a spec that
    sets its own autosize, are left to Streamlit."""
    if "autosize" not in spec and not any(k in spec for k in ("facet", "hconcat", "vconcat", "concat", "repeat")) \
            and not any(k in spec.get("encoding", {}) for k in ("row", "column", "facet")):
        spec["autosize"] = {"type": "fit-x" if stretch else "pad", "contains": "padding"}
    return spec


# --------------------------------------------------------------------------- one colour per model

MODEL_PALETTE = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#b279a2", "#72b7b2", "#eeca3b", "#9d755d",
                 "#ff9da6", "#17becf"]      # tableau10-like, distinct hues (no grey), for trained models
CONTROL_GREYS = ["#7f7f7f", "#bdbdbd", "#525252", "#a3a3a3"]   # random-init controls: greys, never a hue
CONTROL_BAND = "#9e9e9e"


def model_colours(models_df: Optional[pd.DataFrame] = None) -> dict[str, str]:
    """{model_id: colour} for every model of the warehouse, fixed by the sorted model ids: trained
    models take MODEL_PALETTE in order, random-init controls (source 'random') take greys. Every
    chart that colours by model uses it (model_colour), so a model has one colour everywhere."""
    df = q(queries.models) if models_df is None else models_df
    ids = sorted(str(m) for m in df.model_id)
    random = {str(m) for m, s in zip(df.model_id, df.source) if s == "random"}
    out, k, g = {}, 0, 0
    for m in ids:
        if m in random:
            out[m] = CONTROL_GREYS[g % len(CONTROL_GREYS)]
            g += 1
        else:
            out[m] = MODEL_PALETTE[k % len(MODEL_PALETTE)]
            k += 1
    return out


def model_colour(field: str = "model_id", title: str = "model", legend: Optional[alt.Legend] = None,
                 show_legend: bool = True) -> alt.Color:
    """The Altair colour channel for a model-id field on model_colours' fixed scale."""
    colours = model_colours()
    order = [m for m in q(queries.models).model_id if m in colours]     # the legend lists them by size
    lg = None if not show_legend else (legend or alt.Legend(orient="bottom", labelLimit=0, columns=3))
    return alt.Color(f"{field}:N", title=title, legend=lg,
                     scale=alt.Scale(domain=order, range=[colours[m] for m in order]))


def random_models(models_df: Optional[pd.DataFrame] = None) -> list[str]:
    """The random-init control models of the warehouse (source 'random'), sorted."""
    df = q(queries.models) if models_df is None else models_df
    return sorted(str(m) for m, s in zip(df.model_id, df.source) if s == "random")


def zoom_domain(values, step: float = 0.1, lo: float = 0.0, hi: float = 1.0) -> list[float]:
    """A y domain that shows the differences: [min, max] of the values widened to whole `step`s,
    kept inside [lo, hi] (a score in [0, 1] whose values span 0.4 .. 0.8 is drawn on 0.4 .. 0.8)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return [lo, hi]
    a = max(lo, np.floor(v.min() / step - 1e-9) * step)
    b = min(hi, np.ceil(v.max() / step + 1e-9) * step)
    if b - a < step:
        a, b = max(lo, a - step), min(hi, b + step)
    return [round(float(a), 6), round(float(b), 6)]


# --------------------------------------------------------------------------- tables and thumbnails

EVIDENCE = {   # one line each: what the number says (MATH.md §4, §5, §7)
    "model's reading": "share of the head's variance between the images grouped by the model's own zero-shot "
                       "reading of the label's property (offline-v8 labels when >= 0.35 and >= 1.5x any other)",
    "confidence": "share of the head's TextSpan variance carried by the texts of its label (s*)",
    "p-value": "chance of a share this large with the bank's tags shuffled over its texts (4,000 draws); "
               "small: not chance",
    "association": "share of the head's texts that express its label (1: all of them)",
    "tag entropy": "how mixed the property tags of its texts are (0: one property, 1: uniformly mixed); within this "
                   "head: the paper's entanglement is across heads (Metrics page)",
}


def _num(v, fmt: str = ".2f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(float(v), fmt)


def p_value_text(p) -> str:
    """A label's shuffled-tag p-value as the page prints it ('n/a' for labelers without one)."""
    if p is None or (isinstance(p, float) and not np.isfinite(p)):
        return "n/a"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.0e}"


def truth_text(truth: pd.DataFrame) -> str:
    """The ground truth of a head (its `head_truth` rows) in one line per probed dataset."""
    if truth is None or truth.empty:
        return "n/a: no probe of a world with known factors for this model"
    return "; ".join(
        (f"**{plain(r.true_factor)}** (eta² {r.top_eta2:.2f}, next factor {r.second_eta2:.2f})" if r.specialised
         else f"unspecialised (top factor {plain(r.top_factor)}, eta² {r.top_eta2:.2f}, next {r.second_eta2:.2f})")
        + f" on {plain(r.dataset_id)}" for r in truth.itertuples())


def zeroshot_reading(raw) -> Optional[tuple[str, str]]:
    """An offline-v8 label's deciding number from its raw answer: ('0.67', 'colors; next: shapes 0.19'),
    the share of the head's variance between the model's zero-shot classes of the best property, and
    which property that is and the runner-up; None for labels without it (v7, LLM labels)."""
    import json
    try:
        e = json.loads(raw).get("zeroshot") if isinstance(raw, str) else None
    except (ValueError, AttributeError):
        return None
    if not isinstance(e, dict) or not e:
        return None
    ranked = sorted(e.items(), key=lambda kv: -kv[1])
    return (f"{ranked[0][1]:.2f}", f"{plain(ranked[0][0])}; next: {plain(ranked[1][0])} {ranked[1][1]:.2f}"
            if len(ranked) > 1 else plain(ranked[0][0]))


def head_evidence(label: dict, score: dict, truth: Optional[pd.DataFrame] = None) -> None:
    """A head's claim and the evidence beside it: its label, the label's confidence and p-value, its
    association and entanglement (numbers, each with a one-line meaning), and the ground truth."""
    prop = label.get("property", "unlabelled") if label else "unlabelled"
    agree = ""
    if truth is not None and not truth.empty and label:
        right = [r for r in truth.itertuples() if r.specialised and r.true_property == prop]
        wrong = [r for r in truth.itertuples() if r.specialised and r.true_property != prop]
        agree = " · the label agrees with it" if right else " · the label differs from it" if wrong else ""
    st.markdown(f"**Label:** {plain(prop)}" + (f" (labeler {plain(label.get('labeler'))})" if label else "")
                + f"  \n**Ground truth:** {truth_text(truth)}{agree}")
    st.caption("Label: the property the labeler finds in the head (MATH.md §4; offline-v8: the property whose "
               "zero-shot reading by the model explains the head's variance, named by one of its TextSpan texts; "
               "docs/text.md). Ground truth: "
               "the world factor whose class means explain the head's variance (eta², MATH.md §7); specialised "
               "when eta² >= 0.4 and >= 3x the next factor.")
    reading = zeroshot_reading(label.get("raw") if label else None)
    values = ({"model's reading": reading[0]} if reading else {})
    values |= {"confidence": _num(label.get("confidence") if label else None),
              "p-value": p_value_text(label.get("p_value") if label else None),
              "association": _num(score.get("association") if score else None),
              "tag entropy": _num(score.get("tag_entropy") if score else None)}
    for col, (name, value) in zip(st.columns(len(values)), values.items()):
        col.metric(name, value, help=EVIDENCE[name])
        col.caption((f"{reading[1]}. " if name == "model's reading" else "") + EVIDENCE[name])


def duration(seconds: float) -> str:
    """A computation's time for a metric: '840 ms' below a second, else '31.1 s' (a loaded server's
    first run: five digits of ms are cut off in a quarter-width metric at 1280 px)."""
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def plural(n: int, word: str, many: Optional[str] = None) -> str:
    """'1 head', '2 heads' (many: an irregular plural)."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def describe(r) -> str:
    """An image hit's class label, else its caption (shortened), else ''."""
    get = r.get if isinstance(r, dict) else (lambda k: getattr(r, k, None))
    for v in (get("label"), get("caption")):
        if isinstance(v, str) and v.strip():
            return v if len(v) <= 60 else v[:57] + "..."
    return ""


def thumbnails(df: pd.DataFrame, columns: int = 6, score: str = "score") -> None:
    """Thumbnails of image hits with their id, label and score, `columns` per row."""
    rows = list(df.itertuples())
    for start in range(0, len(rows), columns):
        cols = st.columns(columns)
        for col, r in zip(cols, rows[start:start + columns]):
            with col:
                if getattr(r, "thumbnail", None) is not None:
                    st.image(bytes(r.thumbnail), width="stretch")
                st.caption(f"{plain(r.image_id)}  \n{plain(describe(r))}  \n{score} {getattr(r, score):.4f}")


def head_rows(hits: pd.DataFrame, labels: dict[Head, str], heads: Sequence[Head], k: int) -> None:
    """Per-head neighbours: one row per head (name and label), then its top-k thumbnails with scores."""
    by_head = {key: g for key, g in hits.groupby(["layer", "head"])}
    for l, h in heads:
        cols = st.columns([1.3] + [1] * k)
        cols[0].markdown(f"**{head_name(l, h)}**  \n{plain(labels.get((l, h), ''))}")
        g = by_head.get((l, h))
        if g is None:
            cols[1].caption("no head embeddings")
            continue
        for col, r in zip(cols[1:], g.itertuples()):
            if r.thumbnail is not None:
                col.image(bytes(r.thumbnail), width="stretch")
            col.caption(f"{plain(describe(r) or r.image_id)}  \n{r.score:.4f}")


SHORT_NAMES = {"n_heads": "heads", "n_analysed_heads": "analysed", "n_mixed_heads": "mixed", "n_properties": "properties",
               "association_std": "assoc. sd", "entanglement_std": "entangl. sd", "n_specialised": "specialised",
               "n_right": "right", "n_unspecialised": "unspecial.", "n_false": "false", "false_label_rate": "false rate",
               "dataset_id": "dataset", "model_id": "model", "tag_entropy_std": "entropy sd"}


def short_columns(df: pd.DataFrame) -> dict:
    """Column configuration that keeps a wide score table inside 1280 px: short headers (SHORT_NAMES;
    the CSV keeps the real names) and 3 decimals for fractional numbers."""
    out = {}
    for c in df.columns:
        label = SHORT_NAMES.get(c, c)
        if pd.api.types.is_float_dtype(df[c]):
            out[c] = st.column_config.NumberColumn(label, format="%.3f")
        elif label != c:
            out[c] = st.column_config.Column(label)
    return out


def textspan_columns(texts: pd.DataFrame) -> dict:
    """The column configuration of a head's TextSpan table: variance explained as a bar with its number,
    wide enough to read ('medium': a narrow progress column cuts the number off)."""
    return {"rank": st.column_config.NumberColumn("rank", width="small"),
            "variance_explained": st.column_config.ProgressColumn(
                "variance explained", format="%.3f", min_value=0.0, width="medium",
                max_value=float(max(texts.variance_explained.max(), 1e-9)))}


def csv_download(df: pd.DataFrame, name: str, key: str) -> None:
    """A button that downloads the table behind a chart as CSV (binary columns dropped)."""
    plain = df.drop(columns=[c for c in df.columns if c == "thumbnail"], errors="ignore")
    st.download_button(f"Download {name}.csv", plain.to_csv(index=False).encode(), file_name=f"{name}.csv",
                       mime="text/csv", key=key, on_click="ignore", icon=":material/download:")

"""The page registry: file (relative to dashboard/app.py), title, icon, url path. app.py routes with it;
head cards link to pages through it, so a page is named in one place only."""
from __future__ import annotations

ATLAS = "views/atlas.py"
HEAD = "views/head.py"
MATCH = "views/match.py"
PROPERTY_NN = "views/property_neighbours.py"
TOPIC = "views/topic_segmentation.py"
CONTRASTIVE = "views/contrastive_segmentation.py"
IMAGE_NN = "views/image_neighbours.py"
TEXT_NN = "views/text_neighbours.py"
NEURON = "views/neuron.py"
NEURON_ATLAS = "views/neuron_atlas.py"
NEURON_TEXT = "views/neuron_text.py"
METRICS = "views/metrics.py"
SQL = "views/sql_console.py"

# (file, title, icon, url path). The page files live in views/, not pages/: Streamlit treats a
# `pages/` folder beside the entry script as its legacy multipage app, which runs a page file
# directly (bypassing app.py) or shows "Page not found" when a URL is opened or reloaded.
PAGES: list[tuple[str, str, str, str]] = [
    (ATLAS, "Atlas", ":material/grid_view:", "head-atlas"),
    (HEAD, "Head", ":material/center_focus_strong:", "head"),
    (MATCH, "Head match", ":material/leaderboard:", "head-match"),
    (PROPERTY_NN, "Property neighbours", ":material/join_inner:", "property-neighbours"),
    (TOPIC, "Topic segmentation", ":material/layers:", "topic-segmentation"),
    (CONTRASTIVE, "Contrastive segmentation", ":material/compare:", "contrastive-segmentation"),
    (IMAGE_NN, "Per-head neighbours of an image", ":material/image_search:", "image-neighbours"),
    (TEXT_NN, "Per-head neighbours of a text", ":material/manage_search:", "text-neighbours"),
    (NEURON_ATLAS, "Neuron atlas", ":material/scatter_plot:", "neuron-atlas"),
    (NEURON, "Neuron", ":material/blur_on:", "neuron"),
    (NEURON_TEXT, "Neurons that write a text", ":material/edit_note:", "neuron-text"),
    (METRICS, "Metrics", ":material/monitoring:", "model-metrics"),
    (SQL, "SQL console", ":material/terminal:", "sql-console"),
]

TITLES = {path: title for path, title, _, _ in PAGES}
URLS = {path: url for path, _, _, url in PAGES}


def page_of_url(url_path: str) -> str:
    """The page file of a url path (the default page, the Atlas, has the empty path too)."""
    return next((path for path, url in URLS.items() if url == url_path), ATLAS)

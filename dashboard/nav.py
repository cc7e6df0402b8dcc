"""The page registry: file (relative to dashboard/app.py), title, icon, url path. app.py routes with it;
head cards link to pages through it, so a page is named in one place only."""
from __future__ import annotations

ATLAS = "pages/atlas.py"
PROPERTY_NN = "pages/property_neighbours.py"
TOPIC = "pages/topic_segmentation.py"
CONTRASTIVE = "pages/contrastive_segmentation.py"
IMAGE_NN = "pages/image_neighbours.py"
TEXT_NN = "pages/text_neighbours.py"
METRICS = "pages/metrics.py"
SQL = "pages/sql_console.py"

# (file, title, icon, url path). The url paths differ from the file names on purpose: Streamlit
# still maps a URL equal to a file name in a `pages/` folder straight to that file (its legacy
# multipage mode), which would bypass app.py; hyphenated paths always route through app.py.
PAGES: list[tuple[str, str, str, str]] = [
    (ATLAS, "Atlas", ":material/grid_view:", "head-atlas"),
    (PROPERTY_NN, "Property neighbours", ":material/join_inner:", "property-neighbours"),
    (TOPIC, "Topic segmentation", ":material/layers:", "topic-segmentation"),
    (CONTRASTIVE, "Contrastive segmentation", ":material/compare:", "contrastive-segmentation"),
    (IMAGE_NN, "Per-head neighbours of an image", ":material/image_search:", "image-neighbours"),
    (TEXT_NN, "Per-head neighbours of a text", ":material/manage_search:", "text-neighbours"),
    (METRICS, "Metrics", ":material/monitoring:", "model-metrics"),
    (SQL, "SQL console", ":material/terminal:", "sql-console"),
]

TITLES = {path: title for path, title, _, _ in PAGES}
URLS = {path: url for path, _, _, url in PAGES}

"""The page registry: file (relative to dashboard/app.py), title, icon. app.py routes with it;
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

PAGES: list[tuple[str, str, str]] = [
    (ATLAS, "Atlas", ":material/grid_view:"),
    (PROPERTY_NN, "Property neighbours", ":material/join_inner:"),
    (TOPIC, "Topic segmentation", ":material/layers:"),
    (CONTRASTIVE, "Contrastive segmentation", ":material/compare:"),
    (IMAGE_NN, "Per-head neighbours of an image", ":material/image_search:"),
    (TEXT_NN, "Per-head neighbours of a text", ":material/manage_search:"),
    (METRICS, "Metrics", ":material/monitoring:"),
    (SQL, "SQL console", ":material/terminal:"),
]

TITLES = {path: title for path, title, _ in PAGES}

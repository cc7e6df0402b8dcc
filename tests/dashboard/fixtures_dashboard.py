"""A small warehouse built in code for the dashboard tests (AppTest and the real browser).

Two random-init toy models (`toy-shapes`, seeds 0 and 1: 6 layers x 4 heads, 64 px, d = 128)
decompose generated scenes (a coloured shape on a background) with models.decompose; every
table the pages read is filled through the warehouse schema (warehouse.writer applies the
migrations): models, datasets, images (+ thumbnails and files), image_factors,
image_embeddings, head_embeddings, texts (+ property tags), text_embeddings, head_texts
(TextSpan of MATH.md §3), head_labels (offline majority tag), text_judgments, ablations
(mean ablation of heads, MATH.md §2), probes (nearest-centroid probes per head and factor), runs.

    from fixtures_dashboard import build_fixture_warehouse
    path = build_fixture_warehouse(tmp_dir)      # -> tmp_dir / 'warehouse.duckdb'
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from warehouse import writer  # noqa: E402

ARCH = "toy-shapes"
SEEDS = (0, 1)
DATASET = "shapes:fixture"
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15)}
POSITIONS = ("left", "right")
TEXTS = {  # the fixture's text bank: text -> property tag
    "a red object": "colors", "something green": "colors", "a blue thing": "colors",
    "a yellow patch": "colors", "a circle": "shapes", "a square": "shapes",
    "a triangle": "shapes", "a star shape": "shapes", "on the left": "locations",
    "on the right": "locations", "at the top": "locations", "two objects": "counting",
    "three objects": "counting", "striped": "texture", "dotted": "texture", "a photo of a dog": "animals",
}
K_TEXTS = 5


def draw_scene(shape: str, color: str, background: str, position: str, size: int = 96) -> Image.Image:
    """One generated scene: a filled shape of `color` on `background`, on the left or right half."""
    img = Image.new("RGB", (size, size), BACKGROUNDS[background])
    d = ImageDraw.Draw(img)
    cx = size * (0.3 if position == "left" else 0.7)
    cy, r = size * 0.5, size * 0.2
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        d.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        d.rectangle(box, fill=COLORS[color])
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
    return img


def scenes(n: int) -> list[dict]:
    """n scenes cycling through every factor combination (deterministic)."""
    out = []
    for i in range(n):
        f = dict(shape=SHAPES[i % 3], color=list(COLORS)[(i // 3) % 3],
                 background=list(BACKGROUNDS)[(i // 9) % 2], position=POSITIONS[(i // 2) % 2])
        out.append(dict(index=i, factors=f, image=draw_scene(**f)))
    return out


def text_id(bank: str, text: str) -> str:
    return hashlib.sha1(f"{bank}\x00{text}".encode()).hexdigest()[:16]


def textspan(C: np.ndarray, T: np.ndarray, k: int, r: int = 80) -> list[tuple[int, float]]:
    """MATH.md §3 on one head: C [n, d] head embeddings, T [M, d] unit texts -> [(text index, variance)]."""
    C = C - C.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(C, full_matrices=False)
    basis = vt[: min(r, vt.shape[0])]                               # [r, d]
    T = (T @ basis.T) @ basis                                       # texts in the head's top-r span
    total = float((C ** 2).sum()) or 1.0
    chosen: list[tuple[int, float]] = []
    for _ in range(min(k, len(T))):
        norms = np.linalg.norm(T, axis=1)
        score = np.where(norms > 1e-8, np.linalg.norm(C @ (T / np.maximum(norms, 1e-8)[:, None]).T, axis=0) ** 2, -1)
        for j, _v in chosen:
            score[j] = -1
        j = int(np.argmax(score))
        u = T[j] / max(norms[j], 1e-8)
        chosen.append((j, float(((C @ u) ** 2).sum()) / total))
        C = C - np.outer(C @ u, u)
        T = T - np.outer(T @ u, u)
    return chosen


def offline_label(tags: list[str], variances: list[float]) -> tuple[str, float]:
    """Variance-weighted majority tag of a head's texts; 'mixed' when the winner holds < 40 %."""
    weight: dict[str, float] = {}
    for t, v in zip(tags, variances):
        weight[t] = weight.get(t, 0.0) + v
    prop, w = max(weight.items(), key=lambda kv: (kv[1], kv[0]))
    conf = w / (sum(weight.values()) or 1.0)
    return (prop if conf >= 0.4 else "mixed"), float(conf)


def _probe(X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Nearest-centroid probe: train on even rows, test on odd rows -> (accuracy, chance)."""
    tr, te = np.arange(len(y)) % 2 == 0, np.arange(len(y)) % 2 == 1
    classes = sorted(set(y[tr]))
    cent = np.stack([X[tr][y[tr] == c].mean(0) for c in classes])
    pred = np.array(classes)[np.argmin(((X[te][:, None] - cent[None]) ** 2).sum(-1), axis=1)]
    values, counts = np.unique(y[tr], return_counts=True)
    majority = values[np.argmax(counts)]
    return float((pred == y[te]).mean()), float((y[te] == majority).mean())


def _zero_shot(emb: np.ndarray, class_vecs: np.ndarray, y: np.ndarray, classes: list[str]) -> float:
    pred = np.array(classes)[np.argmax(emb @ class_vecs.T, axis=1)]
    return float((pred == y).mean())


def build_fixture_warehouse(folder: Path, n_images: int = 24) -> Path:
    """Write the fixture warehouse (and its image files) under `folder`; return the .duckdb path."""
    folder = Path(folder)
    img_dir = folder / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    path = folder / "warehouse.duckdb"
    items = scenes(n_images)
    for it in items:
        it["image_id"] = f"{DATASET}/{it['index']:04d}"
        it["path"] = str(img_dir / f"{it['index']:04d}.png")
        it["image"].save(it["path"])
    texts = list(TEXTS)
    tags = [TEXTS[t] for t in texts]
    run_id = "fixture-run"

    with writer(path) as con:
        con.execute("INSERT INTO runs (run_id, job, params, status, finished_at) VALUES (?, 'fixture', ?, 'ok', now())",
                    [run_id, json.dumps({"n_images": n_images})])
        con.execute("INSERT INTO datasets VALUES (?, 'shapes fixture', 'shapes', ?, now())", [DATASET, n_images])
        con.executemany("INSERT INTO properties VALUES (?, ?)",
                        [(p, f"fixture property {p}") for p in sorted(set(tags))])
        con.executemany("INSERT INTO texts VALUES (?, 'atlas', ?, ?)",
                        [(text_id("atlas", t), t, TEXTS[t]) for t in texts])
        con.executemany("INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", [
            (it["image_id"], DATASET, it["path"], hashlib.sha256(it["image"].tobytes()).hexdigest(),
             it["factors"]["shape"], f"a {it['factors']['color']} {it['factors']['shape']} on the {it['factors']['position']}",
             it["image"].width, it["image"].height, models.thumbnail_jpeg(it["image"])) for it in items])
        con.executemany("INSERT INTO image_factors VALUES (?, ?, ?)", [
            (it["image_id"], f, v) for it in items for f, v in it["factors"].items()])

    for seed in SEEDS:
        lm = models.load_model(ARCH, random_init=True, seed=seed)
        batch = torch.stack([lm.preprocess(it["image"]) for it in items])
        dec = models.decompose(lm, batch, layers="last4")
        emb = dec.embedding.numpy()                               # [n, d]
        head_cls = dec.head_cls.numpy()                           # [n, L', H, d]
        rest = dec.rest.numpy()                                   # [n, d]
        T = models.encode_texts(lm, texts).numpy()                # [M, d]
        layers = dec.layers
        row = lm.row() | {"analysed_layers": layers}
        with writer(path) as con:
            cols = ", ".join(row)
            con.execute(f"INSERT INTO models ({cols}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
            con.executemany("INSERT INTO image_embeddings VALUES (?, ?, ?)",
                            [(lm.model_id, it["image_id"], emb[i].tolist()) for i, it in enumerate(items)])
            con.executemany("INSERT INTO head_embeddings VALUES (?, ?, ?, ?, ?)", [
                (lm.model_id, it["image_id"], l, h, head_cls[i, j, h].tolist())
                for i, it in enumerate(items) for j, l in enumerate(layers) for h in range(lm.heads)])
            con.executemany("INSERT INTO text_embeddings VALUES (?, ?, ?)",
                            [(lm.model_id, text_id("atlas", t), T[m].tolist()) for m, t in enumerate(texts)])
            for j, l in enumerate(layers):
                for h in range(lm.heads):
                    chosen = textspan(head_cls[:, j, h], T, K_TEXTS)
                    con.executemany("INSERT INTO head_texts (model_id, layer, head, rank, text_id, variance_explained, "
                                    "dataset_id, bank, run_id) VALUES (?, ?, ?, ?, ?, ?, ?, 'atlas', ?)", [
                        (lm.model_id, l, h, rank, text_id("atlas", texts[m]), v, DATASET, run_id)
                        for rank, (m, v) in enumerate(chosen)])
                    prop, conf = offline_label([tags[m] for m, _ in chosen], [v for _, v in chosen])
                    con.execute("INSERT INTO head_labels (model_id, layer, head, property, confidence, labeler, "
                                "prompt_hash, raw, run_id) VALUES (?, ?, ?, ?, ?, 'offline', NULL, ?, ?)",
                                [lm.model_id, l, h, prop, conf, json.dumps({"tags": [tags[m] for m, _ in chosen]}), run_id])
                    con.executemany("INSERT INTO text_judgments VALUES (?, ?, ?, ?, ?, ?, 'tag', ?)", [
                        (lm.model_id, l, h, text_id("atlas", texts[m]), prop, tags[m] == prop, run_id)
                        for m, _ in chosen])
            _write_ablations_and_probes(con, lm, items, layers, emb, head_cls, rest, run_id)
    return path


def _write_ablations_and_probes(con, lm, items, layers, emb, head_cls, rest, run_id) -> None:
    """Mean ablation of heads on zero-shot shape accuracy (MATH.md §2), and per-head probes."""
    y = np.array([it["factors"]["shape"] for it in items])
    class_vecs = models.encode_texts(lm, [f"a {s}" for s in SHAPES]).numpy()
    mean = head_cls.mean(0, keepdims=True)                        # [1, L', H, d]
    rows = [("baseline", None, None, _zero_shot(emb, class_vecs, y, list(SHAPES))),
            ("mlps", None, None, _zero_shot(emb - rest + rest.mean(0), class_vecs, y, list(SHAPES)))]
    for j, l in enumerate(layers):
        upto = (head_cls[:, : j + 1] - mean[:, : j + 1]).sum((1, 2))
        rows.append(("attn_upto", l, None, _zero_shot(emb - upto, class_vecs, y, list(SHAPES))))
        for h in range(lm.heads):
            one = head_cls[:, j, h] - mean[:, j, h]
            rows.append(("head", l, h, _zero_shot(emb - one, class_vecs, y, list(SHAPES))))
    con.executemany("INSERT INTO ablations VALUES (?, ?, 'shape', ?, ?, ?, ?, ?)",
                    [(lm.model_id, DATASET, kind, l, h, acc, run_id) for kind, l, h, acc in rows])
    probe_rows = []
    for factor in ("shape", "color", "position"):
        yf = np.array([it["factors"][factor] for it in items])
        for j, l in enumerate(layers):
            for h in range(lm.heads):
                acc, chance = _probe(head_cls[:, j, h], yf)
                probe_rows.append((lm.model_id, DATASET, l, h, factor, acc, chance, run_id))
    con.executemany("INSERT INTO probes VALUES (?, ?, ?, ?, ?, ?, ?, ?)", probe_rows)


if __name__ == "__main__":  # python tests/fixtures_dashboard.py DIR: build one to look at
    out = build_fixture_warehouse(Path(sys.argv[1] if len(sys.argv) > 1 else "var/fixture"))
    print(out)

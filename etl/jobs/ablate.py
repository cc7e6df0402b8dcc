"""`ablate` (mean ablation, MATH.md §2) and `probe` (head x factor probes, stored).

Both work on a labelled dataset: the shapes world's factors, or an ImageFolder's classes
(zero-shot prompts "a photo of a {class}").
"""
from __future__ import annotations

import json

import numpy as np
import torch

from etl.common import add_model_args, add_warehouse_arg, load_model_from_args, progress, warehouse_path


def add_parser(sub) -> None:
    p = sub.add_parser("ablate", help="mean-ablation study: zero-shot accuracy with components replaced by their mean",
                       description="Per labelled target (shapes factors, or folder classes): baseline accuracy, all "
                                   "MLPs mean-ablated, cumulative attention ablation from layer 0 up to each layer, "
                                   "and per-head ablation for the analysed layers. Stores `ablations` and "
                                   "`component_means`.")
    add_model_args(p)
    add_warehouse_arg(p)
    p.add_argument("--dataset", required=True, help="shapes:N:seed=S or an ImageFolder-layout folder")
    p.add_argument("--layers", default="auto", help="layers for per-head ablation (default auto: every layer up to 12 layers, else the last 4)")
    p.add_argument("--max-images", type=int, default=2000, help="images used (default 2000)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward (default 64)")
    p.set_defaults(func=run_ablate)

    q = sub.add_parser("probe", help="per-head ground truth for every shapes-world factor: linear probes (`probes`) "
                            "and variance shares eta2 (`head_factor_variance`)",
                       description="Reads head_embeddings and image_factors of a shapes dataset from the warehouse "
                                   "(run `embed` first) and stores, per head and factor, held-out probe accuracy "
                                   "and chance, and eta2: the share of the head's variance the factor's class "
                                   "means explain (MATH.md §7; views head_truth, label_agreement).")
    q.add_argument("--model", required=True, metavar="MODEL_ID", help="a model_id of the warehouse, e.g. toy-shapes/bundled")
    add_warehouse_arg(q)
    q.add_argument("--dataset", required=True, help="a shapes dataset already embedded, e.g. shapes:2000:seed=0")
    q.add_argument("--seed", type=int, default=0, help="train/test split seed (default 0)")
    q.set_defaults(func=run_probe)


def _targets(lm, dataset) -> dict[str, tuple[list[str], torch.Tensor]]:
    """target name -> (class values, unit class text embeddings [V, d])."""
    from models import encode_texts
    if dataset.source == "shapes":
        from etl import eval_toy, shapes
        return {f: (list(shapes.FACTORS[f]), eval_toy.class_embeddings(lambda t: encode_texts(lm, t), f))
                for f in shapes.FACTORS}
    classes = getattr(dataset, "classes", [])
    if len(classes) < 2:
        raise ValueError(f"ablate needs labelled images: shapes:N:seed=S, or a folder with one subfolder per class "
                         f"(found {len(classes)} classes in {dataset.name})")
    return {"label": (classes, encode_texts(lm, [f"a photo of a {c}." for c in classes]))}


def ablation_table(comp: dict, labels: dict[str, np.ndarray], text: dict[str, torch.Tensor],
                   head_layers: list[int]) -> list[dict]:
    """Accuracies with components replaced by their dataset mean.

    comp: heads [n, L, H, d], mlp [n, L, d], attn_bias [n, L, d], embedding [n, d];
    labels: target -> class index per image [n] (-1 = unknown); text: target -> [V, d].
    """
    emb, heads, mlp = comp["embedding"], comp["heads"], comp["mlp"]
    attn = heads.sum(2) + comp["attn_bias"]                              # [n, L, d]

    def accuracy(rep: torch.Tensor) -> dict:
        out = {}
        for t, y in labels.items():
            keep = torch.from_numpy(y >= 0)
            pred = (rep[keep] @ text[t].T).argmax(1).numpy()
            out[t] = float((pred == y[y >= 0]).mean())
        return out

    def ablated(part: torch.Tensor) -> torch.Tensor:                    # part: [n, d]
        return emb - part + part.mean(0, keepdim=True)

    rows = []
    def add(kind, accs, layer=None, head=None):
        rows.extend(dict(factor=t, kind=kind, layer=layer, head=head, accuracy=a) for t, a in accs.items())

    add("baseline", accuracy(emb))
    add("mlps", accuracy(ablated(mlp.sum(1))))
    for l in range(attn.shape[1]):
        add("attn_upto", accuracy(ablated(attn[:, : l + 1].sum(1))), layer=l)
    for l in head_layers:
        for h in range(heads.shape[2]):
            add("head", accuracy(ablated(heads[:, l, h])), layer=l, head=h)
    return rows


def run_ablate(args) -> int:
    from etl.datasets import open_dataset
    from models import decompose_components, resolve_layers
    from warehouse import writer
    from warehouse.runs import run_record
    path = warehouse_path(args)
    lm = load_model_from_args(args)
    dataset = open_dataset(args.dataset)
    head_layers = resolve_layers(args.layers, lm.layers)
    targets = _targets(lm, dataset)
    parts = {k: [] for k in ("heads", "mlp", "attn_bias", "embedding")}
    labels = {t: [] for t in targets}
    batch = []

    def flush():
        x = torch.stack([lm.preprocess(img) for img, _ in batch])
        comp = decompose_components(lm, x)
        for k in parts:
            parts[k].append(comp[k].cpu())
        for t, (values, _) in targets.items():
            labels[t] += [values.index(v) if v in values else -1 for v in (lab[t] for _, lab in batch)]
        batch.clear()

    params = {"model_id": lm.model_id, "dataset": dataset.dataset_id, "max_images": args.max_images}
    with run_record(path, "ablate", params) as run_id:
        n = 0
        for item in progress(dataset.items(), total=min(dataset.n_images or args.max_images, args.max_images),
                             desc="ablate", unit="img"):
            if n >= args.max_images:
                break
            try:
                img = item.load()
            except Exception:
                continue  # embed records bad files; ablation just skips them
            lab = dict(item.factors) if dataset.source == "shapes" else {"label": item.label}
            batch.append((img, lab))
            n += 1
            if len(batch) == args.batch_size:
                flush()
        if batch:
            flush()
        if n == 0:
            raise ValueError(f"no readable images in {args.dataset}")
        comp = {k: torch.cat(v) for k, v in parts.items()}
        y = {t: np.asarray(v) for t, v in labels.items()}
        rows = ablation_table(comp, y, {t: e for t, (_, e) in targets.items()}, head_layers)
        means = [("embed", (comp["embedding"] - comp["heads"].sum((1, 2)) - comp["mlp"].sum(1)
                            - comp["attn_bias"].sum(1)).mean(0))]
        for l in range(lm.layers):
            means.append((f"L{l}.mlp", comp["mlp"][:, l].mean(0)))
            means.append((f"L{l}.attn", (comp["heads"][:, l].sum(1) + comp["attn_bias"][:, l]).mean(0)))
            means += [(f"L{l}.H{h}", comp["heads"][:, l, h].mean(0)) for h in range(lm.heads)]
        with writer(path) as con:
            con.execute("DELETE FROM ablations WHERE model_id = ? AND dataset_id = ?", [lm.model_id, dataset.dataset_id])
            con.executemany("INSERT INTO ablations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            [[lm.model_id, dataset.dataset_id, r["factor"], r["kind"], r["layer"], r["head"],
                              r["accuracy"], run_id] for r in rows])
            con.execute("DELETE FROM component_means WHERE model_id = ? AND dataset_id = ?", [lm.model_id, dataset.dataset_id])
            con.executemany("INSERT INTO component_means VALUES (?, ?, ?, ?)",
                            [[lm.model_id, dataset.dataset_id, name, v.tolist()] for name, v in means])
    summary = {r["factor"]: round(r["accuracy"], 4) for r in rows if r["kind"] == "baseline"}
    mlps = {r["factor"]: round(r["accuracy"], 4) for r in rows if r["kind"] == "mlps"}
    print(json.dumps({"model_id": lm.model_id, "dataset": dataset.dataset_id, "images": n,
                      "baseline": summary, "mlps_ablated": mlps}))
    return 0


def run_probe(args) -> int:
    from etl.probe import factor_variance, probe_matrix
    from etl.textbank import WORLD_FACTOR_PROPERTIES
    from warehouse import connect, writer
    from warehouse.runs import run_record
    path = warehouse_path(args)
    with connect(path) as con:
        rows = con.execute(
            "SELECT h.image_id, h.layer, h.head, h.vec FROM head_embeddings h JOIN images i USING (image_id) "
            "WHERE h.model_id = ? AND i.dataset_id = ? ORDER BY h.image_id, h.layer, h.head",
            [args.model, args.dataset]).fetchall()
        facts = con.execute(
            "SELECT f.image_id, f.factor, f.value FROM image_factors f JOIN images i USING (image_id) "
            "WHERE i.dataset_id = ?", [args.dataset]).fetchall()
    if not rows or not facts:
        raise ValueError(f"no head embeddings with factor labels for model {args.model} on {args.dataset}: "
                         f"run `python -m etl embed --model ... --dataset {args.dataset}` first (a shapes dataset)")
    ids = sorted({r[0] for r in rows})
    layers = sorted({r[1] for r in rows})
    heads = sorted({r[2] for r in rows})
    index = {i: k for k, i in enumerate(ids)}
    d = len(rows[0][3])
    X = np.zeros((len(ids), len(layers), len(heads), d), np.float32)            # [n, L', H, d]
    for image_id, l, h, vec in rows:
        X[index[image_id], layers.index(l), heads.index(h)] = vec
    by_factor: dict[str, list] = {}
    for image_id, factor, value in facts:
        by_factor.setdefault(factor, [None] * len(ids))
        if image_id in index:
            by_factor[factor][index[image_id]] = value
    with run_record(path, "probe", {"model_id": args.model, "dataset": args.dataset}) as run_id:
        result = probe_matrix(X, by_factor, seed=args.seed, layers=layers)
        eta2 = factor_variance(X, by_factor, layers=layers)
        with writer(path) as con:
            con.executemany("INSERT INTO factor_properties (factor, property) VALUES (?, ?) "
                            "ON CONFLICT (factor) DO UPDATE SET property = excluded.property",
                            list(WORLD_FACTOR_PROPERTIES.items()))
            con.execute("DELETE FROM head_factor_variance WHERE model_id = ? AND dataset_id = ?",
                        [args.model, args.dataset])
            con.executemany("INSERT INTO head_factor_variance (model_id, dataset_id, layer, head, factor, eta2, "
                            "run_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                            [[args.model, args.dataset, r["layer"], r["head"], r["factor"], r["eta2"], run_id]
                             for r in eta2])
            con.execute("DELETE FROM probes WHERE model_id = ? AND dataset_id = ?", [args.model, args.dataset])
            con.executemany("INSERT INTO probes VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            [[args.model, args.dataset, r["layer"], r["head"], r["factor"], r["accuracy"],
                              r["chance"], run_id] for r in result])
    print(json.dumps({"model_id": args.model, "dataset": args.dataset, "rows": len(result),
                      "eta2_rows": len(eta2)}))
    return 0

"""`ablate`: mean ablation (MATH.md §2), stored in `ablations` and `component_means`.

It works on a labelled dataset: the shapes world's factors, or an ImageFolder's classes
(zero-shot prompts "a photo of a {class}").
"""
from __future__ import annotations

import json

from etl.common import (add_model_args, add_warehouse_arg, dataset_spec, image_batch, load_model_from_args,
                        positive_int, progress, warehouse_path)
from warehouse import head_name


def add_parser(sub) -> None:
    p = sub.add_parser("ablate", help="mean-ablation study: zero-shot accuracy with components replaced by their mean",
                       description="Per labelled target (shapes factors, or folder classes): baseline accuracy, all "
                                   "MLPs mean-ablated, cumulative attention ablation from layer 0 up to each layer, "
                                   "and per-head ablation for the analysed layers. Stores `ablations` and "
                                   "`component_means`.")
    add_model_args(p)
    add_warehouse_arg(p)
    p.add_argument("--dataset", required=True, type=dataset_spec, help="shapes:N:seed=S or an ImageFolder-layout folder")
    p.add_argument("--layers", default="auto", help="layers for per-head ablation (default auto: every layer up to 12 layers, else the last 4)")
    p.add_argument("--max-images", type=positive_int, default=2000, help="images used (default 2000)")
    p.add_argument("--batch-size", type=image_batch, default=64,
                   help="images per forward (default 64; checked against the machine's memory)")
    p.add_argument("--force", action="store_true",
                   help="recompute even when this model, dataset and settings are already stored")
    p.set_defaults(func=run_ablate)


def _targets(lm, dataset) -> dict[str, tuple[list[str], torch.Tensor]]:
    """target name -> (class values, unit class text embeddings [V, d])."""
    from models import encode_texts
    if dataset.source == "shapes":
        from etl.world import evaluate as eval_toy, shapes
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
    import torch
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
    path = warehouse_path(args)       # a wrong --warehouse fails before the model loads
    lm = load_model_from_args(args)
    print(json.dumps(ablate(path, lm, args.dataset, args.layers, args.max_images, args.batch_size,
                            args.force)))
    return 0


def ablate(path: str, lm, dataset_spec: str, layers: str = "auto", max_images: int = 2000, batch_size: int = 64,
           force: bool = False) -> dict:
    """Mean-ablation accuracies of the model on a labelled dataset, stored; skipped (run 'skipped')
    when the same model, dataset, layers and image count are already stored, unless ``force``."""
    from etl.datasets import open_dataset
    from models import resolve_layers
    from warehouse.runs import completed_run, run_record
    if max_images < 1 or batch_size < 1:
        raise ValueError("--max-images and --batch-size must be at least 1")
    dataset = open_dataset(dataset_spec)
    head_layers = resolve_layers(layers, lm.layers)
    params = {"model_id": lm.model_id, "dataset": dataset.dataset_id, "max_images": max_images,
              "layers": head_layers}
    if not force and completed_run(path, "ablate", params):
        with run_record(path, "ablate", params) as run_id:
            run_id.skipped = True
        return {"model_id": lm.model_id, "dataset": dataset.dataset_id, "skipped": "already stored (--force recomputes)"}
    from etl import threads
    with threads.for_model(lm.width):        # a small tower's matrices: one thread is faster (etl/threads.py)
        return _ablate(path, lm, dataset, dataset_spec, head_layers, params, max_images, batch_size)


def _ablate(path: str, lm, dataset, dataset_spec: str, head_layers: list[int], params: dict, max_images: int,
            batch_size: int) -> dict:
    """ablate's work once it is known to be needed (see ablate)."""
    import numpy as np
    import torch
    from models import decompose
    from warehouse import writer, writes
    from warehouse.runs import run_record
    targets = _targets(lm, dataset)
    parts = {k: [] for k in ("heads", "mlp", "attn_bias", "embedding")}
    labels = {t: [] for t in targets}
    batch = []

    def flush():
        x = torch.stack([lm.preprocess(img) for img, _ in batch])
        dec = decompose(lm, x, "all", components=True)
        comp = dict(heads=dec.head_cls, mlp=dec.mlp, attn_bias=dec.attn_bias, embedding=dec.embedding)
        if dec.pool_mlp is not None:                  # an attention pool's MLP (SigLIP: MAP), a component of its own
            parts.setdefault("pool_mlp", [])
            comp["pool_mlp"] = dec.pool_mlp
        for k in parts:
            parts[k].append(comp[k].cpu())
        for t, (values, _) in targets.items():
            labels[t] += [values.index(v) if v in values else -1 for v in (lab[t] for _, lab in batch)]
        batch.clear()

    with run_record(path, "ablate", params) as run_id:
        n = 0
        for item in progress(dataset.items(), total=min(dataset.n_images or max_images, max_images),
                             desc="ablate", unit="img"):
            if n >= max_images:
                break
            try:
                img = item.load()
            except Exception:
                continue  # embed records bad files; ablation just skips them
            lab = dict(item.factors) if dataset.source == "shapes" else {"label": item.label}
            batch.append((img, lab))
            n += 1
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
        if n == 0:
            raise ValueError(f"no readable images in {dataset_spec}")
        comp = {k: torch.cat(v) for k, v in parts.items()}
        y = {t: np.asarray(v) for t, v in labels.items()}
        rows = ablation_table(comp, y, {t: e for t, (_, e) in targets.items()}, head_layers)
        pool_mlp = comp.get("pool_mlp")
        means = [("embed", (comp["embedding"] - comp["heads"].sum((1, 2)) - comp["mlp"].sum(1)
                            - comp["attn_bias"].sum(1) - (pool_mlp if pool_mlp is not None else 0)).mean(0))]
        if pool_mlp is not None:
            means.append(("pool_mlp", pool_mlp.mean(0)))
        for l in range(lm.layers):
            means.append((f"L{l}.mlp", comp["mlp"][:, l].mean(0)))
            means.append((f"L{l}.attn", (comp["heads"][:, l].sum(1) + comp["attn_bias"][:, l]).mean(0)))
            means += [(head_name(l, h), comp["heads"][:, l, h].mean(0)) for h in range(lm.heads)]
        with writer(path) as con:
            writes.replace_ablations(con, lm.model_id, dataset.dataset_id, rows, run_id)
            writes.replace_component_means(con, lm.model_id, dataset.dataset_id,
                                           [(name, v.numpy()) for name, v in means])
    summary = {r["factor"]: round(r["accuracy"], 4) for r in rows if r["kind"] == "baseline"}
    mlps = {r["factor"]: round(r["accuracy"], 4) for r in rows if r["kind"] == "mlps"}
    return {"model_id": lm.model_id, "dataset": dataset.dataset_id, "images": n, "baseline": summary,
            "mlps_ablated": mlps}

"""`neurons`: the second-order lens over a dataset (MATH.md §10) -> the neuron tables of migration 008.

    python -m etl neurons --model toy-shapes/bundled --dataset shapes:2000:seed=0            # layers auto
    python -m etl neurons --model ViT-B-16/laion2b_s34b_b88k --dataset folder:... --layers 9 --store-alpha

For each chosen MLP layer, one pass over the dataset's images (those embedded for the model) computes
every neuron's alpha [N, P] per image (P: its K later heads, each through the M heads of an attention
pool where the tower has one) (models.neurons, exact cheap form) and folds it into streaming
statistics (etl.neuron_stats): the distribution of its effect norm ||phi_n(I)||, the share of images
where it matters, its top images, the first principal direction of its effects over them (sign-fixed),
its mean effect and its effect through each later head, and on the shapes world eta2 per factor (the
heads' code, etl.world.probes.FactorVariance). Then per neuron: a sparse text decomposition of the
principal direction over the model's text bank (orthogonal matching pursuit, etl.text.sparse) with its
reconstruction r2, an offline label from those texts (etl.text.labelers.OfflineLabeler, each text
weighted by the r2 it added) and --shuffled-draws labels with the bank's tags shuffled (the chance
baseline of the agreement view). On a shapes dataset, the paper's check: zero-shot accuracy on the toy
eval (etl.world.evaluate) with every neuron's effect replaced by 0, its mean, its rank-1 form or its
sparse-text form.

Resumable: a layer stored with the same settings is skipped (--force recomputes); the pass over the
images checkpoints its statistics every CHECKPOINT_S seconds under $ATLAS_HOME/cache/neurons/, so a
killed run carries on from the last checkpoint. Layers: 'auto' measures, on the first PROBE_IMAGES
images, how much each MLP layer's neurons move the embedding through the later heads (reach = the mean
of ||sum_n phi_n(I) - its mean over the images||) and takes the --auto-layers layers that reach most.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import time
from pathlib import Path

from etl.world.seeds import EVAL
from etl.common import (add_warehouse_arg, choose_bank, model_row_or_fail, non_negative_int, positive_int,
                        progress, warehouse_path)

PROBE_IMAGES = 64
TEXTS_K = 8
CHECKPOINT_S = 60.0
EVAL_VARIANTS = ("baseline", "zero", "mean", "rank1", "sparse")


def add_parser(sub) -> None:
    p = sub.add_parser("neurons", help="second-order effects of MLP neurons: statistics, texts, labels (neuron_*)",
                       description=__doc__.split("\n\n")[2].replace("\n", " "))
    add_warehouse_arg(p)
    p.add_argument("--model", metavar="MODEL_ID", required=True,
                   help="a model_id of the warehouse `models` table (embed images and texts with it first)")
    p.add_argument("--dataset", metavar="SPEC", required=True,
                   help="the images, as given to embed (shapes:N:seed=S, skimage, a folder, a CSV manifest); only "
                        "the images embedded for the model are used")
    p.add_argument("--layers", default="auto",
                   help="MLP layers, 0-based: auto (default: the --auto-layers layers whose neurons reach the later "
                        "heads most, measured on the first 64 images: the mean norm of the layer's summed "
                        "second-order effect around its mean; printed as `reach`), or indices like 8,9 (the last "
                        "layer has no later head)")
    p.add_argument("--auto-layers", type=positive_int, default=1, metavar="N",
                   help="how many layers --layers auto picks (default 1)")
    p.add_argument("--max-images", type=positive_int, default=None, metavar="N",
                   help="use at most the first N images of the dataset (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--top-k", type=positive_int, default=16, help="top images stored per neuron (default 16)")
    p.add_argument("--pc-images", type=positive_int, default=100,
                   help="the principal direction is taken over each neuron's top N images (default 100)")
    p.add_argument("--texts", type=positive_int, default=TEXTS_K, metavar="K",
                   help=f"texts per neuron in the sparse decomposition (default {TEXTS_K})")
    p.add_argument("--bank", metavar="NAME", default=None,
                   help="text bank (default: the only bank embedded for the model, else its default bank)")
    p.add_argument("--store-alpha", action="store_true",
                   help="also store every image's alpha (neuron_alpha: N x K x M floats per image, K later heads, M "
                        "pool heads or 1; large)")
    p.add_argument("--eval-n", type=non_negative_int, default=500, metavar="N",
                   help="scenes per set of the toy eval for the zero-shot check (shapes datasets only; 0 skips; "
                        "default 500)")
    p.add_argument("--eval-seed", type=non_negative_int, default=EVAL,
                   help=f"world seed of the toy eval's scenes (default {EVAL}, held out; training used 0-2)")
    p.add_argument("--shuffled-draws", type=non_negative_int, default=20, metavar="N",
                   help="labelings with the bank's tags shuffled, the chance baseline (default 20)")
    p.add_argument("--force", action="store_true", help="recompute layers already stored with these settings")
    p.set_defaults(func=run)


def run(args) -> int:
    out = neurons(warehouse_path(args), args.model, args.dataset, layers=args.layers, auto_layers=args.auto_layers,
                  max_images=args.max_images, batch_size=args.batch_size, top_k=args.top_k,
                  pc_images=args.pc_images, texts_k=args.texts, bank=args.bank, store_alpha=args.store_alpha,
                  eval_n=args.eval_n, eval_seed=args.eval_seed, shuffled_draws=args.shuffled_draws, force=args.force)
    print(json.dumps(out, default=float))
    return 0


# --------------------------------------------------------------------------- images

def _items(path: str, model_id: str, dataset, max_images):
    """The dataset's items embedded for the model, in the dataset's order (at most max_images)."""
    from warehouse.queries import embedded_image_ids
    stored = embedded_image_ids(path, model_id, dataset.dataset_id)
    if not stored:
        raise ValueError(f"no image of {dataset.dataset_id} is embedded for {model_id}: run `python -m etl embed "
                         f"--model ... --dataset {dataset.dataset_id}` first (the neurons job shows the stored "
                         "images' thumbnails)")
    n = 0
    for item in dataset.items():
        if max_images is not None and n >= max_images:
            return
        if item.image_id in stored:
            n += 1
            yield item


def _batches(lm, items, batch_size: int, skip: int = 0):
    """(image_ids, pixels [B, 3, S, S], factors per image) batches, after skipping `skip` items;
    unreadable images are left out (embed recorded them)."""
    import torch
    ids, xs, facts = [], [], []
    for i, item in enumerate(items):
        if i < skip:
            continue
        try:
            x = lm.preprocess(item.load())
        except Exception:
            continue
        ids.append(item.image_id)
        xs.append(x)
        facts.append(dict(item.factors))
        if len(ids) == batch_size:
            yield ids, torch.stack(xs), facts
            ids, xs, facts = [], [], []
    if ids:
        yield ids, torch.stack(xs), facts


# --------------------------------------------------------------------------- layers

def reach(lm, images, layers: list[int]) -> dict[int, float]:
    """How much each MLP layer's neurons move the embedding through the later heads, on images
    [n, 3, S, S]: the mean over the images of ||sum_n phi_n(I) - its mean||."""
    import torch
    from models.neurons import SecondOrderLens
    lens = SecondOrderLens(lm.visual, layers)
    effects = {l: [] for l in layers}
    T, N = lens.tower.prefix + lm.grid[0] * lm.grid[1], max(lens.n_neurons.values())
    step = max(1, int(2e8 // (4 * T * N * len(layers))))           # every layer's activations: about 200 MB
    for chunk in images.split(step):
        tr = lens.trace(chunk)
        for l in layers:
            effects[l].append(lens.layer_effect(lens.alpha(tr, l), l).double())
    out = {}
    for l in layers:
        e = torch.cat(effects[l])
        out[l] = float((e - e.mean(0)).norm(dim=-1).mean())
    return out


def choose_layers(lm, spec: str, auto_layers: int, probe) -> tuple[list[int], dict[int, float]]:
    """(layers, reach of every candidate layer) for --layers; probe() -> images [n, 3, S, S]."""
    from models import resolve_layers
    last = lm.layers - 1
    if last < 1:
        raise ValueError("the model has one transformer layer: no MLP layer has a later attention head to "
                         "reach the embedding through")
    if spec.strip().lower() == "auto":
        candidates = list(range(last))
        r = reach(lm, probe(), candidates)
        ranked = sorted(candidates, key=lambda l: (-r[l], l))
        return sorted(ranked[:auto_layers]), r
    layers = resolve_layers(spec, lm.layers)
    if last in layers:
        raise ValueError(f"--layers {spec}: MLP layer {last} is the last one and reaches no later attention head; "
                         f"choose among 0..{last - 1}")
    return layers, {}


# --------------------------------------------------------------------------- the job

def neurons(path: str, model_id: str, dataset_spec: str, *, layers: str = "auto", auto_layers: int = 1,
            max_images: int | None = None, batch_size: int = 32, top_k: int = 16, pc_images: int = 100,
            texts_k: int = TEXTS_K, bank: str | None = None, store_alpha: bool = False, eval_n: int = 500,
            eval_seed: int = EVAL, shuffled_draws: int = 20, force: bool = False, lm=None) -> dict:
    """The neuron tables for the chosen MLP layers of a warehouse model over a dataset; returns counts,
    the layers and their reach, and per layer the specialised neurons and the zero-shot check.
    lm: the model already loaded (its warehouse row's model), else it is loaded from the row."""
    import numpy as np
    import torch
    from etl.datasets import open_dataset
    from etl.neuron_stats import LayerAccumulator
    from models import model_from_row
    from models.neurons import SecondOrderLens
    from warehouse import atlas_home, writer, writes
    from warehouse.queries import bank_text_matrix
    from warehouse.runs import completed_run, run_record
    for name, v in (("--batch-size", batch_size), ("--top-k", top_k), ("--pc-images", pc_images),
                    ("--texts", texts_k), ("--auto-layers", auto_layers)):
        if v < 1:
            raise ValueError(f"{name} must be at least 1")
    if top_k > pc_images:
        raise ValueError(f"--top-k {top_k} is more than --pc-images {pc_images}: the top images are taken from "
                         "the images kept for the principal direction; raise --pc-images")
    row = model_row_or_fail(path, model_id)
    dataset = open_dataset(dataset_spec)
    bank = choose_bank(path, model_id, row["arch"], bank)
    text_ids, tags, T = bank_text_matrix(path, model_id, bank)
    if texts_k > len(text_ids):
        raise ValueError(f"--texts {texts_k}: the bank {bank!r} has only {len(text_ids)} texts embedded")
    items = list(_items(path, model_id, dataset, max_images))
    if lm is None or lm.model_id != model_id:
        lm = model_from_row(row)
    lm.model.eval()

    def probe():
        return next(_batches(lm, items[:PROBE_IMAGES], PROBE_IMAGES))[1]

    clock = time.perf_counter()
    chosen, reaches = choose_layers(lm, layers, auto_layers, probe)
    seconds = {"choose_layers": round(time.perf_counter() - clock, 2)}
    shapes_world = dataset.source == "shapes"
    settings = {"model_id": model_id, "dataset": dataset.dataset_id, "n_images": len(items), "bank": bank,
                "texts_k": texts_k, "pc_images": pc_images, "top_k": top_k, "store_alpha": store_alpha,
                "eval_n": eval_n if shapes_world else 0, "eval_seed": eval_seed, "shuffled_draws": shuffled_draws}
    todo = [l for l in chosen if force or not completed_run(path, "neurons", {**settings, "layer": l})]
    out = {"model_id": model_id, "dataset": dataset.dataset_id, "layers": chosen,
           "reach": {str(l): round(v, 6) for l, v in sorted(reaches.items())}, "images": len(items),
           "skipped_layers": [l for l in chosen if l not in todo], "stored": {}, "seconds": seconds}
    if not todo:
        with run_record(path, "neurons", {**settings, "layers": chosen}) as run_id:
            run_id.skipped = True
        return out

    lens = SecondOrderLens(lm.visual, todo)
    key = hashlib.sha256(json.dumps({**settings, "layers": todo, "fingerprint": lm.fingerprint()},
                                    sort_keys=True).encode()).hexdigest()[:20]
    ckpt = atlas_home() / "cache" / "neurons" / f"{key}.pkl"
    state = _load_checkpoint(ckpt) if not force else None
    if state is None:
        state = {"done": 0, "acc": {l: LayerAccumulator(lens.gram(l).numpy(), pc_images, shapes_world, lens.groups)
                                    for l in todo},
                 "ids": []}
        with writer(path) as con:                       # a layer recomputed keeps no alpha of an earlier run
            for l in todo:
                writes.delete_neuron_alpha(con, model_id, l)
    t_last = time.monotonic()
    clock = time.perf_counter()
    pending_alpha: list = []
    with run_record(path, "neurons", {**settings, "layers": todo, "pass": True}) as _:
        bar = progress(_batches(lm, items, batch_size, skip=state["done"]), desc=f"neurons {model_id} L{todo}",
                       unit="batch", total=max(0, -(-(len(items) - state["done"]) // batch_size)))
        for ids, x, facts in bar:
            with torch.no_grad():
                tr = lens.trace(x)
                alphas = {l: lens.alpha(tr, l).float().numpy() for l in todo}
            labels = {f: [fa.get(f) for fa in facts] for f in sorted({k for fa in facts for k in fa})}
            for l in todo:
                state["acc"][l].add(alphas[l], labels if shapes_world else None)
            state["ids"] += ids
            state["done"] += len(ids)
            if store_alpha:
                pending_alpha.append((ids, alphas))
            if time.monotonic() - t_last > CHECKPOINT_S:
                _flush_alpha(path, model_id, pending_alpha)
                _save_checkpoint(ckpt, state)
                t_last = time.monotonic()
        _flush_alpha(path, model_id, pending_alpha)
        _save_checkpoint(ckpt, state)
    seconds["pass"] = round(time.perf_counter() - clock, 2)

    for l in todo:
        clock = time.perf_counter()
        params = {**settings, "layer": l}
        with run_record(path, "neurons", params) as run_id:
            stored = _finish_layer(path, lm, lens, l, state["acc"][l], state["ids"], dataset, row, bank,
                                   text_ids, tags, T, settings, reaches.get(l), run_id)
        out["stored"][str(l)] = stored
        seconds[f"finish L{l}"] = round(time.perf_counter() - clock, 2)
    ckpt.unlink(missing_ok=True)
    return out


def _flush_alpha(path: str, model_id: str, pending: list) -> None:
    from warehouse import writer, writes
    if not pending:
        return
    with writer(path) as con:
        for ids, alphas in pending:
            for l, a in alphas.items():
                writes.insert_neuron_alpha(con, model_id, l, ids, a)
    pending.clear()


def _save_checkpoint(ckpt: Path, state: dict) -> None:
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    tmp = ckpt.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(ckpt)


def _load_checkpoint(ckpt: Path):
    """The state a killed run left (None when there is none or it cannot be read)."""
    try:
        with open(ckpt, "rb") as f:
            return pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError):
        return None


def _finish_layer(path, lm, lens, layer, acc, image_ids, dataset, row, bank, text_ids, tags, T, settings,
                  layer_reach, run_id) -> dict:
    """Summaries, texts, labels, ground truth and the zero-shot check of one layer, written in one transaction."""
    import numpy as np
    import pyarrow as pa
    import torch
    from etl.text.labelers import HeadText, OfflineLabeler, vocabulary
    from etl.text.sparse import sparse_texts
    from warehouse import writer, writes
    res = acc.finish(lambda sl: lens.head_vectors(layer, sl).numpy())
    N, K, M = acc.N, acc.K // acc.groups, acc.groups                          # neurons, later heads, pool heads
    sp = sparse_texts(res.pc, T, settings["texts_k"])
    vocab = vocabulary(path)
    labeler = OfflineLabeler(vocab, bank_tags=tags)
    plain = OfflineLabeler(vocab)
    rng = np.random.default_rng(0)
    tag_arr = np.asarray(tags, dtype=object)
    label_rows = []
    draws = [rng.permutation(len(tags)) for _ in range(settings["shuffled_draws"])]
    for n in range(N):
        chosen = [(int(i), float(g)) for i, g in zip(sp.index[n], sp.gain[n]) if i >= 0]
        texts = [HeadText(text_ids[i], tags[i], g) for i, g in chosen]
        lab = labeler.label(texts)
        label_rows.append((n, "labeler", 0, lab.property or "mixed", lab.confidence, lab.labeler, lab.prompt_hash,
                           lab.p_value, lab.raw))
        for d, perm in enumerate(draws):
            shuffled = [HeadText(text_ids[i], tag_arr[perm[i]], g) for i, g in chosen]
            b = plain.label(shuffled)
            label_rows.append((n, "tag-shuffled", d, b.property or "mixed", b.confidence, b.labeler, b.prompt_hash,
                               None, None))
    k = min(settings["top_k"], res.top_index.shape[1])                        # top images kept per neuron
    ids = np.asarray(image_ids, dtype=object)
    stats = pa.table({
        "neuron": pa.array(np.arange(N), pa.int32()), "mean_norm": res.mean_norm, "q50": res.q50, "q90": res.q90,
        "q99": res.q99, "max_norm": res.max_norm, "share_matters": res.share_matters, "hist_max": res.hist_max,
        "hist_counts": pa.array([c.tolist() for c in res.hist_counts.astype(np.int32)], pa.list_(pa.int32())),
        "pc": writes.vector_column(res.pc.astype(np.float32)), "pc_share": res.pc_share, "recon_r2": sp.r2,
        "run_id": [run_id] * N})
    nn, rr = np.meshgrid(np.arange(N), np.arange(k), indexing="ij")
    top = pa.table({"neuron": pa.array(nn.ravel(), pa.int32()), "rank": pa.array(rr.ravel(), pa.int32()),
                    "image_id": list(ids[res.top_index[:, :k].ravel()]), "norm": res.top_norm[:, :k].ravel(),
                    "projection": res.top_projection[:, :k].ravel()})
    has = sp.index >= 0
    tn, tr = np.nonzero(has)
    texts = pa.table({"neuron": pa.array(tn, pa.int32()), "rank": pa.array(tr, pa.int32()),
                      "text_id": [text_ids[i] for i in sp.index[has]], "coef": sp.coef[has], "gain": sp.gain[has]})
    labels = pa.table({c: v for c, v in zip(
        ["neuron", "labeling", "draw", "property", "confidence", "labeler", "prompt_hash", "p_value", "raw"],
        [pa.array(col, t) for col, t in zip(zip(*label_rows), [pa.int32(), pa.string(), pa.int32(), pa.string(),
                                                                pa.float64(), pa.string(), pa.string(),
                                                                pa.float64(), pa.string()])])} | {
        "run_id": [run_id] * len(label_rows)})
    heads = lens.heads(layer)
    hn, hk = np.meshgrid(np.arange(N), np.arange(K), indexing="ij")
    head_effects = pa.table({"neuron": pa.array(hn.ravel(), pa.int32()),
                             "head_layer": pa.array([heads[j][0] for j in hk.ravel()], pa.int32()),
                             "head": pa.array([heads[j][1] for j in hk.ravel()], pa.int32()),
                             "effect": res.head_effect.ravel()})
    fv_rows = [(n, f, float(e[n])) for f, e in sorted(res.eta2.items()) for n in range(N)]
    factor_variance = pa.table({"dataset_id": [dataset.dataset_id] * len(fv_rows),
                                "neuron": pa.array([r[0] for r in fv_rows], pa.int32()),
                                "factor": [r[1] for r in fv_rows], "eta2": [r[2] for r in fv_rows],
                                "run_id": [run_id] * len(fv_rows)})
    abl_rows = []
    clock = time.perf_counter()
    if settings["eval_n"]:
        abl_rows = zero_shot_check(lm, lens, layer, res, sp, T, settings["eval_n"], settings["eval_seed"])
    ablations = pa.table({"eval": [r[0] for r in abl_rows], "variant": [r[1] for r in abl_rows],
                          "factor": [r[2] for r in abl_rows], "accuracy": pa.array([r[3] for r in abl_rows], pa.float64()),
                          "run_id": [run_id] * len(abl_rows)})
    layer_row = {"dataset_id": dataset.dataset_id, "n_images": res.n_images, "n_neurons": N, "later_heads": K,
                 "pool_heads": M,
                 "reach": layer_reach, "bank": bank, "texts_k": settings["texts_k"], "pc_images": settings["pc_images"],
                 "matters_share": 0.9, "alpha_stored": bool(settings["store_alpha"]), "run_id": run_id}
    with writer(path) as con:
        if res.eta2:
            writes.upsert_factor_properties(con, _factor_properties())
        writes.replace_neuron_layer(con, row["model_id"], layer, layer_row=layer_row,
                                    stats=stats, top_images=top, texts=texts, labels=labels,
                                    head_effects=head_effects, factor_variance=factor_variance, ablations=ablations)
    summary = {"neurons": N, "later_heads": K, "pool_heads": M, "eval_seconds": round(time.perf_counter() - clock, 2),
               "median_share_matters": round(float(np.median(res.share_matters)), 4),
               "median_recon_r2": round(float(np.median(sp.r2)), 4)}
    if res.eta2:
        eta = np.stack([res.eta2[f] for f in sorted(res.eta2)])                  # [F, N]
        srt = np.sort(eta, 0)
        summary["specialised"] = int(((srt[-1] >= 0.4) & (srt[-1] >= 3 * srt[-2])).sum())
    if abl_rows:
        summary["zero_shot"] = {v: round(float(np.mean([r[3] for r in abl_rows if r[1] == v])), 4)
                                for v in EVAL_VARIANTS}
    return summary


def _factor_properties() -> dict:
    from etl.text.bank import WORLD_FACTOR_PROPERTIES
    return WORLD_FACTOR_PROPERTIES


def zero_shot_check(lm, lens, layer: int, res, sp, T, n: int, seed: int) -> list[tuple]:
    """The paper's check on the toy eval: zero-shot accuracy per factor with every neuron's effect of
    `layer` replaced at once (EVAL_VARIANTS). Returns (eval, variant, factor, accuracy) rows."""
    import numpy as np
    import torch
    from etl.world import evaluate
    from models import encode_texts, pixels_to_tensor
    sets = evaluate.eval_sets(seed, n, lm.image_size)
    classes = evaluate.class_table(lambda t: encode_texts(lm, t))
    pc = torch.from_numpy(res.pc).double()                                             # [N, d]
    recon = torch.from_numpy(sp.coef[:, :, None] * T[np.clip(sp.index, 0, None)] * (sp.index >= 0)[:, :, None]).sum(1)
    recon = torch.nn.functional.normalize(recon.double(), dim=-1)                     # [N, d] unit
    mean_total = torch.from_numpy(res.mean_effect).double().sum(0)                    # [d]
    v_pc, v_sp = [], []
    for a in range(0, len(pc), 256):
        U = lens.head_vectors(layer, slice(a, a + 256)).double()                      # [c, K, d]
        v_pc.append(torch.einsum("ckd,cd->ck", U, pc[a:a + 256]))
        v_sp.append(torch.einsum("ckd,cd->ck", U, recon[a:a + 256]))
    v_pc, v_sp = torch.cat(v_pc), torch.cat(v_sp)                                     # [N, K]
    emb = {v: {} for v in EVAL_VARIANTS}
    for which, scenes in sets.items():
        parts = {v: [] for v in EVAL_VARIANTS}
        for a in range(0, len(scenes), 64):
            x = pixels_to_tensor(lm, np.stack([s.image for s in scenes[a:a + 64]]))
            with torch.no_grad():
                tr = lens.trace(x, [layer])
                alpha = lens.alpha(tr, layer).double()                               # [B, N, K]
                e = tr.embedding.double()
                total = lens.layer_effect(alpha, layer).double()                      # [B, d]
                base = e - total
                parts["baseline"].append(e)
                parts["zero"].append(base)
                parts["mean"].append(base + mean_total)
                parts["rank1"].append(base + torch.einsum("bnk,nk->bn", alpha, v_pc) @ pc)
                parts["sparse"].append(base + torch.einsum("bnk,nk->bn", alpha, v_sp) @ recon)
        for v in EVAL_VARIANTS:
            emb[v][which] = torch.cat(parts[v]).float()
    name = f"toy:seed={seed}:n={n}"
    rows = []
    for v in EVAL_VARIANTS:
        for factor, acc in evaluate.zero_shot(emb[v], sets, classes).items():
            rows.append((name, v, factor, acc))
    return rows

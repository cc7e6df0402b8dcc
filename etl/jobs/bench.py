"""`bench`: the benchmarks of the ETL, models and warehouse in one process, side by side, medians.
(The dashboard's timings are `python -m dashboard.bench`; `make bench` runs both.)

Prints one table per section and, as the last line, one JSON object whose first keys are the
decomposition ratios of issue 2 (decompose_vs_forward, decompose_tokens_vs_forward, onnx_vs_torch).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from etl.common import positive_int

SECTIONS = ["decompose", "secondorder", "shapes", "textspan", "textencode", "embed", "neighbours"]
EXTRA = ["neuronscale"]         # minutes long: only with --only


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run the benchmarks (make bench)",
                       description="Throughputs and ratios measured side by side in one run (medians).")
    p.add_argument("--only", action="append", choices=SECTIONS + EXTRA,
                   help="run only these sections (repeatable); neuronscale (the neurons job on ViT-B-16, random "
                        "weights: time and warehouse bytes of one layer, extrapolated to 10,000 images) runs only "
                        "when named")
    p.add_argument("--scale-images", type=positive_int, default=64, metavar="N",
                   help="images the neuronscale section measures on (default 64)")
    p.add_argument("--rounds", type=positive_int, default=5, help="rounds per measurement (default 5)")
    p.set_defaults(func=run)


def _table(title: str, rows: list[tuple]) -> None:
    print(f"\n## {title}")
    width = max(len(str(r[0])) for r in rows)
    for name, value in rows:
        print(f"  {str(name):<{width}}  {value}")


def bench_embed(arch: str = "toy-shapes", n: int = 1024, rounds: int = 3, model_threads: int = 0) -> dict:
    """End-to-end embed into DuckDB vs the bare onnxruntime runner on the same preprocessed images.

    The images are a folder of PNG files (``n`` shapes scenes, written before the clock starts), as a
    user's dataset is: the job reads, decodes, preprocesses, runs, writes. (Generating scenes inside
    the job, ``shapes:N``, costs about as much CPU per image as the toy model itself, which would
    measure the generator, not the pipeline.) The bare side is the model alone: the session made
    beforehand, only ``runner(batch)`` timed, with onnxruntime's defaults. The embed side is the whole
    job on an empty warehouse: open the dataset, start the loader, load the ONNX session, decode,
    preprocess, run, write, re-cluster (``optimize``). ``model_threads``: onnxruntime's intra-op
    threads on both sides (0: every core; 1 leaves the other core of this 2-core host to the job's
    loader and writer, as a larger machine leaves spare cores)."""
    import torch
    from etl.datasets import open_dataset
    from etl.jobs.embed import embed, export
    from models import load_model
    from models.onnx import OnnxRunner
    from warehouse import writer
    lm = load_model(arch) if arch == "toy-shapes" else load_model(arch, random_init=True)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ATLAS_HOME"] = tmp
        os.environ["ATLAS_NO_PROGRESS"] = "1"
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i, item in enumerate(open_dataset(f"shapes:{n}:seed=5").items()):
            item.load().save(folder / f"{i:06d}.png")
        layers = list(range(lm.layers - 4, lm.layers))
        runner = OnnxRunner(export(str(Path(tmp) / "w.duckdb"), lm, layers), threads=model_threads)
        imgs = [lm.preprocess(item.load()) for item in open_dataset(str(folder)).items()]
        bare, e2e = [], []
        for r in range(rounds):
            t = time.perf_counter()
            for i in range(0, n, 64):
                runner(torch.stack(imgs[i:i + 64]))
            bare.append(n / (time.perf_counter() - t))
            path = str(Path(tmp) / f"w{r}.duckdb")
            with writer(path):          # a migrated, empty warehouse: creating one is not embedding
                pass
            t = time.perf_counter()
            embed(path, lm, str(folder), layers, "onnx", None, 64, "bench", model_threads=model_threads)
            e2e.append(n / (time.perf_counter() - t))
    b, e = statistics.median(bare), statistics.median(e2e)
    return {"arch": arch, "images": n, "source": "folder of PNG files", "model_threads": model_threads or "all",
            "bare_onnx_img_s": b, "embed_e2e_img_s": e, "embed_vs_bare": e / b}


def bench_neuron_scale(n: int = 64, arch: str = "ViT-B-16", layer: int = 9, per: int = 10_000) -> dict:
    """What the neurons job costs for one MLP layer of `arch` (random weights, CPU), measured on `n`
    images and extrapolated to `per` images.

    A warehouse gets n shapes scenes embedded (torch backend) and the atlas bank's 3,962 texts with
    random unit embeddings (the job's cost does not depend on what the texts say, and a random model's
    text tower says nothing either). Then `neurons --layers {layer} --store-alpha --eval-n 0` runs, timed
    by stage. The pass over the images grows linearly with n (each image is one forward pass and its
    alpha), the finish (principal directions, orthogonal matching pursuit over the bank, labels) does not;
    so time(per) = finish + pass / n * per. Bytes: the layer's summary tables and its neuron_alpha rows
    are copied into fresh DuckDB files and measured; summaries do not grow with n, alpha does linearly
    (bytes(per) = summary + alpha / n * per). The statistics held in memory grow as [images, N] float32."""
    import duckdb
    import numpy as np
    from etl.jobs.embed import embed
    from etl.jobs.neurons import neurons
    from etl.text.bank import ATLAS_BANK, PROPERTIES, bank_texts, text_id
    from models import load_model
    from warehouse import writer, writes
    from warehouse.db import connect, release_readers
    lm = load_model(arch, random_init=True, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ATLAS_HOME"] = tmp
        os.environ["ATLAS_NO_PROGRESS"] = "1"
        path = str(Path(tmp) / "w.duckdb")
        embed(path, lm, f"shapes:{n}:seed=5", [lm.layers - 1], "torch", None, 16, "bench")
        items = bank_texts(ATLAS_BANK)
        ids = [text_id(ATLAS_BANK, t) for t, _ in items]
        T = np.random.default_rng(0).normal(size=(len(ids), lm.embed_dim)).astype(np.float32)
        with writer(path) as con:
            writes.upsert_properties(con, dict(PROPERTIES))
            writes.upsert_texts(con, ATLAS_BANK, ids, [t for t, _ in items], [tag for _, tag in items])
            writes.insert_text_embeddings(con, lm.model_id, ids, T / np.linalg.norm(T, axis=1, keepdims=True))
        t = time.perf_counter()
        out = neurons(path, lm.model_id, f"shapes:{n}:seed=5", layers=str(layer), store_alpha=True, eval_n=0,
                      lm=lm)
        total = time.perf_counter() - t
        sizes = {}
        release_readers()
        with connect(path, read_only=False) as con:
            for name, tables in (("summary", ["neuron_layers", "neuron_stats", "neuron_top_images", "neuron_texts",
                                              "neuron_labels", "neuron_head_effects"]), ("alpha", ["neuron_alpha"])):
                f = Path(tmp) / f"{name}.duckdb"
                writes.copy_tables_to_file(con, f, tables)
                sizes[name] = f.stat().st_size
        empty = Path(tmp) / "empty.duckdb"
        duckdb.connect(str(empty)).close()
        base = empty.stat().st_size
    sec = out["seconds"]
    finish = sec[f"finish L{layer}"]
    per_image = sec["pass"] / n
    alpha_per_image = (sizes["alpha"] - base) / n
    N = out["stored"][str(layer)]["neurons"]
    return {"arch": arch, "layer": layer, "neurons": N, "later_heads": out["stored"][str(layer)]["later_heads"],
            "images": n, "bank_texts": len(ids), "job_s": total, "pass_s": sec["pass"], "finish_s": finish,
            "pass_s_per_image": per_image, f"hours_per_{per}": (finish + per_image * per) / 3600,
            "summary_mb": (sizes["summary"] - base) / 2**20, "alpha_kb_per_image": alpha_per_image / 1024,
            f"alpha_gb_per_{per}": alpha_per_image * per / 2**30,
            f"memory_mb_per_{per}": per * N * 4 / 2**20}


def bench_text_encode(n: int = 512, seed: int = 0, rounds: int = 3) -> dict:
    """models.bench.bench_text_encode on the product's atlas bank: a fixed subset of `n` texts drawn
    with `seed` (open_clip's full-context path would take over 10 min a round on all 3,962 texts on 2 cores)."""
    import random
    from etl.text.bank import ATLAS_BANK, bank_texts
    from models.bench import bench_text_encode as bench
    bank = [t for t, _ in bank_texts(ATLAS_BANK)]
    texts = random.Random(seed).sample(bank, n) if n < len(bank) else bank
    return {"bank": ATLAS_BANK, "bank_texts": len(bank), "seed": seed, **bench(texts, rounds=rounds)}


def embed_peak_rss(n: int) -> dict:
    """Peak RSS (MB) of a fresh `embed` process over shapes:n (streaming => ~independent of n):
    the job's own peak, its largest loader worker's, and their bound, job + workers x largest worker
    (an upper bound on the sum: a forked worker's RSS also counts pages it shares with the job).

    Read from the child's own VmHWM and RUSAGE_CHILDREN (its reaped loader workers): getrusage's
    ru_maxrss survives exec, so a child spawned from this (large) benchmark process would report the
    parent's peak as its own RUSAGE_SELF.
    """
    with tempfile.TemporaryDirectory() as tmp:
        code = ("import resource, sys; from etl.cli import main; from etl.loader import default_workers; "
                "main(sys.argv[1:]); "
                "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0], "
                "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, default_workers(False))")
        env = {**os.environ, "ATLAS_HOME": tmp, "ATLAS_NO_PROGRESS": "1"}
        out = subprocess.run([sys.executable, "-c", code, "embed", "--model", "toy-shapes", "--dataset",
                              f"shapes:{n}:seed=9", "--warehouse", f"{tmp}/w.duckdb"],
                             capture_output=True, text=True, env=env, check=True)
        job, worker, workers = (int(x) for x in out.stdout.strip().splitlines()[-1].split())
        worker = worker if workers else 0            # (RUSAGE_CHILDREN also counts the job's other children)
        return {"job_mb": job / 1024, "worker_mb": worker / 1024, "workers": workers,
                "bound_mb": (job + workers * worker) / 1024}


def run(args) -> int:
    only = set(args.only or SECTIONS)
    summary: dict = {}
    if "decompose" in only:
        from models.bench import bench_decompose
        r = bench_decompose(rounds=args.rounds)
        _table(f"decomposition, {r['arch']} random weights, batch {r['batch']}, CPU threads {r['threads']}, "
               f"median of {r['rounds']}", [(k, f"{v:.2f} images/s") for k, v in r["images_per_s"].items()]
               + [(k, f"{v:.3f}") for k, v in r["ratios"].items()])
        summary.update({k: round(v, 3) for k, v in r["ratios"].items()})
        from models.bench import bench_decompose_siglip
        r = bench_decompose_siglip(rounds=args.rounds)
        _table(f"decomposition of a MAP-pooled tower, {r['arch']} random weights, batch {r['batch']}, CPU threads "
               f"{r['threads']}, median of {r['rounds']}",
               [(k, f"{v:.2f} images/s") for k, v in r["images_per_s"].items()]
               + [(k, f"{v:.3f}") for k, v in r["ratios"].items()])
        summary.update({k: round(v, 3) for k, v in r["ratios"].items()})
    if "secondorder" in only:
        from models.bench import bench_second_order
        r = bench_second_order(rounds=args.rounds)
        _table(f"second-order lens (MATH.md §10), {r['arch']} random weights, MLP layer {r['layer']} "
               f"({r['neurons']:,} neurons x {r['later_heads']} later heads), batch {r['batch']} in micro-batches "
               f"of {r['micro_batch']}, CPU threads {r['threads']}, median of {r['rounds']}",
               [(f"{k} (s)", f"{v:.3f}") for k, v in r["seconds"].items()]
               + [("second_order_vs_forward (extra cost of alpha for one layer)", f"{r['second_order_vs_forward']:.3f}"),
                  ("second_order_alpha_only_vs_forward (alpha from a trace)",
                   f"{r['second_order_alpha_only_vs_forward']:.3f}")])
        summary["second_order_vs_forward"] = round(r["second_order_vs_forward"], 3)
        summary["second_order_alpha_only_vs_forward"] = round(r["second_order_alpha_only_vs_forward"], 3)
    if "shapes" in only:
        from etl.world.shapes import bench_shapes
        rate = statistics.median(bench_shapes() for _ in range(3))
        _table("shapes world generator (64 px, one thread)", [("images/s", f"{rate:.0f}")])
        summary["shapes_images_per_s"] = round(rate)
    if "textspan" in only:
        from etl.text.textspan import bench_textspan
        r = bench_textspan()
        _table("TextSpan (48 heads x k=20, 3,500 texts, 5,000 images, d=512)", [(k, v) for k, v in r.items()])
        summary.update({f"textspan_{k}": v for k, v in r.items() if isinstance(v, (int, float))})
    if "textencode" in only:
        r = bench_text_encode(rounds=max(3, args.rounds // 2))
        _table(f"text encoding, {r['arch']} random weights, {r['texts']} of the {r['bank']} bank's {r['bank_texts']:,} "
               f"texts (seeded subset, seed {r['seed']}), batch {r['batch_size']}, CPU threads {r['threads']}, "
               f"median of {r['rounds']}",
               [(f"open_clip encode_text, full {r['context']}-token batches (s)", f"{r['open_clip_s']:.2f}"),
                (f"encode_texts, sorted + trimmed, mean {r['mean_tokens']:.1f} tokens (s)", f"{r['encode_texts_s']:.2f}"),
                ("text_encode_vs_open_clip (wall)", f"{r['text_encode_vs_open_clip']:.2f}"),
                ("the same in process CPU seconds", f"{r['open_clip_cpu_s']:.1f} / {r['encode_texts_cpu_s']:.1f} = "
                                                    f"{r['text_encode_vs_open_clip_cpu']:.2f}"),
                ("max abs diff of the unit embeddings", f"{r['max_abs_diff']:.1e}")])
        summary.update(text_encode_vs_open_clip=round(r["text_encode_vs_open_clip"], 3),
                       text_encode_subset_texts=r["texts"],
                       text_encode_open_clip_s=round(r["open_clip_s"], 2),
                       text_encode_ours_s=round(r["encode_texts_s"], 2))
    if "embed" in only:
        # sizes where the job's fixed start and finish (about 0.8 s to the first model batch: dataset,
        # ONNX session; 0.5 s after the last: its commit and the re-clustering) are a few % of the run
        rounds = max(1, args.rounds // 2)
        r = bench_embed("ViT-B-32", n=1024, rounds=rounds)
        toy = bench_embed("toy-shapes", n=4096, rounds=rounds)
        # the same with onnxruntime on one core and the other left to the loader and the writer
        r1 = bench_embed("ViT-B-32", n=1024, rounds=rounds, model_threads=1)
        toy1 = bench_embed("toy-shapes", n=4096, rounds=rounds, model_threads=1)
        rss_small, rss_big = embed_peak_rss(500), embed_peak_rss(50_000)
        _table("embed into DuckDB vs bare onnxruntime (a folder of PNG files; ViT-B-32 random: 1,024 images; "
               "toy-shapes: 4,096 images)",
               [(k, f"{v:.2f}" if isinstance(v, float) else v) for k, v in r.items()]
               + [(f"toy {k}", f"{v:.2f}" if isinstance(v, float) else v) for k, v in toy.items()]
               + [(f"one model thread: {x['arch']} embed_vs_bare ({x['embed_e2e_img_s']:.2f} vs {x['bare_onnx_img_s']:.2f} "
                   f"images/s)", f"{x['embed_vs_bare']:.3f}") for x in (r1, toy1)]
               + [(f"peak RSS embed {k:,} images, job + {m['workers']} loader worker(s) (MB)",
                   f"{m['job_mb']:.0f} + {m['worker_mb']:.0f} = {m['bound_mb']:.0f}")
                  for k, m in ((500, rss_small), (50_000, rss_big))])
        summary.update(embed_vs_bare=round(r["embed_vs_bare"], 3), embed_vs_bare_toy=round(toy["embed_vs_bare"], 3),
                       embed_vs_bare_one_model_thread=round(r1["embed_vs_bare"], 3),
                       embed_vs_bare_toy_one_model_thread=round(toy1["embed_vs_bare"], 3),
                       embed_rss_mb_500=round(rss_small["bound_mb"]),
                       embed_rss_mb_50000=round(rss_big["bound_mb"]))
    if "neuronscale" in only:
        r = bench_neuron_scale(n=args.scale_images)
        _table(f"neurons job, {r['arch']} random weights, MLP layer {r['layer']} ({r['neurons']:,} neurons x "
               f"{r['later_heads']} later heads), {r['images']} images measured, {r['bank_texts']:,} texts, CPU",
               [(k, f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()])
        summary.update({f"neuron_scale_{k}": round(v, 4) if isinstance(v, float) else v for k, v in r.items()
                        if k not in ("arch",)})
    if "neighbours" in only:
        from warehouse.bench import bench_neighbours
        ms = bench_neighbours()
        _table("top-10 neighbour query for one head over 50,000 images (d=512)", [("median ms", f"{ms:.1f}")])
        summary["neighbours_top10_ms"] = round(ms, 1)
    print()
    print(json.dumps(summary))
    return 0

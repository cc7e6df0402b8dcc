"""`study`: the size study (MATH.md §11, issue 19): every zoo model on held-out worlds, every score,
per size the mean over model seeds, the trend against log(image-tower parameters), a verdict per
definition of "interpretable".

    python -m etl study                                 # every trained toy model + the random control,
                                                        # on the study worlds of etl/world/seeds.py
    python -m etl study --world 1013 --n 300 --model toy-shapes-small      # a smaller one
    python -m etl study --in-place                      # score the shapes datasets already in --warehouse
                                                        # (make etl's demo study)

Each world gets its own warehouse under --study-dir (labels are per model, so one warehouse holds
one world), built by the pipeline's own jobs: embed, texts, textspan on that world's scenes only,
label (with its tag-shuffled baseline), judge, probe (with the label-free code scores). Every step
skips what is stored, so a second run only scores. The scores are the views of migration 007
(`model_measures`); the study writes them, per size and per definition, into --warehouse
(`study_scores`, `study_sizes`, `study_verdicts`, and `world_seeds`: which worlds were used for what),
where the Metrics page reads them. One progress line per model and world.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import time
from pathlib import Path

from etl.common import add_warehouse_arg, non_negative_int, positive_int, warehouse_path

CONTROL = "toy-shapes"           # the random-init control: the middle architecture, random weights (seed 0)
DEFAULT_N = 1000                 # scenes per world


def add_parser(sub) -> None:
    from etl.world.seeds import STUDY
    p = sub.add_parser("study", help="the size study: every zoo model on held-out worlds, per size, trend and verdicts",
                       description=__doc__.split("\n\n")[0] + " Resumable: every step skips what is stored.")
    add_warehouse_arg(p)
    p.add_argument("--world", type=non_negative_int, action="append", default=None, metavar="SEED",
                   help=f"a held-out world seed to study on (repeatable; default {' and '.join(map(str, STUDY))}, "
                        "the study worlds of etl/world/seeds.py; worlds used in training or tuning are refused)")
    p.add_argument("--n", type=positive_int, default=DEFAULT_N, help=f"scenes per world (default {DEFAULT_N})")
    p.add_argument("--model", action="append", default=None, metavar="ARCH",
                   help="a toy architecture with shipped weights (repeatable; default: every models/toy config "
                        "with weights, so new seeds join when their weights land)")
    p.add_argument("--control", default=CONTROL, metavar="ARCH",
                   help=f"architecture of the random-init control (seed 0; default {CONTROL}; 'none': no control)")
    p.add_argument("--study-dir", default=None, metavar="DIR",
                   help="where the per-world warehouses live (default $ATLAS_HOME/study)")
    p.add_argument("--name", default=None,
                   help="the study's name in the warehouse (default 'zoo', with --in-place 'demo')")
    p.add_argument("--in-place", action="store_true",
                   help="build nothing: score the models and shapes datasets already in --warehouse")
    p.add_argument("--bootstrap", type=non_negative_int, default=None, metavar="B",
                   help="image resamples behind the label-free scores' intervals (default: the probe job's, 200)")
    p.set_defaults(func=run)


def run(args) -> int:
    out = study(warehouse_path(args), worlds=args.world, n=args.n, models=args.model,
                control=None if args.control == "none" else args.control, study_dir=args.study_dir,
                name=args.name, in_place=args.in_place, bootstrap=args.bootstrap)
    print(out.pop("report"))
    print(json.dumps(out, default=float))
    return 0


def _line(text: str) -> None:
    print(text, flush=True)


def study(path: str, worlds: list[int] | None = None, n: int = DEFAULT_N, models: list[str] | None = None,
          control: str | None = CONTROL, study_dir: str | None = None, name: str | None = None,
          in_place: bool = False, bootstrap: int | None = None) -> dict:
    """Build (unless ``in_place``) and score every model on every world; store and report the study.
    Returns {'study', 'models', 'worlds', 'seconds', 'report'} ('report': the table and verdicts)."""
    from etl.world import seeds
    from etl.world import study as S
    from warehouse import writer, writes
    from warehouse.runs import run_record, up_to_date
    t0 = time.perf_counter()
    name = name or ("demo" if in_place else "zoo")
    params = None
    if in_place:
        if worlds or models:
            raise ValueError("--in-place scores what --warehouse holds: leave out --world and --model")
        todo = _in_place_todo(path)
        params = {"study": name, "in_place": True, "worlds": sorted({_world_seed(d) for d, _ in todo}),
                  "models": sorted({m for _, m in todo}), "n": None}
        if todo and up_to_date(path, "study", params, key=None):     # a rerun of `make etl` that added nothing
            with run_record(path, "study", params) as run_id:
                run_id.skipped = True
            return {"study": name, "models": len(params["models"]), "worlds": params["worlds"], "skipped": True,
                    "seconds": round(time.perf_counter() - t0, 1),
                    "report": f"Nothing changed in this warehouse since its study '{name}': the stored study stands "
                              "(study_scores, study_sizes, study_verdicts)."}
        rows = _score_in_place(path, todo)
    else:
        worlds = list(worlds or seeds.STUDY)
        used = [w for w in worlds if not seeds.held_out(w)]
        if used:
            raise ValueError(f"world seed {used[0]} was used for training or tuning (etl/world/seeds.py), so its "
                             f"scenes are not held out; pick others (the study's: {', '.join(map(str, seeds.STUDY))})")
        rows = _build_and_score(path, worlds, n, _zoo(models), control, study_dir, bootstrap)
    if not rows:
        raise ValueError("no model has labels and ground truth on a shapes dataset"
                         + (" in this warehouse: run `python -m etl run --model ... --dataset shapes:N:seed=S` first"
                            if in_place else ""))
    per_model = S.per_model(rows)
    sizes = S.summarise_sizes(per_model)
    verdicts = S.study_fits(per_model)
    params = params or {"study": name, "in_place": False, "worlds": sorted({r["world_seed"] for r in rows}),
                        "models": sorted({r["model_id"] for r in rows}), "n": n}
    with run_record(path, "study", params) as run_id:
        with writer(path) as con:
            writes.replace_world_seeds(con, seeds.provenance())
            writes.replace_study(con, name, rows, sizes, verdicts, run_id)
    report = report_text(rows, sizes, verdicts, params["worlds"], name)
    return {"study": name, "models": len(params["models"]), "worlds": params["worlds"],
            "seconds": round(time.perf_counter() - t0, 1), "report": report}


def report_text(rows: list[dict], sizes: list[dict], verdicts: list[dict], worlds: list[int], name: str) -> str:
    """The study's tables (per model and world: the labels beside both baselines; per size: mean [95 %
    interval over model seeds] of every score) and one verdict per line."""
    from etl.world import seeds
    from etl.world import study as S
    held = ", ".join(f"{w}{'' if seeds.held_out(w) else ' (NOT held out: used in training or tuning)'}" for w in worlds)
    lines = [f"## Size study '{name}' on world seed(s) {held}",
             f"(training used worlds {', '.join(map(str, seeds.TRAINING))}; the labeler's constants were tuned on "
             f"{', '.join(map(str, seeds.TUNING))})", "",
             "Per model and world (95 % intervals: kappa and margins over a head bootstrap, rates Wilson):", "",
             S.model_table(rows), "",
             "Per size (mean over model seeds, each averaged over the worlds; 95 % t interval over the seeds):", "",
             S.markdown_table(sizes), "", "Verdicts:"]
    lines += [f"- {v['verdict']}" for v in verdicts]
    return "\n".join(lines)


def _zoo(models: list[str] | None) -> list[str]:
    """The toy architectures to study: ``models``, else every models/toy config with shipped weights."""
    from models import toy_architectures
    from models.registry import bundled_weights
    if models:
        missing = [m for m in models if bundled_weights(m) is None]
        if missing:
            have = [m for m in toy_architectures() if bundled_weights(m)]
            raise ValueError(f"no shipped weights for {missing[0]!r} (models/toy/{missing[0]}.safetensors); "
                             f"toy models with weights: {', '.join(have)}")
        return list(models)
    return [m for m in toy_architectures() if bundled_weights(m)]


def _embedded(path: str, model_id: str, dataset_id: str) -> set:
    """The images of ``dataset_id`` the model has embeddings of in ``path`` (none when the file is new)."""
    from warehouse.queries import embedded_image_ids
    return embedded_image_ids(path, model_id, dataset_id) if Path(path).exists() else set()


def _world_seed(dataset_id: str) -> int | None:
    m = re.fullmatch(r"shapes:\d+:seed=(\d+)", dataset_id)
    return int(m.group(1)) if m else None


def _image_params(lm) -> int:
    return int(sum(p.numel() for p in lm.visual.parameters()))


def _rows(path: str, model_id: str, dataset_id: str, params: int) -> list[dict]:
    """The model's scores on one dataset (model_measures) as study_scores rows."""
    from etl.world.study import size_of
    from warehouse.queries import measures_of, model_row
    row = model_row(path, model_id)
    size = size_of(row["source"], row["layers"], row["width"], row["pooling"])
    return [dict(model_id=model_id, world_seed=_world_seed(dataset_id), dataset_id=dataset_id, size=size,
                 image_params=params, score=score, value=v, lo=lo, hi=hi)
            for score, (v, lo, hi) in measures_of(path, model_id, dataset_id).items()]


def _progress(i: int, total: int, world: int, model_id: str, rows: list[dict], seconds: float) -> None:
    got = {r["score"]: r["value"] for r in rows}
    fmt = lambda k: "–" if got.get(k) is None or got[k] != got[k] else f"{got[k]:.2f}"   # noqa: E731
    size = rows[0]["size"] if rows else "?"
    _line(f"[{i}/{total}] world {world} · {model_id} ({size}): kappa {fmt('kappa')} "
          f"(- shuffled {fmt('kappa_margin_shuffled')}), invented {fmt('invented_rate')}, "
          f"informativeness {fmt('informativeness')}, MIG {fmt('mig')} · {seconds:.0f} s")


def _in_place_todo(path: str) -> list[tuple[str, str]]:
    """(shapes dataset, model) pairs of ``path`` with labels and ground truth: what an in-place study scores."""
    from warehouse.queries import models_with_truth, shapes_datasets
    return [(d, m) for d in shapes_datasets(path) if _world_seed(d) is not None for m in models_with_truth(path, d)]


def _score_in_place(path: str, todo: list[tuple[str, str]]) -> list[dict]:
    """Score every (dataset, model) of ``todo`` (``_in_place_todo``)."""
    from models import model_from_row
    from warehouse.queries import model_row
    rows, params = [], {}
    for i, (dataset_id, model_id) in enumerate(todo, 1):
        t = time.perf_counter()
        if model_id not in params:
            params[model_id] = _image_params(model_from_row(model_row(path, model_id)))
        got = _rows(path, model_id, dataset_id, params[model_id])
        _progress(i, len(todo), _world_seed(dataset_id), model_id, got, time.perf_counter() - t)
        rows += got
    return rows


def _build_and_score(path: str, worlds: list[int], n: int, zoo: list[str], control: str | None,
                     study_dir: str | None, bootstrap: int | None) -> list[dict]:
    """Every (world, model): the pipeline's jobs into the world's warehouse (each skips what is stored),
    then its scores."""
    from etl.jobs import embed, judge, label, probe, texts, textspan
    from models import default_bank, load_model
    from warehouse import atlas_home
    base = Path(study_dir) if study_dir else atlas_home() / "study"
    specs = [(m, False) for m in zoo] + ([(control, True)] if control else [])
    total, i, rows = len(worlds) * len(specs), 0, []
    for world in worlds:
        dataset_id = f"shapes:{n}:seed={world}"
        wpath = str(base / f"world-{world}-n{n}.duckdb")
        for arch, random_init in specs:
            i += 1
            t = time.perf_counter()
            lm = load_model(arch, random_init=random_init, seed=0)
            bank = default_bank(arch)
            with contextlib.redirect_stdout(io.StringIO()):          # the jobs' own JSON lines
                if len(_embedded(wpath, lm.model_id, dataset_id)) < n:   # (a finished embed still re-clusters)
                    embed.embed_datasets(wpath, lm, [dataset_id], embed.model_layers(lm, "auto"))
                texts.load_texts(wpath, lm.model_id, bank=bank)
                textspan.textspan(wpath, lm.model_id, bank=bank, dataset=dataset_id)
                label.label(wpath, lm.model_id)
                judge.judge(wpath, lm.model_id, "tag")
                probe.probe(wpath, lm.model_id, dataset_id,
                            **({} if bootstrap is None else {"bootstrap": bootstrap}))
            got = _rows(wpath, lm.model_id, dataset_id, _image_params(lm))
            _progress(i, total, world, lm.model_id, got, time.perf_counter() - t)
            rows += got
    return rows

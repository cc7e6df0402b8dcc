"""`train-toy` (one training run of a toy CLIP) and `train-zoo` (a zoo model by the shipped recipe).

The training itself lives in etl/world/recipe.py; this module only turns flags into a TrainConfig.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict

import models
from etl.common import (image_batch, non_negative_float, non_negative_int, positive_float, positive_int,
                        probability)
from etl.world import recipe
from etl.world.recipe import MODEL_NAME, TrainConfig


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=models.toy_architectures(),
                   help=f"toy architecture to train (a models/toy/*.json config; default {MODEL_NAME})")
    p.add_argument("--steps", type=positive_int,
                   help="optimiser steps (each on a fresh batch of scenes); default 1000 "
                        "(~25-40 min on a shared 2-core CPU)")
    p.add_argument("--batch-size", type=image_batch, help="scenes per step (default 128; checked against the machine's memory)")
    p.add_argument("--lr", type=positive_float, help="peak AdamW learning rate (default 1e-3)")
    p.add_argument("--warmup", type=non_negative_float,
                   help="warm-up steps; a value < 1 is a fraction of --steps (default 0.05)")
    p.add_argument("--weight-decay", type=non_negative_float,
                   help="AdamW weight decay on weight matrices (default 0.1)")
    p.add_argument("--group-size", type=positive_int,
                   help="scenes per group of minimal variants (a random scene plus copies that "
                        "each change one factor): hard negatives for shape/position/count; "
                        "1 = independent scenes (default 4)")
    p.add_argument("--targets", choices=["exact", "diagonal"],
                   help="contrastive targets: 'exact' = every image a caption is true of is a "
                        "positive (known factors); 'diagonal' = standard CLIP (default exact)")
    p.add_argument("--factor-loss", type=non_negative_float,
                   help="weight of the per-factor contrastive term: each image against the "
                        "one-factor captions of every value of each factor ('a red shape' vs "
                        "'a blue shape' ...), a weighted mean over factors (--factor-weights); "
                        "0 disables (default 1.0)")
    p.add_argument("--factor-weights",
                   help="weights of the factors in the factor term, FACTOR=W,...; unnamed "
                        "factors weigh 1 (default 'shape=2')")
    p.add_argument("--text-loss", type=non_negative_float,
                   help="weight of the text-side paraphrase term: two wordings of each factor "
                        "value's caption match each other, not the other values; keeps factor "
                        "words apart in the text tower; 0 disables (default 1.0)")
    p.add_argument("--sigmoid-weight", type=non_negative_float,
                   help="weight of SigLIP's sigmoid loss, for a model whose config has a logit bias "
                        "(toy-shapes-map); it sums B binary terms per image, so it is weighed down to "
                        "the softmax loss's gradient; ignored for softmax models (default 0.2)")
    p.add_argument("--single-prob", type=probability,
                   help="extra probability that a group's base scene holds a single object "
                        "(only with --group-size > 1; default 0.5)")
    p.add_argument("--pos-init-scale", type=positive_float,
                   help="multiply open_clip's initial image position embedding (std width^-0.5) "
                        "by this; 1 keeps open_clip's init (default 10)")
    p.add_argument("--partial-prob", type=probability,
                   help="share of captions that name only a random subset of the factors "
                        "(the rest name all of them; default 0.5)")
    p.add_argument("--image-size", type=positive_int,
                   help="scene size in pixels; must match the config's image_size (default 64)")
    p.add_argument("--seed", type=non_negative_int,
                   help="seed of the model init and of the shapes world used for training (default 0)")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default 2)")
    p.add_argument("--checkpoint-dir",
                   help="where last.pt and log.jsonl go (default $ATLAS_HOME/toy-train)")
    p.add_argument("--checkpoint-every", type=positive_int,
                   help="write a resumable checkpoint every N steps (default 100)")
    p.add_argument("--log-every", type=positive_int, help="append a log.jsonl line every N steps")
    p.add_argument("--resume", action="store_true",
                   help="continue from <checkpoint-dir>/last.pt (same --seed/--steps/--batch-size)")
    p.add_argument("--init",
                   help="start from these safetensors weights instead of a random init "
                        "(a second training phase); the scenes still come from --seed, "
                        "starting at --start-index")
    p.add_argument("--start-index", type=non_negative_int,
                   help="first scene index of the training stream (default 0); a second phase "
                        "should start after the scenes the first one used (steps x batch size)")
    p.add_argument("--stop-at", type=non_negative_int,
                   help="checkpoint and stop after this step (0: run to --steps); "
                        "continue later with --resume")
    p.add_argument("--out",
                   help="final float16 safetensors (default models/toy/<model>.safetensors)")
    p.add_argument("--snapshot-out", action="store_true",
                   help="also rewrite --out at every checkpoint (useful to evaluate mid-run)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def add_parser(sub) -> None:
    p = sub.add_parser("train-toy", help="train a toy CLIP on the shapes world (CPU; resumable)",
                       description=recipe.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _train_arguments(p)
    p.set_defaults(**asdict(TrainConfig()), func=run_train)

    z = sub.add_parser(
        "train-zoo", help="train a toy model of the zoo by the shipped two-phase recipe (resumable)",
        description="Train a models/toy/*.json architecture by the zoo recipe (the two phases of "
                    "RECIPE_PHASES in etl/world/recipe.py); a re-run resumes where it stopped. "
                    "Example: python -m etl train-zoo --model toy-shapes-small --seed 0")
    z.add_argument("--model", required=True, choices=models.toy_architectures(), help="toy architecture")
    z.add_argument("--seed", type=non_negative_int, default=0, help="init and training-world seed (default 0)")
    z.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default 1)")
    z.add_argument("--out", default=None, help="final weights (default models/toy/<model>.safetensors)")
    z.add_argument("--work-dir", default=None,
                   help="phase checkpoints and weights (default $ATLAS_HOME/toy-train/<model>-seed<seed>)")
    z.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    z.set_defaults(func=run_zoo)

    k = sub.add_parser(
        "pack-zoo", help="rewrite a zoo weights file in the lossless packed form (rows training never touched "
                         "are rebuilt from the seed)",
        description="Rewrite models/toy/<model>.safetensors, trained by the zoo recipe, so that the token-embedding "
                    "rows training never updated are rebuilt from the seed at load time instead of stored "
                    "(models/zoo_pack.py; ~12.6 MB less per model). The packed file is read back and compared "
                    "bit for bit before it replaces the original; train-zoo packs its output itself. "
                    "Example: python -m etl pack-zoo --model toy-shapes-seed1")
    k.add_argument("--model", required=True, choices=models.toy_architectures(), help="toy architecture")
    k.set_defaults(func=run_pack)


def run_train(args) -> int:
    fields = TrainConfig.__dataclass_fields__
    recipe.train(TrainConfig(**{k: v for k, v in vars(args).items() if k in fields}))
    return 0


def run_zoo(args) -> int:
    print(recipe.train_recipe(args.model, args.seed, args.threads, args.out, args.work_dir, args.no_progress))
    return 0


def run_pack(args) -> int:
    import json
    from models.registry import bundled_weights
    path = bundled_weights(args.model)
    if path is None:
        raise ValueError(f"{args.model} has no weights file in models/toy/; train it first: "
                         f"python -m etl train-zoo --model {args.model} --seed S")
    print(json.dumps({"model": args.model, "weights": str(path), **recipe.pack_weights(path, args.model)}))
    return 0

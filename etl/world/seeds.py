"""Which shapes-world seeds were used for what: the one place in code that says so.

A scene is drawn from a generator seeded by (world seed, index), so `shapes:N:seed=S` holds
scenes 0..N-1 of world S. Training drew its scenes from worlds 0, 1 and 2 (a model trained with
`--seed S` sees world S, scene indices from 0 in phase 1 and from 128,000 in phase 2, RECIPE_PHASES
in etl/world/recipe.py), so `shapes:2000:seed=0` is made of training images of every seed-0 model.
A study that wants held-out images uses worlds no training and no tuning drew from.

`python -m etl study` writes this provenance into the warehouse (table `world_seeds`), so a
warehouse says which of its images any model or constant was ever fitted on; the Metrics page
shows it beside the study.
"""
from __future__ import annotations

TRAINING = {0: "the seed-0 zoo models (toy-shapes-small, toy-shapes, toy-shapes-large, toy-shapes-map)",
            1: "the seed-1 zoo models (toy-shapes-small-seed1, toy-shapes-seed1, toy-shapes-large-seed1, "
               "toy-shapes-map-seed1)",
            2: "the seed-2 zoo models (toy-shapes-small-seed2, toy-shapes-seed2, toy-shapes-large-seed2, "
               "toy-shapes-map-seed2)"}

# the offline labeler's constants: v5 (agreement check, votes, threshold, majority) on 0, 7 and 11;
# v6 (agreements must beat the head's strongest disagreement) and v7 (that floor from other properties'
# texts, readings opposite backing a property, evidence weighed by agreement) and v8 (the zero-shot
# reading's floor and ratio) on 7 and 11 only
TUNING = {0: "offline labeler v5 constants", 7: "offline labeler v5, v6, v7 and v8 constants",
          11: "offline labeler v5, v6, v7 and v8 constants"}

# the size study of issue 19: worlds nobody drew from before
STUDY = (1013, 2029)

# the zoo's zero-shot targets (etl/world/evaluate.py EVAL_TARGETS, `eval-toy`, the neurons job's check):
# held out from every training seed (worlds 0-2) and from tuning
EVAL = 3

# `make etl`'s demo warehouse (Makefile DATASET): held out from training, tuning and the study
DEMO = 41

EARLIER = {23: "the README's size study before issue 19 (600 scenes); test_zoo's label check",
           31: "the README's size study before issue 19 (600 scenes)",
           4242: "an outside check of the ground truth (issue 19)",
           9001: "an outside check of the ground truth (issue 19)"}


def provenance() -> list[dict]:
    """Every (seed, role, used_by) row of the `world_seeds` table."""
    rows = [dict(seed=s, role="training", used_by=u) for s, u in TRAINING.items()]
    rows += [dict(seed=s, role="tuning", used_by=u) for s, u in TUNING.items()]
    rows += [dict(seed=s, role="study", used_by="the size study (python -m etl study), held out") for s in STUDY]
    rows.append(dict(seed=EVAL, role="eval", used_by="the zoo's zero-shot targets (eval-toy, the neurons job's check)"))
    rows.append(dict(seed=DEMO, role="demo", used_by="make etl's demo warehouse, held out"))
    rows += [dict(seed=s, role="earlier", used_by=u) for s, u in EARLIER.items()]
    return rows


def held_out(seed: int) -> bool:
    """True when no training and no tuning drew scenes from world ``seed``."""
    return seed not in TRAINING and seed not in TUNING

"""Shared fixtures. Tests use only data the product ships or generates (a user's clone has
nothing beside it), so "a user's own text file" is written here from the product's vocabularies."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def user_text_files(tmp_path_factory) -> dict[str, Path]:
    """Two untagged user banks, written the way users' files look (blank lines, repeated lines,
    stray whitespace, a UTF-8 BOM):

    - ``descriptions.txt``: every text of the product's atlas bank (3,900+ short image
      descriptions), one per line, untagged;
    - ``words.txt``: every distinct word of the atlas bank, one per line.
    Returns {name: path}.
    """
    from etl.text.bank import atlas_bank
    root = tmp_path_factory.mktemp("user_banks")
    texts = [t for t, _ in atlas_bank()]
    lines = []
    for i, t in enumerate(texts):
        lines.append(f"  {t}\t" if i % 97 == 0 else t.replace(" ", "  ") if i % 89 == 0 else t)
        if i % 211 == 0:
            lines += ["", t]                      # blank line and a repeat
    desc = root / "descriptions.txt"
    desc.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    words = list(dict.fromkeys(w.strip(",.") for t in texts for w in t.split()))
    words_file = root / "words.txt"
    words_file.write_text("\n".join(words) + "\n", encoding="utf-8")
    return {"descriptions.txt": desc, "words.txt": words_file}


@pytest.fixture(scope="session")
def toy_warehouse(tmp_path_factory) -> Path:
    """The `run` job (every step but ablate) on the bundled toy model and 300 scenes of a world
    seed that training never used: a small demo warehouse built by the product's own jobs."""
    from etl.cli import main
    tmp = tmp_path_factory.mktemp("toywh")
    wh = tmp / "w.duckdb"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATLAS_HOME", str(tmp))
        mp.setenv("ATLAS_NO_PROGRESS", "1")
        assert main(["run", "--model", "toy-shapes", "--dataset", "shapes:300:seed=13", "--warehouse", str(wh),
                     "--skip", "ablate"]) == 0
    return wh


# The dashboard tests' warehouse (tests/dashboard): what `make demo` builds, made small.
DASHBOARD_SHAPES = "shapes:120:seed=41"      # the demo world (etl/world/seeds.py DEMO): held out
# the smallest trained toy whose heads serve two factors (background, and colour on L1.H1): the seed-0 small
# toy's heads are all background heads, which labeler v8 labels as such, and the pages need two properties
DASHBOARD_MODEL = "toy-shapes-small-seed1"
DASHBOARD_JOBS = [
    # the smallest trained toy (4 layers x 2 heads) on scenes and photos: every step of `run` ...
    ["run", "--model", DASHBOARD_MODEL, "--dataset", DASHBOARD_SHAPES, "--dataset", "skimage", "--skip", "ablate"],
    # ... with its ablation on half the scenes (the slowest step, so the job's own --max-images)
    ["ablate", "--model", DASHBOARD_MODEL, "--dataset", DASHBOARD_SHAPES, "--max-images", "60"],
    # and its random-init control, as in `make etl` (no ablation: the metrics page shows what a model lacks)
    ["run", "--model", DASHBOARD_MODEL, "--random-init", "--seed", "0", "--dataset", DASHBOARD_SHAPES,
     "--skip", "ablate"],
    # and, as in `make etl`, the demo study of what the warehouse holds (per size, trend, verdicts)
    ["study", "--in-place"],
]


@pytest.fixture(scope="session")
def dashboard_warehouse(tmp_path_factory) -> Path:
    """The warehouse the dashboard tests (AppTest and the real browser) read, built by the
    product's own jobs (`etl.cli.main`, DASHBOARD_JOBS): two models (toy-shapes-small-seed1 with
    its bundled weights, and its random-init control), 120 shapes scenes and the scikit-image photos,
    the shapes text bank, TextSpan texts, offline labels (with the tag-shuffled baseline), judgments,
    scores, probes and code scores, a mean ablation of the trained model, and the in-place study.
    50 to 90 s on two busy cores."""
    from etl.cli import main
    tmp = tmp_path_factory.mktemp("dashwh")
    wh = tmp / "warehouse.duckdb"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATLAS_HOME", str(tmp))
        mp.setenv("ATLAS_NO_PROGRESS", "1")
        for argv in DASHBOARD_JOBS:
            assert main(argv + ["--warehouse", str(wh)]) == 0, argv
    return wh

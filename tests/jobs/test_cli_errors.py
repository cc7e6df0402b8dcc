"""Every CLI error is one line: `python -m etl ...` on bad input ends with exactly one stderr line,
``error: ...`` naming what was wrong, and exit code 2; ``--debug`` adds the traceback."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from warehouse import writer

ENV = {**os.environ, "ATLAS_NO_PROGRESS": "1"}
ENV.pop("ATLAS_DEBUG", None)
TOY = ["--model", "toy-shapes-small"]


def cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "etl", *args], capture_output=True, text=True, timeout=timeout,
                          env={**ENV, **(env or {})})


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """Paths the cases point at: a folder, a text file, an empty warehouse, a malicious checkpoint, ..."""
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "folder").mkdir()
    (root / "notes.txt").write_text("not a database\n")
    with writer(root / "empty.duckdb"):
        pass

    class Evil:
        def __reduce__(self):
            return (print, ("this would run",))
    torch.save({"visual.conv1.weight": Evil()}, root / "evil.pt")
    import pickle
    with open(root / "raw.pt", "wb") as f:      # a raw pickle (not torch.save): torch warned before refusing it
        pickle.dump({"visual.conv1.weight": Evil()}, f, protocol=4)
    (root / "nopath.csv").write_text("file,label\na.png,x\n")
    return {"folder": str(root / "folder"), "text": str(root / "notes.txt"), "empty": str(root / "empty.duckdb"),
            "missing": str(root / "missing.duckdb"), "evil": str(root / "evil.pt"),
            "nopath": str(root / "nopath.csv"), "raw": str(root / "raw.pt"), "home": str(root / "home"), "root": root}


def _args(template: list[str], places: dict) -> list[str]:
    return [a.format(**places) for a in template]


WH = ["--warehouse", "{missing}"]     # a writing job would create it; these fail before writing
WRITES = ["--warehouse", "{root}/w.duckdb"]   # these fail inside the job's run record (a failed run)

# (id, argv, expected phrase, exit code)
CASES = [
    # --device
    ("device-tpu", ["embed", *TOY, "--dataset", "shapes:4", "--device", "tpu", *WH], "'tpu' is not a device", 2),
    ("device-cuda-colon", ["embed", *TOY, "--dataset", "shapes:4", "--device", "cuda:x", *WH], "is not a device", 2),
    ("device-cuda-no-gpu", ["embed", *TOY, "--dataset", "shapes:4", "--device", "cuda", *WH],
     "needs a GPU that torch can use", 2),
    ("precision-on-cpu", ["embed", *TOY, "--dataset", "shapes:4", "--precision", "fp16", *WH], "needs a GPU", 2),
    # --warehouse
    ("wh-folder-write", ["embed", *TOY, "--dataset", "shapes:4", "--warehouse", "{folder}"], "is a folder", 2),
    ("wh-text-write", ["embed", *TOY, "--dataset", "shapes:4", "--warehouse", "{text}"],
     "is not a DuckDB warehouse", 2),
    ("wh-under-a-file", ["embed", *TOY, "--dataset", "shapes:4", "--warehouse", "{text}/w.duckdb"],
     "which is a file, not a folder", 2),
    ("wh-under-a-file-read", ["metrics", "--warehouse", "{text}/w.duckdb"], "which is a file, not a folder", 2),
    ("wh-folder-read", ["metrics", "--warehouse", "{folder}"], "is a folder", 2),
    ("wh-text-read", ["metrics", "--warehouse", "{text}"], "is not a DuckDB warehouse", 2),
    ("wh-missing-read", ["metrics", "--warehouse", "{missing}"], "No warehouse at", 2),
    ("wh-missing-textspan", ["textspan", "--model", "m", "--warehouse", "{missing}"], "No warehouse at", 2),
    ("wh-empty-metrics", ["metrics", "--warehouse", "{empty}"], "no labelled heads yet", 2),
    ("wh-unknown-model", ["textspan", "--model", "nope/x", "--warehouse", "{empty}"], "is not in the warehouse", 2),
    # numeric flags
    ("embed-batch-0", ["embed", *TOY, "--dataset", "shapes:4", "--batch-size", "0", *WH], "not a positive integer", 2),
    ("embed-batch-neg", ["embed", *TOY, "--dataset", "shapes:4", "--batch-size", "-3", *WH],
     "not a positive integer", 2),
    ("embed-batch-text", ["embed", *TOY, "--dataset", "shapes:4", "--batch-size", "abc", *WH], "is not an integer", 2),
    ("embed-seed-neg", ["embed", *TOY, "--random-init", "--seed", "-1", "--dataset", "shapes:4", *WH],
     "is negative", 2),
    ("run-batch-0", ["run", *TOY, "--dataset", "shapes:4", "--batch-size", "0", *WH], "not a positive integer", 2),
    ("textspan-k-0", ["textspan", "--model", "m", "-k", "0", *WH], "not a positive integer", 2),
    ("textspan-r-neg", ["textspan", "--model", "m", "-r", "-1", *WH], "not a positive integer", 2),
    ("label-threshold", ["label", "--model", "m", "--threshold", "1.5", *WH], "not a probability", 2),
    ("label-alpha-0", ["label", "--model", "m", "--alpha", "0", *WH], "not in (0, 1]", 2),
    ("label-min-votes", ["label", "--model", "m", "--min-votes", "0", *WH], "not a positive integer", 2),
    ("label-llm-timeout", ["label", "--model", "m", "--llm-timeout", "0", *WH], "not a positive number", 2),
    ("judge-batch-0", ["judge", "--model", "m", "--batch-size", "0", *WH], "not a positive integer", 2),
    ("judge-retries-neg", ["judge", "--model", "m", "--llm-retries", "-1", *WH], "is negative", 2),
    ("texts-batch-neg", ["texts", "--batch-size", "-1", *WH], "not a positive integer", 2),
    ("ablate-max-images", ["ablate", *TOY, "--dataset", "shapes:4", "--max-images", "0", *WH],
     "not a positive integer", 2),
    ("bench-rounds", ["bench", "--rounds", "0"], "not a positive integer", 2),
    ("verify-n-images", ["verify", *TOY, "--n-images", "0"], "not a positive integer", 2),
    ("eval-toy-n", ["eval-toy", "--n", "0"], "not a positive integer", 2),
    ("probe-heads-threads", ["probe-heads", "--threads", "0"], "not a positive integer", 2),
    ("train-steps", ["train-toy", "--steps", "0"], "not a positive integer", 2),
    ("train-lr", ["train-toy", "--lr", "-1"], "not a positive number", 2),
    ("train-lr-nan", ["train-toy", "--lr", "nan"], "not a finite number", 2),
    ("train-single-prob", ["train-toy", "--single-prob", "2"], "not a probability", 2),
    ("train-zoo-threads", ["train-zoo", "--model", "toy-shapes", "--threads", "0"], "not a positive integer", 2),
    # bounded parallelism and sizes, checked against the machine while the flags are parsed (issue 21 breaks 3, 11)
    ("loader-workers-bomb", ["embed", *TOY, "--dataset", "shapes:4", "--loader-workers", "100000", *WH],
     "argument --loader-workers: 100,000 is more than this machine's", 2),
    ("run-loader-workers-bomb", ["run", *TOY, "--dataset", "shapes:4", "--loader-workers", "100000", *WH],
     "argument --loader-workers: 100,000 is more than this machine's", 2),
    ("batch-size-bomb", ["embed", *TOY, "--dataset", "shapes:4", "--batch-size", "100000000", *WH],
     "argument --batch-size: 100,000,000 images in one batch need at least", 2),
    ("ablate-batch-bomb", ["ablate", *TOY, "--dataset", "shapes:4", "--batch-size", "100000000", *WH],
     "images in one batch need at least", 2),
    ("texts-batch-bomb", ["texts", "--batch-size", "10000000000", *WH], "texts in one batch need at least", 2),
    ("train-batch-bomb", ["train-toy", "--batch-size", "100000000"], "images in one batch need at least", 2),
    ("shapes-huge", ["embed", *TOY, "--dataset", "shapes:10000000000000:seed=1", *WH],
     "10,000,000,000,000 scenes is more than a warehouse counts (at most 2,147,483,647)", 2),
    ("shapes-over-memory", ["embed", *TOY, "--dataset", "shapes:2000000000", *WH],
     "2,000,000,000 scenes of shapes:2000000000 need at least", 2),
    ("ablate-shapes-huge", ["ablate", *TOY, "--dataset", "shapes:10000000000000", *WH],
     "scenes is more than a warehouse counts", 2),
    ("ray-workers-bomb", ["embed", *TOY, "--dataset", "shapes:4", "--engine", "ray", "--workers", "100000", *WH],
     "--workers 100,000 is more than this machine's", 2),
    ("ray-shard-size-bomb", ["embed", *TOY, "--dataset", "shapes:4", "--engine", "ray", "--shard-size",
                             "100000000000", *WH], "images in one shard need at least", 2),
    # usage
    ("unknown-job", ["nope"], "invalid choice: 'nope'", 2),
    ("missing-flag", ["embed", *TOY], "the following arguments are required: --dataset", 2),
    ("unknown-flag", ["metrics", "--wharehouse", "x"], "unrecognized arguments: --wharehouse", 2),
    # inputs
    ("unknown-dataset", ["embed", *TOY, "--dataset", "imagenet-1k", *WRITES], "unknown dataset 'imagenet-1k'", 2),
    ("manifest-no-path", ["embed", *TOY, "--dataset", "{nopath}", *WRITES], "needs a header with a 'path' column",
     2),
    ("unknown-arch", ["embed", "--model", "NoSuchArch", "--dataset", "shapes:4", *WH],
     "unknown model architecture 'NoSuchArch'", 2),
    ("checkpoint-missing", ["embed", *TOY, "--checkpoint", "{root}/nope.pt", "--dataset", "shapes:4", *WH],
     "checkpoint file not found", 2),
    ("checkpoint-pickle", ["embed", *TOY, "--checkpoint", "{evil}", "--dataset", "shapes:4", *WH],
     "is not a plain state dict (it would run code when unpickled)", 2),
    ("checkpoint-raw-pickle", ["embed", *TOY, "--checkpoint", "{raw}", "--dataset", "shapes:4", *WH],
     "raw.pt: it is not a torch state dict", 2),
    ("decompose-out-folder", ["decompose", *TOY, "--image", "{text}", "--out", "{folder}"], "is a folder", 2),
    ("decompose-bad-image", ["decompose", *TOY, "--image", "{text}", "--out", "{root}/d.npz"], "notes.txt", 2),
]
assert len(CASES) >= 30


@pytest.mark.parametrize("argv,phrase,code", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_error_line(places, argv, phrase, code):
    # the "no GPU" cases hide any GPU from the job, so they hold on a GPU machine too
    env = {"CUDA_VISIBLE_DEVICES": ""} if "needs a GPU that torch can use" in phrase else None
    r = cli(*_args(argv, places), env=env)
    lines = r.stderr.splitlines()
    assert r.returncode == code, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert phrase in lines[0], lines[0]
    assert not os.path.exists(places["missing"])        # nothing was created on the way


def test_an_unusable_atlas_home_is_one_error_line(places):
    r = cli("embed", *TOY, "--dataset", "shapes:4", env={"ATLAS_HOME": places["text"]})
    assert r.returncode == 2 and r.stderr.splitlines() == [r.stderr.strip()], r.stderr
    assert r.stderr.startswith("error: ") and "which is a file, not a folder" in r.stderr


def test_debug_shows_the_traceback(places):
    for argv in (["--debug", "metrics", "--warehouse", places["folder"]],
                 ["metrics", "--warehouse", places["folder"], "--debug"]):
        r = cli(*argv)
        assert r.returncode == 2
        assert r.stderr.startswith("Traceback (most recent call last):") and "WarehouseError" in r.stderr
        assert r.stderr.splitlines()[-1].startswith("error: ") and "is a folder" in r.stderr.splitlines()[-1]
    r = cli("metrics", "--warehouse", places["folder"], env={"ATLAS_DEBUG": "1"})
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_reading_jobs_create_no_warehouse_and_no_home(tmp_path):
    home = tmp_path / "home"
    for argv in (["metrics"], ["metrics", "--study"], ["textspan", "--model", "m"]):
        r = cli(*argv, env={"ATLAS_HOME": str(home)})
        assert r.returncode == 2 and "No warehouse at" in r.stderr, r.stderr
    assert not home.exists()


def test_a_batch_the_model_cannot_hold_is_refused_before_it_runs(places):
    """Past the parse-time floor (1 MB an image), the embed job checks a batch against the loaded
    model's own size: ViT-B-16 takes ~11.6 MB an image, so the largest batch the floor lets through is refused."""
    from etl.common import IMAGE_BYTES_MIN, machine_memory
    batch = machine_memory() // 2 // IMAGE_BYTES_MIN                  # the most the floor allows
    r = cli("embed", "--model", "ViT-B-16", "--random-init", "--dataset", "shapes:4", "--batch-size", str(batch),
            "--warehouse", places["missing"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"--batch-size {batch:,} of ViT-B-16/random-seed0 needs at least" in r.stderr, r.stderr
    assert not os.path.exists(places["missing"])

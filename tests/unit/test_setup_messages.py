"""`make setup` says why it failed: the free disk beside pip's own error, and a warning before pip
starts when the disk is short. Runs the project's Makefile with a stand-in interpreter in `.venv`
(no pip is run), so it costs well under a second."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _stand_in(tmp: Path, pip_fails: bool) -> Path:
    """A folder with the Makefile, a requirements.txt and a `.venv/bin/python` that answers
    `pip install -r` with pip's out-of-space error (or success) and every other call with success."""
    shutil.copy(ROOT / "Makefile", tmp / "Makefile")
    (tmp / "requirements.txt").write_text("")
    py = tmp / ".venv" / "bin" / "python"
    py.parent.mkdir(parents=True)
    answer = ('echo "ERROR: Could not install packages due to an OSError: [Errno 28] '
              'No space left on device" >&2; exit 1' if pip_fails else "exit 0")
    py.write_text(f'#!/bin/bash\ncase "$*" in *" -r "*) {answer};; esac\nexit 0\n')
    py.chmod(0o755)
    return tmp


def _make(folder: Path, *args: str) -> subprocess.CompletedProcess:
    if shutil.which("make") is None:
        pytest.fail("make is not installed: the README's two commands need it")
    return subprocess.run(["make", "--no-print-directory", "setup", *args], cwd=folder,
                          capture_output=True, text=True, timeout=60)


def test_a_failing_pip_is_reported_with_the_free_disk_and_nothing_is_marked_installed(tmp_path):
    folder = _stand_in(tmp_path, pip_fails=True)
    done = _make(folder)
    assert done.returncode != 0
    assert "No space left on device" in done.stderr          # pip's own error is kept
    assert "[setup 2/2] pip failed after" in done.stderr
    assert "free disk here:" in done.stderr and "make setup resumes" in done.stderr
    assert not (folder / ".venv" / ".installed").exists()    # the next make runs pip again


def test_a_short_disk_is_warned_about_before_pip_and_a_success_is_marked(tmp_path):
    folder = _stand_in(tmp_path, pip_fails=False)
    short = _make(folder, "SETUP_FREE_GB=100000000")          # more than any disk holds
    assert short.returncode == 0, short.stderr
    assert "GB free on this disk; a new .venv needs about 100000000 GB" in short.stdout
    assert "[setup 2/2] done in" in short.stdout
    assert (folder / ".venv" / ".installed").exists()

    (folder / ".venv" / ".installed").unlink()
    roomy = _make(folder, "SETUP_FREE_GB=0")
    assert roomy.returncode == 0 and "warning" not in roomy.stdout

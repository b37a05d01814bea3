"""Logging (issue 20): the library logs to module loggers, the CLI puts them on the console (-v, -q),
nothing silences the root logger."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

SETS = ["model.name=tiny-clip", "model.pretrained=", "data.dataset=synthetic", "data.n_clients=3",
        "data.n_train=90", "data.n_test=30", "data.min_size=5", "data.cache_dir=", "rounds=2",
        "train.local_epochs=1", "run.threads=1", "algorithm=promptfl", "prompt.n_ctx=4"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def test_building_a_bare_model_silences_only_open_clips_random_init_warning():
    import open_clip
    from pfedmoap.clip import backbone

    seen = []

    class Spy(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())
    root = logging.getLogger()
    spy = Spy()
    root.addHandler(spy)
    real = open_clip.create_model

    def noisy(*a, **k):
        assert not root.disabled
        logging.warning("No pretrained weights loaded for model 'x'. Model initialized randomly.")
        logging.warning("something else")
        logging.getLogger("other.library").warning("a third thing")
        return "model"
    try:
        open_clip.create_model = noisy
        assert backbone._create_bare(open_clip, "any") == "model"
    finally:
        open_clip.create_model = real
        root.removeHandler(spy)
    assert seen == ["something else", "a third thing"]
    assert not root.filters and not root.disabled


def _run(tmp_path, *flags):
    args = [sys.executable, "-m", "pfedmoap.cli", "run", *flags, "--out", str(tmp_path / "run")]
    for s in SETS:
        args += ["--set", s]
    p = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


@pytest.mark.slow
def test_verbosity_flags(tmp_path):
    verbose = _run(tmp_path / "b", "-v")
    assert "round 1: slowest rank's seconds comm" in verbose and "round 2/2" in verbose
    quiet = _run(tmp_path / "c", "-q")
    assert "round 1/2" not in quiet and "# pfedmoap" not in quiet
    assert "mean client accuracy per round" in quiet          # the result itself is still printed

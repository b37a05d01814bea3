"""Evaluation never changes training (issue 21): every registered method, run with the same seed
and config under `run.eval_every` 1 and 3 (evaluating everyone, or only the participants, every
third round), records the same values, array for array, for every client both runs evaluate
(accuracy, macro-F1, loss, per-domain accuracy and the method's own logs), the same participation
and the same uploads."""
from __future__ import annotations

import numpy as np
import pytest

from pfedmoap import algorithms, comm, config, federation, store

SETS = ["model.name=tiny-clip", "model.pretrained=", "data.dataset=synthetic", "data.n_clients=5",
        "data.n_train=150", "data.n_test=50", "data.min_size=5", "data.cache_dir=", "rounds=4",
        "train.local_epochs=1", "train.frac=0.4", "run.threads=1", "prompt.n_ctx=4", "run.progress=false",
        "run.checkpoint_every=0"]
# settings of a method that change what its evaluation downloads or keeps
VARIANTS = [("pfedmoap", "moe.aggregate_gate=true"), ("pfedmoap", "moe.participation=snapshot")]


def _run(out, name: str, extra: list[str]) -> dict:
    cfg = config.load(None, SETS + [f"algorithm={name}", *extra])
    federation.Federation(cfg, comm.LocalComm()).run(out, "overwrite")
    return store.read_results(out)["rounds"]


@pytest.mark.slow
@pytest.mark.parametrize("name, extra", [(n, None) for n in algorithms.names()] + VARIANTS)
def test_evaluation_does_not_change_training(tmp_path, name, extra):
    extra = [extra] if extra else []
    every = _run(tmp_path / "every", name, extra)
    assert every["evaluated"].all()
    R = len(every["evaluated"])
    due = np.array([(r + 1) % 3 == 0 or r == R - 1 for r in range(R)])
    skip = {"evaluated", "bytes_down", "phase_time", "wall_time"}      # bytes_down: evaluation downloads
    keys = sorted(k for k in every if k not in skip and np.ndim(every[k]) >= 2)
    assert {"accuracy", "macro_f1", "loss", "domain_accuracy", "participated", "bytes_up"} <= set(keys)
    for clients in ("all", "participants"):
        got = _run(tmp_path / clients, name, extra + ["run.eval_every=3", f"run.eval_clients={clients}"])
        ev = got["evaluated"]
        part = got["participated"].astype(bool)
        want = due[:, None] & (np.ones_like(part) if clients == "all" else part)
        want[-1] = True
        np.testing.assert_array_equal(ev, want)
        for k in keys:
            if k in ("participated", "bytes_up"):        # training: every round, every client
                np.testing.assert_array_equal(got[k], every[k], err_msg=f"{name} {clients}: {k}")
            else:
                np.testing.assert_array_equal(got[k][ev], every[k][ev], err_msg=f"{name} {clients}: {k}")

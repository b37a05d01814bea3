"""Loading runs: one results.h5 read back as a `Run`, and the helpers every report shares."""
from __future__ import annotations

import re
import tomllib
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import PFedMoAPError
from ..store import READABLE_RESULTS, read_results

LAST_K = 5
SEED_KEYS = frozenset({"seed", "out"})  # config keys that may differ between the seeds of one group


@dataclass(frozen=True)
class Run:
    """One run read back. `rounds` arrays are cut to the rows actually written (`n_done`)."""
    path: Path
    attrs: dict
    config: dict
    partition: dict
    rounds: dict
    status: str  # complete | running | stopped | incomplete | schema N unsupported

    @property
    def name(self) -> str:
        """The run directory's name, used in figure names and titles."""
        return self.path.resolve().parent.name

    @property
    def algorithm(self) -> str:
        return str(self.attrs.get("algorithm", "?"))

    @property
    def seed(self) -> int | None:
        return self.attrs.get("seed")

    @property
    def n_done(self) -> int:
        return len(self.rounds.get("accuracy", ()))

    @property
    def n_planned(self) -> int:
        """The rounds the run has, as its writer recorded them (a one-round method records 1)."""
        return int(self.attrs.get("n_rounds", 0))

    @property
    def readable(self) -> bool:
        return self.attrs.get("schema_version") in READABLE_RESULTS

    def accuracy_curve(self, full_only: bool = True) -> np.ndarray:
        """(R,) unweighted mean over clients of the accuracy, per round. A round that evaluated only
        some clients or none (run.eval_every, run.eval_clients: /rounds/evaluated) is NaN, or with
        full_only=False the mean over the clients it evaluated (NaN where none)."""
        curve = nanmean(self.rounds["accuracy"], axis=1)
        return np.where(self.full_rounds(), curve, np.nan) if full_only else curve

    def full_rounds(self) -> np.ndarray:
        """(R,) bool: the rounds that evaluated every client (all of them before schema 3)."""
        evaluated = self.rounds.get("evaluated")
        if not isinstance(evaluated, np.ndarray) or evaluated.ndim != 2:
            return np.ones(self.n_done, bool)
        return evaluated[:self.n_done].all(axis=1)


def load_run(path: str | Path) -> Run:
    """Read one run (its directory or its results.h5). A path that is not a run raises
    PFedMoAPError; an incomplete run or one of another schema version loads with that status."""
    data = read_results(path)
    attrs = data["attrs"]
    file = Path(path) / "results.h5" if Path(path).is_dir() else Path(path)
    if attrs.get("schema_version") not in READABLE_RESULTS:
        status = f"schema {attrs.get('schema_version')} unsupported"
        return Run(file, attrs, parse_config(attrs.get("config")), {}, {}, status)
    rounds = data["rounds"]
    per_round = {k: v for k, v in rounds.items() if isinstance(v, np.ndarray) and v.ndim >= 1}
    if int(attrs["rounds_done"]) > 0 and "accuracy" not in per_round:
        raise PFedMoAPError(f"{file}: rounds_done is {attrs['rounds_done']} but there is no "
                            "/rounds/accuracy; expected a pfedmoap results.h5 "
                            "(docs/hdf5-layout.md)")
    # A run being written may have resized some data sets for the next round and not others.
    n = min([int(attrs["rounds_done"])] + [len(v) for v in per_round.values()])
    rounds = {k: (v[:n] if k in per_round else v) for k, v in rounds.items()}
    rounds.setdefault("accuracy", np.zeros((0, int(attrs["n_clients"])), np.float32))
    run = Run(file, attrs, parse_config(attrs["config"]), data["partition"], rounds,
              str(attrs["status"]))
    if run.status == "complete" and run.n_done < run.n_planned:
        return replace(run, status="incomplete")
    return run


def find_results(paths) -> list[Path]:
    """Every results.h5 under the given paths: a run directory, its results.h5, or any folder
    above runs (a table's OUT). A path with none is one PFedMoAPError."""
    files: dict[str, Path] = {}
    for given in paths:
        p = Path(given)
        if p.is_file():
            found = [p]
        elif (p / "results.h5").is_file():
            found = [p / "results.h5"]
        elif p.is_dir():
            found = sorted(p.rglob("results.h5"))
        else:
            raise PFedMoAPError(f"{given}: does not exist; expected a run directory or a folder of runs")
        if not found:
            raise PFedMoAPError(f"{given}: no results.h5 under it; expected a run directory or a folder of runs")
        for f in found:
            files.setdefault(str(f.absolute()), f)
    return list(files.values())


class Stat(NamedTuple):
    """Mean and sample standard deviation (ddof=1) over a group's runs; std is None for one run."""
    mean: float
    std: float | None

    @classmethod
    def of(cls, values) -> Stat | None:
        values = np.asarray(values, dtype=np.float64)
        if values.size == 0:
            return None
        std = float(np.std(values, ddof=1)) if values.size > 1 else None
        return cls(float(np.mean(values)), std)


def dp_neighbours(run: Run) -> str:
    """The neighbouring relation of a DP run's ε (files before issue 21 assumed the same)."""
    return str(run.attrs.get("dp_neighbours", "add/remove one client (client-level)"))


def dp_epsilon(run: Run) -> float | None:
    """The ε a DP run has spent by its last written round (`/rounds/dp_epsilon`; before any round,
    the planned total, attribute `dp_epsilon`); inf for clipping without noise; None without DP."""
    eps = run.rounds.get("dp_epsilon")
    value = eps[-1] if isinstance(eps, np.ndarray) and eps.ndim == 1 and len(eps) else \
        run.attrs.get("dp_epsilon")
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if np.isnan(value) else value


def pm(stat: Stat | None, scale: float = 1.0, digits: int = 2) -> str:
    """`81.25 ± 1.50` (or the mean alone for one run; "" for none)."""
    if stat is None or not np.isfinite(stat.mean):
        return ""
    text = f"{stat.mean * scale:.{digits}f}"
    return text if stat.std is None else f"{text} ± {stat.std * scale:.{digits}f}"


def parse_config(text) -> dict:
    try:
        return tomllib.loads(text) if isinstance(text, str) else {}
    except tomllib.TOMLDecodeError:
        return {"_unparsed": text}


def without_seed(config: dict) -> dict:
    return {k: (without_seed(v) if isinstance(v, dict) else v)
            for k, v in config.items() if k not in SEED_KEYS}


def flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def nanmean(values, axis=None):
    with warnings.catch_warnings():  # an all-NaN slice (no expert, no test image) stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)

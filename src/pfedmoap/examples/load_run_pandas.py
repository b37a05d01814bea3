"""Read a pfedmoap run into pandas DataFrames (h5py + pandas, no pfedmoap import): one row per
(round, client), as for a groupby or a seaborn plot. The layout is in docs/hdf5-layout.md.

    python -m pfedmoap.examples.load_run_pandas RUN_DIR_OR_RESULTS_H5   (or: python load_run_pandas.py ...)
"""
import sys
from pathlib import Path

import h5py

try:
    import pandas as pd
except ImportError:
    sys.exit("this example needs pandas, which pfedmoap does not install: pip install pandas")

path = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
if path.is_dir():
    path = path / "results.h5"

PER_CLIENT = ("accuracy", "macro_f1", "loss", "participated", "bytes_up", "bytes_down")
with h5py.File(path, "r", locking=False) as f:  # the run may still be being written
    attrs = dict(f.attrs)
    n = int(attrs["rounds_done"])
    # Each (rounds, clients) array becomes a column of a long table indexed by (round, client).
    long = pd.concat({name: pd.DataFrame(f["rounds"][name][:n]).stack() for name in PER_CLIENT},
                     axis=1)
long.index.names = ["round", "client"]
long = long.reset_index()
long["round"] += 1  # row r of the file holds the state after round r + 1
for key in ("algorithm", "dataset", "partition", "seed"):
    long[key] = attrs[key]

per_round = long.groupby("round")[["accuracy", "macro_f1"]].mean() * 100
per_round["bytes"] = long.groupby("round")[["bytes_up", "bytes_down"]].sum().sum(axis=1)
print(f"{path}: {attrs['algorithm']}, seed {attrs['seed']}, {attrs['status']}, "
      f"{n} of {attrs['n_rounds']} rounds")
print(per_round.round(2).to_string())

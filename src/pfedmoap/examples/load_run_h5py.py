"""Read a pfedmoap run with h5py and numpy only (no pfedmoap import): the layout is in
docs/hdf5-layout.md. Prints the run's attributes and the mean client accuracy per round.

    python -m pfedmoap.examples.load_run_h5py RUN_DIR_OR_RESULTS_H5   (or: python load_run_h5py.py ...)
"""
import sys
from pathlib import Path

import h5py
import numpy as np

path = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
if path.is_dir():
    path = path / "results.h5"

# locking=False: the run may still be open for writing by its rank 0.
with h5py.File(path, "r", locking=False) as f:
    attrs = dict(f.attrs)
    n = int(attrs["rounds_done"])  # rows past rounds_done may be a round being written
    accuracy = f["rounds/accuracy"][:n]  # (rounds, clients) float32, fractions
    participated = f["rounds/participated"][:n]  # (rounds, clients) bool
    classnames = list(f["partition"].attrs["classnames"])

print(f"{path}: {attrs['algorithm']} on {attrs['dataset']} / {attrs['partition']}, "
      f"seed {attrs['seed']}, {attrs['status']}, {n} of {attrs['n_rounds']} rounds, "
      f"{attrs['n_clients']} clients, {len(classnames)} classes")
print("round  mean accuracy  clients trained")
for r, (acc, trained) in enumerate(zip(accuracy, participated), start=1):
    print(f"{r:5d}  {100 * np.nanmean(acc):12.2f}%  {int(trained.sum()):15d}")

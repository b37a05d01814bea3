#!/usr/bin/env python
"""The MPI engine's cost: `mpiexec -n R pfedmoap run` for R = 1..4 on tiny-clip with 100 clients.

    python tools/bench_mpi.py [--ranks 1,2,3,4] [--compute-bound] [--plain] [--set key=value ...]

For every R it reads the run's results.h5 and prints seconds per round split into compute
(train + eval), communication and writing (each the max over ranks of /rounds/phase_time), the
round's wall time on rank 0, and the bytes per round against the payload minimum (4 bytes x the
prompt floats actually needed, see tools/benchmark.py). Prints figures, never asserts times.

`--compute-bound` makes local training dominate (more images per client, 5 local epochs, a
checkpoint only at the end) to test "with one torch thread per rank, 2 ranks at least 1.7x faster
per round than 1". Rank 0 is the server: R = 2 has ONE client rank, R = 3 has two. `--plain` adds
R = 0: plain python, no mpiexec (LocalComm).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tools"))

import numpy as np  # noqa: E402

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")

BASE = ["model.name=tiny-clip", "model.pretrained=", "data.dataset=synthetic", "data.n_clients=100",
        "data.partition=iid", "run.threads=1", "rounds=3", "algorithm=pfedmoap", "train.frac=1.0"]
SMALL = ["data.n_train=4000", "data.n_test=2000", "train.local_epochs=1"]
COMPUTE = ["data.n_train=12800", "data.n_test=2000", "train.local_epochs=5", "run.checkpoint_every=0"]


def run_once(ranks: int, out: Path, sets: list[str]) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "pfedmoap.cli", "run", "--out", str(out), "--if-exists", "overwrite"]
    for s in sets:
        cmd += ["--set", s]
    if ranks:
        cmd = [MPIEXEC, "-n", str(ranks)] + cmd
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"R = {ranks} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return wall, p.stdout


def main(argv=None) -> None:
    from benchmark import cpu_model, payload_minimum
    from pfedmoap import store

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="1,2,3,4")
    ap.add_argument("--compute-bound", action="store_true")
    ap.add_argument("--plain", action="store_true", help="also R = 0: plain python, no mpiexec")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    ranks = ([0] if args.plain else []) + [int(r) for r in args.ranks.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="pfedmoap-mpi-"))
    sets = BASE + (COMPUTE if args.compute_bound else SMALL) + [f"data.cache_dir={tmp / 'cache'}"] + args.sets
    print(f"== bench_mpi{' --compute-bound' if args.compute_bound else ''}  (CPU: {cpu_model()}, "
          f"{os.cpu_count()} cores; {MPIEXEC})")
    print(f"scenario: {' '.join(sets)}   (runs under {tmp})")
    run_once(1, tmp / "warm-cache", sets + ["rounds=1"])      # the feature cache is written once, untimed

    rows = {}
    for R in ranks:
        wall, _ = run_once(R, tmp / f"r{R}", sets)
        res = store.read_results(tmp / f"r{R}")
        rd = res["rounds"]
        pt = rd["phase_time"]                                # (rounds, W, phases)
        ph = list(rd["phases"])
        col = lambda name: pt[:, :, ph.index(name)]          # noqa: E731
        compute = np.nanmax(col("train") + col("eval"), axis=1).mean()
        # rank 0's comm includes waiting in the Gatherv for the client ranks to finish training:
        # communication proper is the client ranks' comm (rank 0's only when it hosts the clients)
        clients_comm = col("comm")[:, 1:] if pt.shape[1] > 1 else col("comm")
        comm = np.nanmax(clients_comm, axis=1).mean()
        server_wait = np.nanmax(col("comm")[:, :1], axis=1).mean()
        write = np.nanmax(col("write"), axis=1).mean()
        up_min, down_min = payload_minimum(res, res["attrs"]["algorithm"])
        rows[R] = dict(wall=wall, round=float(rd["wall_time"].mean()), rounds=rd["wall_time"].tolist(),
                       compute=compute, comm=comm, write=write,
                       up=rd["bytes_up"].sum(1), down=rd["bytes_down"].sum(1), up_min=up_min, down_min=down_min,
                       acc=rd["accuracy"][-1], world=int(res["attrs"]["world_size"]))
        r = rows[R]
        label = "plain" if R == 0 else f"R = {R}"
        clients = "1 process hosts all" if R <= 1 else f"{R - 1} client rank{'s' if R > 2 else ''} + server"
        print(f"{label:<6} ({clients:<22}) round {r['round']:7.3f} s  = compute (train+eval) {compute:7.3f} + "
              f"comm {comm:6.3f} + write {write:6.3f}   (rank 0 in collectives {server_wait:6.3f})  [rounds {', '.join(f'{x:.2f}' for x in r['rounds'])}; "
              f"process wall {wall:6.1f} s]")

    print("\nbytes per round, all clients (identical at every R is expected):")
    for R, r in rows.items():
        tot = r["up"] + r["down"]
        mins = r["up_min"] + r["down_min"]
        over = [f"{100 * (t - m) / m:.2f}%" if m else "-" for t, m in zip(tot, mins)]
        print(f"  R = {R}: logged {', '.join(f'{int(t):,}' for t in tot)}; minimum "
              f"{', '.join(f'{int(m):,}' for m in mins)}; overhead {', '.join(over)} (expert ids, 4 B each)")
    ref = next(iter(rows.values()))["acc"]
    same = all(np.array_equal(r["acc"], ref, equal_nan=True) for r in rows.values())
    print(f"final-round accuracies identical at every R: {same}")

    base = rows.get(1) or rows.get(0)
    if base:
        print("\nspeed-up per round against one process hosting every client (R = 1):")
        for R, r in rows.items():
            print(f"  R = {R}: {base['round'] / r['round']:5.2f}x per round (compute {base['compute'] / r['compute']:5.2f}x)"
                  + ("   <- claim: 2 ranks >= 1.7x" if R == 2 else "")
                  + ("   <- 2 client ranks + server on 2 cores" if R == 3 else ""))


if __name__ == "__main__":
    main()

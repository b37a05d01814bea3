#!/usr/bin/env python
"""Cost of training augmentation (data.augment) through the real round loop; prints, never asserts.

    python tools/bench_augment.py [--set key=value ...] [--modes clean,views,fresh,fresh-lazy,reference]

Each mode runs the embedded quick-start scenario (quick-start config + --set) in its own process,
one rank (federation.Federation with LocalComm), and reports the start-up (Build: clean features,
cached views, precomputed fresh views) and the mean seconds per round (all of it, and the "train"
phase alone):

clean       data.augment = none: cached clean features (one image-tower pass per image, ever)
views       data.augment = views, augment_views = 4: four cached views per image, one drawn per epoch
fresh       data.augment = fresh with a cold data.cache_dir: every participant's views of every
            round precomputed at start-up (in batches of one client's images per epoch), read per round
fresh-warm  the same with the cache filled by `fresh` (a second method, seed or resume on the same data)
fresh-lazy  data.augment = fresh, data.cache_dir = "": each client's views of a round encoded when it
            first trains in it (in fit, before its first step), nothing written
reference   the reference-style step: the image tower runs inside every training batch, on that
            batch's images (load, random-resized-crop + flip, encode 32 images), as Dassl/CoOp do.
            The same views as `fresh` (same keys), so the same training up to rounding.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

MODES = {
    "clean": ["data.augment=none"],
    "views": ["data.augment=views", "data.augment_views=4"],
    "fresh": ["data.augment=fresh"],
    "fresh-warm": ["data.augment=fresh"],
    "fresh-lazy": ["data.augment=fresh", "data.cache_dir="],
    "reference": ["data.augment=fresh", "data.cache_dir="],
}


class PerBatchViews:
    """`ClientData.fresh_views` for the reference-style step: x_all[idx] encodes the batch's images."""

    def __init__(self, backbone, split, ids, seed, round_, epoch, transform):
        self.args = backbone, split, ids, seed, round_, epoch, transform

    def __getitem__(self, idx):
        import torch
        from pfedmoap.data import features
        backbone, split, ids, seed, round_, epoch, transform = self.args
        x = features.compute_fresh(backbone, split, ids[idx.numpy()], seed, round_, epoch, transform)
        return torch.from_numpy(x).to(backbone.device)


def child(mode: str, sets: list[str], out: str) -> dict:
    import numpy as np
    import torch
    from pfedmoap import config
    from pfedmoap.comm import LocalComm
    from pfedmoap.federation import Federation
    cfg = config.load(None, sets + MODES[mode], base=config.QUICKSTART)
    t = time.perf_counter()
    fed = Federation(cfg, LocalComm())
    startup = time.perf_counter() - t
    b = fed.build
    if mode == "reference":
        split, tf = b.dataset.train, b.fresh.transform
        for c, data in b.data.items():
            ids = np.asarray(b.partition.train[c], np.int64)
            data.fresh_views = (lambda ids: lambda r, e: PerBatchViews(b.backbone, split, ids, cfg.seed, r, e, tf))(ids)
    run = fed.run(Path(out), if_exists="overwrite")
    res = fed.results
    phases = np.array([rec.phase_time[0] for rec in res.records])
    train = phases[:, list(res.phases).index("train")]
    walls = [rec.wall_time for rec in res.records]
    return {"mode": mode, "startup_s": startup, "round_s": float(np.mean(walls)), "train_s": float(np.mean(train)),
            "accuracy": run.mean_accuracy[-1], "threads": torch.get_num_threads(),
            "encoded_blocks": getattr(b.fresh, "computed", 0) if b.fresh is not None else 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--modes", default="clean,views,fresh,fresh-warm,fresh-lazy,reference")
    ap.add_argument("--child", default="")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.sets, args.out)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        cache = f"{tmp}/cache"
        print(f"{'mode':<11} {'start-up s':>10} {'round s':>8} {'train s/round':>13} {'accuracy':>8}")
        for mode in args.modes.split(","):
            sets = [f"data.cache_dir={cache}"] + args.sets
            cmd = [sys.executable, __file__, "--child", mode, "--out", f"{tmp}/{mode}"]
            for s in sets:
                cmd += ["--set", s]
            p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
            if p.returncode:
                sys.exit(f"{mode}: {p.stderr[-2000:]}")
            r = json.loads(p.stdout.strip().splitlines()[-1])
            print(f"{mode:<11} {r['startup_s']:>10.2f} {r['round_s']:>8.2f} {r['train_s']:>13.2f} "
                  f"{100 * r['accuracy']:>7.2f}%", flush=True)


if __name__ == "__main__":
    main()

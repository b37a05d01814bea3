#!/usr/bin/env python
"""One GPU measurement of client blocks (issue 24), in under 8 minutes of wall time:

    OUT=gpu_out python tools/gpu_check.py            # on the GPU machine (default device cuda, bf16)
    GPU_CHECK_TINY=1 OUT=/tmp/g python tools/gpu_check.py   # the same pieces, tiny, on the CPU

Pieces, in order of importance; each runs in its own process under a timeout, a failure is one
line and the rest goes on, and a global guard (GPU_CHECK_BUDGET seconds, default 450) skips what
no longer fits:
  env        nvidia-smi, torch/CUDA versions, the commit
  step-*     benchmark.py blockstep: one block training step at B = 1, 4, 16, 64 (bf16), ms per
             step and per client-step, aten ops, GPU busy fraction; run.cuda_graph off and on;
             ViT-B-16 and RN50, random init, C = 10 and (ViT-B-16) C = 100
  round-*    benchmark.py _round1: the real round loop (pFedMoAP, 64 clients, synthetic data, random
             init, every client trains) at B = 1 and 16, with and without run.cuda_graph (then B = 4
             and 64 if time is left), per-round seconds by phase
  paper-*    the CIFAR-100 paper config (RN50, 100 clients, 10% sampled, 5 local epochs, fresh
             augmentation) on generated data of its shape (50,000 train / 10,000 test images,
             100 classes), random init, a few rounds: seconds per round by phase, at B = 100 (blocks
             are id-blocks: B = n_clients puts each round's participants in one block) and B = 1
Everything goes to $OUT (text per piece, JSON where there are figures, summary.json).
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
T0 = time.monotonic()
BUDGET = float(os.environ.get("GPU_CHECK_BUDGET", "450"))
TINY = os.environ.get("GPU_CHECK_TINY", "") not in ("", "0")
OUT = Path(os.environ.get("OUT") or "gpu_out")
OUT.mkdir(parents=True, exist_ok=True)
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
if TINY:
    DEVICE, PREC, BLOCKS, RBLOCKS = "cpu", "fp32", "1,4", [1, 4]
    STEP_MODELS = [("tiny-clip", 10)]
    ROUND_MODEL, PAPER_MODEL = "tiny-clip", "tiny-clip"
    PAPER = ["data.n_train=400", "data.n_test=100", "data.n_classes=10", "data.n_clients=10",
             "train.local_epochs=1", "rounds=2"]
else:
    DEVICE, PREC, BLOCKS, RBLOCKS = "cuda", "bf16", "1,4,16,64", [1, 16, 4, 64]
    STEP_MODELS = [("ViT-B-16", 10), ("RN50", 10), ("ViT-B-16", 100)]
    ROUND_MODEL, PAPER_MODEL = "ViT-B-16", "RN50-quickgelu"
    PAPER = ["data.n_train=50000", "data.n_test=10000", "data.n_classes=100", "rounds=" +
             os.environ.get("GPU_CHECK_PAPER_ROUNDS", "3")]
summary: dict = {"tiny": TINY, "device": DEVICE, "precision": PREC, "pieces": {}}


def left() -> float:
    return BUDGET - (time.monotonic() - T0)


def piece(name: str, cmd: list[str], cap: float, min_needed: float = 20.0) -> str | None:
    """Run one piece under min(cap, time left) seconds; its output to OUT/name.txt; one line on failure."""
    limit = min(cap, left() - 5)
    if limit < min_needed:
        print(f"[{name}] skipped: {left():.0f} s left of the {BUDGET:.0f} s budget", flush=True)
        summary["pieces"][name] = "skipped"
        return None
    t = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=ENV, cwd=ROOT)
        text = p.stdout + ("\n--- stderr ---\n" + p.stderr if p.stderr.strip() else "")
        status = "ok" if p.returncode == 0 else f"failed (exit {p.returncode})"
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        text, status = out + f"\n(timed out after {limit:.0f} s)", f"timed out after {limit:.0f} s"
    except Exception as e:                     # noqa: BLE001 -- one line, the rest goes on
        text, status = "", f"failed: {type(e).__name__}: {e}"
    (OUT / f"{name}.txt").write_text(f"$ {shlex.join(cmd)}\n{text}")
    dt = time.monotonic() - t
    summary["pieces"][name] = {"status": status, "seconds": round(dt, 1)}
    last = [ln for ln in text.splitlines() if ln.strip() and "USDT" not in ln and "gpuGetDeviceCount" not in ln]
    hint = "" if status == "ok" else f": {last[-1][:200] if last else ''}"
    print(f"[{name}] {status} in {dt:.0f} s{hint}", flush=True)
    if status == "ok":
        for ln in text.splitlines():
            if "ms/step" in ln:
                print("   " + ln.strip(), flush=True)
    return text if status == "ok" else None


def env() -> None:
    cmd = [PY, "-c", "import torch, platform, sys; print('python', sys.version.split()[0], platform.platform());"
           "print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version());"
           "print('cuda available', torch.cuda.is_available());"
           "[print('gpu', i, torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i)) "
           "for i in range(torch.cuda.device_count())];"
           "import open_clip, numpy, h5py; print('open_clip', open_clip.__version__, 'numpy', numpy.__version__, 'h5py', h5py.__version__)"]
    text = piece("env", cmd, 60, 5) or ""
    for extra, c in (("nvidia-smi", ["nvidia-smi"]), ("git", ["git", "-C", str(ROOT), "log", "-1", "--format=%H %s"])):
        try:
            text += f"\n$ {' '.join(c)}\n" + subprocess.run(c, capture_output=True, text=True, timeout=20).stdout
        except Exception as e:             # noqa: BLE001
            text += f"\n{extra}: {type(e).__name__}: {e}\n"
    (OUT / "env.txt").write_text(text)
    print(text.strip()[:1500], flush=True)


def steps(models) -> None:
    for model, C in models:
        name = f"step-{model}-C{C}"
        js = OUT / f"{name}.json"
        piece(name, [PY, "tools/benchmark.py", "blockstep", "--model", model, "--device", DEVICE,
                     "--precision", PREC, "--classes", str(C), "--blocks", BLOCKS, "--repeats", "5" if TINY else "10",
                     "--cuda-graph", "both", "--json", str(js)], cap=100)
        if js.exists():
            summary[name] = json.loads(js.read_text())


def round_sets(model: str, B: int) -> list[str]:
    sets = [f"model.name={model}", "model.pretrained=", f"model.device={DEVICE}", f"model.precision={PREC}",
            "data.dataset=synthetic", "data.n_classes=10", "data.cache_dir=",
            "algorithm=pfedmoap", "moe.n_experts=4", "rounds=3", "train.local_epochs=1", "run.threads=1",
            "run.checkpoint_every=0", "run.progress=false", f"train.client_block={B}"]
    sets += ["data.n_clients=16", "data.n_train=800", "data.n_test=320"] if TINY else \
        ["data.n_clients=64", "data.n_train=6400", "data.n_test=1280"]
    if not TINY:       # the GPU's faster text settings (docs/gpu-figures.md)
        sets += ["run.truncate_eos=false", "run.shared_prefix=false"]
    return sets


def rounds(blocks) -> None:
    for B in blocks:
        for graph in (False, True) if (DEVICE == "cuda" and B in (1, 16)) else (False,):
            name = f"round-{ROUND_MODEL}-B{B}" + ("-graph" if graph else "")
            sets = round_sets(ROUND_MODEL, B) + (["run.cuda_graph=true"] if graph else [])
            cmd = [PY, "tools/benchmark.py", "_round1", "--out", str(OUT / "runs" / name)] + sum((["--set", s] for s in sets), [])
            text = piece(name, cmd, cap=90, min_needed=40)
            if text:
                line = [ln for ln in text.splitlines() if ln.startswith("{")]
                if line:
                    r = json.loads(line[-1])
                    summary[name] = {k: r[k] for k in ("wall_s_per_round", "wall_s_rounds", "phases",
                                                       "phase_s_per_round", "setup_s", "accuracy")}
                    print(f"   {name}: {r['wall_s_per_round']:.3f} s/round; rounds {['%.2f' % w for w in r['wall_s_rounds']]}; "
                          + ", ".join(f"{p} {s:.2f}" for p, s in zip(r["phases"], r["phase_s_per_round"])), flush=True)


def paper(blocks) -> None:
    cfg = ROOT / "src/pfedmoap/configs/paper/cifar100.toml"
    # id-blocks: with 10% of 100 clients sampled, B = 100 puts a round's participants in one block
    for B in blocks:
        name = f"paper-cifar100-B{B}"
        run_dir = OUT / "runs" / name
        sets = [f"model.name={PAPER_MODEL}", "model.pretrained=", f"model.device={DEVICE}", f"model.precision={PREC}",
                "data.dataset=synthetic", "data.cache_dir=", "run.checkpoint_every=0", "run.progress=false",
                f"train.client_block={B}"] + PAPER
        if not TINY:
            sets += ["run.truncate_eos=false", "run.shared_prefix=false"]
        cmd = [PY, "-m", "pfedmoap.cli", "run", str(cfg), "--out", str(run_dir), "--if-exists", "overwrite", "-v"] \
            + sum((["--set", s] for s in sets), [])
        if piece(name, cmd, cap=240, min_needed=60) is None:
            continue
        try:
            import numpy as np
            sys.path.insert(0, str(ROOT / "src"))
            from pfedmoap import store
            rd = store.read_results(run_dir)["rounds"]
            wall, pt, phases = np.asarray(rd["wall_time"]), np.asarray(rd["phase_time"]), [str(p) for p in rd["phases"]]
            ok = ~np.isnan(wall)
            summary[name] = {"wall_s_rounds": wall[ok].tolist(), "phases": phases,
                             "phase_s_per_round": np.nanmax(pt[ok], axis=1).mean(0).tolist()}
            print(f"   {name}: seconds per round {['%.1f' % w for w in wall[ok]]}; "
                  + ", ".join(f"{p} {s:.1f}" for p, s in zip(phases, summary[name]["phase_s_per_round"])), flush=True)
        except Exception as e:            # noqa: BLE001
            print(f"   {name}: results.h5 not read: {type(e).__name__}: {e}", flush=True)


def main() -> None:
    print(f"gpu_check: device {DEVICE} {PREC}, budget {BUDGET:.0f} s, output {OUT.resolve()}"
          + (" (GPU_CHECK_TINY: tiny CPU settings)" if TINY else ""), flush=True)
    big = 10 if TINY else 100         # B = n_clients of the paper config: a round's participants in one block
    # the most wanted figures first; what does not fit the budget is skipped
    plan = [(env, ()), (steps, (STEP_MODELS[:2],)), (rounds, (RBLOCKS[:2],)), (paper, ((big,),)),
            (steps, (STEP_MODELS[2:],)), (rounds, (RBLOCKS[2:],)), (paper, ((1,),))]
    for part, args in plan:
        try:
            part(*args)
        except Exception as e:            # noqa: BLE001 -- one line, the rest goes on
            print(f"[{part.__name__}] failed: {type(e).__name__}: {e}", flush=True)
        (OUT / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"gpu_check: done in {time.monotonic() - T0:.0f} s; figures in {OUT / 'summary.json'}", flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Performance harness for pfedmoap: prints figures, never asserts times.

    python tools/benchmark.py step   [--classes 10,100] [--repeats 3]
    python tools/benchmark.py memory [--clients 1000] [--model ViT-B-32]
    python tools/benchmark.py round  [--set key=value ...] [--no-variants]
    python tools/benchmark.py scale  [--set key=value ...] [--router-only] [--clients 100,1000,10000] [--ranks 1,3]
    python tools/benchmark.py ops    [--blocks 1,2,4,8] [--methods local,pfedmoap] [--set key=value ...]
    python tools/benchmark.py blockstep [--model ViT-B-16] [--device cuda] [--precision bf16] [--blocks 1,4,16,64]

step    one training step (batch 32, 16 context tokens, one torch thread) on a ViT-B-32-size
        random-init model: the reference-style step (image tower on the batch + full 77-token text
        encoding) against ours (cached image features + EOS truncation + shared prefix), each fast
        path on its own, and a pFedMoAP step split into text encoding, gating and optimiser step.
memory  per-client state beyond the shared backbone (ClientPart.state_vector) and the resident
        memory of one process hosting 1,000 pFedMoAP clients on a ViT-B-32-size backbone.
round   a configured scenario through the real round loop (federation.Federation with LocalComm):
        seconds per round by phase, peak memory, bytes per round against the payload minimum, and
        the speed-up of each fast path on the same run. Every variant runs in its own process.
scale   N = 100, 1,000, 10,000 clients x 20 rounds on tiny-clip + synthetic data, in one process and
        under mpiexec -n 3: seconds per round by phase, the results.h5 commit per round, checkpoint
        time and size, framework overhead, memory per rank; and the server's router.route cost for
        the round's participants.

ops     client blocks (train.client_block = B, issue 24) through the real round loop on tiny-clip +
        synthetic data: aten ops (torch.profiler) per client-step of local training and per round,
        and wall seconds per round, at each B; target at B = 8: ops per client-step <= 1/6 of B = 1's.
blockstep  one block training step of B clients (the batched text pass, per-client losses, StackedSGD;
        cached image features, batch 32 each) on a model/device/precision: ms per step and per
        client-step, aten ops per client-step, and on CUDA the GPU busy fraction (kernel time / wall),
        with and without run.cuda_graph (--cuda-graph both|on|off).

`--set key=value` overrides the scenario's config exactly as `pfedmoap run --set` does.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


# ---------------------------------------------------------------------------- helpers

def proc_status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in bytes (Linux /proc/self/status)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0]) * 1024
    return out


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def timeit(fn, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall seconds of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), ts


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def header(title: str) -> None:
    print(f"\n== {title}  (CPU: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s))")


# ---------------------------------------------------------------------------- step

def cmd_step(args) -> None:
    from pfedmoap.clip.backbone import Backbone
    from pfedmoap.clip.gating import GatingNetwork, moe_logits
    from pfedmoap.clip.prompt import PromptEncoder
    import torch.nn.functional as F

    torch.set_num_threads(1)
    torch.manual_seed(0)
    B, n_ctx, R = 32, 16, args.repeats
    bb = Backbone(args.model, pretrained="", seed=0)
    header(f"step: {args.model} random init, batch {B}, n_ctx {n_ctx}, forward+backward, "
           f"median of {R} (reference-style: {args.ref_repeats})")
    res = bb.model.visual.image_size
    res = res[0] if isinstance(res, (tuple, list)) else res
    images = torch.randn(B, 3, res, res)
    D = bb.embed_dim
    W = bb.model.token_embedding.weight.shape[1] if hasattr(bb.model, "token_embedding") \
        else bb.model.text.token_embedding.weight.shape[1]
    s = bb.logit_scale

    # the image tower alone (frozen: no graph, as inside CoOp's forward)
    def image_tower():
        with torch.no_grad():
            return F.normalize(bb.model.encode_image(images), dim=-1)
    t_img, _ = timeit(image_tower, args.ref_repeats, 0)
    cached = image_tower()
    pool_feats = F.normalize(torch.randn(4096, D), dim=-1)        # a client's cached features
    gen = torch.Generator().manual_seed(0)

    def cached_batch():
        return pool_feats[torch.randperm(len(pool_feats), generator=gen)[:B]]
    t_cache, _ = timeit(cached_batch, 50)
    print(f"image features for a batch of {B}: image tower {t_img * 1e3:9.1f} ms | "
          f"cached (index into features) {t_cache * 1e3:7.3f} ms | speed-up {t_img / t_cache:,.0f}x")

    rows = []
    for C in args.classes:
        names = [f"{args.classname} {i}" for i in range(C)]
        labels = torch.arange(B) % C
        encs = {
            "full77": PromptEncoder(bb, names, n_ctx, truncate=False, shared_prefix=False),
            "trunc": PromptEncoder(bb, names, n_ctx, truncate=True, shared_prefix=False),
            "prefix77": PromptEncoder(bb, names, n_ctx, truncate=False, shared_prefix=True),
            "ours": PromptEncoder(bb, names, n_ctx, truncate=True, shared_prefix=True),
        }
        ctx = (torch.randn(n_ctx, W) * 0.02).requires_grad_(True)
        opt = torch.optim.SGD([ctx], lr=0.002, momentum=0.9, weight_decay=5e-4)

        def coop_step(enc, image_mode):
            def step():
                f = image_tower() if image_mode == "tower" else cached_batch()
                text = enc(ctx)
                loss = F.cross_entropy(s * f @ text.t(), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return step

        def text_only(enc):
            def step():
                text = enc(ctx)
                loss = F.cross_entropy(s * cached @ text.t(), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            return step

        t, mins = {}, {}
        slow = args.ref_repeats if C <= 20 else 1     # a 77-token step at C = 100 takes tens of seconds
        for key, fn, reps, warm in (
                ("ref", coop_step(encs["full77"], "tower"), slow, 0),
                ("cache+full77", coop_step(encs["full77"], "cache"), slow, 0),
                ("ours", coop_step(encs["ours"], "cache"), R, 1),
                ("text trunc", text_only(encs["trunc"]), R, 1),
                ("text prefix77", text_only(encs["prefix77"]), slow, 0),
                ("text trunc+prefix", text_only(encs["ours"]), R, 1)):
            t[key], ts = timeit(fn, reps, warm)
            mins[key] = min(ts)
        t["text full77"] = t["cache+full77"]          # the same work: 77-token text fwd+bwd + SGD step
        with torch.no_grad():      # exactness check of the fast paths against the 77-token path
            ref = encs["full77"](ctx)
            err = max(float((encs[k](ctx) - ref).abs().max()) for k in ("trunc", "prefix77", "ours"))
        L_trunc = encs["trunc"].length
        suffix = L_trunc - 1 - n_ctx
        print(f"\nC = {C} classes  (sequence 77 -> {L_trunc} tokens after EOS truncation; shared prefix "
              f"{1 + n_ctx} tokens once + {suffix} suffix tokens per class; max |diff| vs 77-token "
              f"path {err:.1e})")
        print(f"  reference-style CoOp step (image tower + 77 tokens) {t['ref'] * 1e3:10.1f} ms")
        print(f"  cached features + 77 tokens                          {t['cache+full77'] * 1e3:10.1f} ms"
              f"   cache speed-up {t['ref'] / t['cache+full77']:6.2f}x")
        print(f"  ours (cache + truncation + shared prefix)            {t['ours'] * 1e3:10.1f} ms"
              f"   total speed-up {t['ref'] / t['ours']:6.1f}x  (target >= 12x: "
              f"{'met' if t['ref'] / t['ours'] >= 12 else 'MISSED'})")
        print(f"  text fwd+bwd: 77 tokens {t['text full77'] * 1e3:8.1f} ms | truncation "
              f"{t['text trunc'] * 1e3:8.1f} ms ({t['text full77'] / t['text trunc']:5.2f}x) | shared prefix "
              f"alone {t['text prefix77'] * 1e3:8.1f} ms ({t['text full77'] / t['text prefix77']:5.2f}x) | "
              f"both {t['text trunc+prefix'] * 1e3:8.1f} ms ({t['text full77'] / t['text trunc+prefix']:5.2f}x; "
              f"prefix on top of truncation {t['text trunc'] / t['text trunc+prefix']:4.2f}x)")

        # pFedMoAP step split into phases (image features cached; K = 10: local + 9 experts)
        K = args.experts
        experts = F.normalize(torch.randn(K - 1, C, D), dim=-1)
        gating = GatingNetwork(D, 128, 8, 10.0)
        gopt = torch.optim.SGD(gating.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        for p in gating.parameters():
            gopt.state[p]["momentum_buffer"] = torch.zeros_like(p)
        enc = encs["ours"]
        x = cached_batch()

        def moap_step():
            text = torch.cat([enc(ctx).unsqueeze(0), experts])
            logits, _ = moe_logits(gating, x, text, s, 0.5)
            loss = F.cross_entropy(logits, labels)
            opt.zero_grad(set_to_none=True)
            gopt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            gopt.step()

        def text_fb():
            text = enc(ctx)
            opt.zero_grad(set_to_none=True)
            (text * experts[0]).sum().backward()

        text_frozen = torch.cat([enc(ctx).detach().unsqueeze(0), experts])

        def gating_fb():
            logits, _ = moe_logits(gating, x, text_frozen, s, 0.5)
            gopt.zero_grad(set_to_none=True)
            F.cross_entropy(logits, labels).backward()

        def opt_steps():
            opt.step()
            gopt.step()
        t_moap, _ = timeit(moap_step, R)
        t_text, _ = timeit(text_fb, R)
        t_gate, _ = timeit(gating_fb, R)
        moap_step()
        t_opt, _ = timeit(opt_steps, 20)
        print(f"  pFedMoAP step (K = {K}, cached features) {t_moap * 1e3:8.1f} ms = text encoding fwd+bwd "
              f"{t_text * 1e3:7.1f} ms ({100 * t_text / t_moap:4.1f}%) + gating fwd+bwd "
              f"{t_gate * 1e3:6.2f} ms ({100 * t_gate / t_moap:4.1f}%) + optimiser steps "
              f"{t_opt * 1e3:6.3f} ms ({100 * t_opt / t_moap:4.1f}%); speed-up vs reference-style "
              f"CoOp step {t['ref'] / t_moap:5.1f}x")
        rows.append((C, t["ref"], t["ours"], t_moap, mins["ref"], mins["ours"], slow))
    print("\nsummary (median; min in brackets -- the machine is shared, min is the less disturbed figure)")
    print("     C  reference-style ms     ours (CoOp) ms        speed-up  pFedMoAP step ms  (ref repeats)")
    for C, r, o, m, rmin, omin, slow in rows:
        print(f"  {C:4d} {r * 1e3:9.1f} ({rmin * 1e3:7.1f}) {o * 1e3:8.1f} ({omin * 1e3:7.1f}) "
              f"{r / o:6.1f}x ({rmin / omin:5.1f}x) {m * 1e3:10.1f}       {slow}")


# ---------------------------------------------------------------------------- memory

def cmd_memory(args) -> None:
    from pfedmoap import algorithms, config
    from pfedmoap.algorithms.base import ClientData, Setup
    from pfedmoap.clip.backbone import Backbone
    from pfedmoap.clip.prompt import PromptEncoder
    from pfedmoap.data.datasets import load_dataset
    from pfedmoap.data.partition import make_partition

    torch.set_num_threads(1)
    header(f"memory: {args.clients} pFedMoAP clients, {args.model} random init")
    stages = [("start (python + torch + pfedmoap imported)", proc_status())]
    cfg = config.load(None, [f"model.name={args.model}", "model.pretrained=", "algorithm=pfedmoap",
                             "data.dataset=synthetic", f"data.n_clients={args.clients}",
                             f"data.n_train={args.train_per_client * args.clients}",
                             f"data.n_test={args.test_per_client * args.clients}",
                             "data.partition=iid", "data.cache_dir="] + args.sets)
    bb = Backbone(cfg.model.name, cfg.model.pretrained, seed=0)
    stages.append(("backbone built", proc_status()))
    ds = load_dataset(cfg.data)
    part = make_partition(ds, cfg.data, cfg.seed)
    enc = PromptEncoder(bb, ds.classnames, cfg.prompt.n_ctx)
    W = bb.model.token_embedding.weight.shape[1] if hasattr(bb.model, "token_embedding") \
        else bb.model.text.token_embedding.weight.shape[1]
    method = algorithms.get("pfedmoap")(Setup(cfg, args.clients, enc, bb, (cfg.prompt.n_ctx, W)))
    algo = method.client()
    stages.append(("synthetic data set + partition + encoder", proc_status()))

    probe = algo.init_state(0)
    S = len(algo.state_vector(probe))
    tensors = algo.state_tensors(probe)
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors)
    ctx_n = probe.ctx.numel()
    g_n = sum(p.numel() for p in probe.gating.parameters())
    print(f"per-client state (ClientPart.state_vector): {S:,} floats = {4 * S:,} bytes "
          f"({4 * S / 2**20:.3f} MiB; target < 1 MB: {'met' if 4 * S < 1e6 else 'MISSED'})")
    print(f"  ctx {ctx_n:,} + gating parameters {g_n:,} + momentum buffers {g_n:,} floats; "
          f"measured tensor storage {tensor_bytes:,} bytes")
    del probe

    # features: the shapes the cache would hold (random unit vectors; encoding 1000s of images with a
    # ViT-B-32 on 2 CPU cores would only measure the image tower), stored per client as federation.py does
    D = bb.embed_dim
    g = torch.Generator().manual_seed(0)
    feats = {sp: torch.nn.functional.normalize(torch.randn(len(getattr(ds, sp)), D, generator=g), dim=-1).numpy()
             for sp in ("train", "test")}
    data = {}
    for c in range(args.clients):
        tr, te = part.train[c], part.test[c]
        data[c] = ClientData(torch.from_numpy(feats["train"][tr]), torch.from_numpy(ds.train.labels[tr]),
                                        torch.from_numpy(feats["test"][te]), torch.from_numpy(ds.test.labels[te]))
    del feats
    stages.append((f"cached features ({len(ds.train)} train + {len(ds.test)} test x {D}) per client", proc_status()))
    before = proc_status()["VmRSS"]
    t = time.perf_counter()
    states = {c: algo.init_state(c) for c in range(args.clients)}
    t_init = time.perf_counter() - t
    after = proc_status()["VmRSS"]
    stages.append((f"{args.clients} x init_state", proc_status()))
    # one local step for a few clients: autograd peak of the text encoder
    algo.cfg.train.local_epochs = 1
    experts = torch.nn.functional.normalize(torch.randn(cfg.options.n_experts - 1, len(ds.classnames), D), dim=-1)
    t = time.perf_counter()
    for c in range(min(3, args.clients)):
        algo._experts[c] = experts         # what prepare() leaves for a client with K-1 experts
        algo.fit(states[c], data[c], 0, c, {})
    t_fit = time.perf_counter() - t
    stages.append(("after fit() of 3 clients (1 local epoch, K experts)", proc_status()))
    print(f"init_state x {args.clients}: {t_init:.2f} s; RSS grew {mib(after - before)} = "
          f"{(after - before) / args.clients / 1024:,.1f} KiB per client (state tensors "
          f"{tensor_bytes / 1024:,.1f} KiB + Python/nn.Module/optimiser objects)")
    print(f"fit() of 3 clients: {t_fit:.2f} s")
    print(f"\n{'stage':<62}{'VmRSS':>14}{'VmHWM':>14}")
    for name, st in stages:
        print(f"{name:<62}{mib(st['VmRSS']):>14}{mib(st['VmHWM']):>14}")
    hwm = stages[-1][1]["VmHWM"]
    print(f"\npeak resident memory with {args.clients} clients: {mib(hwm)} "
          f"(target < 4 GB: {'met' if hwm < 4e9 else 'MISSED'})")


# ---------------------------------------------------------------------------- round

ROUND_DEFAULTS = ["algorithm=pfedmoap", "rounds=3", "train.local_epochs=1", "run.threads=1",
                  "run.checkpoint_every=1"]


def payload_minimum(res: dict, algorithm: str) -> tuple[np.ndarray, np.ndarray]:
    """Per round, (minimum upload bytes, minimum download bytes) counted per client.

    Minimum = 4 bytes x the prompt floats actually needed: each participant uploads its prompt
    (+1 float, its sample count); each client receives the prompts of its valid experts, and each
    participant the global prompt when one exists (round > 0); promptfl/fedprox: every client the
    new global prompt for evaluation."""
    import tomllib
    cfg = tomllib.loads(res["attrs"]["config"])
    n_ctx = cfg["prompt"]["n_ctx"]
    part = res["rounds"]["participated"]
    up_rows = res["rounds"]["bytes_up"]
    R, N = part.shape
    # P from a participant's logged upload: 4 (P + 1)
    P = None
    nz = up_rows[up_rows > 0]
    if len(nz):
        P = int(nz[0]) // 4 - 1
    if P is None:
        return np.zeros(R), np.zeros(R)
    shares = algorithm not in ("local", "zeroshot")
    up = np.array([part[r].sum() * 4 * (P + 1) if shares else 0 for r in range(R)], float)
    down = np.zeros(R)
    for r in range(R):
        if shares and r > 0:
            down[r] += part[r].sum() * 4 * P
        if algorithm in ("promptfl", "fedprox"):
            down[r] += N * 4 * P
        if "experts" in res["rounds"] and res["rounds"]["experts"].ndim == 3:
            down[r] += (res["rounds"]["experts"][r] >= 0).sum() * 4 * P
    _ = n_ctx
    return up, down


def run_scenario(sets: list[str], out_dir: str) -> dict:
    """One Federation run in this process; returns its figures (printed as JSON by `_round1`)."""
    from pfedmoap import comm, config, federation, store
    cfg = config.load(None, sets, base=config.QUICKSTART)
    t0 = time.perf_counter()
    fed = federation.Federation(cfg, comm.LocalComm())
    t_setup = time.perf_counter() - t0
    fed.run(out_dir, "overwrite")
    t_total = time.perf_counter() - t0
    res = store.read_results(out_dir)
    rd = res["rounds"]
    pt = rd["phase_time"]                     # (R, W, P)
    phases = list(rd["phases"])
    up_min, down_min = payload_minimum(res, cfg.algorithm)
    return {
        "setup_s": t_setup, "total_s": t_total, "rounds": int(pt.shape[0]), "phases": phases,
        "phase_s_per_round": np.nanmax(pt, axis=1).mean(axis=0).tolist(),
        "wall_s_per_round": float(rd["wall_time"].mean()), "wall_s_rounds": rd["wall_time"].tolist(),
        # results.write + checkpoint happen in Federation.run, outside _round: in no phase, no wall_time
        "untimed_s_per_round": (t_total - t_setup - float(rd["wall_time"].sum())) / pt.shape[0],
        "bytes_up": rd["bytes_up"].sum(1).tolist(), "bytes_down": rd["bytes_down"].sum(1).tolist(),
        "min_up": up_min.tolist(), "min_down": down_min.tolist(),
        "accuracy": float(np.nanmean(rd["accuracy"][-1])),
        "vmhwm": proc_status()["VmHWM"], "n_clients": int(res["attrs"]["n_clients"]),
        "algorithm": cfg.algorithm, "model": cfg.model.name, "dataset": cfg.data.dataset,
    }


def _subprocess_round(sets: list[str], out_dir: str) -> dict:
    cmd = [sys.executable, __file__, "_round1", "--out", out_dir] + sum((["--set", s] for s in sets), [])
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if p.returncode != 0:
        raise SystemExit(f"benchmark run failed ({' '.join(sets)}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def print_run(name: str, r: dict) -> None:
    ph = dict(zip(r["phases"], r["phase_s_per_round"]))
    print(f"{name:<26} setup {r['setup_s']:7.2f} s | per round {r['wall_s_per_round']:7.3f} s = "
          + " + ".join(f"{k} {v:.3f}" for k, v in ph.items())
          + f" | outside phases (results.h5 + checkpoint.h5 writes) {r['untimed_s_per_round']:.3f}"
          + f" | peak RSS {mib(r['vmhwm'])} | final acc {r['accuracy']:.4f}")


def print_bytes(r: dict) -> None:
    print("bytes per round (all clients)     logged up   minimum up | logged down  minimum down  "
          "(down overhead)")
    for i, (u, mu, d, md) in enumerate(zip(r["bytes_up"], r["min_up"], r["bytes_down"], r["min_down"])):
        over = f"{100 * (d - md) / md:5.2f}%" if md else "  -"
        print(f"  round {i + 1:<3}                  {int(u):>12,} {int(mu):>12,} | {int(d):>11,} "
              f"{int(md):>13,}  ({over})")


def cmd_round(args) -> None:
    header("round: the real round loop in-process (federation.Federation + LocalComm)")
    sets = ROUND_DEFAULTS + args.sets
    tmp = Path(tempfile.mkdtemp(prefix="pfedmoap-bench-"))
    cache = tmp / "cache"
    print(f"scenario: quick-start config + {' '.join(sets)}   (run dirs under {tmp})")
    # warm the feature cache first so 'cached' timings measure reading it, not writing it
    base = _subprocess_round(sets + [f"data.cache_dir={cache}"], str(tmp / "warm"))
    print(f"{r'(cache cold: computes+writes)':<26} setup {base['setup_s']:7.2f} s")
    runs = {"all fast paths": _subprocess_round(sets + [f"data.cache_dir={cache}"], str(tmp / "fast"))}
    print_run("all fast paths", runs["all fast paths"])
    if not args.no_variants:
        variants = {
            "truncate_eos=false": ["run.truncate_eos=false"],
            "shared_prefix=false": ["run.shared_prefix=false"],
            "both text paths off": ["run.truncate_eos=false", "run.shared_prefix=false"],
            "cache_dir= (in memory)": ["data.cache_dir="],
        }
        for name, extra in variants.items():
            c = [] if "cache_dir" in name else [f"data.cache_dir={cache}"]
            runs[name] = _subprocess_round(sets + c + extra, str(tmp / name.split("=")[0].replace(" ", "_")))
            print_run(name, runs[name])
        f = runs["all fast paths"]
        print("\nspeed-up of each fast path on this run (the variant without it / all fast paths):")
        for name in ("truncate_eos=false", "shared_prefix=false", "both text paths off"):
            v = runs[name]
            tr = lambda r: r["phase_s_per_round"][r["phases"].index("train")] + r["phase_s_per_round"][r["phases"].index("eval")]  # noqa: E731
            print(f"  {name:<22} per round {v['wall_s_per_round'] / f['wall_s_per_round']:5.2f}x "
                  f"(train+eval {tr(v) / tr(f):5.2f}x)")
        v = runs["cache_dir= (in memory)"]
        print(f"  {'feature cache (file)':<22} set-up {v['setup_s']:.2f} s -> {f['setup_s']:.2f} s "
              f"({v['setup_s'] / f['setup_s']:.2f}x; cold run writing it: {base['setup_s']:.2f} s); "
              f"per round unchanged ({v['wall_s_per_round']:.3f} vs {f['wall_s_per_round']:.3f} s): "
              "features are computed once per run either way, never per step")
    print()
    print_bytes(runs["all fast paths"])


def cmd_round1(args) -> None:
    r = run_scenario(args.sets, args.out)
    print(json.dumps(r))


# ---------------------------------------------------------------------------- scale

SCALE_SETS = ["model.name=tiny-clip", "model.pretrained=", "data.dataset=synthetic", "data.partition=iid",
              "train.local_epochs=1", "rounds=20", "run.threads=1", "algorithm=pfedmoap",
              # evaluate the round's participants each round, every client at the last round
              "run.eval_clients=participants", "run.eval_every=1", "run.checkpoint_every=10",
              # a small gating network: 9,472 floats per client (the default's 133,120 = 532 KB per
              # client would make 10,000 clients 5.3 GB of state); the loop's costs do not depend on it
              "moe.gating_dim=32", "moe.gating_heads=4", "run.progress=false"]
SCALE_FRAC = {100: 0.1, 1000: 0.1, 10000: 0.01}        # 10, 100, 100 participants per round
TRAIN_PER_CLIENT, TEST_PER_CLIENT = 10, 5


def scale_sets(n: int, frac: float | None = None) -> list[str]:
    return SCALE_SETS + [f"data.n_clients={n}", f"data.n_train={TRAIN_PER_CLIENT * n}",
                         f"data.n_test={TEST_PER_CLIENT * n}", f"train.frac={frac or SCALE_FRAC.get(n, 0.1)}"]


def _tensor_bytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def cmd_scale1(args) -> None:
    """One scale run on this rank (plain python or under mpiexec): each rank writes rank<r>.json."""
    from pfedmoap import comm as comm_mod, config, federation, store
    world = comm_mod.world()
    cfg = config.load(None, args.sets, base=config.QUICKSTART)
    t0 = time.perf_counter()
    fed = federation.Federation(cfg, world)
    setup = time.perf_counter() - t0
    after_setup = proc_status()
    commits: list[float] = []
    if fed.root:      # time every commit of results.h5 (Results.write) as the run makes it
        from pfedmoap.store import Results
        write = Results.write

        def timed_write(self, status=None):
            t = time.perf_counter()
            write(self, status)
            commits.append(time.perf_counter() - t)
        Results.write = timed_write
    t1 = time.perf_counter()
    fed.run(args.out, "overwrite")
    run_s = time.perf_counter() - t1
    state = sum(_tensor_bytes(*fed.client.state_tensors(fed.states[int(c)])) for c in fed.mine)
    feats = sum(_tensor_bytes(d.train_x, d.train_y, d.test_x, d.test_y, d.train_views) for d in fed.build.data.values())
    server = sum(np.asarray(v).nbytes for v in fed.server.state_dict().values()) if fed.root else 0
    out = {"rank": world.rank, "size": world.size, "clients": int(len(fed.mine)), "setup_s": setup, "run_s": run_s,
           "state_bytes": state, "feature_bytes": feats, "server_bytes": server,
           "state_per_client": state / max(1, len(fed.mine)),
           "rss_after_setup": after_setup["VmRSS"], "hwm": proc_status()["VmHWM"]}
    if fed.root:
        res = store.read_results(args.out)
        out.update(commits=commits, checkpoints=fed.checkpoints, phases=list(res["rounds"]["phases"]),
                   phase_time=np.nan_to_num(res["rounds"]["phase_time"], nan=0.0).tolist(),
                   wall_time=res["rounds"]["wall_time"].tolist(),
                   final_write_time=float(res["attrs"]["final_write_time"]),
                   evaluated=res["rounds"]["evaluated"].sum(1).tolist(),
                   participants=res["rounds"]["participated"].sum(1).tolist(),
                   results_bytes=(Path(args.out) / store.RESULTS).stat().st_size,
                   n_clients=int(res["attrs"]["n_clients"]))
    Path(args.json).with_name(f"{Path(args.json).stem}.rank{world.rank}.json").write_text(json.dumps(out))


def _scale_run(n: int, ranks: int, tmp: Path, extra: list[str]) -> list[dict]:
    run_dir = tmp / f"n{n}-r{ranks}"
    sets = scale_sets(n) + [f"data.cache_dir={tmp / 'cache'}"] + extra
    cmd = [sys.executable, __file__, "_scale1", "--out", str(run_dir), "--json", str(tmp / f"n{n}-r{ranks}.json")]
    cmd += sum((["--set", s] for s in sets), [])
    if ranks > 1:
        cmd = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks)] + cmd
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"scale run N = {n}, {ranks} rank(s) failed:\n{p.stderr[-3000:]}")
    return [json.loads((tmp / f"n{n}-r{ranks}.rank{r}.json").read_text()) for r in range(ranks)]


def scale_figures(ranks: list[dict]) -> dict:
    """Seconds per round by phase (max over ranks; comm: over the client ranks, rank 0's comm is mostly
    waiting for them), the results.h5 commit (Results.write) per round, memory per rank and the
    framework overhead: the round's wall time less the clients' own work on the slowest rank
    (prepare + train + eval: the method's model computations), i.e. communication, server, writing
    and waiting."""
    root = ranks[0]
    pt = np.array(root["phase_time"])                 # (R, W, P), NaN (not timed) as 0
    ph = root["phases"]
    wall = np.array(root["wall_time"])
    R, W = pt.shape[:2]
    col = {p: pt[:, :, i] for i, p in enumerate(ph)}
    per_phase = {p: col[p].max(axis=1) for p in ph}    # (R,)
    if W > 1:
        per_phase["comm"] = col["comm"][:, 1:].max(axis=1)
    work = (col["prepare"] + col["train"] + col["eval"]).max(axis=1)
    overhead = wall - work
    body = np.arange(R - 1)                            # rounds 1..R-1 (the last evaluates every client)
    ckpt = {rd for rd, _, _ in root["checkpoints"]}    # a checkpoint's time is in the next round's write
    plain = np.array([i for i in body if i not in ckpt])
    commits = np.array(root["commits"][:R])
    return {
        "phases": {p: (float(v[body].mean()), float(v[-1])) for p, v in per_phase.items()},
        "wall": (float(wall[body].mean()), float(wall[-1])),
        "overhead": (float(overhead[body].mean()), float((overhead / wall)[body].mean()), float(overhead[-1] / wall[-1])),
        "overhead_plain": (float(overhead[plain].mean()), float((overhead / wall)[plain].mean())),
        "overhead_with_prepare": float(((overhead + col["prepare"].max(axis=1)) / wall)[body].mean()),
        "commit": (float(commits[0]), float(commits[min(19, R - 1)]), float(commits[-1]), float(np.median(commits))),
        "write_phase": per_phase["write"].tolist(),
        "checkpoints": root["checkpoints"], "final_write_time": root["final_write_time"],
        "results_bytes": root["results_bytes"], "evaluated": root["evaluated"], "participants": root["participants"],
        "memory": [{k: r[k] for k in ("rank", "clients", "state_bytes", "state_per_client", "feature_bytes",
                                      "server_bytes", "rss_after_setup", "hwm", "setup_s")} for r in ranks],
    }


def log_bench(n_clients: int = 10000, rounds: int = 200, experts: int = 9) -> None:
    """results.h5 commit per round (store.Results: rows appended in place) at rounds 1 .. `rounds`,
    against rewriting the whole file each round (what results.h5 did before issue 16, emulated:
    every round so far written to a new file, fsync, rename)."""
    from pfedmoap import store
    tmp = Path(tempfile.mkdtemp(prefix="pfedmoap-log-"))
    N, phases = n_clients, ["comm", "prepare", "train", "eval", "write", "server"]
    logs = {"experts": store.Field(np.int32, "", "", (experts,)), "gate_weight": store.Field(np.float32, "", "", (experts + 1,))}
    attrs = dict(config="", algorithm="pfedmoap", dataset="synthetic", partition="iid", seed=1, world_size=1,
                 n_clients=N, n_classes=10, n_rounds=rounds, config_hash="")
    res = store.Results(tmp, attrs, {"n_train": np.ones(N, np.int32), "domain_names": ["all"]}, phases, logs)
    res.create()
    g = np.random.default_rng(0)

    def record():
        a = g.random(N, np.float32)
        return store.RoundRecord(accuracy=a, macro_f1=a, loss=a, participated=a < 0.01, domain_accuracy=a[:, None],
                                 bytes_up=np.zeros(N, np.int64), bytes_down=np.zeros(N, np.int64),
                                 phase_time=np.zeros((1, 6), np.float32), wall_time=1.0,
                                 logs={"experts": np.zeros((N, experts), np.int32),
                                       "gate_weight": np.zeros((N, experts + 1), np.float32)})
    t_new, rows = [], []
    for r in range(rounds):
        rec = record()
        t = time.perf_counter()
        res.append(rec)
        res.write("complete" if r == rounds - 1 else None)
        t_new.append(time.perf_counter() - t)
        rows.append(rec)
    res.close()
    t_old = {}
    for r in (1, 20, rounds):     # the old way: the whole history rewritten atomically
        t = time.perf_counter()
        path = tmp / "whole.h5.tmp"
        with h5py.File(path, "w") as f:
            for k in ("accuracy", "macro_f1", "loss", "participated", "bytes_up", "bytes_down"):
                f.create_dataset(f"rounds/{k}", data=np.stack([np.asarray(getattr(x, k)) for x in rows[:r]]))
            f.create_dataset("rounds/domain_accuracy", data=np.stack([x.domain_accuracy for x in rows[:r]]))
            for k in logs:
                f.create_dataset(f"rounds/{k}", data=np.stack([x.logs[k] for x in rows[:r]]))
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(path, tmp / "whole.h5")
        t_old[r] = time.perf_counter() - t
    size = (tmp / store.RESULTS).stat().st_size
    print(f"results.h5 at {N:,} clients ({size / rounds / 2**20:.2f} MiB per round): commit in place, round 1 "
          f"{1e3 * t_new[0]:.1f} ms, round 20 {1e3 * t_new[19]:.1f} ms, round {rounds} {1e3 * t_new[-1]:.1f} ms; median "
          f"of rounds 1-10 {1e3 * np.median(t_new[:10]):.1f} ms, of rounds {rounds - 9}-{rounds} "
          f"{1e3 * np.median(t_new[-10:]):.1f} ms | whole-file rewrite (before): round 1 {1e3 * t_old[1]:.1f} ms, "
          f"round 20 {1e3 * t_old[20]:.1f} ms, round {rounds} {1e3 * t_old[rounds]:.1f} ms")
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)


def time_router(N: int, P: int, E: int, queries: int | None = None) -> None:
    """router.route for `queries` clients (all N when None) against a pool of N prompts."""
    from pfedmoap import router
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(N, P)).astype(np.float32)
    in_pool = np.ones(N, bool)
    clients = np.arange(N) if queries is None else np.sort(rng.choice(N, queries, replace=False))
    for method in ("knn", "random", "fixed"):
        t, _ = timeit(lambda: router.route(method, pool, in_pool, pool[clients], clients, E, 1, 3), 3)
        print(f"  router.route({method!r:8}) pool N = {N:6d}, P = {P:5d}, {len(clients):6d} clients routed, "
              f"{E} experts: {t * 1e3:8.1f} ms")


def cmd_scale(args) -> None:
    header("scale")
    torch.set_num_threads(1)
    print("server per-round work: router.route for the round's participants only (pFedMoAP routes the round's "
          "participants at fit, and at evaluation only the evaluated clients that trained with experts)")
    for N, P, q in ((1000, 16 * 64, None), (10000, 16 * 64, 100), (10000, 16 * 512, 100), (10000, 16 * 64, 1000)):
        time_router(N, P, 9, q)
    if args.router_only:
        return
    print()
    log_bench()
    tmp = Path(tempfile.mkdtemp(prefix="pfedmoap-scale-"))
    print(f"\nscenario: {' '.join(SCALE_SETS)}; per N: {TRAIN_PER_CLIENT} train + {TEST_PER_CLIENT} test images "
          f"per client, train.frac {SCALE_FRAC}; run dirs under {tmp}")
    rows = {}
    for n in args.clients:
        for r in args.ranks:
            rows[(n, r)] = figs = scale_figures(_scale_run(n, r, tmp, args.sets))
            ph = figs["phases"]
            R = len(figs["write_phase"])
            print(f"\nN = {n:,}, {r} rank(s) ({'one process' if r == 1 else f'mpiexec -n {r}: server + {r - 1} client ranks'}): "
                  f"{figs['participants'][0]} participants per round; evaluated per round "
                  f"{figs['evaluated'][0]} (round 1) ... {figs['evaluated'][-1]} (round {R})")
            print(f"  s/round, rounds 1-{R - 1} mean | round {R}: wall {figs['wall'][0]:.3f} | "
                  f"{figs['wall'][1]:.3f} = " + ", ".join(f"{p} {a:.3f} | {b:.3f}" for p, (a, b) in ph.items()))
            o = figs["overhead"]
            print(f"  framework overhead (wall - prepare - train - eval of the slowest rank): {o[0]:.3f} s = "
                  f"{100 * o[1]:.1f}% of a round (round {R}: {100 * o[2]:.1f}%); rounds without a checkpoint "
                  f"{figs['overhead_plain'][0]:.3f} s = {100 * figs['overhead_plain'][1]:.1f}%; counting prepare "
                  f"(the experts' text encoding) as overhead too: {100 * figs['overhead_with_prepare']:.1f}%")
            c1, c20, cl, cm = figs["commit"]
            print(f"  results.h5 commit (Results.write): round 1 {1e3 * c1:.1f} ms, round 20 {1e3 * c20:.1f} ms, "
                  f"round {R} {1e3 * cl:.1f} ms, median {1e3 * cm:.1f} ms; write phase per round "
                  + " ".join(f"{w:.3f}" for w in figs["write_phase"]) + f"; results.h5 {figs['results_bytes'] / 2**20:.1f} MiB")
            for rd, secs, size in figs["checkpoints"]:
                print(f"  checkpoint after round {rd}: {secs:.2f} s, {size / 2**20:.1f} MiB")
            for m in figs["memory"]:
                print(f"  rank {m['rank']}: {m['clients']:6d} clients, state {mib(m['state_bytes'])} "
                      f"({m['state_per_client'] / 1024:.1f} KiB each), features {mib(m['feature_bytes'])}, "
                      f"server (pool, ...) {mib(m['server_bytes'])}; RSS after set-up {mib(m['rss_after_setup'])}, "
                      f"peak {mib(m['hwm'])}; set-up {m['setup_s']:.1f} s")
    names = list(next(iter(rows.values()))["phases"])
    print("\nsummary: s/round by phase (max over ranks; comm over the client ranks), mean of rounds 1-19 | round 20 "
          "(every client evaluated); overhead = wall - (prepare + train + eval) of the slowest rank")
    print("| N | ranks | wall | " + " | ".join(names) + " | overhead | overhead, rounds without checkpoint | commit r1 / r20 |")
    print("|" + "---|" * (len(names) + 6))
    for (n, r), f in rows.items():
        print(f"| {n:,} | {r} | {f['wall'][0]:.3f} \\| {f['wall'][1]:.2f} | "
              + " | ".join(f"{a:.3f} \\| {b:.3f}" for a, b in f["phases"].values())
              + f" | {100 * f['overhead'][1]:.1f}% | {100 * f['overhead_plain'][1]:.1f}% | "
              f"{1e3 * f['commit'][0]:.1f} / {1e3 * f['commit'][1]:.1f} ms |")
    (tmp / "summary.json").write_text(json.dumps({f"{n}/{r}": f for (n, r), f in rows.items()}))
    print(f"(figures as JSON: {tmp / 'summary.json'})")


# ---------------------------------------------------------------------------- client blocks

OPS_SETS = ["model.name=tiny-clip", "model.pretrained=", "data.dataset=synthetic", "data.partition=iid",
            "data.n_clients=16", "data.n_train=1280", "data.n_test=320", "data.n_classes=10", "data.cache_dir=",
            "rounds=3", "train.local_epochs=1", "train.batch_size=32", "run.threads=1", "run.progress=false",
            "run.checkpoint_every=0", "run.eval_every=1"]


def count_aten(prof) -> int:
    """aten ops the profiler recorded (every call, nested ones included: a consistent proxy of the
    operators dispatched, hence of kernel launches on a GPU)."""
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def client_steps(fed, cids) -> int:
    t = fed.cfg.train
    return sum(t.local_epochs * (n // min(t.batch_size, n)) for n in (len(fed.build.data[c].train_y) for c in cids) if n)


def ops_run(sets: list[str], out_dir: str) -> dict:
    """Round 0 warms up; round 1's local training (every fit_block) is profiled; round 2 is profiled whole."""
    from torch.profiler import ProfilerActivity, profile
    from pfedmoap import comm, config, federation
    cfg = config.load(None, sets)
    fed = federation.Federation(cfg, comm.LocalComm())
    got = {"train_ops": 0, "round_ops": 0, "steps": 0, "round_s": []}
    fit_block, run_round = fed.client.fit_block, fed._round
    current = {"r": -1}

    def profiled_fit(states, datas, r, cids, downs):
        if current["r"] != 1:
            return fit_block(states, datas, r, cids, downs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = fit_block(states, datas, r, cids, downs)
        got["train_ops"] += count_aten(prof)
        got["steps"] += client_steps(fed, cids)
        return out

    def profiled_round(r):
        current["r"] = r
        t = time.perf_counter()
        if r == 2:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run_round(r)
            got["round_ops"] = count_aten(prof)
        else:
            run_round(r)
        got["round_s"].append(time.perf_counter() - t)

    fed.client.fit_block, fed._round = profiled_fit, profiled_round
    fed.run(out_dir, "overwrite")
    got["ops_per_client_step"] = got["train_ops"] / max(1, got["steps"])
    return got


def cmd_ops(args) -> None:
    header("ops: aten ops per client-step and per round at client block B (torch.profiler, CPU)")
    tmp = Path(tempfile.mkdtemp(prefix="pfedmoap-ops-"))
    sets = OPS_SETS + args.sets
    print(f"scenario: {' '.join(sets)}")
    print("ops/client-step: round 1's local training (every fit_block profiled) / its client-steps; "
          "ops/round: round 2 profiled whole; s/round: round 0's wall time (not profiled)")
    summary = {}
    for method in args.methods:
        base = None
        print(f"\n{method}:   B   ops/client-step   (vs B=1)   ops/round   (vs B=1)   s/round (round 0)")
        for B in args.blocks:
            extra = ["moe.n_experts=4"] if method == "pfedmoap" else []
            r = ops_run([f"algorithm={method}"] + sets + extra + [f"train.client_block={B}"], str(tmp / f"{method}-{B}"))
            base = base or r
            summary[f"{method}/{B}"] = r
            print(f"  {B:14d} {r['ops_per_client_step']:16,.0f} {base['ops_per_client_step'] / r['ops_per_client_step']:9.2f}x"
                  f" {r['round_ops']:11,d} {base['round_ops'] / r['round_ops']:9.2f}x {r['round_s'][0]:11.2f}")
        if 8 in args.blocks and 1 in args.blocks:
            ratio = summary[f"{method}/1"]["ops_per_client_step"] / summary[f"{method}/8"]["ops_per_client_step"]
            print(f"  target at B = 8: ops per client-step <= 1/6 of B = 1's: {ratio:.1f}x fewer "
                  f"({'met' if ratio >= 6 else 'MISSED'})")
    if args.json:
        Path(args.json).write_text(json.dumps(summary))


def busy_fraction(prof, wall_s: float) -> float:
    """GPU kernel time over wall time of the profiled window (kernels of one stream do not overlap)."""
    total_us = 0.0
    for e in prof.key_averages():
        dev = str(getattr(e, "device_type", ""))
        if dev.endswith("CUDA"):
            total_us += getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
    return total_us * 1e-6 / wall_s if wall_s > 0 else float("nan")


def cmd_blockstep(args) -> None:
    from torch.profiler import ProfilerActivity, profile
    import torch.nn.functional as F
    from pfedmoap.algorithms.training import Group, Recipe, StackedSGD
    from pfedmoap.clip.backbone import Backbone
    from pfedmoap.clip.prompt import PromptEncoder

    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("blockstep: --device cuda but torch.cuda.is_available() is False")
    bb = Backbone(args.model, pretrained="", device=args.device, precision=args.precision, seed=0)
    dev = bb.device
    D, bs, n_ctx = bb.embed_dim, 32, 16
    W = bb.model.token_embedding.weight.shape[1] if hasattr(bb.model, "token_embedding") \
        else bb.model.text.token_embedding.weight.shape[1]
    header(f"blockstep: {args.model} random init on {dev} ({args.precision}), C = {args.classes} classes, "
           f"batch {bs} per client, n_ctx {n_ctx}, truncate_eos {args.truncate}, shared_prefix {args.prefix}")
    names = [f"class {i}" for i in range(args.classes)]
    graphs = {"both": [False, True], "on": [True], "off": [False]}[args.cuda_graph] if cuda else [False]
    rows = []

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for graph in graphs:
        enc = PromptEncoder(bb, names, n_ctx, truncate=args.truncate, shared_prefix=args.prefix, cuda_graph=graph)
        for B in args.blocks:
            g = torch.Generator().manual_seed(B)
            ctx = (torch.randn(B, n_ctx, W, generator=g) * 0.02).to(dev).requires_grad_(True)
            x = F.normalize(torch.randn(B, bs, D, generator=g), dim=-1).to(dev)
            y = torch.randint(args.classes, (B, bs), generator=g).to(dev)
            opt = StackedSGD(Group([ctx], Recipe(lr=0.002, momentum=0.9, weight_decay=5e-4)), 1)
            opt.set_epochs([0] * B)
            active = [True] * B

            def step():
                text = enc.encode_block(ctx)
                logits = bb.logit_scale * torch.bmm(x, text.transpose(1, 2))
                loss = F.cross_entropy(logits.reshape(-1, args.classes), y.reshape(-1), reduction="none")
                opt.zero_grad()
                (loss.view(B, bs).mean(1)).sum().backward()
                opt.step(active)
            try:
                for _ in range(3):
                    step()
                sync()
                t, _ = timeit(lambda: (step(), sync()), args.repeats, 0)
                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                with profile(activities=acts) as prof:
                    t0 = time.perf_counter()
                    step()
                    sync()
                    wall = time.perf_counter() - t0
                ops = count_aten(prof)
                busy = busy_fraction(prof, wall) if cuda else float("nan")
            except Exception as e:       # e.g. out of memory at a large B: one line, the rest goes on
                print(f"  cuda_graph {str(graph):5} B {B:4d}: failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
                if cuda:
                    torch.cuda.empty_cache()
                continue
            row = {"model": args.model, "device": str(dev), "precision": args.precision, "cuda_graph": graph and enc.cuda_graph,
                   "B": B, "classes": args.classes, "ms_per_step": t * 1e3, "ms_per_client_step": t * 1e3 / B,
                   "aten_ops_per_step": ops, "aten_ops_per_client_step": ops / B, "gpu_busy": busy}
            rows.append(row)
            print(f"  cuda_graph {str(row['cuda_graph']):5} B {B:4d}: {row['ms_per_step']:9.2f} ms/step "
                  f"{row['ms_per_client_step']:8.3f} ms/client-step  {ops / B:9,.0f} aten ops/client-step"
                  + (f"  GPU busy {100 * busy:5.1f}%" if cuda else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(rows))


# ---------------------------------------------------------------------------- CLI

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("step", "memory", "round", "scale", "ops", "blockstep", "_round1", "_scale1"):
        s = sub.add_parser(name)
        s.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
        if name == "step":
            s.add_argument("--model", default="ViT-B-32")
            s.add_argument("--classes", type=lambda v: [int(x) for x in v.split(",")], default=[10, 100])
            s.add_argument("--repeats", type=int, default=5)
            s.add_argument("--ref-repeats", type=int, default=3, help="repeats of the slow reference-style paths")
            s.add_argument("--experts", type=int, default=10, help="K for the pFedMoAP step, local included")
            s.add_argument("--classname", default="class", help="class i is named '<classname> i'")
        if name == "memory":
            s.add_argument("--model", default="ViT-B-32")
            s.add_argument("--clients", type=int, default=1000)
            s.add_argument("--train-per-client", type=int, default=20)
            s.add_argument("--test-per-client", type=int, default=10)
        if name == "round":
            s.add_argument("--no-variants", action="store_true", help="only the run with every fast path")
        if name == "scale":
            s.add_argument("--router-only", action="store_true")
            s.add_argument("--clients", type=lambda v: [int(x) for x in v.split(",")], default=[100, 1000, 10000])
            s.add_argument("--ranks", type=lambda v: [int(x) for x in v.split(",")], default=[1, 3],
                           help="1: one process; R > 1: mpiexec -n R (rank 0 the server)")
        if name == "ops":
            s.add_argument("--blocks", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2, 4, 8])
            s.add_argument("--methods", type=lambda v: v.split(","), default=["local", "pfedmoap"])
            s.add_argument("--json", default="")
        if name == "blockstep":
            s.add_argument("--model", default="ViT-B-16")
            s.add_argument("--device", default="cuda")
            s.add_argument("--precision", default="bf16")
            s.add_argument("--classes", type=int, default=10)
            s.add_argument("--blocks", type=lambda v: [int(x) for x in v.split(",")], default=[1, 4, 16, 64])
            s.add_argument("--repeats", type=int, default=10)
            s.add_argument("--threads", type=int, default=1)
            s.add_argument("--cuda-graph", default="both", choices=["both", "on", "off"])
            s.add_argument("--truncate", type=lambda v: v.lower() in ("1", "true", "yes"), default=False,
                           help="run.truncate_eos (false: the GPU's faster setting, docs/gpu-figures.md)")
            s.add_argument("--prefix", type=lambda v: v.lower() in ("1", "true", "yes"), default=False,
                           help="run.shared_prefix")
            s.add_argument("--json", default="")
        if name in ("_round1", "_scale1"):
            s.add_argument("--out", required=True)
        if name == "_scale1":
            s.add_argument("--json", required=True)
    args = p.parse_args(argv)
    {"step": cmd_step, "memory": cmd_memory, "round": cmd_round, "scale": cmd_scale,
     "ops": cmd_ops, "blockstep": cmd_blockstep, "_round1": cmd_round1, "_scale1": cmd_scale1}[args.command](args)


if __name__ == "__main__":
    main()

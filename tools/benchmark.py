#!/usr/bin/env python
"""Performance harness for pfedmoap: prints figures, never asserts times.

    python tools/benchmark.py step   [--classes 10,100] [--repeats 3]
    python tools/benchmark.py memory [--clients 1000] [--model ViT-B-32]
    python tools/benchmark.py round  [--set key=value ...] [--no-variants]
    python tools/benchmark.py scale  [--set key=value ...] [--router-only]

step    one training step (batch 32, 16 context tokens, one torch thread) on a ViT-B-32-size
        random-init model: the reference-style step (image tower on the batch + full 77-token text
        encoding) against ours (cached image features + EOS truncation + shared prefix), each fast
        path on its own, and a pFedMoAP step split into text encoding, gating and optimiser step.
memory  per-client state beyond the shared backbone (ClientPart.state_vector) and the resident
        memory of one process hosting 1,000 pFedMoAP clients on a ViT-B-32-size backbone.
round   a configured scenario through the real round loop (federation.Federation with LocalComm):
        seconds per round by phase, peak memory, bytes per round against the payload minimum, and
        the speed-up of each fast path on the same run. Every variant runs in its own process.
scale   1,000 clients x 5 rounds on tiny-clip + synthetic data, and the server's router.route cost
        (knn, random) with 1,000 clients.

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
    method = algorithms.get("pfedmoap")(algorithms.Setup(cfg, args.clients, enc, bb, (cfg.prompt.n_ctx, W)))
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
        data[c] = algorithms.ClientData(torch.from_numpy(feats["train"][tr]), torch.from_numpy(ds.train.labels[tr]),
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
    experts = torch.nn.functional.normalize(torch.randn(cfg.moe.n_experts - 1, len(ds.classnames), D), dim=-1)
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
    fed = federation.Federation(cfg, comm.LocalComm(), log=lambda *a, **k: None)
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

SCALE_DEFAULTS = ["model.name=tiny-clip", "model.pretrained=", "data.dataset=synthetic", "data.n_clients=1000",
                  "data.n_train=20000", "data.n_test=10000", "data.partition=iid", "train.local_epochs=1",
                  "train.frac=0.1", "rounds=5", "run.threads=1", "algorithm=pfedmoap"]


def time_router(N: int, P: int, E: int) -> None:
    from pfedmoap import router
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(N, P)).astype(np.float32)
    in_pool = np.ones(N, bool)
    clients = np.arange(N)
    for method in ("knn", "random", "fixed"):
        t, _ = timeit(lambda: router.route(method, pool, in_pool, pool, clients, E, 1, 3), 5)
        print(f"  router.route({method!r:8}) N = {N:5d}, P = {P:5d}, {E} experts: {t * 1e3:8.1f} ms")
    if N <= 1000:   # the knn distance matrix alone, to separate it from the per-client selection loop
        q = pool.astype(np.float64)

        def dist():
            d = (q * q).sum(1)[:, None] + (q * q).sum(1)[None, :] - 2 * q @ q.T
            return np.argsort(d, axis=1, kind="stable")
        t, _ = timeit(dist, 5)
        print(f"    of which the batched distance matrix + argsort: {t * 1e3:8.1f} ms")


def cmd_scale(args) -> None:
    header("scale")
    torch.set_num_threads(1)
    print("server per-round work: router.route with 1,000 clients (one batched distance matrix for knn)")
    for N, P in ((1000, 16 * 64), (1000, 16 * 512), (2000, 16 * 512)):
        time_router(N, P, 9)
    if args.router_only:
        return
    sets = SCALE_DEFAULTS + args.sets
    tmp = Path(tempfile.mkdtemp(prefix="pfedmoap-scale-"))
    sets = [f"data.cache_dir={tmp / 'cache'}"] + sets
    print(f"\nscenario: {' '.join(sets)}")
    r = _subprocess_round(sets, str(tmp / "run"))
    print(f"total {r['total_s']:.1f} s (set-up incl. features {r['setup_s']:.1f} s) for {r['n_clients']} clients "
          f"x {r['rounds']} rounds; per round {r['wall_s_per_round']:.2f} s "
          f"({', '.join(f'{x:.2f}' for x in r['wall_s_rounds'])})")
    print_run("phases", r)
    print_bytes(r)


# ---------------------------------------------------------------------------- CLI

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("step", "memory", "round", "scale", "_round1"):
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
        if name == "_round1":
            s.add_argument("--out", required=True)
    args = p.parse_args(argv)
    {"step": cmd_step, "memory": cmd_memory, "round": cmd_round, "scale": cmd_scale,
     "_round1": cmd_round1}[args.command](args)


if __name__ == "__main__":
    main()

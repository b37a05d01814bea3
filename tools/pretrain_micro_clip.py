#!/usr/bin/env python
"""Pretrain the micro CLIP that ships in the package (`micro-clip`, tag `digits`).

    HF_HUB_OFFLINE=1 python tools/pretrain_micro_clip.py            # writes src/pfedmoap/weights/*
    python tools/pretrain_micro_clip.py --out-dir /tmp/mc            # somewhere else
    python tools/pretrain_micro_clip.py --check                      # rerun, compare with shipped

From scratch, with the CLIP contrastive loss, on the *pretraining half* of the embedded `digits`
data set (original domain only; light augmentation: random shifts of up to 2 pixels). Each image's
caption is drawn from `TEMPLATES` with its class name ("a handwritten seven."). Several images of a
batch share a class, so the symmetric image<->text cross-entropy uses label-aware targets: every
caption of the image's class is a positive (UniCL-style; with distinct classes it is plain CLIP).
Because the text transformer is causal, each distinct caption is encoded once per step, cut after
its end-of-text token (identical features to open_clip's `encode_text`, a fraction of the cost).

Deterministic for a seed and thread count (defaults: seed 0, 2 torch threads); on the same machine
and software, rerunning reproduces the shipped file bit for bit (`--check`). Writes the weights
(float16, only the token-embedding rows in use; see `pfedmoap.clip.micro`) and the metadata JSON
with the zero-shot accuracy per domain measured on the model as loaded from the written file.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from pfedmoap.clip import micro  # noqa: E402
from pfedmoap.data import digits  # noqa: E402

TEMPLATES = [
    "a photo of a {}.",
    "a photo of the digit {}.",
    "a handwritten {}.",
    "the number {}.",
    "a picture of the number {}.",
    "an image of a handwritten digit {}.",
    "the digit {}.",
    "a drawing of a {}.",
]
# Token rows kept besides those of the captions: common prompt-initialisation phrases and the
# placeholder words prompt learners tokenise before splicing learned context in.
EXTRA_WORDS = ["a photo of a", "a photo of the", "x", "X", "false", "False", "true", "digit",
               "number", "handwritten", "image", "picture", "of", "the", "a", "an", "."]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--max-shift", type=int, default=2)
    p.add_argument("--out-dir", type=Path, default=micro.WEIGHTS_FILE.parent)
    p.add_argument("--check", action="store_true",
                   help="train into a temporary folder and compare with the shipped files")
    return p.parse_args(argv)


def kept_token_ids(tokenizer) -> list[int]:
    texts = [t.format(c) for t in TEMPLATES for c in digits.CLASSNAMES]
    texts += [micro.HAND_TEMPLATE.format(c) for c in digits.CLASSNAMES] + EXTRA_WORDS
    toks = tokenizer(texts)
    return sorted(int(i) for i in torch.unique(toks) if int(i) != 0)


def encode_captions(model, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's `encode_text` on sequences cut after the longest end-of-text position."""
    eot = tokens.argmax(-1)
    n = int(eot.max()) + 1
    x = model.token_embedding(tokens[:, :n]) + model.positional_embedding[:n]
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    x = model.ln_final(x)
    x = x[torch.arange(len(tokens)), eot] @ model.text_projection
    return F.normalize(x, dim=-1)


def random_shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Shift each image (n, c, h, w) by up to max_shift pixels in each direction, zero (black) fill."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4)
    off = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=g)
    return torch.stack([pad[i, :, off[i, 0]:off[i, 0] + h, off[i, 1]:off[i, 1] + w] for i in range(n)])


def train(args) -> tuple[torch.nn.Module, list[int], dict]:
    import open_clip
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    micro.register_model_configs()
    model = open_clip.create_model(micro.MODEL_NAME, pretrained=None)
    tokenizer = open_clip.get_tokenizer(micro.MODEL_NAME)

    images, labels = digits.pretraining_half()
    # images_to_tensor normalises with the model's mean/std; black background = 0 before that, so
    # shift with the normalised value of black: shift first in [0,1] space, then normalise.
    raw = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(model.visual.image_mean)[:, None, None]
    std = torch.tensor(model.visual.image_std)[:, None, None]
    y = torch.as_tensor(labels)
    T = len(TEMPLATES)
    cap_tokens = tokenizer([t.format(c) for c in digits.CLASSNAMES for t in TEMPLATES])  # c*T + t

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    n = len(y)
    steps_per_epoch = math.ceil(n / args.batch_size)
    total = steps_per_epoch * args.epochs

    def lr_at(step):
        if step < args.warmup_steps:
            return args.lr * (step + 1) / args.warmup_steps
        t = (step - args.warmup_steps) / max(1, total - args.warmup_steps)
        return 0.5 * args.lr * (1 + math.cos(math.pi * t))

    g = torch.Generator().manual_seed(args.seed)
    model.train()
    step, t0, log = 0, time.time(), []
    for epoch in range(args.epochs):
        perm = torch.randperm(n, generator=g)
        tot_loss = 0.0
        for i in range(0, n, args.batch_size):
            idx = perm[i:i + args.batch_size]
            yb = y[idx]
            xb = (random_shift(raw[idx], args.max_shift, g) - mean) / std
            tb = torch.randint(0, T, (len(idx),), generator=g)
            # distinct captions of the batch, encoded once each
            cap_ids = yb * T + tb
            uniq, inv = torch.unique(cap_ids, return_inverse=True)
            for grp in opt.param_groups:
                grp["lr"] = lr_at(step)
            f_img = model.encode_image(xb, normalize=True)
            f_txt = encode_captions(model, cap_tokens[uniq])[inv]
            scale = model.logit_scale.exp()
            logits = scale * f_img @ f_txt.T
            pos = (yb[:, None] == yb[None, :]).float()
            target = pos / pos.sum(1, keepdim=True)
            loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            tot_loss += float(loss.detach()) * len(idx)
            step += 1
        log.append(round(tot_loss / n, 4))
        if epoch % 10 == 0 or epoch == args.epochs - 1:
            print(f"epoch {epoch:3d}  loss {tot_loss / n:.4f}  scale {float(model.logit_scale.detach().exp()):.1f}  "
                  f"{time.time() - t0:.0f}s", flush=True)
    model.eval()
    info = {"steps": step, "seconds": round(time.time() - t0, 1), "loss_per_epoch": log}
    return model, kept_token_ids(tokenizer), info


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(tempfile.mkdtemp()) if args.check else args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / micro.WEIGHTS_FILE.name
    meta_path = out_dir / micro.METADATA_FILE.name

    model, ids, info = train(args)
    torch.save(micro.pack_state_dict(model, ids), weights)

    # measure on the model exactly as users get it: loaded back from the written file
    loaded = micro.create_model()
    micro.load_shipped_weights(loaded, weights)
    pre_x, pre_y = digits.pretraining_half()
    zs_test = {d: round(a, 4) for d, a in digits.zero_shot_per_domain(loaded, "test").items()}
    zs_train = {d: round(a, 4) for d, a in digits.zero_shot_per_domain(loaded, "train").items()}
    zs_pre = round(micro.zero_shot_accuracy(loaded, pre_x, pre_y, digits.CLASSNAMES), 4)
    cfg = json.loads((micro.MODEL_CONFIG_DIR / f"{micro.MODEL_NAME}.json").read_text())
    meta = {
        "model": micro.MODEL_NAME,
        "tag": micro.TAG,
        "config": cfg,
        "weights_file": weights.name,
        "weights_sha256": micro.file_sha256(weights),
        "weights_format": "float16 state_dict; token_embedding.weight holds only the rows "
                          "`token_ids` (others are zero at load time)",
        "n_token_rows_kept": len(ids),
        "n_parameters_shipped": int(sum(v.numel() for v in micro.pack_state_dict(model, ids)
                                        ["state_dict"].values())),
        "seed": args.seed,
        "training": {
            "data": "digits pretraining half (original domain), "
                    f"{len(pre_y)} images, split seed {digits.SPLIT_SEED}",
            "loss": "CLIP symmetric contrastive, label-aware targets (same-class captions positive)",
            "templates": TEMPLATES,
            "augmentation": f"random shift up to {args.max_shift} px, black fill",
            "optimizer": "AdamW betas (0.9, 0.98), weight decay on matrices only",
            "lr": args.lr, "weight_decay": args.weight_decay, "warmup_steps": args.warmup_steps,
            "schedule": "linear warm-up, cosine", "epochs": args.epochs,
            "batch_size": args.batch_size, "torch_threads": args.threads, **info,
        },
        "zero_shot": {
            "template": micro.HAND_TEMPLATE,
            "test": zs_test,
            "train": zs_train,
            "pretraining_half": zs_pre,
        },
        "software": {"torch": torch.__version__, "python": platform.python_version(),
                     "open_clip": __import__("open_clip").__version__, "machine": platform.machine()},
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {weights} ({weights.stat().st_size / 1e6:.2f} MB) and {meta_path}")
    print("zero-shot test accuracy per domain:", json.dumps(zs_test))

    if args.check:
        shipped = json.loads(micro.METADATA_FILE.read_text())
        same = shipped["weights_sha256"] == meta["weights_sha256"]
        print("shipped weights reproduced bit for bit" if same else
              "weights differ from the shipped file (another machine or software version?); "
              f"shipped zero-shot {shipped['zero_shot']['test']}")
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The micro CLIP that ships inside the package: a small open_clip model, really pretrained.

`micro-clip` (model config `pfedmoap/model_configs/micro-clip.json`: 32x32 images, ViT 4 layers
width 128 patch 8, text transformer 3 layers width 128, embed dim 128) was pretrained from scratch by
`tools/pretrain_micro_clip.py` with the CLIP contrastive loss on the *pretraining half* of the
embedded `digits` data set (original domain only, captions from a few templates). It never saw the
federated half, which is the benchmark (`pfedmoap.data.digits`).

Weights file `pfedmoap/weights/micro-clip-digits.pt` (torch.save, loadable with weights_only=True):
    {"format": 1, "model": "micro-clip", "tag": "digits",
     "state_dict": {name: float16 tensor},   # every parameter and buffer of the open_clip model,
                                            # except that "token_embedding.weight" holds only
     "token_ids": int64 tensor (n,)}         # the rows of these token ids.
Only the token-embedding rows of the words the pretraining captions, the hand prompt and a few
prompt-initialisation words use are stored (the whole 49,408-row table would be 12 MB); every other
row is zero after loading. Those tokens were never trained, so nothing is lost. Parameters are
stored in half precision and loaded as float32.

Metadata `pfedmoap/weights/micro-clip-digits.json`: seed, config, training settings, the weights
file's sha256, and the zero-shot accuracy (hand prompt "a photo of a {}.") on the federated half's
test split per domain, measured on the model as loaded from the shipped file.
"""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

MODEL_NAME = "micro-clip"
TAG = "digits"
PACKAGE_DIR = Path(__file__).resolve().parent.parent
MODEL_CONFIG_DIR = PACKAGE_DIR / "model_configs"
WEIGHTS_FILE = PACKAGE_DIR / "weights" / f"{MODEL_NAME}-{TAG}.pt"
METADATA_FILE = PACKAGE_DIR / "weights" / f"{MODEL_NAME}-{TAG}.json"
HAND_TEMPLATE = "a photo of a {}."
FORMAT = 1

_registered = False


def register_model_configs() -> None:
    """Make open_clip know the package's model configs (`micro-clip`, ...). Idempotent."""
    global _registered
    if _registered:
        return
    import open_clip
    open_clip.add_model_config(MODEL_CONFIG_DIR)
    _registered = True


def create_model():
    """A `micro-clip` open_clip model with random init (eval mode, float32)."""
    import open_clip
    register_model_configs()
    model = open_clip.create_model(MODEL_NAME, pretrained=None)
    return model.eval()


def load_pretrained() -> torch.nn.Module:
    """`micro-clip` with the shipped weights loaded (eval mode, float32)."""
    model = create_model()
    load_shipped_weights(model)
    return model


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pack_state_dict(model: torch.nn.Module, token_ids) -> dict:
    """The shipped format (see the module doc) of `model`, keeping the token rows `token_ids`."""
    ids = torch.as_tensor(sorted({int(i) for i in token_ids}), dtype=torch.int64)
    sd = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if k == "token_embedding.weight":
            v = v[ids]
        sd[k] = v.to(torch.float16).clone() if v.is_floating_point() else v.clone()
    return {"format": FORMAT, "model": MODEL_NAME, "tag": TAG, "state_dict": sd, "token_ids": ids}


def load_shipped_weights(model: torch.nn.Module, path: str | Path | None = None) -> None:
    """Load the shipped weights (or a file in the same format) into a `micro-clip` model, in place.

    Token-embedding rows that the file does not hold are set to zero. Never touches the network.
    """
    path = WEIGHTS_FILE if path is None else Path(path)
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown micro CLIP weights format {blob.get('format')!r}")
    sd = dict(blob["state_dict"])
    ids = blob["token_ids"]
    own = model.state_dict()
    if own.get("token_embedding.weight") is None:
        raise ValueError(f"{path}: the model has no token embedding; build it from {MODEL_NAME!r}")
    emb = torch.zeros_like(own["token_embedding.weight"])
    emb[ids] = sd["token_embedding.weight"].to(emb.dtype)
    sd["token_embedding.weight"] = emb
    missing = set(own) - set(sd)
    unexpected = set(sd) - set(own)
    if missing or unexpected:
        raise ValueError(f"{path}: does not fit this model (missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}); build it from {MODEL_NAME!r}")
    sd = {k: v.to(own[k].dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True)


@lru_cache(maxsize=1)
def metadata() -> dict:
    """The shipped metadata (a fresh copy is not made: do not modify it)."""
    with open(METADATA_FILE) as f:
        return json.load(f)


def recorded_zero_shot() -> dict[str, float]:
    """Zero-shot accuracy ("a photo of a {}.") on the federated test split, per `digits` domain."""
    return dict(metadata()["zero_shot"]["test"])


# ---- evaluation helpers (used by the pretraining tool and the tests) -------------------------------

def images_to_tensor(images: np.ndarray, model: torch.nn.Module) -> torch.Tensor:
    """RGB uint8 (n, 32, 32, 3) -> normalised float tensor (n, 3, 32, 32).

    Identical to open_clip's eval preprocess for this model on 32x32 images (the resize and centre
    crop are no-ops there): x / 255, then the model's mean and std.
    """
    mean = torch.tensor(getattr(model.visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
    std = torch.tensor(getattr(model.visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - mean[:, None, None]) / std[:, None, None]


@torch.no_grad()
def class_text_features(model, classnames, template: str = HAND_TEMPLATE) -> torch.Tensor:
    import open_clip
    register_model_configs()
    tok = open_clip.get_tokenizer(MODEL_NAME)
    return model.encode_text(tok([template.format(c) for c in classnames]), normalize=True)


@torch.no_grad()
def zero_shot_accuracy(model, images: np.ndarray, labels: np.ndarray, classnames,
                       template: str = HAND_TEMPLATE, batch_size: int = 512) -> float:
    model.eval()
    t = class_text_features(model, classnames, template)
    correct = 0
    for i in range(0, len(labels), batch_size):
        f = model.encode_image(images_to_tensor(images[i:i + batch_size], model), normalize=True)
        correct += int((f @ t.T).argmax(-1).eq(torch.as_tensor(labels[i:i + batch_size])).sum())
    return correct / max(len(labels), 1)

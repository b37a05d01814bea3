"""The shipped micro CLIP: small, loads offline, and reproduces its recorded zero-shot accuracy."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from pfedmoap.clip import micro
from pfedmoap.data import digits


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return micro.load_pretrained()


def test_files_small_and_metadata_consistent():
    assert micro.WEIGHTS_FILE.stat().st_size < 5_000_000
    meta = micro.metadata()
    assert meta["model"] == micro.MODEL_NAME == "micro-clip" and meta["tag"] == micro.TAG == "digits"
    assert isinstance(meta["seed"], int)
    cfg = json.loads((micro.MODEL_CONFIG_DIR / "micro-clip.json").read_text())
    assert meta["config"] == cfg
    assert cfg["embed_dim"] % 128 == 0          # the gating network pools D to d = 128
    assert meta["weights_sha256"] == micro.file_sha256(micro.WEIGHTS_FILE)
    assert set(micro.recorded_zero_shot()) == set(digits.DOMAINS)


def test_register_model_configs_idempotent():
    import open_clip
    from open_clip import factory
    micro.register_model_configs()
    n = len(factory._MODEL_CONFIG_PATHS)
    micro.register_model_configs()
    assert len(factory._MODEL_CONFIG_PATHS) == n
    assert "micro-clip" in open_clip.list_models()
    tok = open_clip.get_tokenizer("micro-clip")
    assert tok(["a photo of a seven."]).shape == (1, 77)


def test_token_rows(model):
    blob = torch.load(micro.WEIGHTS_FILE, map_location="cpu", weights_only=True)
    ids = blob["token_ids"]
    emb = model.token_embedding.weight.detach()
    assert emb.dtype == torch.float32
    kept = torch.zeros(len(emb), dtype=torch.bool)
    kept[ids] = True
    assert (emb[~kept] == 0).all()
    assert (emb[kept].abs().sum(1) > 0).all()
    import open_clip
    tok = open_clip.get_tokenizer("micro-clip")
    used = tok([micro.HAND_TEMPLATE.format(c) for c in digits.CLASSNAMES] + ["a photo of a"])
    assert kept[used[used > 0]].all()


def test_preprocess_matches_open_clip(model):
    import open_clip
    x, _ = digits.federated_split("test", "noise")
    pre = open_clip.image_transform(32, is_train=False, mean=model.visual.image_mean,
                                    std=model.visual.image_std)
    from PIL import Image
    ref = torch.stack([pre(Image.fromarray(x[i])) for i in range(4)])
    assert torch.allclose(micro.images_to_tensor(x[:4], model), ref, atol=1e-6)


def test_zero_shot_matches_record(model):
    got = digits.zero_shot_per_domain(model, "test")
    rec = micro.recorded_zero_shot()
    n = len(digits.split_indices()["test"])
    for d in digits.DOMAINS:
        assert abs(got[d] - rec[d]) <= 2.5 / n, (d, got[d], rec[d])   # at most 2 images differ
    # a really pretrained model: strong on held-out originals, weaker under shift, above chance
    assert got["original"] >= 0.9
    assert all(0.15 < got[d] < got["original"] for d in digits.DOMAINS[1:])


def test_wrong_model_rejected():
    with pytest.raises(ValueError, match="micro-clip"):
        micro.load_shipped_weights(torch.nn.Linear(2, 2))

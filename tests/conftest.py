"""Shared fixtures: the tiny random-init CLIP that ships for tests, built once per session."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # nothing in the tests may touch the network

import pytest


@pytest.fixture(scope="session")
def tiny_backbone():
    """`tiny-clip` (embed_dim 128, text width 64), random init with a fixed seed, frozen."""
    import torch
    from pfedmoap.clip.backbone import Backbone
    # The tiny model's ops take microseconds; on a small shared machine intra-op threads only add
    # contention (measured: 10-50x slower per call with 2 threads under load).
    torch.set_num_threads(1)
    return Backbone("tiny-clip", pretrained="", seed=0)

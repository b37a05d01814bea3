"""`zeroshot`: the frozen CLIP with the hand prompt `prompt.template`; nothing trains or moves (method.py)."""
from __future__ import annotations

from .. import register
from ..manifest import Manifest

# one round: the frozen model is evaluated once
register(Manifest("zeroshot", "pfedmoap.algorithms.zeroshot.method:ZeroShot", label="ZS-CLIP", order=10,
                  quickstart=True, rounds=1, summary="the frozen CLIP with the hand prompt prompt.template"))

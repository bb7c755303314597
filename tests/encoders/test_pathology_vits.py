"""Published pathology tile encoders: tiny random checkpoints in exactly their authors'
folder layouts, loaded through the registry, embedding the bundled Kather tiles, and
compared with transformers' ViTModel / Dinov2Model / Dinov2WithRegistersModel on the same
weights (converted between layouts by hand here, independently of the loader)."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from healthfm.cli import main
from healthfm.datasets import data_path
from healthfm.encoders import describe, entries
from healthfm.encoders.pathology_vits import (
    HOPTIMUS_MEAN,
    HOPTIMUS_STD,
    SPECS,
    PathologyViT,
    timm_reference,
)
from healthfm.errors import ConfigError, ModelError
from healthfm.inference import load_embeddings
from healthfm.loader import load_encoder
from healthfm.pathology.source import TileSource, embed_tiles
from healthfm.pathology.tilesets import read_tile_set
from healthfm.pathology.tokenizer import unpatchify

transformers = pytest.importorskip("transformers")

DIM, DEPTH, HEADS = 48, 2, 4
KATHER = data_path("pathology", "kather2016_samples")
NAMES = ("phikon", "phikon-v2", "uni", "uni2-h", "h-optimus-0", "virchow2")


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn away from its init (layer scales of 1e-5 would hide a block)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "lambda1" in name:
                p.copy_(0.5 + 0.2 * noise)
            else:
                p.add_(0.1 * noise)
    return model.eval()


def _hub_state(model: torch.nn.Module, folder) -> dict:
    """The state dict as transformers publishes it (save_pretrained's hub key names)."""
    model.save_pretrained(folder)
    return load_file(str(folder / "model.safetensors"))


def _hf_blocks_to_timm(sd: dict, depth: int, swiglu: bool) -> dict:
    """Hub-layout DINOv2 encoder layers → timm's block names (q, k, v fused; the SwiGLU's
    packed ``weights_in`` is gate-first, as timm's SwiGLUPacked reads ``fc1``)."""
    out = {}
    for i in range(depth):
        s, d = f"encoder.layer.{i}.", f"blocks.{i}."
        a = s + "attention.attention."
        fc1, fc2 = ("weights_in", "weights_out") if swiglu else ("fc1", "fc2")
        for kind in ("weight", "bias"):
            out[d + f"attn.qkv.{kind}"] = torch.cat(
                [sd[a + f"{m}.{kind}"] for m in ("query", "key", "value")]
            )
            out[d + f"attn.proj.{kind}"] = sd[s + f"attention.output.dense.{kind}"]
            out[d + f"norm1.{kind}"] = sd[s + f"norm1.{kind}"]
            out[d + f"norm2.{kind}"] = sd[s + f"norm2.{kind}"]
            out[d + f"mlp.fc1.{kind}"] = sd[s + f"mlp.{fc1}.{kind}"]
            out[d + f"mlp.fc2.{kind}"] = sd[s + f"mlp.{fc2}.{kind}"]
        out[d + "ls1.gamma"] = sd[s + "layer_scale1.lambda1"]
        out[d + "ls2.gamma"] = sd[s + "layer_scale2.lambda1"]
    out["norm.weight"], out["norm.bias"] = sd["layernorm.weight"], sd["layernorm.bias"]
    out["patch_embed.proj.weight"] = sd["embeddings.patch_embeddings.projection.weight"]
    out["patch_embed.proj.bias"] = sd["embeddings.patch_embeddings.projection.bias"]
    return out


def _timm_keys(depth: int, reg: bool) -> set[str]:
    """The state-dict keys of timm's VisionTransformer (num_classes=0, layer scale)."""
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    keys |= {"norm.weight", "norm.bias"} | ({"reg_token"} if reg else set())
    for i in range(depth):
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{m}.weight", f"blocks.{i}.{m}.bias"}
        keys |= {f"blocks.{i}.ls1.gamma", f"blocks.{i}.ls2.gamma"}
    return keys


def _timm_config(arch: str, model_args: dict, mean, std) -> dict:
    """A timm hub config.json (the layout of the MahmoodLab / paige-ai / bioptimus repos)."""
    return {
        "architecture": arch,
        "num_classes": 0,
        "num_features": DIM,
        "global_pool": model_args.get("global_pool", "token"),
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [3, 224, 224],
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "mean": list(mean),
            "std": list(std),
            "num_classes": 0,
        },
    }


def _write_timm(folder, state: dict, config: dict, bin_file: bool = True) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    if bin_file:
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")


def _reduced(args: dict) -> dict:
    return {**args, "embed_dim": DIM, "depth": DEPTH, "num_heads": HEADS}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each entry's folder, and the transformers model the same weights define."""
    root = tmp_path_factory.mktemp("published_pathology")
    refs: dict[str, tuple] = {}
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

    # Phikon: a transformers ViTModel folder (save_pretrained writes config + safetensors).
    cfg = transformers.ViTConfig(
        hidden_size=DIM,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        intermediate_size=4 * DIM,
        image_size=224,
        patch_size=16,
    )
    torch.manual_seed(0)
    vit = _perturb(transformers.ViTModel(cfg), 1)
    vit.save_pretrained(root / "phikon")
    refs["phikon"] = (root / "phikon", vit, 1)

    # Phikon-v2: a Dinov2Model folder (ViT-L/16 layout: layer scale, no registers).
    d2cfg = transformers.Dinov2Config(
        hidden_size=DIM,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        mlp_ratio=4,
        image_size=224,
        patch_size=16,
        layerscale_value=1e-5,
    )
    torch.manual_seed(2)
    dinov2 = _perturb(transformers.Dinov2Model(d2cfg), 3)
    dinov2.save_pretrained(root / "phikon-v2")
    refs["phikon-v2"] = (root / "phikon-v2", dinov2, 1)

    # UNI: timm vit_large_patch16_224 + init_values (= Dinov2Model's layout under timm
    # names: position table covers the class token, GELU MLP).
    torch.manual_seed(4)
    uni_ref = _perturb(transformers.Dinov2Model(d2cfg), 5)
    sd = _hub_state(uni_ref, root / "hub-uni")
    state = _hf_blocks_to_timm(sd, DEPTH, swiglu=False)
    state["cls_token"] = sd["embeddings.cls_token"]
    state["pos_embed"] = sd["embeddings.position_embeddings"]
    assert set(state) == _timm_keys(DEPTH, reg=False)
    args = {
        "img_size": 224,
        "patch_size": 16,
        "init_values": 1e-5,
        "num_classes": 0,
        "dynamic_img_size": True,
    }
    _write_timm(
        root / "uni", state, _timm_config("vit_large_patch16_224", _reduced(args), *imagenet)
    )
    refs["uni"] = (root / "uni", uni_ref, 1)

    # UNI2-h and H-optimus-0: registers after the class token, positions on the patches
    # only (no_embed_class), packed SwiGLU = Dinov2WithRegisters' SwiGLU FFN.
    for name, n_reg, arch, mlp_ratio, norm, seed in (
        ("uni2-h", 8, "vit_giant_patch14_224", 2.66667 * 2, imagenet, 6),
        ("h-optimus-0", 4, "vit_giant_patch14_reg4_dinov2", None, (HOPTIMUS_MEAN, HOPTIMUS_STD), 8),
    ):
        rcfg = transformers.Dinov2WithRegistersConfig(
            hidden_size=DIM,
            num_hidden_layers=DEPTH,
            num_attention_heads=HEADS,
            mlp_ratio=4,
            image_size=224,
            patch_size=14,
            num_register_tokens=n_reg,
            use_swiglu_ffn=True,
        )
        torch.manual_seed(seed)
        ref = _perturb(transformers.Dinov2WithRegistersModel(rcfg), seed + 1)
        sd = _hub_state(ref, root / f"hub-{name}")
        state = _hf_blocks_to_timm(sd, DEPTH, swiglu=True)
        pos = sd["embeddings.position_embeddings"]
        state["cls_token"] = sd["embeddings.cls_token"] + pos[:, :1]
        state["pos_embed"] = pos[:, 1:].clone()
        state["reg_token"] = sd["embeddings.register_tokens"]
        assert set(state) == _timm_keys(DEPTH, reg=True)
        assert state["blocks.0.mlp.fc1.weight"].shape == (256, DIM)  # int(48 * 5.33334)
        if name == "uni2-h":
            args = {
                "img_size": 224,
                "patch_size": 14,
                "init_values": 1e-5,
                "mlp_ratio": mlp_ratio,
                "num_classes": 0,
                "no_embed_class": True,
                "reg_tokens": 8,
                "dynamic_img_size": True,
            }
        else:
            args = {"num_classes": 0, "img_size": 224, "global_pool": "token", "init_values": 1e-5}
        _write_timm(
            root / name, state, _timm_config(arch, _reduced(args), *norm), bin_file=name == "uni2-h"
        )
        refs[name] = (root / name, ref, 1 + n_reg)

    # Virchow2: 4 registers whose positions ARE in the table (vit_huge_patch14_224's
    # original layout). The same network as Dinov2WithRegisters when the register
    # positions r are folded out of the register tokens: (reg - r) + r.
    rcfg = transformers.Dinov2WithRegistersConfig(
        hidden_size=DIM,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        mlp_ratio=4,
        image_size=224,
        patch_size=14,
        num_register_tokens=4,
        use_swiglu_ffn=True,
    )
    torch.manual_seed(10)
    ref = _perturb(transformers.Dinov2WithRegistersModel(rcfg), 11)
    sd = _hub_state(ref, root / "hub-virchow2")
    state = _hf_blocks_to_timm(sd, DEPTH, swiglu=True)
    pos = sd["embeddings.position_embeddings"]
    r = 0.3 * torch.randn(1, 4, DIM, generator=torch.Generator().manual_seed(12))
    state["cls_token"] = sd["embeddings.cls_token"]
    state["reg_token"] = sd["embeddings.register_tokens"] - r
    state["pos_embed"] = torch.cat([pos[:, :1], r, pos[:, 1:]], dim=1)  # 1 + 4 + 256
    assert set(state) == _timm_keys(DEPTH, reg=True)
    args = {
        "img_size": 224,
        "init_values": 1e-5,
        "num_classes": 0,
        "reg_tokens": 4,
        "mlp_ratio": 5.3375,
        "global_pool": "",
        "dynamic_img_size": True,
    }
    _write_timm(
        root / "virchow2", state, _timm_config("vit_huge_patch14_224", _reduced(args), *imagenet)
    )
    refs["virchow2"] = (root / "virchow2", ref, 5)
    return refs


@pytest.fixture(scope="module")
def tiles():
    return read_tile_set(KATHER)


def _load(name: str, folders) -> PathologyViT:
    enc = load_encoder(f"{name}:{folders[name][0]}", modality="pathology")
    assert isinstance(enc, PathologyViT)
    return enc


def test_entries_are_listed_with_licences():
    known = entries()
    for name in NAMES:
        e = known[name]
        assert e.modality == "pathology" and e.licence and e.source.startswith("https://")
        assert e.loader is not None
    assert known["uni"].gated and known["virchow2"].gated and not known["h-optimus-0"].gated
    assert known["h-optimus-0"].licence == "Apache-2.0"
    assert known["virchow2"].dim == 2560


@pytest.mark.parametrize("name", NAMES)
def test_matches_transformers_on_real_tiles(name, folders, tiles):
    """The native ViT reading the authors' layout == transformers on the same weights."""
    enc = _load(name, folders)
    _, ref, prefix = folders[name]
    raw = tiles.load(np.arange(8), enc.tokenizer.image_size)
    batch = enc.tokenizer.encode_tiles(raw)
    pixels = unpatchify(batch["inputs"][:, 1:], enc.tokenizer.patch_size)
    with torch.no_grad():
        ours = enc.forward_features(batch)
        hidden = ref(pixel_values=pixels).last_hidden_state
        assert ours.shape == hidden.shape
        torch.testing.assert_close(ours, hidden, atol=1e-5, rtol=0)
        want = hidden[:, 0]
        if name == "virchow2":  # CLS ⊕ mean of patch tokens (registers 1-4 excluded)
            want = torch.cat([hidden[:, 0], hidden[:, prefix:].mean(1)], dim=-1)
        torch.testing.assert_close(enc.embed(batch), want, atol=1e-5, rtol=0)
        # The image path (a strided conv) and the patch path (a linear map) agree.
        torch.testing.assert_close(enc.vit(pixels), ours, atol=1e-5, rtol=0)
    norm = (
        (HOPTIMUS_MEAN, HOPTIMUS_STD)
        if name == "h-optimus-0"
        else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    )
    assert enc.tokenizer.mean == norm[0] and enc.tokenizer.std == norm[1]
    assert enc.tokenizer.patch_size == (16 if name in ("phikon", "phikon-v2", "uni") else 14)


@pytest.mark.parametrize("name", ["phikon", "phikon-v2"])
def test_position_interpolation_matches_transformers(name, folders, tiles):
    """Another input size resamples the position table as transformers does."""
    enc = _load(name, folders)
    _, ref, _ = folders[name]
    images = tiles.load(np.arange(2), 160).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        ours = enc.vit(images)
        hidden = ref(pixel_values=images, interpolate_pos_encoding=True).last_hidden_state
    assert ours.shape == (2, 1 + 100, DIM)
    torch.testing.assert_close(ours, hidden, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_embeds_bundled_tiles_deterministically(name, folders, tiles):
    enc = _load(name, folders)
    source = TileSource(tiles, enc.tokenizer, augment=False, cache=False)
    a = embed_tiles(enc, source, batch_size=10)
    b = embed_tiles(enc, source, batch_size=7)
    assert a.shape == (24, enc.dim) and np.isfinite(a).all()
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert np.unique(a.round(5), axis=0).shape[0] == 24  # every tile its own vector
    # The embedding moves with the input: a flipped tile is another vector.
    raw = tiles.load(np.arange(2), enc.tokenizer.image_size)
    with torch.no_grad():
        plain = enc.embed(enc.tokenizer.encode_tiles(raw))
        flipped = enc.embed(enc.tokenizer.encode_tiles(raw.flip(2).contiguous()))
    assert (plain - flipped).abs().max() > 1e-3
    d = describe(enc)
    assert d["modality"] == "pathology" and len(d["model_hash"]) == 64


def test_preprocessor_config_resize_crop_and_normalisation(folders, tiles, tmp_path):
    """A transformers folder's preprocessor_config.json says how tiles are prepared:
    DINOv2's BitImageProcessor resizes to 256 and center-crops 224."""
    import shutil

    folder = tmp_path / "phikon-v2"
    shutil.copytree(folders["phikon-v2"][0], folder)
    mean, std = [0.5, 0.6, 0.7], [0.2, 0.25, 0.3]
    processor = {
        "image_processor_type": "BitImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": 256},
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
        "do_normalize": True,
        "image_mean": mean,
        "image_std": std,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    enc = load_encoder(f"phikon-v2:{folder}")
    tok = enc.tokenizer
    assert type(tok).__name__ == "CroppedPatchTokenizer"
    assert (tok.image_size, tok.crop_size, tok.n_tokens) == (256, 224, 197)
    assert tok.mean == tuple(mean) and tok.std == tuple(std)
    source = TileSource(tiles, tok, augment=False, cache=False)
    batch = source.batch(np.arange(3))
    assert batch["inputs"].shape == (3, 197, 16 * 16 * 3)
    # The patches are the normalised centre 224 of the 256-px tile.
    images = tok.to_float(tiles.load(np.arange(3), 256))[..., 16:240, 16:240]
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(unpatchify(batch["inputs"][:, 1:], 16), (images - m) / s)
    assert embed_tiles(enc, source, batch_size=8).shape == (24, DIM)
    # A ViTImageProcessor (Phikon's) resizes straight to 224: no crop.
    processor.update(size={"height": 224, "width": 224}, do_center_crop=False)
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    tok = load_encoder(f"phikon-v2:{folder}").tokenizer
    assert type(tok).__name__ == "PatchTokenizer" and tok.image_size == 224
    processor.update(size={"height": 224, "width": 200})
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    with pytest.raises(ModelError, match="not a square size"):
        load_encoder(f"phikon-v2:{folder}")


def test_h_optimus_checkpoint_pth(folders, tiles, tmp_path):
    """Bioptimus also distribute a bare ``checkpoint.pth`` (the same timm state dict)."""
    src = folders["h-optimus-0"][0]
    folder = tmp_path / "hopt"
    folder.mkdir()
    (folder / "config.json").write_text((src / "config.json").read_text())
    torch.save(load_file(str(src / "model.safetensors")), folder / "checkpoint.pth")
    batch = _load("h-optimus-0", folders).tokenizer.encode_tiles(tiles.load(np.arange(2), 224))
    with torch.no_grad():
        torch.testing.assert_close(
            load_encoder(f"h-optimus-0:{folder}").embed(batch),
            _load("h-optimus-0", folders).embed(batch),
        )


def test_bf16_embedding_follows_fp32(folders, tiles):
    enc = _load("h-optimus-0", folders)
    source = TileSource(tiles, enc.tokenizer, augment=False, cache=False)
    full = embed_tiles(enc, source, batch_size=12)
    half = embed_tiles(enc, source, batch_size=12, bf16=True)
    cos = (full * half).sum(1) / np.linalg.norm(full, axis=1) / np.linalg.norm(half, axis=1)
    assert cos.min() > 0.98


def test_poolings_and_untrained_control(folders, tiles):
    enc = _load("virchow2", folders)
    batch = enc.tokenizer.encode_tiles(tiles.load(np.arange(3), 224))
    with torch.no_grad():
        both = enc.embed(batch)
        tokens = enc.forward_features(batch)  # CLS, 4 registers, 256 patches
        assert tokens.shape == (3, 1 + 4 + 256, DIM)
        torch.testing.assert_close(both, torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], -1))
        uni = _load("uni", folders)
        uni_batch = uni.tokenizer.encode_tiles(tiles.load(np.arange(3), 224))
        torch.testing.assert_close(
            uni.embed(uni_batch, "mean"), uni.forward_features(uni_batch)[:, 1:].mean(1)
        )
        fresh = enc.untrained(0)
        assert fresh.dim == enc.dim and (fresh.embed(batch) - both).abs().max() > 1e-3
        torch.testing.assert_close(fresh.embed(batch), enc.untrained(0).embed(batch))
    with pytest.raises(ConfigError, match="pools by"):
        uni.embed(uni_batch, "last")
    with pytest.raises(ConfigError, match=r"pools by cls\+mean"):
        enc.embed(batch, "cls")


def test_cli_embed_tiles_and_evaluate(folders, tmp_path):
    out = tmp_path / "emb"
    assert main(["embed", f"uni:{folders['uni'][0]}", str(KATHER), "--out", str(out)]) == 0
    keys, emb = load_embeddings(out / "embeddings.parquet")
    assert emb.shape == (24, DIM) and len(set(keys)) == 24
    res = tmp_path / "eval"
    argv = ["evaluate", f"phikon:{folders['phikon'][0]}", str(KATHER), "--out", str(res)]
    assert main([*argv, "--seeds", "0", "--n-boot", "20"]) == 0
    rows = json.loads((res / "results.json").read_text())
    ours = [r for r in rows if not r["is_baseline"]]
    assert ours and all(r["method"].startswith("phikon-") for r in ours)
    assert len({r["n_test"] for r in rows}) == 1  # same test tiles as the baselines


def test_cli_evaluates_several_published_models_side_by_side(folders, tmp_path):
    res = tmp_path / "side"
    argv = ["evaluate", "--model", f"phikon:{folders['phikon'][0]}"]
    argv += ["--model", f"virchow2:{folders['virchow2'][0]}", str(KATHER), "--out", str(res)]
    assert main([*argv, "--seeds", "0", "--n-boot", "20"]) == 0
    rows = json.loads((res / "results.json").read_text())
    methods = {r["method"] for r in rows if not r["is_baseline"]}
    assert any(m.startswith("phikon-") for m in methods)
    assert any(m.startswith("virchow2-") for m in methods)
    assert len({r["n_test"] for r in rows}) == 1  # the same test tiles for every model


def test_cli_embeds_a_slide_into_trident_hdf5(folders, tmp_path):
    svs = data_path("pathology", "CMU-1-Small-Region.svs")
    out = tmp_path / "feats"
    argv = ["embed", f"virchow2:{folders['virchow2'][0]}", str(svs), "--out", str(out)]
    assert main([*argv, "--mpp", "2.0", "--size", "112"]) == 0
    with h5py.File(out / "CMU-1-Small-Region.h5", "r") as h5:
        feats = h5["features"][:]
        assert feats.shape == (h5["coords"].shape[0], 2 * DIM)
        assert h5["features"].attrs["pooling"] == "cls+mean"
    assert np.isfinite(feats).all() and feats.std(0).mean() > 0


@pytest.mark.parametrize("name", ["uni", "uni2-h", "h-optimus-0", "virchow2"])
def test_timm_back_end_where_it_imports(name, folders, tiles):
    """timm's own VisionTransformer on the same folder; without timm, a one-line error."""
    try:
        import timm  # noqa: F401
    except Exception:
        with pytest.raises(ConfigError, match=r"healthfm\[timm\]"):
            timm_reference(folders[name][0], SPECS[name])
        return
    enc = _load(name, folders)
    ref = timm_reference(folders[name][0], SPECS[name])
    batch = enc.tokenizer.encode_tiles(tiles.load(np.arange(4), 224))
    pixels = unpatchify(batch["inputs"][:, 1:], enc.tokenizer.patch_size)
    with torch.no_grad():
        torch.testing.assert_close(
            enc.forward_features(batch), ref.forward_features(pixels), atol=1e-5, rtol=0
        )


# ------------------------------------------------------------------------------ errors


def test_mis_shaped_tensor_is_named(folders, tmp_path):
    src = folders["uni2-h"][0]
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    state["blocks.1.mlp.fc2.weight"] = state["blocks.1.mlp.fc2.weight"][:, :-2].clone()
    bad = tmp_path / "bad"
    _write_timm(bad, state, json.loads((src / "config.json").read_text()))
    with pytest.raises(ModelError, match=r"mis-shaped: blocks\.1\.mlp\.fc2\.weight") as err:
        load_encoder(f"uni2-h:{bad}")
    assert "pytorch_model.bin" in str(err.value)


@pytest.mark.parametrize(
    ("entry", "folder", "message"),
    [
        ("uni", "phikon", "not one"),  # a transformers folder is not timm-format
        ("phikon", "uni", "model_type"),  # a timm folder is not a ViTModel folder
        ("phikon-v2", "phikon", "model_type"),  # a ViTModel is not a Dinov2Model
        ("uni", "uni2-h", "patch_size=14"),  # ViT-H/14 with registers: not UNI
        ("virchow2", "h-optimus-0", "no_embed_class=True"),  # positions on patches only
        ("uni2-h", "h-optimus-0", "mis-shaped: reg_token"),  # 4 registers, not 8
    ],
)
def test_folder_of_another_model_is_refused(entry, folder, message, folders):
    with pytest.raises(ModelError, match=message):
        load_encoder(f"{entry}:{folders[folder][0]}")


def test_unsupported_timm_arguments_are_named(folders, tmp_path):
    import shutil

    folder = tmp_path / "uni"
    shutil.copytree(folders["uni"][0], folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_args"].update(drop_path_rate=0.1, pre_norm=False)  # harmless at inference
    (folder / "config.json").write_text(json.dumps(config))
    assert load_encoder(f"uni:{folder}").dim == DIM
    config["model_args"]["qk_norm"] = True
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"not supported by the native ViT: \['qk_norm'\]"):
        load_encoder(f"uni:{folder}")


def test_missing_folder_and_weights(folders, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_encoder(f"uni:{tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((folders["uni"][0] / "config.json").read_text())
    with pytest.raises(ModelError, match=r"none of model\.safetensors, pytorch_model\.bin"):
        load_encoder(f"uni:{tmp_path / 'empty'}")


class _Exploit:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


def test_malicious_pickle_is_refused(folders, tmp_path):
    bad = tmp_path / "evil"
    marker = tmp_path / "was-run"
    bad.mkdir()
    (bad / "config.json").write_text((folders["uni"][0] / "config.json").read_text())
    torch.save({"cls_token": _Exploit(str(marker))}, bad / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"wants to run code.*refused"):
        load_encoder(f"uni:{bad}")
    assert not marker.exists()

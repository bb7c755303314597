"""Patch tokens, H&E augmentations, the MAE objective and exact resume of tile pretraining."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from healthfm.model.config import ModelConfig
from healthfm.model.heads import FoundationModel
from healthfm.pathology import MODALITY, TileSource
from healthfm.pathology.mae import encode_visible, mae_prepare
from healthfm.pathology.tokenizer import (
    CLS_ID,
    PATCH_ID,
    PatchTokenizer,
    augment_images,
    hed_jitter,
    patchify,
    unpatchify,
)
from healthfm.stages.pretrain import pretrain
from healthfm.tokenizer import tokenizer_from_dict
from healthfm.train.trainer import TrainConfig

pretrain_tiles = partial(pretrain, "pathology")


def _tiny_mae(tok: PatchTokenizer) -> FoundationModel:
    torch.manual_seed(0)
    config = ModelConfig(
        modality="pathology",
        vocab_size=tok.vocab_size,
        d_model=64,
        n_layers=2,
        n_heads=2,
        d_ff=128,
        max_len=tok.n_tokens,
        objective="mae",
        input_dim=tok.input_dim,
    )
    return FoundationModel(config)


def test_patchify_roundtrip_and_order():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    p = patchify(x, 4)
    assert p.shape == (2, 4, 48)
    # Patch 1 is the top-right 4×4 block (raster order), channels last within a pixel.
    assert torch.equal(p[0, 1].reshape(4, 4, 3)[..., 0], x[0, 0, :4, 4:])
    assert torch.equal(unpatchify(p, 4), x)


def test_tokenizer_batch_and_json(kather):
    tok = PatchTokenizer(32, 8)
    samples = MODALITY.read(kather, {})
    batch = tok.encode_tiles(samples.payload.load(np.arange(4), 150))
    assert batch["ids"].shape == (4, 17) and batch["inputs"].shape == (4, 17, 192)
    assert (batch["ids"][:, 0] == CLS_ID).all() and (batch["ids"][:, 1:] == PATCH_ID).all()
    assert (batch["inputs"][:, 0] == 0).all() and batch["attention_mask"].all()
    back = tokenizer_from_dict(tok.to_dict())
    assert isinstance(back, PatchTokenizer) and back.hash == tok.hash
    with pytest.raises(Exception, match="divide"):
        PatchTokenizer(30, 8)


def test_augmentations_reproducible_and_dihedral(kather):
    samples = MODALITY.read(kather, {})
    images = PatchTokenizer(64, 16).to_float(samples.payload.load(np.arange(6), 64))
    a = augment_images(images, torch.Generator().manual_seed(3))
    b = augment_images(images, torch.Generator().manual_seed(3))
    c = augment_images(images, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Without colour jitter every output is one of the 8 flips/rotations of its input.
    geo = augment_images(images, torch.Generator().manual_seed(5), hed=0, brightness=0, contrast=0)
    for img, out in zip(images, geo, strict=True):
        variants = [torch.rot90(v, k, dims=(-2, -1)) for v in (img, img.flip(-1)) for k in range(4)]
        assert any(torch.equal(out, v) for v in variants)


def test_hed_jitter_identity_and_effect(kather):
    samples = MODALITY.read(kather, {})
    images = PatchTokenizer(32, 8).to_float(samples.payload.load(np.arange(4), 32)).double()
    same = hed_jitter(images, torch.Generator().manual_seed(0), sigma=0.0, bias=0.0)
    # Pixels darker than 1/255 are clamped before the log; the rest round-trip.
    assert torch.allclose(same, images.clamp(min=1 / 255), atol=1e-6)
    moved = hed_jitter(images, torch.Generator().manual_seed(0), sigma=0.2, bias=0.05)
    assert (moved - images).abs().mean() > 0.005


def test_mae_mask_is_generator_driven():
    tok = PatchTokenizer(32, 8)
    batch = tok.encode_images(torch.rand(3, 3, 32, 32))
    a = mae_prepare(batch, torch.Generator().manual_seed(0), tok.vocab_size, 0.75)
    b = mae_prepare(batch, torch.Generator().manual_seed(0), tok.vocab_size, 0.75)
    assert torch.equal(a["mae_keep"], b["mae_keep"])
    assert a["mae_keep"].shape == (3, 4) and (a["mae_hidden"].sum(1) == 12).all()
    assert not a["mae_hidden"][:, 0].any()
    rows = torch.arange(3)[:, None]
    assert not a["mae_hidden"][rows, a["mae_keep"]].any()


def test_visible_encoding_keeps_positions():
    """Encoding all patches through the MAE path equals the plain backbone forward."""
    tok = PatchTokenizer(32, 8)
    model = _tiny_mae(tok).eval()
    batch = tok.encode_images(torch.rand(2, 3, 32, 32))
    keep = torch.arange(1, 17).expand(2, -1)
    with torch.no_grad():
        assert torch.allclose(
            encode_visible(model, batch, keep), model.forward_batch(batch), atol=1e-5
        )


def test_mae_learns_on_real_tiles(kather):
    tok = PatchTokenizer(32, 8)
    samples = MODALITY.read(kather, {})
    source = TileSource(samples.payload, tok, augment=False)
    model = _tiny_mae(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = mae_prepare(
        source.batch(np.arange(24)), torch.Generator().manual_seed(0), tok.vocab_size, 0.75
    )
    first = None
    for _ in range(30):
        loss, n = model.pretraining_loss(batch)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert n == 24 * 12
    assert float(loss.detach()) < 0.8 * first


def test_pretrain_resume_is_exact(kather, tmp_path):
    opts = {"image_size": 32, "patch_size": 8}
    cfg = TrainConfig(
        steps=4,
        batch_size=8,
        lr=1e-3,
        warmup_steps=1,
        eval_every=2,
        checkpoint_every=2,
        log_every=1,
        seed=0,
    )
    over = {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64}
    full = pretrain_tiles(kather, tmp_path / "full", opts, train_config=cfg, model_overrides=over)
    part = tmp_path / "part"
    pretrain_tiles(kather, part, opts, train_config=cfg, model_overrides=over, stop_at=2)
    assert not part.exists()  # stopped early: no model folder yet
    pretrain_tiles(kather, part, opts, train_config=cfg, model_overrides=over, resume=True)
    a, b = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (full / "tokenizer.json").exists()


def test_too_few_tiles_for_a_batch(kather, tmp_path):
    with pytest.raises(Exception, match="fewer than one batch"):
        pretrain_tiles(
            kather,
            tmp_path / "m",
            {"image_size": 32, "patch_size": 8},
            train_config=TrainConfig(steps=1, batch_size=64),
        )

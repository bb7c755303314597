"""``NAME:owner/repo`` and a cache repo folder load a published model from the local
Hugging Face cache, offline, without downloading."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import transformers

from healthfm.datasets import data_path
from healthfm.encoders.base import resolve_folder
from healthfm.errors import ModelError
from healthfm.loader import load_encoder
from healthfm.pathology.tilesets import read_tile_set

KATHER = data_path("pathology", "kather2016_samples")

REVISION = "0123456789abcdef0123456789abcdef01234567"


def _cache(root, repo: str, folder) -> None:
    """The hub cache's layout: blobs, refs/main, snapshots/<rev>/<file> -> ../../blobs/<x>."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(REVISION)
    snap = repo_dir / "snapshots" / REVISION
    snap.mkdir(parents=True)
    (repo_dir / "blobs").mkdir()
    for i, f in enumerate(sorted(folder.iterdir())):
        blob = repo_dir / "blobs" / f"blob{i}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(f"../../blobs/blob{i}")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cfg = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=224,
        patch_size=16,
    )
    torch.manual_seed(0)
    published = tmp_path / "published"
    transformers.ViTModel(cfg).save_pretrained(published)
    cache = tmp_path / "hf" / "hub"
    _cache(cache, "owkin/phikon", published)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return published, cache


def test_hub_id_and_cache_folder_load_the_published_model(hub):
    published, cache = hub
    tiles = read_tile_set(KATHER)
    direct = load_encoder(f"phikon:{published}", modality="pathology")
    by_id = load_encoder("phikon:owkin/phikon", modality="pathology")
    folder = cache / "models--owkin--phikon"
    by_folder = load_encoder(f"phikon:{folder}", modality="pathology")
    assert resolve_folder("owkin/phikon") == folder / "snapshots" / REVISION
    assert resolve_folder(folder) == folder / "snapshots" / REVISION
    raw = tiles.load(np.arange(2), direct.tokenizer.image_size)
    with torch.no_grad():
        want = direct.embed(direct.tokenizer.encode_tiles(raw))
        for enc in (by_id, by_folder):
            assert torch.equal(enc.embed(enc.tokenizer.encode_tiles(raw)), want)
            assert enc.model_hash == direct.model_hash


def test_hub_cache_env_and_missing_models(hub, tmp_path, monkeypatch):
    published, _ = hub
    # HF_HUB_CACHE wins over HF_HOME, read when the model is loaded.
    other = tmp_path / "elsewhere"
    _cache(other, "owkin/phikon", published)
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    assert (
        resolve_folder("owkin/phikon") == other / "models--owkin--phikon" / "snapshots" / REVISION
    )
    with pytest.raises(
        ModelError, match=r"nor in the local Hugging Face cache .*`hf download owkin/phikon-v2`"
    ):
        load_encoder("phikon-v2:owkin/phikon-v2")
    # A folder is a folder; a relative path that is not an id is left to the loader.
    assert resolve_folder(published) == published
    assert resolve_folder(tmp_path / "no" / "such" / "dir") == tmp_path / "no" / "such" / "dir"

"""Embedding batches: a token budget, and packed rows that give exactly the padded result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from healthfm.datasets import promoters
from healthfm.errors import ConfigError
from healthfm.inference import embed_store, token_budget_batches
from healthfm.modality import get_modality
from healthfm.model.config import ModelConfig
from healthfm.model.heads import FoundationModel

PBMC = "src/healthfm/data/singlecell/pbmc68k_counts.h5ad"
MEDS = "src/healthfm/data/ehr/clinosim_meds"


def test_token_budget_batches_cover_every_sample_once_within_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 500, size=997)
    batches = token_budget_batches(lengths, batch_size=64, max_tokens=4096)
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(997))
    for b in batches:
        assert len(b) <= 64
        assert len(b) == 1 or lengths[b].max() * len(b) <= 4096
    # Shortest first: short samples share big batches, long ones small.
    assert len(batches[0]) == 64 and len(batches[-1]) < 16
    assert [len(b) for b in token_budget_batches(lengths, 10, None)][:3] == [10, 10, 10]
    # A sample longer than the budget still runs, alone.
    assert [len(b) for b in token_budget_batches(np.array([9000, 5]), 8, 4096)] == [1, 1]


def _store(modality: str, path, options: dict, tmp_path, n: int = 160):
    mod = get_modality(modality)
    opts = mod.options(options)
    samples = mod.read(path, opts)
    tok = mod.fit_tokenizer(samples, np.arange(len(samples)), opts)
    return tok, mod.tokenize(tok, samples, tmp_path / "store", np.arange(min(n, len(samples))))


@pytest.mark.parametrize(
    ("modality", "path", "options", "causal"),
    [
        ("dna", promoters(), {"label_column": "label"}, False),
        ("dna", promoters(), {"label_column": "label"}, True),
        ("singlecell", PBMC, {}, False),
        ("ehr", MEDS, {}, True),  # whole timelines, the most recent 256 tokens of long ones
    ],
)
@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_packed_equals_padded(modality, path, options, causal, pooling, tmp_path):
    tok, store = _store(modality, path, options, tmp_path, n=64 if modality == "ehr" else 160)
    torch.manual_seed(0)
    max_len = min(256, 1 << int(int(store.lengths.max()) - 1).bit_length())
    config = ModelConfig.from_preset(
        "tiny",
        modality=modality,
        vocab_size=tok.vocab_size,
        max_len=max_len,
        objective="causal" if causal else "masked",
        use_times=modality == "ehr",
        truncate="tail" if modality == "ehr" else "head",
    )
    model = FoundationModel(config).eval()
    padded = embed_store(model, store, pooling, batch_size=16, max_tokens=None)
    packed = embed_store(model, store, pooling, batch_size=64, pack=True)
    budget = embed_store(model, store, pooling, batch_size=64, max_tokens=2048)
    np.testing.assert_allclose(packed, padded, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(budget, padded, rtol=1e-5, atol=1e-5)
    part = np.array([5, 3, 61, 42])
    np.testing.assert_allclose(
        embed_store(model, store, pooling, pack=True, indices=part), padded[part], atol=1e-5
    )


def test_bf16_stays_close_to_fp32(tmp_path):
    """bf16 autocast: every embedding within cosine 0.99 of fp32 on real cells."""
    tok, store = _store("singlecell", PBMC, {}, tmp_path, n=64)
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", modality="singlecell", vocab_size=tok.vocab_size)
    model = FoundationModel(config).eval()
    fp32 = embed_store(model, store)
    bf16 = embed_store(model, store, bf16=True)
    cos = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cos.min() > 0.99, cos.min()


def test_bf16_tiles_stay_close_to_fp32():
    """The same tolerance on real H&E tiles (Kather 2016) through the patch path."""
    from healthfm.datasets import data_path
    from healthfm.pathology.tilesets import read_class_folders
    from healthfm.pathology.tokenizer import PatchTokenizer

    tiles = read_class_folders(data_path("pathology", "kather2016_samples"))
    tok = PatchTokenizer(224, 16)
    batch = tok.encode_tiles(tiles.load(np.arange(len(tiles.keys)), 224))
    torch.manual_seed(0)
    config = ModelConfig.from_preset(
        "tiny", modality="pathology", vocab_size=tok.vocab_size, max_len=tok.n_tokens,
        input_dim=tok.input_dim,
    )  # fmt: skip
    model = FoundationModel(config).eval()
    with torch.inference_mode():
        fp32 = model.embed(batch, "mean").numpy()
        with torch.autocast("cpu", torch.bfloat16):
            bf16 = model.embed(batch, "mean").float().numpy()
    cos = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cos.min() > 0.99, cos.min()


def test_pack_needs_an_encoder_that_packs(tmp_path):
    tok, store = _store("dna", promoters(), {"label_column": "label"}, tmp_path, n=8)
    model = FoundationModel(
        ModelConfig.from_preset("tiny", modality="dna", vocab_size=tok.vocab_size)
    )
    model.supports_packing = False
    with pytest.raises(ConfigError, match="cannot attend within packed rows"):
        embed_store(model, store, pack=True)

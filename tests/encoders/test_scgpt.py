"""scGPT through the registry, on a tiny random checkpoint written in the authors' layout
(args.json, vocab.json, best_model.pt; flash-attention ``Wqkv`` names and plain ones),
checked against a faithful reference of scgpt/model/model.py built on
torch.nn.TransformerEncoder, and against scgpt.preprocess.binning."""

from __future__ import annotations

import json
import os
import pickle

import anndata as ad
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from healthfm.encoders import entries
from healthfm.errors import DataError, ModelError
from healthfm.inference import embed_store
from healthfm.loader import load_encoder
from healthfm.modality import get_modality
from healthfm.singlecell import pbmc68k
from healthfm.train.data import collate

SC = get_modality("singlecell")
ARGS = {  # scGPT_human's args.json, reduced sizes
    "data_source": "/scratch/ssd004/datasets/cellxgene/scb_strict/human",
    "pad_token": "<pad>",
    "input_style": "binned",
    "input_emb_style": "continuous",
    "n_bins": 51,
    "max_seq_len": 1200,
    "mask_ratio": [0.25, 0.5, 0.75],
    "fast_transformer": True,
    "nlayers": 3,
    "nheads": 4,
    "embsize": 32,
    "d_hid": 48,
    "dropout": 0.2,
    "n_layers_cls": 3,
    "mask_value": -1,
    "pad_value": -2,
    "MVC": True,
    "USE_GENERATIVE_TRAINING": True,
}


class Reference(nn.Module):
    """scgpt/model/model.py's TransformerModel, the parts ``_encode`` runs plus the heads a
    pretrained checkpoint carries (built with use_fast_transformer=False)."""

    def __init__(self, ntoken: int, d: int, nhead: int, d_hid: int, nlayers: int, dropout: float):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.embedding = nn.Embedding(ntoken, d)
        self.encoder.enc_norm = nn.LayerNorm(d)
        self.flag_encoder = nn.Embedding(2, d)
        self.value_encoder = nn.Module()
        self.value_encoder.dropout = nn.Dropout(dropout)
        self.value_encoder.linear1 = nn.Linear(1, d)
        self.value_encoder.activation = nn.ReLU()
        self.value_encoder.linear2 = nn.Linear(d, d)
        self.value_encoder.norm = nn.LayerNorm(d)
        layer = nn.TransformerEncoderLayer(d, nhead, d_hid, dropout, batch_first=True)
        self.transformer_encoder = nn.TransformerEncoder(layer, nlayers, enable_nested_tensor=False)
        self.decoder = nn.Module()
        self.decoder.fc = nn.Sequential(
            nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, 1)
        )
        self.mvc_decoder = nn.Module()
        self.mvc_decoder.gene2query = nn.Linear(d, d)
        self.mvc_decoder.W = nn.Linear(d, d, bias=False)
        self.encoder.embedding.weight.data.uniform_(-0.1, 0.1)  # init_weights

    def _encode(self, src, values, src_key_padding_mask):
        src = self.encoder.enc_norm(self.encoder.embedding(src))
        v = self.value_encoder
        x = torch.clamp(values.unsqueeze(-1), max=512)
        values = v.dropout(v.norm(v.linear2(v.activation(v.linear1(x)))))
        return self.transformer_encoder(src + values, src_key_padding_mask=src_key_padding_mask)


def _flash_names(state):
    """The names a checkpoint trained with flash-attention's FlashMHA carries."""
    return {
        k.replace("self_attn.in_proj_weight", "self_attn.Wqkv.weight").replace(
            "self_attn.in_proj_bias", "self_attn.Wqkv.bias"
        ): v
        for k, v in state.items()
    }


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """scGPT_human-like folders over the bundled PBMC genes (+ decoy symbols): one saved
    with flash-attention names (as published), one with nn.MultiheadAttention's."""
    root = tmp_path_factory.mktemp("scgpt")
    genes = [f"DECOY{i}" for i in range(5)] + list(ad.read_h5ad(pbmc68k()).var_names)[::-1]
    vocab = {g: i for i, g in enumerate(genes)}
    vocab["<pad>"], vocab["<cls>"] = len(vocab), len(vocab) + 1  # <eoc> is appended on load
    torch.manual_seed(0)
    ref = Reference(
        len(vocab) + 1, ARGS["embsize"], ARGS["nheads"], ARGS["d_hid"], ARGS["nlayers"], 0.2
    )
    ref.eval()
    out = {}
    for name, state in (("flash", _flash_names(ref.state_dict())), ("plain", ref.state_dict())):
        folder = root / name / "scGPT_human"
        folder.mkdir(parents=True)
        (folder / "args.json").write_text(json.dumps(ARGS, indent=4))
        (folder / "vocab.json").write_text(json.dumps(vocab, indent=2))
        torch.save(dict(state), folder / "best_model.pt")
        out[name] = folder
    out["reference"] = ref
    out["vocab"] = vocab
    return out


@pytest.fixture(scope="module")
def model(folders):
    return load_encoder(f"scgpt:{folders['flash']}")


@pytest.fixture(scope="module")
def store(model, tmp_path_factory):
    samples = SC.read(pbmc68k(), {"label_column": "bulk_labels"})
    SC.check_input(samples, model.tokenizer)
    return SC.tokenize(model.tokenizer, samples, tmp_path_factory.mktemp("s") / "store")


def test_tokens_follow_the_authors_embed_data_and_binning(model, folders, store):
    """embed_data: genes by symbol in the vocabulary, non-zero only, <cls> first with
    pad_value; DataCollator: binning(row, 51) of the counts, ties drawn between
    digitize(right=True) and digitize(...)."""
    tok, vocab = model.tokenizer, folders["vocab"]
    assert tok.vocab["<eoc>"] == len(vocab) and tok.vocab_size == len(vocab) + 1
    from healthfm.tokenizer import tokenizer_from_dict

    assert tokenizer_from_dict(tok.to_dict()).hash == tok.hash  # rebuilt from its config
    adata = ad.read_h5ad(pbmc68k())
    ids_in_vocab = np.array([vocab.get(g, -1) for g in adata.var_names])
    x = adata.X.toarray().astype(np.float32)
    drawn = 0
    for i in range(adata.n_obs):
        row = x[i][ids_in_vocab >= 0]
        genes = ids_in_vocab[ids_in_vocab >= 0]
        nz = np.nonzero(row)[0]
        edges = np.quantile(row[nz], np.linspace(0, 1, 50))
        left = np.digitize(row[nz], edges)
        right = np.digitize(row[nz], edges, right=True)
        ids = np.asarray(store.maps["ids"][store.offsets[i] : store.offsets[i + 1]])
        vals = np.asarray(store.maps["values"][store.offsets[i] : store.offsets[i + 1]])
        assert ids[0] == vocab["<cls>"] and vals[0] == ARGS["pad_value"]
        assert sorted(ids[1:]) == sorted(genes[nz])
        by_gene = dict(zip(ids[1:], vals[1:], strict=True))
        ours = np.array([by_gene[g] for g in genes[nz]])
        low = np.where(right < left, right + 1, left)  # ceil(u * (right - left) + left)
        assert np.all((ours >= low) & (ours <= left)), i
        drawn += int(np.sum(ours != left))
    assert drawn > 0  # ties at bin edges are drawn, not all sent to the top bin


def test_tokens_are_deterministic_and_drawn_like_the_authors(model):
    chunk_a = next(SC.encode(model.tokenizer, SC.read(pbmc68k(), {})))
    chunk_b = next(SC.encode(model.tokenizer, SC.read(pbmc68k(), {})))
    np.testing.assert_array_equal(chunk_a.values, chunk_b.values)
    # Over a cell with many tied counts, the drawn bins spread like scGPT's random ones.
    row = np.array([1.0] * 60 + [2.0] * 20 + list(range(3, 23)), dtype=np.float32)
    edges = np.quantile(row, np.linspace(0, 1, 50))
    left, right = np.digitize(row, edges), np.digitize(row, edges, right=True)
    authors = np.ceil(np.random.default_rng(0).random((400, len(row))) * (right - left) + left)
    from healthfm.singlecell.tokenizer import row_segments

    order = np.argsort(-row, kind="stable")
    rows = np.zeros(len(row), dtype=np.int64)
    counts, starts, _ = row_segments(rows, 1)
    ours = model.tokenizer.bins(row[order], rows, np.arange(len(row)), counts, starts)
    ones = ours[row[order] == 1.0]
    assert set(np.unique(ones)) <= set(np.unique(authors[:, :60]))
    # The same mean, to 3.5 standard errors of a mean over 60 draws.
    se = authors[:, :60].std() / np.sqrt(len(ones))
    assert abs(ones.mean() - authors[:, :60].mean()) < 3.5 * se


@pytest.mark.parametrize("names", ["flash", "plain"])
def test_encoder_matches_the_torch_reference(folders, model, store, names):
    enc = model if names == "flash" else load_encoder(f"scgpt:{folders['plain']}")
    ref = folders["reference"]
    batch = collate(store, np.arange(40), enc.max_len)
    mask = batch["attention_mask"]
    pad = ~mask
    gene = torch.where(mask, batch["ids"], torch.full_like(batch["ids"], folders["vocab"]["<pad>"]))
    values = torch.where(mask, torch.nan_to_num(batch["values"], nan=-2.0), torch.tensor(-2.0))
    with torch.no_grad():
        out = ref._encode(gene, values, src_key_padding_mask=pad)
        ours = enc.forward_features(batch)
        torch.testing.assert_close(ours[mask], out[mask], atol=1e-5, rtol=1e-5)
        # get_batch_cell_embeddings: <cls> state, L2-normalised.
        torch.testing.assert_close(
            enc.embed(batch), F.normalize(out[:, 0], dim=-1), atol=1e-5, rtol=1e-5
        )
        # The authors feed genes in column order; the model has no positions, so the order
        # healthfm uses (by count) gives the same <cls> state.
        perm = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(mask.shape[1] - 1)])
        full = mask.all(1)
        out_perm = ref._encode(gene[full][:, perm], values[full][:, perm], pad[full][:, perm])
        torch.testing.assert_close(out_perm[:, 0], out[full][:, 0], atol=1e-5, rtol=1e-5)


def test_pre_norm_follows_the_flash_layer(folders, tmp_path):
    import shutil

    folder = tmp_path / "pre"
    shutil.copytree(folders["flash"], folder)
    (folder / "args.json").write_text(json.dumps({**ARGS, "pre_norm": True}))
    enc = load_encoder(f"scgpt:{folder}")
    ref = folders["reference"]
    ids = torch.tensor([[folders["vocab"]["<cls>"], 7, 9, 11]])
    vals = torch.tensor([[-2.0, 3.0, 1.0, 50.0]])
    batch = {"ids": ids, "values": vals, "attention_mask": torch.ones_like(ids, dtype=torch.bool)}
    with torch.no_grad():
        v = ref.value_encoder
        x = ref.encoder.enc_norm(ref.encoder.embedding(ids)) + v.norm(
            v.linear2(F.relu(v.linear1(vals.unsqueeze(-1))))
        )
        for layer in ref.transformer_encoder.layers:  # FlashTransformerEncoderLayer, "pre"
            x = layer.norm1(x)
            x = x + layer.self_attn(x, x, x, need_weights=False)[0]
            x = layer.norm2(x)
            x = x + layer.linear2(F.relu(layer.linear1(x)))
        torch.testing.assert_close(enc.forward_features(batch), x, atol=1e-5, rtol=1e-5)


def test_embeddings_shapes_determinism_sensitivity(model, tmp_path):
    adata = ad.read_h5ad(pbmc68k())[:150].copy()  # 150 cells keep it fast
    samples = SC.read(adata, {})
    SC.check_input(samples, model.tokenizer)
    store = SC.tokenize(model.tokenizer, samples, tmp_path / "a")
    a = embed_store(model, store, batch_size=64)
    b = embed_store(model, store, batch_size=23)
    assert a.shape == (150, 32) and np.isfinite(a).all()
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a, b, atol=1e-5)
    x = adata.X.tolil()
    x[5, :] = 0
    x[5, 10:60] = np.arange(1, 51)
    adata.X = x.tocsr()
    samples = SC.read(adata, {})
    SC.check_input(samples, model.tokenizer)
    c = embed_store(model, SC.tokenize(model.tokenizer, samples, tmp_path / "c"), batch_size=64)
    assert np.abs(c[5] - a[5]).max() > 1e-3
    np.testing.assert_allclose(np.delete(c, 5, 0), np.delete(a, 5, 0), atol=1e-5)
    u = model.untrained(seed=1)
    assert not torch.equal(u.encoder.embedding.weight, model.encoder.embedding.weight)


def test_errors(folders, model, tmp_path):
    import shutil

    # best_model.pt that wants to run code: torch.load(weights_only=True) refuses it.
    evil = tmp_path / "evil"
    shutil.copytree(folders["flash"], evil)
    evil_obj = type("Evil", (), {"__reduce__": lambda self: (os.system, ("echo pwned",))})()
    (evil / "best_model.pt").write_bytes(pickle.dumps({"x": evil_obj}))
    with pytest.raises(ModelError, match=r"wants to run code.*refused"):
        load_encoder(f"scgpt:{evil}")
    # A mis-shaped tensor.
    mis = tmp_path / "mis"
    shutil.copytree(folders["flash"], mis)
    state = torch.load(mis / "best_model.pt", weights_only=True)
    state["value_encoder.linear2.weight"] = state["value_encoder.linear2.weight"][:-1]
    torch.save(state, mis / "best_model.pt")
    with pytest.raises(ModelError, match=r"mis-shaped: value_encoder.linear2.weight"):
        load_encoder(f"scgpt:{mis}")
    # A Geneformer (Hugging Face) folder.
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelError, match="geneformer:"):
        load_encoder(f"scgpt:{hf}")
    # Data with Ensembl ids where the vocabulary has symbols.
    adata = ad.read_h5ad(pbmc68k())
    adata.var_names = [f"ENSG{i:011d}" for i in range(adata.n_vars)]
    with pytest.raises(DataError, match=r"none of the data's 765 genes.*--gene-column"):
        SC.check_input(SC.read(adata, {}), model.tokenizer)
    e = entries()["scgpt"]
    assert e.modality == "singlecell" and e.licence.startswith("MIT") and not e.gated
    assert "bowang-lab/scGPT" in e.source and "Nature Methods" in e.citation


def test_lora_finetune_of_scgpt_reloads_and_scores(folders, tmp_path):
    """`finetune scgpt:DIR --lora` on real cells: adapters on the encoder's blocks, reloaded
    through load_encoder, scored by evaluate --finetuned on the same test rows."""
    from healthfm.stages.evaluate import evaluate
    from healthfm.stages.finetune import FinetuneConfig, finetune

    cells = tmp_path / "cells.h5ad"
    adata = ad.read_h5ad(pbmc68k())[:240].copy()
    adata.write_h5ad(cells)
    spec = f"scgpt:{folders['flash']}"
    config = FinetuneConfig(lora=True, lora_rank=2, epochs=1, batch_size=32)
    result = finetune(
        spec,
        cells,
        tmp_path / "lora",
        {"label_column": "bulk_labels"},
        config,
        n_boot=10,
        echo=False,
    )
    assert result.method == "lora" and result.trainable_parameters < result.total_parameters
    tuned = load_encoder(tmp_path / "lora")
    assert tuned.modality == "singlecell"
    rows = evaluate(
        None,
        cells,
        tmp_path / "ev",
        {"label_column": "bulk_labels"},
        modality_name="singlecell",
        seeds=[0],
        n_boot=10,
        echo=False,
        include_baselines=False,
        finetuned=[tmp_path / "lora"],
    )
    assert any("finetune-lora" in r.method for r in rows)

"""Geneformer V1/V2 through the registry, on tiny random checkpoints written in exactly the
authors' Hugging Face layout, checked against transformers' BertForMaskedLM and against the
authors' rank-value tokenization (re-written here from geneformer/tokenizer.py)."""

from __future__ import annotations

import json
import os
import pickle

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from healthfm.encoders import entries
from healthfm.errors import DataError, ModelError
from healthfm.inference import embed_store
from healthfm.loader import load_encoder
from healthfm.modality import get_modality
from healthfm.singlecell import pbmc68k

transformers = pytest.importorskip("transformers")

SC = get_modality("singlecell")


def _ensembl(i: int) -> str:
    return f"ENSG{i:011d}"


def _v1_config(vocab_size: int) -> dict:
    """The published Geneformer-V1-10M config.json, with reduced sizes."""
    return {
        "architectures": ["BertForMaskedLM"],
        "attention_probs_dropout_prob": 0.02,
        "gradient_checkpointing": False,
        "hidden_act": "relu",
        "hidden_dropout_prob": 0.02,
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 2048,
        "model_type": "bert",
        "num_attention_heads": 4,
        "num_hidden_layers": 3,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "type_vocab_size": 2,
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def _dump(obj, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        pickle.dump(obj, fh)


def _write_model(folder, config, safetensors: bool, seed: int):
    torch.manual_seed(seed)
    model = transformers.BertForMaskedLM(transformers.BertConfig(**config)).eval()
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if safetensors:
        from safetensors.torch import save_file

        state.pop("cls.predictions.decoder.weight", None)  # tied to the word embeddings
        state.pop("cls.predictions.decoder.bias", None)
        save_file(state, str(folder / "model.safetensors"))
    else:
        torch.save(state, folder / "pytorch_model.bin")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A Geneformer repository root: V1 and V2 model folders, V2 dictionaries under
    geneformer/ and V1's under geneformer/gene_dictionaries_30m/, genes (fake Ensembl
    ids) of the bundled PBMC data; medians from the data's non-zero normalized counts."""
    root = tmp_path_factory.mktemp("Geneformer")
    a = ad.read_h5ad(pbmc68k())
    symbols = list(a.var_names)
    ens = {s: _ensembl(i + 1) for i, s in enumerate(symbols)}
    x = a.X.tocsc()
    norm = sp.csc_matrix(sp.diags(1e4 / a.obs["n_counts"].to_numpy()) @ a.X).tocsc()
    medians = {}
    for j, s in enumerate(symbols):
        col = norm.data[norm.indptr[j] : norm.indptr[j + 1]]
        # Spread by a small per-gene factor: real medians (t-digest estimates over 100M
        # cells) are all distinct, these from 700 cells would tie often.
        medians[ens[s]] = (float(np.median(col)) if len(col) else 1.0) * (
            1 + 0.01 * j / len(symbols)
        )
    del x
    # An alias id collapsing onto the first gene, as ensembl_mapping_dict holds them.
    mapping = {e.upper(): e for e in ens.values()} | {"ENSG99999999999": ens[symbols[0]]}
    for version, genes, place, suffix in (
        ("V1", symbols, root / "geneformer" / "gene_dictionaries_30m", "_gc30M"),
        ("V2", symbols[::2] + symbols[1::4], root / "geneformer", "_gc104M"),
    ):
        specials = ["<pad>", "<mask>"] + (["<cls>", "<eos>"] if version == "V2" else [])
        tokens = {t: i for i, t in enumerate(specials)}
        tokens |= {ens[g]: len(specials) + i for i, g in enumerate(genes)}
        _dump(tokens, place / f"token_dictionary{suffix}.pkl")
        _dump(
            {ens[g]: np.float64(medians[ens[g]]) for g in genes},
            place / f"gene_median_dictionary{suffix}.pkl",
        )
        _dump({g: ens[g] for g in genes}, place / f"gene_name_id_dict{suffix}.pkl")
        _dump(
            {k: v for k, v in mapping.items() if v in tokens},
            place / f"ensembl_mapping_dict{suffix}.pkl",
        )
        config = _v1_config(len(tokens))
        if version == "V2":
            config |= {"max_position_embeddings": 4096, "hidden_size": 48, "num_attention_heads": 4}
        name = "Geneformer-V1-10M" if version == "V1" else "Geneformer-V2-104M"
        _write_model(root / name, config, safetensors=version == "V2", seed=len(genes))
    return root


@pytest.fixture(scope="module")
def v1(repo):
    return load_encoder(f"geneformer:{repo / 'Geneformer-V1-10M'}")


@pytest.fixture(scope="module")
def v2(repo):
    return load_encoder(f"geneformer:{repo / 'Geneformer-V2-104M'}")


@pytest.fixture(scope="module")
def cells():
    """The bundled PBMC cells, library sizes from obs['n_counts'] as Geneformer reads them."""
    return SC.read(pbmc68k(), {"total_column": "n_counts", "label_column": "bulk_labels"})


def _store(encoder, samples, tmp_path):
    SC.check_input(samples, encoder.tokenizer)
    return SC.tokenize(encoder.tokenizer, samples, tmp_path / "store")


def _authors_tokens(adata, files, model_input_size, special_token):
    """geneformer/tokenizer.py, TranscriptomeTokenizer.tokenize_anndata (+ sum_ensembl_ids,
    create_dataset's truncation), with symbols mapped to Ensembl ids by gene_name_id_dict."""
    load = {k: pickle.loads(p.read_bytes()) for k, p in files.items()}
    token_dict, median_dict = load["token_dictionary"], load["gene_median_dictionary"]
    mapping = {k: v for k, v in load["ensembl_mapping_dict"].items() if v in token_dict}
    ensembl_id = [load["gene_name_id_dict"].get(g) for g in adata.var_names]
    collapsed = [mapping.get(str(g).upper()) for g in ensembl_id]
    genelist = dict.fromkeys(token_dict, True)
    loc = np.where([genelist.get(i, False) for i in collapsed])[0]
    norm_factor = np.array([median_dict[collapsed[i]] for i in loc])
    tokens = np.array([token_dict[collapsed[i]] for i in loc])
    n_counts = adata.obs["n_counts"].to_numpy()[:, None]
    x_norm = sp.csr_matrix(adata.X[:, loc] / n_counts * 10_000 / norm_factor)
    out = []
    for i in range(x_norm.shape[0]):
        row = x_norm[i]
        order = np.argsort(-row.data)  # rank_genes
        ranked, values = tokens[row.indices][order], row.data[order]
        if special_token:
            ranked = [token_dict["<cls>"], *ranked[: model_input_size - 2], token_dict["<eos>"]]
            values = [np.inf, *values[: model_input_size - 2], -np.inf]
        else:
            ranked, values = ranked[:model_input_size], values[:model_input_size]
        value_of = dict(zip(tokens[row.indices], row.data, strict=True))
        value_of.update({token_dict.get("<cls>", -1): np.inf, token_dict.get("<eos>", -2): -np.inf})
        out.append((np.asarray(ranked), np.asarray(values), value_of))
    return out


def _same_ranking(ours, ref) -> bool:
    """The same normalized value at every rank (to 1e-6: the authors compute in the dtype
    of obs['n_counts'], float32 here, healthfm in float64), and the same token wherever the
    value is not tied: the authors' np.argsort(-x) leaves ties in an unspecified order
    (it depends on the array length and the CPU's SIMD sort), healthfm keeps column order."""
    tokens, values, value_of = ref
    if len(ours) != len(tokens):
        return False
    ours_values = np.array([value_of.get(t, np.nan) for t in ours])
    if not np.allclose(ours_values, values, rtol=1e-6, atol=0):
        return False
    every = np.sort(np.array(list(value_of.values())))  # all the cell's genes (untruncated)
    near = np.isclose(every[1:], every[:-1], rtol=1e-6, atol=0)
    tied = set(every[1:][near]) | set(every[:-1][near])
    untied = np.array([v not in tied for v in values])
    return np.array_equal(np.asarray(ours)[untied], tokens[untied])


def _files(repo, version):
    place = (
        repo / "geneformer" if version == "V2" else repo / "geneformer" / "gene_dictionaries_30m"
    )
    suffix = "_gc104M" if version == "V2" else "_gc30M"
    kinds = (
        "token_dictionary",
        "gene_median_dictionary",
        "gene_name_id_dict",
        "ensembl_mapping_dict",
    )
    return {k: place / f"{k}{suffix}.pkl" for k in kinds}


@pytest.mark.parametrize("version", ["V1", "V2"])
def test_tokens_are_the_authors_rank_value_encoding(repo, v1, v2, cells, tmp_path, version):
    enc = v1 if version == "V1" else v2
    assert enc.tokenizer.version == version and enc.name == f"geneformer-{version.lower()}"
    from healthfm.tokenizer import tokenizer_from_dict

    assert tokenizer_from_dict(enc.tokenizer.to_dict()).hash == enc.tokenizer.hash
    store = _store(enc, cells, tmp_path)
    adata = ad.read_h5ad(pbmc68k())
    # A short context so that truncation is exercised too.
    short = type(enc.tokenizer).from_files(_files(repo, version), max_length=40)
    ref = _authors_tokens(adata, _files(repo, version), enc.tokenizer.max_length, version == "V2")
    ref_short = _authors_tokens(adata, _files(repo, version), 40, version == "V2")
    chunks = list(SC.encode(short, cells))
    short_ids = np.concatenate([c.ids for c in chunks])
    short_off = np.concatenate(
        [[0], np.cumsum(np.concatenate([np.diff(c.offsets) for c in chunks]))]
    )
    exact = 0
    for i in range(len(ref)):
        ours = np.asarray(store.maps["ids"][store.offsets[i] : store.offsets[i + 1]])
        assert _same_ranking(ours, ref[i]), i
        assert _same_ranking(short_ids[short_off[i] : short_off[i + 1]], ref_short[i]), i
        exact += np.array_equal(ours, ref[i][0])
    assert exact > 0.9 * len(ref)  # ties are the exception
    assert int(np.max(np.diff(store.offsets))) <= enc.tokenizer.max_length


@pytest.mark.parametrize("version", ["V1", "V2"])
def test_network_matches_transformers_bert(repo, v1, v2, cells, tmp_path, version):
    enc = v1 if version == "V1" else v2
    folder = repo / ("Geneformer-V1-10M" if version == "V1" else "Geneformer-V2-104M")
    ref = transformers.BertForMaskedLM.from_pretrained(folder, output_hidden_states=True).eval()
    store = _store(enc, cells, tmp_path)
    from healthfm.train.data import collate

    batch = collate(store, np.arange(48), enc.max_len)
    with torch.no_grad():
        hidden = ref(
            input_ids=batch["ids"], attention_mask=batch["attention_mask"].long()
        ).hidden_states[-2]
        ours = enc.forward_features(batch)
    mask = batch["attention_mask"]
    torch.testing.assert_close(ours[mask], hidden[mask], atol=1e-5, rtol=1e-5)
    # The authors' cell embedding: mean over gene tokens (mean_nonpadding_embs); V2: <cls>.
    lengths = mask.sum(1)
    if version == "V2":
        genes = hidden[:, 1:]
        keep = torch.arange(genes.shape[1])[None] < (lengths - 2)[:, None]
    else:
        genes, keep = hidden, mask
    mean = (genes * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
    torch.testing.assert_close(enc.embed(batch, "mean"), mean, atol=1e-5, rtol=1e-5)
    if version == "V2":
        assert enc.pooling == "cls"
        torch.testing.assert_close(enc.embed(batch), hidden[:, 0], atol=1e-5, rtol=1e-5)
    else:
        assert enc.pooling == "mean" and enc.poolings == ("mean",)


def test_embed_shapes_determinism_and_sensitivity(v2, cells, tmp_path):
    store = _store(v2, cells, tmp_path)
    a = embed_store(v2, store, batch_size=64)
    b = embed_store(v2, store, batch_size=17)
    assert a.shape == (700, 48) and np.isfinite(a).all()
    np.testing.assert_allclose(a, b, atol=1e-5)
    # Moving one cell's counts moves its embedding, and no other.
    adata = ad.read_h5ad(pbmc68k())
    x = adata.X.tolil()
    x[3, :] = 0
    x[3, :40] = 7
    adata.X = x.tocsr()
    changed = SC.read(adata, {"total_column": "n_counts"})
    c = embed_store(v2, _store(v2, changed, tmp_path / "c"), batch_size=64)
    assert np.abs(c[3] - a[3]).max() > 1e-3
    np.testing.assert_allclose(np.delete(c, 3, 0), np.delete(a, 3, 0), atol=1e-5)


def test_gene_column_is_chosen_and_duplicates_are_summed(v1, repo, cells, tmp_path):
    adata = ad.read_h5ad(pbmc68k())
    symbols = np.asarray(adata.var_names)
    ensembl = [_ensembl(i + 1) for i in range(len(symbols))]
    # var_names are meaningless ids; the Ensembl ids sit in a var column (auto-chosen).
    adata.var["ensembl_id"] = ensembl
    adata.var["symbol"] = symbols
    adata.var_names = [f"feature{i}" for i in range(len(symbols))]
    samples = SC.read(adata, {"total_column": "n_counts"})
    SC.check_input(samples, v1.tokenizer)
    assert samples.info["gene_column"] in ("ensembl_id", "symbol")
    assert samples.info["coverage"]["n_shared_genes"] == len(symbols)
    ref = _store(v1, cells, tmp_path / "ref")
    got = SC.tokenize(v1.tokenizer, samples, tmp_path / "got")
    np.testing.assert_array_equal(np.asarray(ref.maps["ids"]), np.asarray(got.maps["ids"]))
    # Gene 0's counts split over its id and an alias the mapping collapses onto it: summed.
    split = ad.read_h5ad(pbmc68k())
    half = split.X[:, [0]].multiply(0.5).floor()
    x = sp.hstack([split.X, sp.csr_matrix(split.X[:, [0]] - half)]).tocsr()
    x[:, 0] = half
    var_ids = [*ensembl, "ENSG99999999999"]
    two = ad.AnnData(sp.csr_matrix(x), obs=split.obs)
    two.var_names = var_ids
    s2 = SC.read(two, {"total_column": "n_counts"})
    SC.check_input(s2, v1.tokenizer)
    assert s2.info["coverage"]["n_shared_genes"] == len(symbols)
    got2 = SC.tokenize(v1.tokenizer, s2, tmp_path / "got2")
    np.testing.assert_array_equal(np.asarray(ref.maps["ids"]), np.asarray(got2.maps["ids"]))


def test_no_gene_overlap_names_the_var_column(v1, tmp_path):
    adata = ad.read_h5ad(pbmc68k())
    adata.var["other"] = [f"x{i}" for i in range(adata.n_vars)]
    adata.var_names = [f"gene{i}" for i in range(adata.n_vars)]
    samples = SC.read(adata, {})
    with pytest.raises(DataError, match=r"none of the data's 765 genes.*--gene-column") as err:
        SC.check_input(samples, v1.tokenizer)
    assert err.value.column == "var_names" and "other: 0" in str(err.value)
    # A handful of genes carrying a sliver of the counts is refused as well.
    keep = ad.read_h5ad(pbmc68k())
    names = np.asarray(keep.var_names).astype(object)
    low = np.argsort(np.asarray(keep.X.sum(0)).reshape(-1))[:3]
    names[np.setdiff1d(np.arange(len(names)), low)] = [f"gene{i}" for i in range(len(names) - 3)]
    keep.var_names = names
    with pytest.raises(DataError, match="only 3"):
        SC.check_input(SC.read(keep, {}), v1.tokenizer)


def test_folder_errors(repo, tmp_path):
    import shutil

    # A pickle that wants to run code is refused before anything runs.
    bad = tmp_path / "bad"
    shutil.copytree(repo / "Geneformer-V1-10M", bad / "model")
    (bad / "model" / "token_dictionary.pkl").write_bytes(
        pickle.dumps(type("Evil", (), {"__reduce__": lambda self: (os.system, ("echo pwned",))})())
    )
    with pytest.raises(ModelError, match="refusing to unpickle"):
        load_encoder(f"geneformer:{bad / 'model'}")
    # A mis-shaped tensor names the file and the tensor.
    mis = tmp_path / "mis" / "Geneformer-V1-10M"
    shutil.copytree(repo / "Geneformer-V1-10M", mis)
    shutil.copytree(repo / "geneformer", mis.parent / "geneformer")
    state = torch.load(mis / "pytorch_model.bin", weights_only=True)
    key = "bert.encoder.layer.0.attention.self.query.weight"
    state[key] = state[key][:, :-1].clone()
    torch.save(state, mis / "pytorch_model.bin")
    with pytest.raises(
        ModelError, match=r"mis-shaped: encoder.layer.0.attention.self.query"
    ) as err:
        load_encoder(f"geneformer:{mis}")
    assert err.value.file.endswith("pytorch_model.bin")
    # The other version's name refuses the folder; an scGPT folder is named as such.
    with pytest.raises(ModelError, match="Geneformer V1 folder, not V2"):
        load_encoder(f"geneformer-v2:{repo / 'Geneformer-V1-10M'}")
    scgpt = tmp_path / "scgpt"
    scgpt.mkdir()
    (scgpt / "args.json").write_text("{}")
    (scgpt / "vocab.json").write_text("{}")
    with pytest.raises(ModelError, match="scGPT folder"):
        load_encoder(f"geneformer:{scgpt}")
    # Dictionaries that fit no vocab_size.
    lone = tmp_path / "lone"
    shutil.copytree(repo / "Geneformer-V1-10M", lone)
    _dump({"<pad>": 0, "ENSG1": 1}, lone / "token_dictionary.pkl")
    _dump({"ENSG1": 1.0}, lone / "gene_median_dictionary.pkl")
    with pytest.raises(ModelError, match="no gene dictionary fits"):
        load_encoder(f"geneformer:{lone}")


def test_registry_entries_and_cli(repo, tmp_path):
    from healthfm.cli import main

    known = entries()
    for name in ("geneformer", "geneformer-v1", "geneformer-v2"):
        e = known[name]
        assert e.modality == "singlecell" and e.licence == "Apache-2.0" and not e.gated
        assert "huggingface.co/ctheodoris/Geneformer" in e.source and e.citation
    data = tmp_path / "pbmc.h5ad"
    a = ad.read_h5ad(pbmc68k())[:200]  # 200 cells, their 200 most expressed genes: fast
    top = np.sort(np.argsort(-np.asarray(a.X.sum(axis=0)).reshape(-1), kind="stable")[:200])
    a = a[:, top].copy()
    a = a[np.asarray(a.X.sum(axis=1)).reshape(-1) > 0].copy()
    a.write_h5ad(data)
    out = tmp_path / "emb.h5ad"
    spec = f"geneformer:{repo / 'Geneformer-V2-104M'}"
    assert main(["embed", spec, str(data), "--out", str(out), "--total-column", "n_counts"]) == 0
    emb = ad.read_h5ad(out)
    assert emb.obsm["X_healthfm"].shape == (a.n_obs, 48)
    info = emb.uns["healthfm"]["X_healthfm"]
    assert info["tokenizer"] == "published.geneformer" and info["n_shared_genes"] > 0
    res = tmp_path / "ev"
    args = ["evaluate", spec, str(data), "--label-column", "bulk_labels", "--out", str(res)]
    assert main([*args, "--total-column", "n_counts", "--seeds", "0", "--n-boot", "10"]) == 0
    rows = json.loads((res / "results.json").read_text())
    methods = {r["method"] for r in rows}
    assert "geneformer-v2-cls+logreg" in methods and "hvg-pca+logreg" in methods

"""Single-cell corpora: one gene vocabulary over sources with different gene panels,
coverage, transfer to a third data set, and TileDB-SOMA experiments as sources."""

from __future__ import annotations

import json
import logging

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from healthfm.errors import ConfigError, DataError
from healthfm.modality import get_modality, split_indices
from healthfm.singlecell import pbmc68k
from healthfm.singlecell.corpus import ensembl_share
from healthfm.singlecell.tokenizer import CorpusGeneStats, nonzero_medians

SC = get_modality("singlecell")


@pytest.fixture(scope="module")
def master() -> ad.AnnData:
    """The bundled PBMC cells with Ensembl-like ids in ``var['gene_ids']``."""
    a = ad.read_h5ad(pbmc68k())
    a.var["gene_ids"] = [f"ENSG{i:011d}" for i in range(a.n_vars)]
    return a


def _source(master, cells, genes, path, ensembl=True):
    """Write the chosen cells × genes (in the given column order) as an .h5ad; cells that
    express none of the genes are dropped."""
    a = master[np.asarray(cells)][:, np.asarray(genes)].copy()
    a = a[np.asarray(a.X.sum(axis=1)).reshape(-1) > 0].copy()
    if not ensembl:
        del a.var["gene_ids"]
    a.write_h5ad(path)
    return path


def _parts(paths, options=None):
    parts = []
    for path in paths:
        s = SC.read(path, options or {})
        parts.append((s, split_indices(SC.split(s, "healthfm", (0.7, 0.1, 0.2)))["train"]))
    return parts


def _expressed_ids(parts):
    """Ensembl id -> [number of panels with it, training cells expressing it]."""
    seen: dict[str, list[int]] = {}
    for s, train in parts:
        ids = s.payload.extra["var_columns"]["gene_ids"]
        cells = np.asarray((s.payload.to_csr(train) > 0).sum(axis=0)).reshape(-1)
        for g, c in zip(ids, cells, strict=True):
            entry = seen.setdefault(str(g), [0, 0])
            entry[0] += 1
            entry[1] += int(c)
    return seen


@pytest.fixture
def two(master, tmp_path):
    """A: cells 0..399 on genes 0..499; B: cells 300..699 on genes 265..764, reversed."""
    a = _source(master, range(400), range(500), tmp_path / "A.h5ad")
    b = _source(master, range(300, 700), range(764, 264, -1), tmp_path / "B.h5ad")
    return a, b


def test_union_vocabulary_of_ensembl_ids_with_coverage_logged(two, caplog):
    parts = _parts(two)
    with caplog.at_level(logging.INFO, logger="healthfm"):
        tok = SC.fit_corpus_tokenizer(parts, {})
    seen = _expressed_ids(parts)
    expected = {g for g, (_, cells) in seen.items() if cells >= 1}
    assert set(tok.genes) == expected and len(tok.genes) == len(expected)
    assert ensembl_share(tok.genes) == 1.0  # the var column of Ensembl ids was chosen
    text = caplog.text
    assert text.count("gene identifiers from var/gene_ids") == 2
    assert "are in the vocabulary" in text and "of the vocabulary's" in text
    for s, _ in parts:
        cov = s.info["coverage"]
        in_vocab = np.isin(s.payload.genes, tok.genes)
        assert cov["n_genes_in_vocabulary"] == in_vocab.sum() == cov["n_vocabulary_measured"]
        assert cov["n_genes"] == s.payload.shape[1] and cov["n_vocabulary"] == len(tok.genes)
        assert 0.99 < cov["count_fraction"] <= 1.0
        assert str(s.source) in text


def test_intersection_and_min_sources(two, master, tmp_path):
    parts = _parts(two)
    seen = _expressed_ids(parts)
    both = {g for g, (n, cells) in seen.items() if n == 2 and cells >= 1}
    inter = SC.fit_corpus_tokenizer(parts, {"gene_set": "intersection"})
    assert set(inter.genes) == both
    assert list(SC.fit_corpus_tokenizer(parts, {"min_sources": 2}).genes) == list(inter.genes)
    with pytest.raises(ConfigError, match="contradicts"):
        SC.fit_corpus_tokenizer(parts, {"gene_set": "intersection", "min_sources": 1})
    with pytest.raises(ConfigError, match="between 1 and the number of sources"):
        SC.fit_corpus_tokenizer(parts, {"min_sources": 3})
    # Three panels: genes in at least two of them.
    c = _source(master, range(0, 700, 2), range(400, 700), tmp_path / "C.h5ad")
    parts3 = _parts([*two, c])
    seen3 = _expressed_ids(parts3)
    tok = SC.fit_corpus_tokenizer(parts3, {"min_sources": 2, "tokenizer": "binned"})
    assert set(tok.genes) == {g for g, (n, cells) in seen3.items() if n >= 2 and cells >= 1}
    assert tok.type == "singlecell.binned"


def test_corpus_medians_match_exact_medians_within_a_bucket(two):
    parts = _parts(two)
    tok = SC.fit_corpus_tokenizer(parts, {"tokenizer": "rank"})
    # Exact medians over both sources' training cells, on the union of their panels.
    stats = CorpusGeneStats([s.payload.genes for s, _ in parts])
    blocks = []
    for k, (s, train) in enumerate(parts):
        m = s.payload
        x = m.to_csr(train).tocoo()
        cols = stats.maps[k][x.col]
        blocks.append(
            (
                sp.csr_matrix((x.data, (x.row, cols)), shape=(len(train), len(stats.genes))),
                m.totals[train],
            )
        )
    genes, exact = nonzero_medians(blocks, stats.genes)
    order = {g: i for i, g in enumerate(genes)}
    mine = tok.medians[[i for i, g in enumerate(tok.genes)]]
    ref = exact[[order[g] for g in tok.genes]]
    rel = np.abs(mine / ref - 1)
    assert rel.max() < 0.032 and np.median(rel) < 0.01


def test_encode_maps_columns_by_gene_id(two, master, tmp_path):
    parts = _parts(two)
    tok = SC.fit_corpus_tokenizer(parts, {"gene_set": "intersection", "max_length": 1024})
    b = parts[1][0]
    # The same cells with the columns in yet another order (and a gene outside the vocabulary
    # first): each gene keeps its token, genes outside the vocabulary are dropped.
    a = ad.read_h5ad(two[1])
    rng = np.random.default_rng(0)
    perm = rng.permutation(a.n_vars)
    shuffled = _source(a, range(a.n_obs), perm, tmp_path / "B_shuffled.h5ad")
    s2 = SC.read(shuffled, {"gene_column": "gene_ids"})
    assert not np.array_equal(s2.payload.genes, b.payload.genes)
    first = next(SC.encode(tok, b, np.arange(50)))
    second = next(SC.encode(tok, s2, np.arange(50)))
    np.testing.assert_array_equal(first.offsets, second.offsets)
    for i in range(50):
        x = np.sort(first.ids[first.offsets[i] : first.offsets[i + 1]])
        y = np.sort(second.ids[second.offsets[i] : second.offsets[i + 1]])
        np.testing.assert_array_equal(x, y)
    names = set(tok.token_names(first.ids[first.ids >= 5]).tolist())
    assert names <= set(tok.genes)
    # Cell 0's tokens are exactly its expressed vocabulary genes.
    row = b.payload.rows(np.array([0]))
    expressed = set(b.payload.genes[row.indices[row.data > 0]]) & set(tok.genes)
    assert set(tok.token_names(first.ids[1 : first.offsets[1]])) == expressed
    # A gene at column j of B and column k != j of the shuffled copy: the same token id.
    g = b.payload.genes[5]
    assert (
        tok.column_map(b.payload.genes)[5]
        == tok.column_map(s2.payload.genes)[int(np.flatnonzero(s2.payload.genes == g)[0])]
    )


def test_column_maps_are_not_confused_between_panels(two):
    parts = _parts(two)
    tok = SC.fit_corpus_tokenizer(parts, {})
    for _ in range(2):  # alternate sources: each keeps its own map
        for s, _train in parts:
            m = tok.column_map(s.payload.genes)
            inside = m >= 0
            np.testing.assert_array_equal(tok.genes[m[inside]], s.payload.genes[inside])


def test_source_with_too_little_overlap_is_refused(master, tmp_path):
    counts = np.asarray(master.X.sum(axis=0)).reshape(-1)
    shared = np.arange(200, 400)
    low = shared[np.argsort(counts[shared], kind="stable")[:3]]  # rarely expressed shared genes
    a = _source(master, range(350), range(400), tmp_path / "A.h5ad")
    b = _source(master, range(350, 700), range(200, 600), tmp_path / "B.h5ad")
    c = _source(master, range(700), np.r_[np.arange(600, 765), low], tmp_path / "C.h5ad")
    parts = _parts([a, b, c])
    with pytest.raises(DataError, match="covers too little") as err:
        SC.fit_corpus_tokenizer(parts, {"min_sources": 2})
    assert "C.h5ad" in str(err.value)
    tok = SC.fit_corpus_tokenizer(parts, {})  # the union covers every source
    assert len(tok.genes) > 700


def test_mixed_identifier_kinds_and_empty_vocabulary_are_refused(master, tmp_path):
    a = _source(master, range(350), range(400), tmp_path / "A.h5ad")
    b = _source(master, range(350, 700), range(400), tmp_path / "B.h5ad", ensembl=False)
    with pytest.raises(DataError, match="name genes differently"):
        SC.fit_corpus_tokenizer(_parts([a, b]), {})
    # Both by symbol (the user names var_names' column ... here: none has Ensembl ids).
    c = _source(master, range(350, 700), range(400, 765), tmp_path / "C.h5ad", ensembl=False)
    d = _source(master, range(350), range(400), tmp_path / "D.h5ad", ensembl=False)
    with pytest.raises(DataError, match="vocabulary is empty"):
        SC.fit_corpus_tokenizer(_parts([c, d]), {"gene_set": "intersection"})


def test_a_source_held_out_whole_takes_no_part_in_the_vocabulary(two, master, tmp_path, caplog):
    parts = _parts(two)
    held = _source(master, range(700), range(200, 765), tmp_path / "held.h5ad")
    held_samples = SC.read(held, {})
    with caplog.at_level(logging.INFO, logger="healthfm"):
        tok = SC.fit_corpus_tokenizer(
            [*parts, (held_samples, np.zeros(0, dtype=np.int64))], {"gene_set": "intersection"}
        )
    assert list(tok.genes) == list(SC.fit_corpus_tokenizer(parts, {"min_sources": 2}).genes)
    assert "no training cells: not part of the vocabulary" in caplog.text
    assert held_samples.info["coverage"]["n_train_cells"] == 0
    disjoint = _source(master, range(700), range(500, 765), tmp_path / "disjoint.h5ad")
    a_only = _parts(two[:1])
    with pytest.raises(DataError, match="covers too little") as err:
        SC.fit_corpus_tokenizer([*a_only, (SC.read(disjoint, {}), np.zeros(0, dtype=np.int64))], {})
    assert "disjoint.h5ad" in str(err.value)


def test_ensembl_versions_from_different_releases_share_genes(two, master, tmp_path):
    a = ad.read_h5ad(two[0])
    a.var["gene_ids"] = [f"{g}.{i % 7 + 1}" for i, g in enumerate(a.var["gene_ids"])]
    a.write_h5ad(tmp_path / "A_versioned.h5ad")
    parts = _parts([tmp_path / "A_versioned.h5ad", two[1]])
    tok = SC.fit_corpus_tokenizer(parts, {})
    assert list(tok.genes) == list(SC.fit_corpus_tokenizer(_parts(two), {}).genes)
    assert not any("." in g for g in tok.genes)
    # A versioned data set meets the unversioned vocabulary: matched by stable id.
    versioned = np.array([f"{g}.12" for g in tok.genes[:10]] + ["ENSG99999999999.1", "CD3E"])
    np.testing.assert_array_equal(tok.column_map(versioned), [*range(10), -1, -1])


def test_one_source_is_the_single_input_tokenizer(two):
    parts = _parts(two[:1])
    assert SC.fit_corpus_tokenizer(parts, {}).hash == SC.fit_tokenizer(*parts[0], {}).hash


def test_transfer_to_a_third_data_set_maps_by_id_and_refuses_low_overlap(
    two, master, tmp_path, caplog
):
    """A model's tokenizer fitted on A + B (Ensembl ids) reads a third data set whose
    var_names are symbols: the var column of Ensembl ids is chosen and coverage logged."""
    tok = SC.fit_corpus_tokenizer(_parts(two), {"gene_set": "intersection"})
    third = master[:200, 100:700].copy()
    third.var["ensembl"] = third.var.pop("gene_ids")
    third = third[np.asarray(third.X.sum(axis=1)).reshape(-1) > 0].copy()
    third.write_h5ad(tmp_path / "third.h5ad")
    s = SC.read(tmp_path / "third.h5ad", {})
    with caplog.at_level(logging.INFO, logger="healthfm"):
        SC.check_input(s, tok)
    assert s.info["gene_column"] == "ensembl"
    assert "var/ensembl" in caplog.text and "gene vocabulary coverage" in caplog.text
    assert s.info["coverage"]["n_shared_genes"] == len(set(tok.genes) & set(third.var.ensembl))
    # A data set sharing only a few rarely expressed genes is refused.
    counts = np.asarray(master.X.sum(axis=0)).reshape(-1)
    vocab = np.flatnonzero(np.isin(master.var["gene_ids"], tok.genes))
    low = vocab[np.argsort(counts[vocab], kind="stable")[:2]]
    outside = np.setdiff1d(np.arange(master.n_vars), vocab)
    poor = _source(master, range(700), np.r_[outside, low], tmp_path / "poor.h5ad")
    with pytest.raises(DataError, match="of the counts"):
        SC.check_input(SC.read(poor, {}), tok)


# --------------------------------------------------------------------------- TileDB-SOMA
tiledbsoma = pytest.importorskip("tiledbsoma")


@pytest.fixture(scope="module")
def soma_dir(tmp_path_factory):
    import tiledbsoma.io

    uri = tmp_path_factory.mktemp("soma") / "pbmc"
    tiledbsoma.io.from_h5ad(str(uri), str(pbmc68k()), measurement_name="RNA", X_layer_name="raw")
    return uri


def test_soma_experiment_gives_the_h5ad_tokens(soma_dir, monkeypatch):
    from healthfm.singlecell import reader

    monkeypatch.setattr(reader, "BLOCK_ROWS", 128)  # several blocks
    opts = {"label_column": "bulk_labels", "total_column": "n_counts"}
    h5 = SC.read(pbmc68k(), opts)
    soma = SC.read(soma_dir, opts)
    assert SC.looks_like(soma_dir) is True and SC.looks_like(soma_dir.parent) is False
    np.testing.assert_array_equal(soma.keys, h5.keys)
    np.testing.assert_array_equal(soma.labels, h5.labels)
    np.testing.assert_array_equal(soma.payload.genes, h5.payload.genes)
    np.testing.assert_array_equal(soma.payload.totals, h5.payload.totals)
    np.testing.assert_array_equal(
        soma.payload.extra["n_expressed"], h5.payload.extra["n_expressed"]
    )
    split = split_indices(SC.split(h5, "healthfm", (0.7, 0.1, 0.2)))
    np.testing.assert_array_equal(
        split["train"], split_indices(SC.split(soma, "healthfm", (0.7, 0.1, 0.2)))["train"]
    )
    for kind in ("rank", "binned"):
        tok = SC.fit_tokenizer(soma, split["train"], {"tokenizer": kind})
        assert tok.hash == SC.fit_tokenizer(h5, split["train"], {"tokenizer": kind}).hash
        rows = np.r_[np.arange(600, 700), np.arange(0, 50)[::-1]]  # out of order
        x = list(SC.encode(tok, soma, rows))
        y = list(SC.encode(tok, h5, rows))
        np.testing.assert_array_equal(
            np.concatenate([c.ids for c in x]), np.concatenate([c.ids for c in y])
        )
        if kind == "binned":
            np.testing.assert_array_equal(x[0].values, y[0].values)


def test_soma_obs_filter_and_corpus_with_an_h5ad(soma_dir, master, tmp_path):
    s = SC.read(
        soma_dir, {"obs_filter": "bulk_labels == 'CD14+ Monocyte'", "label_column": "bulk_labels"}
    )
    h5 = ad.read_h5ad(pbmc68k())
    want = h5.obs_names[h5.obs["bulk_labels"] == "CD14+ Monocyte"]
    assert list(s.keys) == list(want) and set(s.labels) == {"CD14+ Monocyte"}
    np.testing.assert_array_equal(
        s.payload.to_csr().toarray(), h5[want].X.toarray().astype(np.float32)
    )
    assert s.info["soma"]["obs_filter"].startswith("bulk_labels")
    assert s.data_hash != SC.read(soma_dir, {}).data_hash
    # A filtered SOMA source (symbols in var_id) next to an .h5ad by symbol: one vocabulary.
    b = _source(master, range(300, 700), range(200, 765), tmp_path / "B.h5ad", ensembl=False)
    parts = [(s, np.arange(len(s))), *_parts([b])]
    tok = SC.fit_corpus_tokenizer(parts, {"gene_set": "intersection"})
    # Both panels hold genes 200..764 (the filtered cells' panel is all 765 genes).
    assert set(tok.genes) <= set(h5.var_names[200:]) and len(tok.genes) > 500
    assert s.info["coverage"]["n_genes"] == 765


def test_soma_bad_inputs_are_clear(soma_dir, tmp_path):
    with pytest.raises(DataError, match="obs_filter") as err:
        SC.read(soma_dir, {"obs_filter": "no_such_column == 'x'"})
    assert "bulk_labels" in str(err.value)  # the obs columns are listed
    with pytest.raises(DataError, match="keeps none"):
        SC.read(soma_dir, {"obs_filter": "bulk_labels == 'no such type'"})
    with pytest.raises(DataError, match="measurement 'ATAC' not found"):
        SC.read(soma_dir, {"measurement": "ATAC"})
    with pytest.raises(DataError, match="X layer 'counts' not found"):
        SC.read(soma_dir, {"x_layer": "counts"})
    with pytest.raises(DataError, match="gene column 'feature_name' is not in var"):
        SC.read(soma_dir, {"gene_column": "feature_name"})
    with pytest.raises(DataError, match="label column 'cell_type' is not in obs"):
        SC.read(soma_dir, {"label_column": "cell_type"})
    with pytest.raises(ConfigError, match="--x-layer"):
        SC.read(soma_dir, {"layer": "counts"})
    with pytest.raises(ConfigError, match="--obs-filter applies to a TileDB-SOMA"):
        SC.read(pbmc68k(), {"obs_filter": "x == 1"})


def test_cli_pretrains_on_a_soma_experiment(soma_dir, tmp_path):
    from healthfm.cli import main

    out = tmp_path / "model"
    args = ["pretrain", "singlecell", str(soma_dir), "--out", str(out), "--max-length", "32"]
    args += ["--preset", "tiny", "--steps", "2", "--batch-size", "16", "--eval-every", "2"]
    assert main(args) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    # Embedding the experiment (filtered): parquet rows; an .h5ad output is refused.
    emb = tmp_path / "emb.parquet"
    filt = ["--obs-filter", "bulk_labels == 'CD14+ Monocyte'"]
    assert main(["embed", str(out), str(soma_dir), "--out", str(emb), *filt]) == 0
    import polars as pl

    assert pl.read_parquet(emb).height == 129
    assert main(["embed", str(out), str(soma_dir), "--out", str(tmp_path / "e.h5ad")]) != 0


def test_cli_pretrains_on_two_panels_and_embeds_a_third(two, master, tmp_path, caplog):
    """The corpus stage: A + B (different panels, Ensembl ids in a var column) and a third
    file held out whole; the model then embeds a data set named by symbols."""
    import polars as pl

    from healthfm.cli import main

    held = _source(master, range(0, 700, 3), range(100, 700), tmp_path / "C.h5ad")
    out = tmp_path / "model"
    args = ["pretrain", "singlecell", *map(str, two), str(held), "--out", str(out)]
    args += ["--holdout-source", "C", "--max-length", "32", "--preset", "tiny", "--steps", "2"]
    args += ["--batch-size", "16", "--eval-every", "2"]
    with caplog.at_level(logging.INFO, logger="healthfm"):
        assert main(args) == 0
    assert "no training cells: not part of the vocabulary" in caplog.text
    genes = json.loads((out / "tokenizer.json").read_text())["config"]["genes"]
    assert ensembl_share(np.array(genes)) == 1.0
    third = master[:150, 50:600].copy()
    third.var["ensembl"] = third.var.pop("gene_ids")
    third = third[np.asarray(third.X.sum(axis=1)).reshape(-1) > 0].copy()
    third.write_h5ad(tmp_path / "third.h5ad")
    emb = tmp_path / "third.parquet"
    assert main(["embed", str(out), str(tmp_path / "third.h5ad"), "--out", str(emb)]) == 0
    assert pl.read_parquet(emb).height == third.n_obs
    assert "var/ensembl" in caplog.text

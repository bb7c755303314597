"""Tokenizers against plain per-cell reference loops (Geneformer / scGPT algorithms)."""

from __future__ import annotations

import numpy as np
import pytest

from healthfm.errors import ConfigError, DataError
from healthfm.modality import get_modality
from healthfm.singlecell import BinnedTokenizer, RankValueTokenizer, read_h5ad
from healthfm.singlecell.tokenizer import nonzero_medians, quantile_bins, sort_rows_desc
from healthfm.tokenizer import CLS_ID, N_SPECIAL, tokenizer_from_dict

SC = get_modality("singlecell")


@pytest.fixture(scope="module")
def samples():
    from healthfm.singlecell import pbmc68k

    return read_h5ad(pbmc68k(), label_column="bulk_labels", total_column="n_counts")


def _train(samples):
    return np.flatnonzero(SC.split(samples, "healthfm", (0.7, 0.1, 0.2)) == "train")


def _cells(chunks):
    out = []
    for c in chunks:
        for i in range(len(c)):
            out.append(c.sample(i))
    return out


def test_medians_equal_numpy_median_over_training_cells(samples):
    train = _train(samples)
    m = samples.payload
    x = m.to_csr(train).toarray().astype(np.float64)
    norm = x / m.totals[train, None] * 1e4
    genes, med = nonzero_medians([(m.to_csr(train), m.totals[train])], m.genes)
    expressed = (x > 0).any(axis=0)
    assert list(genes) == list(m.genes[expressed])
    ref = np.array([np.median(norm[norm[:, j] > 0, j]) for j in np.flatnonzero(expressed)])
    np.testing.assert_allclose(med, ref, rtol=1e-6)


def test_rank_tokens_match_geneformer_loop(samples):
    train = _train(samples)
    tok = SC.fit_tokenizer(samples, train, {"tokenizer": "rank", "max_length": 128})
    assert isinstance(tok, RankValueTokenizer) and tok.fields == ()
    cells = _cells(SC.encode(tok, samples))
    m = samples.payload
    x = m.to_csr()
    col_map = tok.column_map(m.genes)
    for i in range(0, len(samples), 7):  # a checked sample of 100 cells
        row = x[i]
        v = col_map[row.indices]
        keep = v >= 0
        # Geneformer: counts / n_counts * 1e4 / gene median, argsort descending, top N.
        score = row.data[keep] / m.totals[i] * 1e4 / tok.medians[v[keep]]
        order = np.argsort(-score, kind="stable")
        expected = np.concatenate([[CLS_ID], N_SPECIAL + v[keep][order][:127]])
        assert np.array_equal(cells[i]["ids"], expected), i
        assert cells[i]["key"] == samples.keys[i]


def test_binned_values_match_scgpt_binning(samples):
    train = _train(samples)
    tok = SC.fit_tokenizer(samples, train, {"tokenizer": "binned", "n_bins": 11})
    assert isinstance(tok, BinnedTokenizer) and tok.fields == ("values",)
    cells = _cells(SC.encode(tok, samples))
    m = samples.payload
    x = m.to_csr()
    col_map = tok.column_map(m.genes)
    for i in range(0, len(samples), 11):
        row = x[i]
        v = col_map[row.indices]
        keep = v >= 0
        logs = np.log1p(row.data[keep] / m.totals[i] * 1e4).astype(np.float32).astype(np.float64)
        # scGPT: quantile edges of the cell's non-zero values, np.digitize.
        edges = np.quantile(logs, np.linspace(0, 1, tok.n_bins - 1))
        bins = np.digitize(logs, edges)
        order = np.lexsort((row.indices[keep], -logs))
        got = cells[i]
        assert np.isnan(got["values"][0]) and got["ids"][0] == CLS_ID
        assert np.array_equal(got["ids"][1:], N_SPECIAL + v[keep][order])
        np.testing.assert_allclose(got["values"][1:], bins[order] / (tok.n_bins - 1), rtol=1e-6)


def test_quantile_bins_with_ties_and_single_values():
    rng = np.random.default_rng(0)
    rows, vals = [], []
    for r, n in enumerate([1, 2, 5, 50, 333]):
        v = np.sort(rng.integers(1, 6, n).astype(np.float32))[::-1]  # many ties
        rows.append(np.full(n, r))
        vals.append(v)
    rows, vals = np.concatenate(rows), np.concatenate(vals)
    counts = np.bincount(rows)
    starts = np.cumsum(counts) - counts
    got = quantile_bins(vals, rows, counts, starts, 51)
    for r in range(len(counts)):
        v = vals[rows == r].astype(np.float64)
        ref = np.digitize(v, np.quantile(v, np.linspace(0, 1, 50)))
        assert np.array_equal(got[rows == r], ref)


def test_sort_fallback_equals_packed_keys():
    rng = np.random.default_rng(1)
    rows = np.sort(rng.integers(0, 50, 2000))
    # integer scores (ties broken by input order) and near-ties that collide in float32
    scores = rng.integers(1, 20, 2000).astype(np.float64) * (1 + rng.integers(0, 2, 2000) * 1e-12)
    packed = sort_rows_desc(rows, scores, 50)
    lexsorted = sort_rows_desc(rows, scores, 50, packed=False)
    assert np.array_equal(packed, lexsorted)
    assert np.array_equal(packed, np.lexsort((np.arange(2000), -scores, rows)))


def test_tokenizer_uses_training_cells_only(samples):
    train = _train(samples)
    tok = SC.fit_tokenizer(samples, train, {})
    other = np.setdiff1d(np.arange(len(samples)), train)
    m = samples.payload
    altered = m.to_csr().copy()
    altered[other] = altered[other] * 5  # change only non-training cells
    m2 = type(m)(genes=m.genes, totals=m.totals, matrix=altered, extra=m.extra)
    s2 = type(samples)(**{**samples.__dict__, "payload": m2})
    assert SC.fit_tokenizer(s2, train, {}).hash == tok.hash


def test_json_round_trip_and_default_context(samples):
    tok = SC.fit_tokenizer(samples, _train(samples), {"tokenizer": "binned"})
    assert tok.max_length == 512  # longest PBMC cell has 409 genes, + [CLS] -> next power of two
    again = tokenizer_from_dict(tok.to_dict())
    assert again.hash == tok.hash
    a = next(SC.encode(tok, samples, np.arange(20)))
    b = next(SC.encode(again, samples, np.arange(20)))
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.values, b.values, equal_nan=True)
    assert SC.model_defaults(tok, samples, {}) == {"max_len": 512, "use_values": True}


def test_coverage_report_and_no_overlap(samples, caplog):
    m = samples.payload
    half = np.arange(len(m.genes)) % 2 == 0
    tok = RankValueTokenizer(m.genes[half], np.ones(int(half.sum())), max_length=64)
    cov = SC.coverage(samples, tok)
    assert cov.n_shared == half.sum() and cov.n_model_genes == half.sum()
    x = m.to_csr()
    expected = x[:, np.flatnonzero(half)].sum() / x.sum()
    assert cov.count_fraction == pytest.approx(expected)
    assert "coverage" in cov.report()
    with caplog.at_level("INFO", logger="healthfm"):
        SC.check_input(samples, tok)
    assert "gene vocabulary coverage" in caplog.text
    assert samples.info["coverage"]["n_shared_genes"] == half.sum()
    alien = RankValueTokenizer(["ENSG000001", "ENSG000002"], [1.0, 1.0])
    with pytest.raises(DataError) as info:
        SC.check_input(samples, alien)
    assert info.value.column == "var_names" and "--gene-column" in info.value.message


def test_bad_tokenizer_settings():
    with pytest.raises(ConfigError):
        RankValueTokenizer(["A"], [0.0])
    with pytest.raises(ConfigError):
        BinnedTokenizer(["A"], n_bins=2)
    with pytest.raises(ConfigError):
        RankValueTokenizer([], [])

"""The MEDS tokenizer: train-only fit, value deciles, text tokens, time, round trip."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import polars as pl

from ehr.ehr_helpers import events, write_shard
from healthfm.ehr.reader import open_meds
from healthfm.ehr.tokenizer import STATIC_TIME, MedsTokenizer
from healthfm.modality import get_modality
from healthfm.tokenizer import CLS_ID, UNK_ID, tokenizer_from_dict

D = datetime


def _dataset(tmp_path):
    rows = [(1, None, "SEX//F"), (1, D(1970, 1, 1), "MEDS_BIRTH")]
    t = D(2010, 1, 1)
    for i in range(100):  # LAB values 0..99 for subject 1 (train)
        rows.append((1, t + timedelta(hours=i), "LAB", float(i)))
    rows += [(2, D(1980, 1, 1), "MEDS_BIRTH"), (2, D(2011, 1, 1), "ONLY_IN_TEST")] * 1
    df = events(rows).with_columns(pl.lit(None, pl.String).alias("text_value"))
    df = df.with_columns(
        pl.when(pl.col("code") == "SEX//F").then(pl.lit("yes")).otherwise(None).alias("text_value")
    )
    return write_shard(tmp_path / "m", df, splits={1: "train", 2: "held_out"})


def test_fit_on_train_only_and_value_deciles(tmp_path):
    ds = open_meds(_dataset(tmp_path))
    tok = MedsTokenizer.fit(ds, np.array([1]), min_count=1, min_text_count=1)
    assert "ONLY_IN_TEST" not in tok.codes  # the held-out subject never shapes the vocabulary
    assert "LAB" in tok.bins and len(tok.bins["LAB"]) == 9
    np.testing.assert_allclose(
        tok.bins["LAB"], np.quantile(np.arange(100.0), np.arange(1, 10) / 10)
    )
    assert ["SEX//F", "yes"] in tok.texts
    enc = next(tok.encode_dataset(ds))
    names = tok.token_names(enc.ids[enc.offsets[0] : enc.offsets[1]])
    assert names[:3] == ["[CLS]", "SEX//F//yes", "MEDS_BIRTH"]
    lab = [n for n in names if n.startswith("LAB//Q")]
    assert len(lab) == 100
    counts = {q: lab.count(q) for q in set(lab)}
    assert len(counts) == 10 and min(counts.values()) >= 9  # deciles: ~10 values per bin
    # subject 2: unknown code -> [UNK]
    second = enc.ids[enc.offsets[1] : enc.offsets[2]]
    assert UNK_ID in second.tolist()


def test_times_are_ages_and_gap_tokens(tmp_path):
    ds = open_meds(_dataset(tmp_path))
    tok = MedsTokenizer.fit(ds, np.array([1]), min_count=1, min_text_count=1)
    enc = next(tok.encode_dataset(ds))
    lo, hi = enc.offsets[0], enc.offsets[1]
    names = tok.token_names(enc.ids[lo:hi])
    ages = enc.ages[lo:hi]
    assert np.isnan(ages[0]) and np.isnan(ages[1])  # [CLS] and the static row have no age
    assert ages[2] == 0.0  # MEDS_BIRTH
    first_lab = names.index("[GAP>=365d]") + 1
    expected = (np.datetime64("2010-01-01") - np.datetime64("1970-01-01")).astype(int)
    assert ages[first_lab] == expected
    assert enc.time_us[lo] == STATIC_TIME and enc.time_us[lo + 1] == STATIC_TIME
    # the gap token carries the time of the event it precedes; hourly labs need no gap token
    assert enc.time_us[lo + first_lab - 1] == enc.time_us[lo + first_lab]
    assert sum(n.startswith("[GAP") for n in names) == 1
    t = enc.time_us[lo:hi]
    assert np.all(t[1:] >= t[:-1])


def test_no_gap_tokens_option(tmp_path):
    ds = open_meds(_dataset(tmp_path))
    tok = MedsTokenizer.fit(ds, np.array([1]), min_count=1, gap_days=())
    enc = next(tok.encode_dataset(ds))
    assert not any(n.startswith("[GAP") for n in tok.token_names(enc.ids))
    assert enc.ids[0] == CLS_ID


def test_min_count_and_cap(syn_meds):
    ehr = get_modality("ehr")
    s = ehr.read(syn_meds, {})
    train = np.flatnonzero(ehr.split(s, "x", (0.7, 0.1, 0.2)) == "train")
    full = ehr.fit_tokenizer(s, train, {"min_count": 1})
    capped = ehr.fit_tokenizer(s, train, {"min_count": 1, "max_codes": 5})
    assert len(capped.codes) == 5 and capped.codes == full.codes[:5]
    assert "SOCIAL/SMOKING" in full.codes and any(c == "SOCIAL/SMOKING" for c, _ in full.texts)


def test_round_trip_and_hash(syn_meds):
    ehr = get_modality("ehr")
    s = ehr.read(syn_meds, {})
    tok = ehr.fit_tokenizer(s, np.arange(len(s)), {})
    again = tokenizer_from_dict(tok.to_dict())
    assert again.hash == tok.hash and again.tokens == tok.tokens
    a = next(tok.encode_dataset(s.payload["dataset"]))
    b = next(again.encode_dataset(s.payload["dataset"]))
    np.testing.assert_array_equal(a.ids, b.ids)


def test_vectorized_encoding_matches_per_subject(syn_meds):
    """Encoding a whole shard equals encoding each subject alone (no cross-subject bleed)."""
    ehr = get_modality("ehr")
    s = ehr.read(syn_meds, {})
    tok = ehr.fit_tokenizer(s, np.arange(len(s)), {})
    ds = s.payload["dataset"]
    df = pl.read_parquet(ds.shards[0])
    enc = tok.encode_frame(df)
    for i, sid in enumerate(enc.subject_ids[:15]):
        one = tok.encode_frame(df.filter(pl.col("subject_id") == sid))
        np.testing.assert_array_equal(one.ids, enc.ids[enc.offsets[i] : enc.offsets[i + 1]])
        np.testing.assert_array_equal(one.ages, enc.ages[enc.offsets[i] : enc.offsets[i + 1]])


def test_encode_order_follows_indices(syn_meds):
    ehr = get_modality("ehr")
    s = ehr.read(syn_meds, {})
    tok = ehr.fit_tokenizer(s, np.arange(len(s)), {})
    idx = np.array([5, 1, 70, 3])
    chunks = list(ehr.encode(tok, s, idx))
    assert [int(k) for c in chunks for k in c.keys] == s.keys[idx].tolist()
    sorted_chunks = list(ehr.encode(tok, s, np.sort(idx)))
    by_key = {int(k): c.sample(i)["ids"] for c in sorted_chunks for i, k in enumerate(c.keys)}
    for c in chunks:
        for i, k in enumerate(c.keys):
            np.testing.assert_array_equal(c.sample(i)["ids"], by_key[int(k)])


def test_fit_and_encoding_do_not_depend_on_the_batch_size(syn_meds, monkeypatch):
    """Streaming in small subject-aligned batches gives the same vocabulary, bins and tokens."""
    import healthfm.ehr.reader as reader
    import healthfm.ehr.tokenizer as tokenizer

    ds = open_meds(syn_meds)
    train = np.array([s for s, sp in ds.splits.items() if sp == "train"])

    def run() -> tuple[dict, list[np.ndarray]]:
        tok = MedsTokenizer.fit(ds, train, min_count=2, min_text_count=2)
        encs = list(tok.encode_dataset(ds))
        flat = [
            np.concatenate([getattr(e, name) for e in encs])
            for name in ("subject_ids", "ids", "ages", "time_us")
        ]
        return tok.config(), [*flat, np.concatenate([np.diff(e.offsets) for e in encs])]

    config, arrays = run()
    monkeypatch.setattr(reader, "BATCH_ROWS", 97)
    monkeypatch.setattr(tokenizer, "BATCH_ROWS", 97)
    small_config, small_arrays = run()
    assert small_config == config
    for a, b in zip(arrays, small_arrays, strict=True):
        np.testing.assert_array_equal(a, b)
    # bottom-k pruning of the value sample across batches gives the same sample
    monkeypatch.setattr(tokenizer, "VALUE_SAMPLE_CAP", 40)
    capped = run()[0]
    assert capped["bins"] != config["bins"]
    monkeypatch.setattr(reader, "BATCH_ROWS", 1 << 20)
    assert run()[0] == capped

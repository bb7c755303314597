"""MEDS events → tokens: codes, per-code value deciles, frequent text values, time gaps.

One event becomes one token; the vocabulary is fitted on the train split only.

* **Codes**: every code seen at least ``min_count`` times in train (optionally the
  ``max_codes`` most frequent); others become ``[UNK]``.
* **Numeric values → value tokens** ``CODE//Q<b>``: the per-code quantile bin (deciles by
  default, cut points fitted on train). A value token rather than the backbone's continuous
  ``values`` input, because (1) the causal objective predicts the *next token*, so with
  value tokens the model must predict the lab result too, not only which lab was ordered
  (CLMBR and ETHOS do the same); (2) quantile bins are unit-free and robust to outliers
  and to the unit mixes real ETLs produce; (3) the sequence stays one token per event.
* **Text values**: ``(code, text_value)`` pairs seen at least ``min_text_count`` times in
  train become tokens ``CODE//TEXT``; rarer texts fall back to the code token.
* **Time, both ways**: the continuous ``times`` field is the age in days at the event
  (from ``MEDS_BIRTH``), embedded by the backbone's sinusoidal time encoder (FEMR puts age
  into its rotary encoding); and an interval token ``[GAP …]`` (as ETHOS) is inserted
  before an event when at least a day has passed since the subject's previous event,
  because attention cannot read a gap off two age embeddings as directly as a token says
  it, and the next-token objective then also has to predict *when* care resumes.
  Subjects without ``MEDS_BIRTH`` get NaN ages (no time input) but keep the gap tokens.
* Every subject starts with ``[CLS]`` (a start token: a prediction time before any event
  still has a state to read). Static rows (null time) follow it.

Everything is vectorized over a batch of whole subjects with polars / numpy.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import polars as pl

from healthfm.ehr.reader import BATCH_ROWS, BIRTH_CODE, US_PER_DAY, MedsDataset, iter_batches
from healthfm.errors import ConfigError
from healthfm.tokenizer import (
    CLS_ID,
    N_SPECIAL,
    SPECIAL_TOKENS,
    UNK_ID,
    Tokenizer,
    register_tokenizer,
)
from healthfm.tokens import TokenChunk

#: Interval-token cut points in days: [1d, 1w), [1w, 1m), [1m, 3m), [3m, 1y), [1y, ∞).
DEFAULT_GAP_DAYS = (1.0, 7.0, 30.0, 91.0, 365.0)
STATIC_TIME = np.iinfo(np.int64).min
#: Values kept per code and shard for fitting the quantile bins (bounds memory).
VALUE_SAMPLE_CAP = 20_000


def _bottom_k(frames: list[pl.DataFrame]) -> pl.DataFrame:
    """Rows with the :data:`VALUE_SAMPLE_CAP` smallest keys ``u`` of each code ``cid``."""
    merged = pl.concat(frames)
    return merged.filter(pl.col("u").rank("ordinal").over("cid") <= VALUE_SAMPLE_CAP)


@dataclass
class EncodedShard:
    """Tokens of the subjects of one shard, in flat form.

    ``ids`` (int32), ``ages`` (float64 days since birth, NaN where none) and ``time_us``
    (int64 µs since the epoch; static rows and ``[CLS]`` hold the int64 minimum, so they
    are before every prediction time) are aligned; subject ``i`` is
    ``offsets[i]:offsets[i+1]``.
    """

    subject_ids: np.ndarray
    ids: np.ndarray
    ages: np.ndarray
    time_us: np.ndarray
    offsets: np.ndarray
    n_events: int

    def chunk(self) -> TokenChunk:
        """As a :class:`TokenChunk` (``times`` = age in days)."""
        return TokenChunk(
            ids=self.ids, offsets=self.offsets, keys=self.subject_ids.tolist(), times=self.ages
        )


def _value_bins(
    values: list[pl.DataFrame],
    code_ids: dict[str, int],
    vocab: set[str],
    n_bins: int,
    min_count: int,
) -> dict[str, list[float]]:
    """Cut points of every vocabulary code with at least ``min_count`` sampled values:
    the distinct ``n_bins``-quantiles of its value sample."""
    bins: dict[str, list[float]] = {}
    sample = _bottom_k(values)
    names = pl.Series("code", list(code_ids), dtype=pl.String)
    vals = sample.with_columns(names.gather(sample["cid"])).filter(
        pl.col("code").is_in(list(vocab))
    )
    qs = [(b + 1) / n_bins for b in range(n_bins - 1)]
    per_code = (
        vals.group_by("code")
        .agg(
            pl.len().alias("n"),
            *[
                pl.col("numeric_value").quantile(q, "linear").alias(f"q{j}")
                for j, q in enumerate(qs)
            ],
        )
        .filter(pl.col("n") >= min_count)
    )
    for row in per_code.sort("code").iter_rows(named=True):
        edges = sorted({float(row[f"q{j}"]) for j in range(len(qs))})
        bins[row["code"]] = edges
    return bins


def _text_tokens(
    text_counts: dict[tuple[str, str], int], vocab: set[str], min_text_count: int
) -> list[list[str]]:
    """The (code, text) pairs seen at least ``min_text_count`` times, most frequent first."""
    tc = pl.DataFrame(
        {
            "code": [c for c, _ in text_counts],
            "text_value": [t for _, t in text_counts],
            "len": list(text_counts.values()),
        },
        schema={"code": pl.String, "text_value": pl.String, "len": pl.Int64},
    )
    tc = tc.filter((pl.col("len") >= min_text_count) & pl.col("code").is_in(list(vocab)))
    tc = tc.sort(["len", "code", "text_value"], descending=[True, False, False])
    return [[c, t] for c, t in tc.select("code", "text_value").iter_rows()]


@register_tokenizer
class MedsTokenizer(Tokenizer):
    """Tokenizer of MEDS events (see the module docstring for the encoding).

    Parameters
    ----------
    codes
        Vocabulary codes, most frequent first.
    bins
        Code → sorted quantile cut points of its numeric values.
    texts
        ``[code, text_value]`` pairs that get their own token.
    gap_days
        Interval-token cut points in days (empty: no gap tokens).
    """

    type: ClassVar[str] = "ehr.meds"
    modality: ClassVar[str] = "ehr"
    fields = ("times",)

    def __init__(
        self,
        codes: list[str],
        bins: dict[str, list[float]],
        texts: list[list[str]],
        gap_days: tuple[float, ...] | list[float] = DEFAULT_GAP_DAYS,
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.codes = list(codes)
        self.bins = {c: [float(x) for x in e] for c, e in bins.items()}
        self.texts = [list(t) for t in texts]
        self.gap_days = [float(g) for g in gap_days]
        self.settings = dict(settings or {})
        if len(set(self.codes)) != len(self.codes):
            raise ConfigError("duplicate codes in the tokenizer vocabulary")
        tokens = list(SPECIAL_TOKENS)
        self.gap_base = len(tokens)
        tokens += [f"[GAP>={g:g}d]" for g in self.gap_days]
        self.code_base = len(tokens)
        tokens += self.codes
        self.code_to_id = {c: self.code_base + i for i, c in enumerate(self.codes)}
        # Value tokens: per binned code, len(edges) + 1 consecutive ids.
        self.bin_base: dict[str, int] = {}
        for code in self.codes:
            if code in self.bins:
                self.bin_base[code] = len(tokens)
                tokens += [f"{code}//Q{b}" for b in range(len(self.bins[code]) + 1)]
        self.text_base = len(tokens)
        tokens += [f"{c}//{t}" for c, t in self.texts]
        self.tokens = tokens

    # ------------------------------------------------------------------ contract
    @property
    def vocab_size(self) -> int:
        """Number of token ids, specials included."""
        return len(self.tokens)

    def config(self) -> dict[str, Any]:
        """JSON state."""
        return {
            "codes": self.codes,
            "bins": self.bins,
            "texts": self.texts,
            "gap_days": self.gap_days,
            "settings": self.settings,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MedsTokenizer:
        """Rebuild from :meth:`config`."""
        return cls(
            config["codes"],
            config["bins"],
            config["texts"],
            config["gap_days"],
            config.get("settings"),
        )

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        ds: MedsDataset | list[tuple[MedsDataset, np.ndarray]],
        train_subjects: np.ndarray | None = None,
        min_count: int = 5,
        max_codes: int | None = None,
        n_bins: int = 10,
        min_text_count: int = 20,
        gap_days: tuple[float, ...] | list[float] = DEFAULT_GAP_DAYS,
        seed: int = 0,
    ) -> MedsTokenizer:
        """Fit the vocabulary, value bins and text tokens on the train subjects only.

        Streams the shards in batches of whole subjects (:func:`iter_batches`) and keeps
        running code counts, (code, text) counts and at most :data:`VALUE_SAMPLE_CAP`
        numeric values per code (a uniform random subset), so memory stays bounded by one
        batch plus the vocabulary. The result does not depend on the batch size.

        ``ds`` may be a list of ``(dataset, train_subjects)`` pairs: one vocabulary over
        several MEDS roots (a corpus), counted over every root's train subjects (each root's
        subject ids stay its own: they are read root by root).
        """
        parts = [(ds, train_subjects)] if isinstance(ds, MedsDataset) else list(ds)
        if n_bins < 1 or min_count < 1:
            raise ConfigError("n_bins and min_count must be positive")
        # Running totals in plain dicts (O(distinct codes)); the value sample holds a code
        # index, not the string: polars string columns gathered from a batch keep that
        # batch's string buffers alive, so kept strings would pin every batch read.
        code_counts: dict[str, int] = {}
        text_counts: dict[tuple[str, str], int] = {}
        code_ids: dict[str, int] = {}
        values: list[pl.DataFrame] = []
        kept = pending = 0  # rows of the pruned value sample, rows appended since
        shard_index = {
            path: i for i, path in enumerate(p for part, _ in parts for p in part.shards)
        }
        rng_path, rng = None, np.random.default_rng(seed)
        batches = (b for part, subjects in parts for b in iter_batches(part, subjects))
        for path, df in batches:
            if path != rng_path:  # one random stream per shard, drawn on across its batches
                rng_path, rng = path, np.random.default_rng([seed, shard_index[path]])
            here = df.group_by("code").len()
            for code, n in zip(here["code"].to_list(), here["len"].to_list(), strict=True):
                code_counts[code] = code_counts.get(code, 0) + n
                code_ids.setdefault(code, len(code_ids))
            texts_here = (
                df.filter(pl.col("text_value").is_not_null()).group_by(["code", "text_value"]).len()
            )
            for code, text, n in texts_here.iter_rows():
                text_counts[code, text] = text_counts.get((code, text), 0) + n
            num = df.filter(pl.col("numeric_value").is_not_null()).select(
                pl.col("code").replace_strict(code_ids, return_dtype=pl.UInt32).alias("cid"),
                "numeric_value",
            )
            del df, here, texts_here
            if len(num):
                # Bottom-k sampling: every value gets a random key once; keeping the
                # VALUE_SAMPLE_CAP smallest keys per code over all values seen so far is a
                # uniform sample of that code's values, in bounded memory. Pruning only once
                # the unpruned rows outnumber the kept ones (and a batch) keeps the work
                # linear; where it happens does not change the sample.
                values.append(num.with_columns(pl.Series("u", rng.random(len(num)))))
                pending += len(num)
                if pending > max(kept, BATCH_ROWS):
                    values = [_bottom_k(values)]
                    kept, pending = len(values[0]), 0
            del num
        if not code_counts:
            raise ConfigError("the train split holds no events; cannot fit a tokenizer")
        counts = pl.DataFrame(
            {"code": list(code_counts), "len": list(code_counts.values())},
            schema={"code": pl.String, "len": pl.Int64},
        ).filter(pl.col("len") >= min_count)
        counts = counts.sort(["len", "code"], descending=[True, False])
        if max_codes is not None:
            counts = counts.head(max_codes)
        codes = counts["code"].to_list()
        vocab = set(codes)
        bins = _value_bins(values, code_ids, vocab, n_bins, min_count) if values else {}
        texts = _text_tokens(text_counts, vocab, min_text_count) if text_counts else []
        settings = {
            "min_count": min_count,
            "max_codes": max_codes,
            "n_bins": n_bins,
            "min_text_count": min_text_count,
        }
        return cls(codes, bins, texts, gap_days, settings)

    # ------------------------------------------------------------------ encoding
    def _lookups(self) -> tuple[dict[str, int], np.ndarray, np.ndarray, pl.DataFrame]:
        """Code index, value cut-point table, value-token bases and text-token table.

        Built once per tokenizer (encoding runs once per batch).
        """
        cached = self.__dict__.get("_lookup_cache")
        if cached is not None:
            return cached
        code_index = {c: i for i, c in enumerate(self.codes)}
        # Value tokens: a padded (n_codes + 1, max_edges) table of cut points, +inf padded;
        # the last row (unknown codes) and codes without bins have base -1.
        width = max((len(e) for e in self.bins.values()), default=1)
        table = np.full((len(self.codes) + 1, max(width, 1)), np.inf)
        base = np.full(len(self.codes) + 1, -1, dtype=np.int64)
        for code, edges in self.bins.items():
            j = code_index[code]
            table[j, : len(edges)] = edges
            base[j] = self.bin_base[code]
        texts = pl.DataFrame(
            {
                "code": [c for c, _ in self.texts],
                "text_value": [t for _, t in self.texts],
                "tid": np.arange(self.text_base, self.text_base + len(self.texts), dtype=np.int64),
            },
            schema={"code": pl.String, "text_value": pl.String, "tid": pl.Int64},
        )
        self._lookup_cache = (code_index, table, base, texts)
        return self._lookup_cache

    def _event_ids(self, df: pl.DataFrame) -> np.ndarray:
        """One token id per event row (vectorized)."""
        code_index, table, base, texts = self._lookups()
        ci = df["code"].replace_strict(code_index, default=-1, return_dtype=pl.Int64).to_numpy()
        known = ci >= 0
        ids = np.where(known, self.code_base + np.maximum(ci, 0), UNK_ID).astype(np.int64)
        if self.bins:
            v = df["numeric_value"].to_numpy().astype(np.float64)  # nulls -> NaN
            row = np.where(known, ci, len(self.codes))
            has = known & ~np.isnan(v) & (base[row] >= 0)
            if has.any():
                r = row[has]
                b = (v[has, None] >= table[r]).sum(axis=1)
                ids[has] = base[r] + b
        if self.texts:
            # Only rows with a text value can match a (code, text) token.
            with_text = np.flatnonzero(df["text_value"].is_not_null().to_numpy())
            if len(with_text):
                tid = (
                    df[with_text]
                    .select("code", "text_value")
                    .join(texts, on=["code", "text_value"], how="left", maintain_order="left")[
                        "tid"
                    ]
                    .to_numpy()
                )
                tid = tid.astype(np.float64)
                matched = ~np.isnan(tid)
                ids[with_text[matched]] = tid[matched].astype(np.int64)
        return ids

    def encode_frame(self, df: pl.DataFrame) -> EncodedShard:
        """Tokenize a validated MEDS frame (rows of a subject contiguous and time-sorted)."""
        n = len(df)
        if n == 0:
            z = np.zeros(0)
            return EncodedShard(
                np.zeros(0, np.int64),
                z.astype(np.int32),
                z,
                z.astype(np.int64),
                np.zeros(1, np.int64),
                0,
            )
        sid = df["subject_id"].to_numpy()
        t = df["time"].cast(pl.Int64).to_numpy(allow_copy=True)
        t = np.where(df["time"].is_null().to_numpy(), STATIC_TIME, t).astype(np.int64)
        static = t == STATIC_TIME
        starts = np.flatnonzero(np.r_[True, sid[1:] != sid[:-1]])
        rank = np.cumsum(np.r_[True, sid[1:] != sid[:-1]]) - 1  # subject index of each row
        subjects = sid[starts]
        # Birth time of each subject (first MEDS_BIRTH row), NaN if none.
        is_birth = (df["code"] == BIRTH_CODE).to_numpy() & ~static
        birth = np.full(len(subjects), np.nan)
        b_rows = np.flatnonzero(is_birth)
        if len(b_rows):
            first = np.unique(rank[b_rows], return_index=True)
            birth[first[0]] = t[b_rows[first[1]]]
        ages = np.where(static, np.nan, (t - np.nan_to_num(birth[rank], nan=0)) / US_PER_DAY)
        ages = np.where(np.isnan(birth[rank]), np.nan, ages)
        ids = self._event_ids(df)
        # Gap tokens: before a timed event at least gap_days[0] after the previous timed event.
        gap_bin = np.full(n, -1, dtype=np.int64)
        if self.gap_days:
            timed = np.flatnonzero(~static)
            if len(timed) > 1:
                same_subject = rank[timed[1:]] == rank[timed[:-1]]
                gap = (t[timed[1:]] - t[timed[:-1]]) / US_PER_DAY
                g = np.searchsorted(np.asarray(self.gap_days), gap, side="right") - 1
                ok = same_subject & (g >= 0)
                gap_bin[timed[1:][ok]] = g[ok]
        has_gap = gap_bin >= 0
        # Output positions: one [CLS] per subject (before its rows) and one gap token before
        # each event that has one.
        inserted = (rank + 1) + np.cumsum(has_gap)
        pos = np.arange(n) + inserted
        total = n + len(subjects) + int(has_gap.sum())
        out_ids = np.empty(total, dtype=np.int32)
        out_age = np.empty(total, dtype=np.float64)
        out_t = np.empty(total, dtype=np.int64)
        out_ids[pos] = ids
        out_age[pos] = ages
        out_t[pos] = t
        gp = pos[has_gap] - 1
        out_ids[gp] = self.gap_base + gap_bin[has_gap]
        out_age[gp] = ages[has_gap]
        out_t[gp] = t[has_gap]
        cls_pos = pos[starts] - 1 - has_gap[starts]
        out_ids[cls_pos] = CLS_ID
        out_age[cls_pos] = np.nan
        out_t[cls_pos] = STATIC_TIME
        offsets = np.r_[cls_pos, total].astype(np.int64)
        return EncodedShard(subjects.astype(np.int64), out_ids, out_age, out_t, offsets, n)

    def encode_dataset(
        self, ds: MedsDataset, subjects: np.ndarray | None = None
    ) -> Iterator[EncodedShard]:
        """Tokenize the chosen subjects (all by default), in file order.

        One :class:`EncodedShard` per batch of whole subjects (:func:`iter_batches`), so
        memory is bounded by a batch; the concatenated output does not depend on the batch
        size.
        """
        for _, df in iter_batches(ds, subjects):
            yield self.encode_frame(df)

    def token_names(self, ids: np.ndarray) -> list[str]:
        """Token strings of ``ids`` (for inspection)."""
        return [self.tokens[int(i)] for i in ids]


assert N_SPECIAL == 5

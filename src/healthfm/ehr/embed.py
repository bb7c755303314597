"""Embeddings and count features at prediction times, without leakage.

The contract: the representation of a label row ``(subject_id, prediction_time)`` is a
function of exactly the subject's events with ``time <= prediction_time`` (MEDS:
inclusive), never of a later one.

How: each subject is tokenized once (its tokens carry their event time), the *cut-off*
of a label is the number of the subject's tokens with ``time <= prediction_time`` (one
vectorized stable merge of token and label times), and the causal model's hidden state at
position ``cut-off - 1`` summarises exactly those tokens. So one forward pass over a
subject's tokens serves all of its prediction times.

Histories longer than the context ``N`` (``max_len``): a cut-off ``c <= N`` reads the
shared pass over the subject's first tokens; a cut-off ``c > N`` reads a window that starts
on a grid of stride ``N / 2`` (the smallest grid point ``>= c - N``), so it sees the most
recent ``N / 2 + 1`` to ``N`` tokens, and all cut-offs falling in one window share its pass.
The window depends only on ``c``, which depends only on events up to the prediction time,
so truncation can never let a later event in (adding events after the prediction time does
not move the window). ``per_label=True`` re-encodes each label's window on its own (same
windows, same embeddings: the reference path of the tests and the benchmark).

Compute: the one-pass rows (one per subject window) differ widely in length, so they are
packed several to a sequence of the model's context, each a segment with block-diagonal
causal attention and positions restarting at 0, instead of padded; the per-label rows
are many and of similar lengths, so they run in length-sorted padded batches. Other
causal encoders (published models, whose ``forward_features`` know no packing) take the
same windows in padded batches.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from scipy import sparse

from healthfm.ehr.reader import US_PER_DAY, Labels, MedsDataset, iter_batches
from healthfm.ehr.tokenizer import STATIC_TIME, EncodedShard, MedsTokenizer
from healthfm.errors import ConfigError, DataError, ModelError
from healthfm.model.heads import FoundationModel
from healthfm.tokenizer import PAD_ID, UNK_ID

#: Above this fraction of the labelled subjects' events read as [UNK], a model's
#: embeddings say little about the data (another vocabulary?): refused, with the numbers.
MAX_UNKNOWN_FRACTION = 0.5
#: Above this fraction, a warning with the same report.
WARN_UNKNOWN_FRACTION = 0.1

log = logging.getLogger("healthfm.ehr")


def label_cutoffs(
    enc: EncodedShard, subjects: np.ndarray, times_us: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Subject index and global cut-off of every label.

    Parameters
    ----------
    enc
        Tokens of the shard.
    subjects, times_us
        Label subject ids (all present in ``enc``) and prediction times (µs).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Index into ``enc.subject_ids`` and the flat token index one past the last token
        with ``time <= prediction_time`` (so the history is ``offsets[s]:cut``).
    """
    order = np.argsort(enc.subject_ids, kind="stable")
    pos = np.searchsorted(enc.subject_ids[order], subjects)
    if np.any(pos >= len(order)) or np.any(
        enc.subject_ids[order[np.minimum(pos, len(order) - 1)]] != subjects
    ):
        raise KeyError("a label subject is not in this shard")
    s_idx = order[pos]
    tok_subject = np.repeat(np.arange(len(enc.subject_ids)), np.diff(enc.offsets))
    n_tok = len(enc.ids)
    # Stable merge: labels sort after tokens with the same (subject, time) -> inclusive.
    key_s = np.concatenate([tok_subject, s_idx])
    key_t = np.concatenate([enc.time_us, np.asarray(times_us, dtype=np.int64)])
    is_label = np.concatenate([np.zeros(n_tok, np.int8), np.ones(len(s_idx), np.int8)])
    merged = np.lexsort((is_label, key_t, key_s))
    tokens_before = np.cumsum(is_label[merged] == 0)
    where = np.flatnonzero(is_label[merged] == 1)
    cut = np.empty(len(s_idx), dtype=np.int64)
    cut[merged[where] - n_tok] = tokens_before[where]
    return s_idx, cut


@dataclass
class _Rows:
    starts: np.ndarray  # flat start of each forward row
    lengths: np.ndarray  # tokens in each row
    label_row: np.ndarray  # row of each label
    label_pos: np.ndarray  # position (within the row) of the label's last token


def window_start(local_cut: np.ndarray, max_len: int) -> np.ndarray:
    """Start (within the subject) of the context window of each cut-off.

    0 when the history up to the cut-off fits (``c <= N``); otherwise the smallest
    multiple of ``N // 2`` that is at least ``c - N``, so the window holds the most recent
    ``N // 2 + 1`` to ``N`` tokens. It depends on ``c`` alone (so on events up to the
    prediction time alone), and cut-offs of one subject share few distinct windows.
    """
    stride = max(1, max_len // 2)
    over = np.maximum(np.asarray(local_cut) - max_len, 0)
    return (over + stride - 1) // stride * stride


def _plan_rows(
    enc: EncodedShard, s_idx: np.ndarray, cut: np.ndarray, max_len: int, per_label: bool
) -> _Rows:
    lo = enc.offsets[s_idx]
    local = cut - lo  # >= 1: the [CLS] start token is always included
    start = window_start(local, max_len)
    if per_label:  # the reference path: each label's window encoded on its own
        lengths = local - start
        return _Rows(lo + start, lengths, np.arange(len(cut)), lengths - 1)
    # One row per distinct (subject, window start), as long as its longest cut-off needs.
    key = np.stack([s_idx, start], axis=1)
    uniq, inv = np.unique(key, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    lengths = np.zeros(len(uniq), dtype=np.int64)
    np.maximum.at(lengths, inv, local - start)
    starts = enc.offsets[uniq[:, 0]] + uniq[:, 1]
    return _Rows(starts, lengths, inv, local - start - 1)


@torch.inference_mode()
def embed_cutoffs(
    model: FoundationModel,
    enc: EncodedShard,
    s_idx: np.ndarray,
    cut: np.ndarray,
    pooling: str = "last",
    batch_size: int = 32,
    per_label: bool = False,
) -> np.ndarray:
    """Embed every label from the causal model's states at its cut-off.

    Parameters
    ----------
    model
        A causal model (its attention must not look ahead): a healthfm model, or any
        :class:`~healthfm.encoders.Encoder` that declares ``causal = True`` (a published
        model such as CLMBR; forwarded through ``forward_features`` in padded batches).
    enc, s_idx, cut
        Tokens and :func:`label_cutoffs` of the labels.
    pooling
        ``"last"``: the state of the last included token; ``"mean"``: the mean of the
        states of the included tokens (of the window, for long histories).
    batch_size
        Forward rows per batch: padded rows (``per_label=True``) or packed sequences of at
        most ``max_len`` tokens (the one-pass path).
    per_label
        Re-encode each label's history separately (the slow reference path, for tests
        and benchmarks) instead of one pass per subject.

    Returns
    -------
    numpy.ndarray
        float32 (n_labels, d_model), in label order.
    """
    own = isinstance(model, FoundationModel)
    if not (model.config.causal if own else getattr(model, "causal", False)):
        raise ModelError(
            "prediction-time embeddings need a causal model (states must not see later tokens)",
            column="objective",
        )
    if pooling not in ("last", "mean"):
        raise ConfigError(
            f"pooling must be 'last' or 'mean' for prediction-time embeddings, not {pooling!r}"
        )
    if not own:
        return _embed_encoder(model, enc, s_idx, cut, pooling, batch_size, per_label)
    rows = _plan_rows(enc, s_idx, cut, model.config.max_len, per_label)
    if per_label:
        return _embed_padded(model, enc, rows, len(cut), pooling, batch_size)
    return _embed_packed(model, enc, rows, len(cut), pooling, batch_size)


def _embed_encoder(
    model, enc: EncodedShard, s_idx, cut, pooling: str, batch_size: int, per_label: bool
) -> np.ndarray:
    """Any other causal :class:`~healthfm.encoders.Encoder` (a published model): the same
    windows, forwarded through its ``forward_features`` in padded batches (``ids``,
    ``attention_mask`` and, when its tokenizer fills them, ``times``).

    A tokenizer without a start token (FEMR's) can leave a label with no token at or
    before its prediction time: that row gets a zero vector (FEMR itself refuses such
    labels), and the count is logged.
    """
    out = np.zeros((len(cut), model.dim), dtype=np.float32)
    has = cut - enc.offsets[s_idx] >= 1
    if not has.all():
        log.warning(
            "%d of %d prediction times have no known event at or before them: zero vectors",
            int((~has).sum()),
            len(cut),
        )
    if has.any():
        rows = _plan_rows(enc, s_idx[has], cut[has], model.max_len, per_label)
        out[has] = _embed_padded(model, enc, rows, int(has.sum()), pooling, batch_size)
    return out


def _embed_padded(
    model: FoundationModel,
    enc: EncodedShard,
    rows: _Rows,
    n_labels: int,
    pooling: str,
    batch_size: int,
) -> np.ndarray:
    """Forward ``rows`` in length-sorted, right-padded batches of ``batch_size`` rows.

    The re-encoding (per-label) path: its rows are many and of similar lengths once
    sorted, so padding wastes little.
    """
    device = next(model.parameters()).device
    own = isinstance(model, FoundationModel)
    out = np.zeros((n_labels, model.dim), dtype=np.float32)
    order = np.argsort(rows.lengths, kind="stable")
    rank_of_row = np.empty(len(order), dtype=np.int64)
    rank_of_row[order] = np.arange(len(order))
    label_rank = rank_of_row[rows.label_row]
    by_rank = np.argsort(label_rank, kind="stable")
    sorted_rank = label_rank[by_rank]
    use_times = model.config.use_times if own else "times" in model.tokenizer.fields
    for b in range(0, len(order), batch_size):
        batch_rows = order[b : b + batch_size]
        lengths = rows.lengths[batch_rows]
        width = int(lengths.max())
        cols = np.arange(width)
        mask = cols[None, :] < lengths[:, None]
        positions = (rows.starts[batch_rows][:, None] + cols[None, :])[mask]
        ids = np.full((len(batch_rows), width), PAD_ID, dtype=np.int64)
        ids[mask] = enc.ids[positions]
        times = None
        if use_times:
            t = np.full((len(batch_rows), width), np.nan)
            t[mask] = enc.ages[positions]
            times = torch.from_numpy(t).to(device)
        if own:
            hidden = model(torch.from_numpy(ids).to(device), None, None, times)
        else:
            batch = {"ids": torch.from_numpy(ids).to(device)}
            batch["attention_mask"] = torch.from_numpy(mask).to(device)
            if times is not None:
                batch["times"] = times
            hidden = model.forward_features(batch)
        if pooling == "mean":
            hidden = (
                hidden.float().cumsum(1)
                / torch.arange(1, width + 1, device=device, dtype=torch.float32)[None, :, None]
            )
        # Labels whose rows are in this batch.
        sel = by_rank[
            np.searchsorted(sorted_rank, b) : np.searchsorted(sorted_rank, b + len(batch_rows))
        ]
        local_row = torch.from_numpy(label_rank[sel] - b)
        picked = hidden[local_row, torch.from_numpy(rows.label_pos[sel])]
        out[sel] = picked.float().cpu().numpy()
    return out


#: Rows packed together at most (first-fit decreasing costs O(rows x sequences)).
PACK_CHUNK = 4096


def _pack(lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequence and start column of each row, packing rows into sequences of ``width``.

    First-fit decreasing (:func:`healthfm.train.data.pack_rows`) over chunks of at most
    :data:`PACK_CHUNK` rows of similar length (a loop per row, never per token).
    """
    from healthfm.train.data import pack_rows

    seq = np.empty(len(lengths), dtype=np.int64)
    col = np.empty(len(lengths), dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    n_seq = 0
    for c in range(0, len(order), PACK_CHUNK):
        part = order[c : c + PACK_CHUNK]
        r, k = pack_rows(lengths[part], width)
        seq[part], col[part] = r + n_seq, k
        n_seq += int(r.max()) + 1
    return seq, col


def _embed_packed(
    model: FoundationModel,
    enc: EncodedShard,
    rows: _Rows,
    n_labels: int,
    pooling: str,
    batch_size: int,
) -> np.ndarray:
    """Forward ``rows`` packed into sequences of the model's context, ``batch_size`` at a time.

    One-pass rows (one per subject window) have very different lengths, so padded batches
    would spend a large share of their compute on pads. Several rows share a sequence
    instead, each a segment with block-diagonal causal attention and rotary positions
    restarting at 0 (the backbone's packing support), so each row is encoded as if it
    were alone.
    """
    device = next(model.parameters()).device
    out = np.zeros((n_labels, model.config.d_model), dtype=np.float32)
    if len(rows.lengths) == 0:
        return out
    lengths = rows.lengths
    seq, col = _pack(lengths, model.config.max_len)
    n_seq = int(seq.max()) + 1
    # Rows grouped by batch of sequences; labels too.
    row_batch = seq // batch_size
    row_order = np.argsort(row_batch, kind="stable")
    row_bounds = np.searchsorted(
        row_batch[row_order], np.arange(0, n_seq + batch_size, batch_size) // batch_size
    )
    lab_seq = seq[rows.label_row]
    lab_col = col[rows.label_row] + rows.label_pos
    lab_batch = lab_seq // batch_size
    lab_order = np.argsort(lab_batch, kind="stable")
    lab_bounds = np.searchsorted(
        lab_batch[lab_order], np.arange(0, n_seq + batch_size, batch_size) // batch_size
    )
    use_times = model.config.use_times
    for i, b in enumerate(range(0, n_seq, batch_size)):
        these = row_order[row_bounds[i] : row_bounds[i + 1]]
        n_here = min(batch_size, n_seq - b)
        ln = lengths[these]
        width = int((col[these] + ln).max())
        # Token-level scatter, vectorized: one entry per token of the batch.
        tok_row = np.repeat(np.arange(len(these)), ln)
        within = np.arange(int(ln.sum())) - np.repeat(np.cumsum(ln) - ln, ln)
        src = rows.starts[these][tok_row] + within
        r = seq[these][tok_row] - b
        c = col[these][tok_row] + within
        ids = np.full((n_here, width), PAD_ID, dtype=np.int64)
        ids[r, c] = enc.ids[src]
        segments = np.zeros((n_here, width), dtype=np.int64)
        segments[r, c] = tok_row + 1
        positions = np.zeros((n_here, width), dtype=np.int64)
        positions[r, c] = within
        batch = {
            "ids": torch.from_numpy(ids).to(device),
            "segment_ids": torch.from_numpy(segments).to(device),
            "positions": torch.from_numpy(positions).to(device),
        }
        if use_times:
            t = np.full((n_here, width), np.nan)
            t[r, c] = enc.ages[src]
            batch["times"] = torch.from_numpy(t).to(device)
        hidden = model.forward_batch(batch)
        sel = lab_order[lab_bounds[i] : lab_bounds[i + 1]]
        lr = torch.from_numpy(lab_seq[sel] - b).to(device)
        lc = torch.from_numpy(lab_col[sel]).to(device)
        if pooling == "mean":
            # Mean over the segment up to the label: differences of a float64 running sum
            # that restarts nowhere, taken from the segment's first column.
            csum = torch.nn.functional.pad(hidden.double().cumsum(1), (0, 0, 1, 0))
            first = torch.from_numpy(col[rows.label_row[sel]]).to(device)
            count = torch.from_numpy(rows.label_pos[sel] + 1).to(device)
            picked = (csum[lr, lc + 1] - csum[lr, first]) / count[:, None]
        else:
            picked = hidden[lr, lc]
        out[sel] = picked.float().cpu().numpy()
    return out


def count_features(
    enc: EncodedShard, s_idx: np.ndarray, cut: np.ndarray, vocab_size: int
) -> sparse.csr_matrix:
    """Counts of every token id among each label's history (tokens up to its cut-off)."""
    lo = enc.offsets[s_idx]
    lengths = cut - lo
    rows = np.repeat(np.arange(len(cut)), lengths)
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    cols = enc.ids[np.repeat(lo, lengths) + within]
    data = np.ones(len(cols), dtype=np.float32)
    return sparse.csr_matrix((data, (rows, cols)), shape=(len(cut), vocab_size))


@dataclass
class LabelFeatures:
    """Everything computed for a label file, in label order."""

    embeddings: np.ndarray | None
    counts: sparse.csr_matrix
    age_years: np.ndarray
    n_tokens: np.ndarray
    seconds_embed: float
    seconds_total: float


def featurize_labels(
    ds: MedsDataset,
    tokenizer: MedsTokenizer,
    labels: Labels,
    model: FoundationModel | None = None,
    pooling: str = "last",
    batch_size: int = 32,
    per_label: bool = False,
) -> LabelFeatures:
    """Tokenize the labelled subjects batch by batch; embed (if a model is given) and count.

    ``tokenizer`` is any tokenizer with ``encode_frame`` (a MEDS frame to an
    :class:`EncodedShard`) and ``vocab_size``; one with a ``check_dataset(ds)`` method (a
    published model's vocabulary) may refuse the data first.

    Returns features in the order of ``labels.frame``.
    """
    t0 = time.perf_counter()
    subjects = labels.subject_ids
    times_us = labels.times_us
    n = len(subjects)
    emb = np.zeros((n, model.dim), dtype=np.float32) if model is not None else None
    counts = []
    where = []
    age = np.full(n, np.nan)
    n_tokens = np.zeros(n, dtype=np.int64)
    seconds_embed = 0.0
    if model is not None:
        model.eval()
    check = getattr(tokenizer, "check_dataset", None)
    if check is not None:  # a published model's vocabulary: it checks its own coverage
        check(ds)
    # healthfm's own tokenizer: [UNK] runs counted as the batches go (refused when most are).
    own_vocabulary = check is None and isinstance(tokenizer, MedsTokenizer)
    n_unknown = n_events = 0
    unknown_codes: dict[str, int] = {}
    for _, df in iter_batches(ds, np.unique(subjects)):
        enc = tokenizer.encode_frame(df)
        if own_vocabulary:
            n_unknown, n_events = _count_unknown(enc, tokenizer, n_unknown, n_events)
        if own_vocabulary and model is not None and len(unknown_codes) < 5:
            for code in df["code"].unique().head(50).to_list():
                if code not in tokenizer.code_to_id and len(unknown_codes) < 5:
                    unknown_codes[str(code)] = 1
        if own_vocabulary and model is not None and n_events >= 10_000:
            # Decide early: the first batches show another vocabulary as well as all do.
            _check_coverage(n_unknown, n_events, unknown_codes, tokenizer, ds, final=False)
        idx = np.flatnonzero(np.isin(subjects, enc.subject_ids))
        s_idx, cut = label_cutoffs(enc, subjects[idx], times_us[idx])
        if model is not None:
            t = time.perf_counter()
            emb[idx] = embed_cutoffs(model, enc, s_idx, cut, pooling, batch_size, per_label)
            seconds_embed += time.perf_counter() - t
        counts.append(count_features(enc, s_idx, cut, tokenizer.vocab_size))
        where.append(idx)
        birth = _birth_us(df, enc.subject_ids)
        age[idx] = (times_us[idx] - birth[s_idx]) / US_PER_DAY / 365.25
        n_tokens[idx] = cut - enc.offsets[s_idx]
    if not where:
        raise DataError("no labelled subject found in the MEDS data", file=labels.source)
    if own_vocabulary and model is not None:
        _check_coverage(n_unknown, n_events, unknown_codes, tokenizer, ds, final=True)
    order = np.concatenate(where)
    mat = sparse.vstack(counts).tocsr()
    inv = np.empty(len(order), dtype=np.int64)
    inv[order] = np.arange(len(order))
    mat = mat[inv]
    return LabelFeatures(emb, mat, age, n_tokens, seconds_embed, time.perf_counter() - t0)


def _birth_us(df: pl.DataFrame, subject_ids: np.ndarray) -> np.ndarray:
    births = (
        df.filter((pl.col("code") == "MEDS_BIRTH") & pl.col("time").is_not_null())
        .group_by("subject_id")
        .agg(pl.col("time").cast(pl.Int64).min())
    )
    lookup = dict(zip(births["subject_id"].to_list(), births["time"].to_list(), strict=True))
    return np.array([lookup.get(int(s), np.nan) for s in subject_ids], dtype=np.float64)


__all__ = [
    "STATIC_TIME",
    "LabelFeatures",
    "count_features",
    "embed_cutoffs",
    "featurize_labels",
    "label_cutoffs",
]


def _count_unknown(
    enc: EncodedShard, tokenizer: MedsTokenizer, n_unknown: int, n_events: int
) -> tuple[int, int]:
    """Running counts of [UNK] tokens and of code tokens (known or not)."""
    ids = np.asarray(enc.ids)
    known = (ids >= tokenizer.code_base) & (ids < tokenizer.code_base + len(tokenizer.codes))
    unknown = int((ids == UNK_ID).sum())
    return n_unknown + unknown, n_events + unknown + int(known.sum())


def _check_coverage(
    n_unknown: int,
    n_events: int,
    examples: dict[str, int],
    tokenizer: MedsTokenizer,
    ds: MedsDataset,
    final: bool,
) -> None:
    """Refuse (or, above the warning level, warn) when the model's vocabulary misses most
    of the data's codes: its embeddings of [UNK] runs would be scored as if meaningful."""
    import logging

    if n_events == 0:
        return
    fraction = n_unknown / n_events
    report = (
        f"{fraction:.0%} of the labelled subjects' {n_events:,} events have a code outside "
        f"the model's vocabulary of {len(tokenizer.codes):,} codes (read as [UNK]); e.g. "
        f"data codes {list(examples)[:3]}, model codes {tokenizer.codes[:3]}"
    )
    if fraction > MAX_UNKNOWN_FRACTION:
        raise DataError(
            f"{report}: the data use another vocabulary than the model was pretrained on "
            "(map the codes to the model's, or pretrain on this data)",
            file=ds.root,
            column="code",
        )
    if final and fraction > WARN_UNKNOWN_FRACTION:
        logging.getLogger("healthfm").warning("healthfm: warning: %s (%s)", report, ds.root)

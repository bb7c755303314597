"""K-mer tokenization of DNA, fully vectorized, plus reverse-complement augmentation.

Vocabulary of :class:`KmerTokenizer` (ids in this order):

1. the five shared special tokens ``[PAD] [MASK] [CLS] [UNK] [SEP]`` (ids 0-4);
2. all ``4**k`` k-mers over ``ACGT`` in lexicographic order (``A < C < G < T``), so the id of
   a k-mer is ``5 + its base-4 code``;
3. ambiguity tokens:

   * ``k == 1`` and ``ambiguity="token"``: one token per IUPAC code, ``N R Y S W K M B D H V``;
   * ``k == 1`` and ``ambiguity="n"``: a single ``N`` token every IUPAC code maps to;
   * ``k > 1`` (either setting): a single ``[AMB]`` token for any k-mer that contains an
     IUPAC ambiguity code (``4**k`` k-mers would otherwise multiply by 15**k).

Lower case (soft-masked) bases are upper-cased and ``U`` is read as ``T``. Any character
that is neither a base nor an IUPAC code (readers reject those; the tokenizer is lenient)
becomes ``[UNK]``, and so does any k-mer containing one.

Encoding joins all sequences into one ``uint8`` buffer, maps bytes through 256-entry lookup
tables and builds k-mer codes with ``k`` shifted gathers; there is no Python loop per base or
per token. Sequences are processed in blocks of about four million bases so temporaries stay
small whatever the input size.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from healthfm.errors import ConfigError
from healthfm.fsutil import json_hash
from healthfm.tokenizer import (
    CLS_ID,
    N_SPECIAL,
    PAD_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    Tokenizer,
    register_tokenizer,
)
from healthfm.tokens import TokenChunk

BASES = "ACGT"
#: IUPAC ambiguity codes, in the order of their k=1 tokens.
IUPAC_AMBIGUITY = "NRYSWKMBDHV"
#: Complement of every base and IUPAC code.
COMPLEMENT = {
    "A": "T", "C": "G", "G": "C", "T": "A",
    "R": "Y", "Y": "R", "K": "M", "M": "K", "B": "V", "V": "B", "D": "H", "H": "D",
    "S": "S", "W": "W", "N": "N",
}  # fmt: skip
#: Bases each IUPAC code stands for.
IUPAC_BASES = {
    "A": "A", "C": "C", "G": "G", "T": "T",
    "R": "AG", "Y": "CT", "S": "CG", "W": "AT", "K": "GT", "M": "AC",
    "B": "CGT", "D": "AGT", "H": "ACT", "V": "ACG", "N": "ACGT",
}  # fmt: skip
AMBIGUOUS_KMER_TOKEN = "[AMB]"
MAX_K = 8
_INVALID = 255
_BLOCK_BASES = 1 << 22


def _base_lut() -> np.ndarray:
    """Byte -> 0..3 for ACGT (and acgt, U/u as T), 4 + index for IUPAC codes, 255 otherwise."""
    lut = np.full(256, _INVALID, dtype=np.uint8)
    for code, base in enumerate(BASES):
        lut[ord(base)] = lut[ord(base.lower())] = code
    lut[ord("U")] = lut[ord("u")] = 3
    for i, amb in enumerate(IUPAC_AMBIGUITY):
        lut[ord(amb)] = lut[ord(amb.lower())] = 4 + i
    return lut


BASE_LUT = _base_lut()
#: Byte -> packed uint32: base value 0..3 in bits 0-1, bit 16 set for an IUPAC ambiguity
#: code, bit 17 for an invalid character. Shifting by 2 per base while building a k-mer
#: (k <= 8) moves the values within bits 0-15 and the flags to even (ambiguous) or odd
#: (invalid) bits 16-31, so one pass computes the code and both flags.
_PACKED_LUT = (
    np.where(BASE_LUT < 4, BASE_LUT, 0)
    | np.where((BASE_LUT >= 4) & (BASE_LUT != _INVALID), 1 << 16, 0)
    | np.where(BASE_LUT == _INVALID, 1 << 17, 0)
).astype(np.uint32)
_AMBIGUOUS_BITS = np.uint32(0x55550000)
_INVALID_BITS = np.uint32(0xAAAA0000)


def join_sequences(sequences: Sequence[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate sequences into one byte buffer.

    Parameters
    ----------
    sequences
        Strings (list, tuple or numpy array of ``str``/object).

    Returns
    -------
    buffer : numpy.ndarray
        ``uint8`` array of all characters, one byte per character (a non-ASCII character
        becomes ``?``, so positions still count characters).
    lengths : numpy.ndarray
        ``int64`` length of each sequence.
    """
    seqs = sequences.tolist() if isinstance(sequences, np.ndarray) else list(sequences)
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    buffer = np.frombuffer("".join(seqs).encode("ascii", errors="replace"), dtype=np.uint8)
    return buffer, lengths


def window_positions(starts: np.ndarray, counts: np.ndarray, stride: int, size: int) -> np.ndarray:
    """Buffer position of every kept window.

    Sample ``i`` starts at buffer position ``starts[i]`` and keeps ``counts[i]`` windows,
    ``stride`` apart; windows are listed sample by sample. ``size`` is the buffer length.

    Returns
    -------
    numpy.ndarray
        Positions (int32 when the buffer allows, else int64).
    """
    counts = np.asarray(counts)
    # int32 indices halve memory traffic; every intermediate stays within +-size.
    dtype = np.int32 if size < 2**31 - 1 else np.int64
    first = np.cumsum(counts) - counts
    # Window t of sample i sits at starts[i] + (t - first[i]) * stride
    #                             = t * stride + (starts[i] - first[i] * stride).
    base = np.repeat((starts - first * stride).astype(dtype), counts)
    base += np.arange(int(counts.sum()), dtype=dtype) * dtype(stride)
    return base


def _sliding(values: np.ndarray, k: int, bits: int) -> np.ndarray:
    """Combine every run of ``k`` consecutive values: ``out[p] = v[p] v[p+1] ... v[p+k-1]``,
    each value shifted ``bits`` bits per later position (``bits=0``: a bitwise OR).

    Works by doubling (runs of 1, 2, 4... combined along k's binary digits), so it takes
    O(log k) passes over the buffer instead of k.
    """
    result: np.ndarray | None = None
    result_len = 0
    piece, piece_len = values, 1
    remaining = k
    while True:
        if remaining & 1:
            if result is None:
                result, result_len = piece, piece_len
            else:
                n = len(piece) - result_len
                result = result[:n] << (bits * piece_len) if bits else result[:n].copy()
                result |= piece[result_len : result_len + n]
                result_len += piece_len
        remaining >>= 1
        if not remaining:
            break
        n = len(piece) - piece_len
        doubled = piece[:n] << (bits * piece_len) if bits else piece[:n].copy()
        doubled |= piece[piece_len:]
        piece, piece_len = doubled, 2 * piece_len
    return result


def kmer_codes(
    buf: np.ndarray, positions: np.ndarray | None, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Base-4 code of the k-mer starting at each position, with its ambiguity flags.

    Parameters
    ----------
    buf
        ``uint8`` characters (from :func:`join_sequences`).
    positions
        Start of each window; ``positions + k`` must not exceed ``len(buf)``. ``None``:
        every window of the buffer (``len(buf) - k + 1``), boundaries ignored.
    k
        Window length.

    Returns
    -------
    kmer : numpy.ndarray
        int32 code ``sum(base_j * 4**(k-1-j))`` (ambiguous bases count as 0).
    ambiguous, invalid : numpy.ndarray
        Whether the window holds an IUPAC ambiguity code / an invalid character.
    """
    # Slide over the whole buffer with contiguous shifted slices (far faster than gathers),
    # then pick the wanted windows once. Windows that cross a sequence boundary are
    # computed too, but never picked.
    if len(buf) < k:
        empty = np.zeros(0, dtype=bool)
        return np.zeros(0, dtype=np.int32), empty, empty
    packed = _sliding(_PACKED_LUT[buf], k, 2)
    if positions is not None:
        packed = packed[positions]
    kmer = (packed & np.uint32(4**k - 1)).astype(np.int32)
    ambiguous = (packed & _AMBIGUOUS_BITS) != 0
    invalid = (packed & _INVALID_BITS) != 0
    return kmer, ambiguous, invalid


@register_tokenizer
class KmerTokenizer(Tokenizer):
    """DNA k-mer tokenizer (single-nucleotide with ``k=1``, DNABERT-style with ``k=6``).

    Parameters
    ----------
    k
        K-mer length, 1 to 8.
    stride
        Step between k-mer starts, 1 to ``k``: 1 gives overlapping k-mers, ``k``
        non-overlapping ones. Trailing bases that do not fill a window are dropped.
    ambiguity
        ``"token"``: every IUPAC code has its own token (k=1); ``"n"``: all IUPAC codes map
        to ``N``. For ``k > 1`` any k-mer with an ambiguity code is ``[AMB]`` either way.
    add_cls
        Start every sample with ``[CLS]``.
    max_length
        Keep at most this many tokens per sample (``[CLS]`` included); ``None`` keeps all.
    reverse_complement
        Whether pretraining should apply reverse-complement augmentation (read only by
        :meth:`healthfm.dna.modality.DnaPretraining.augmenter`). It is a training option, not part of
        the encoding, so it is left out of :attr:`hash`: flipping it does not invalidate
        token stores.
    """

    type = "dna.kmer"
    modality = "dna"

    def __init__(
        self,
        k: int = 1,
        stride: int = 1,
        ambiguity: str = "token",
        add_cls: bool = True,
        max_length: int | None = None,
        reverse_complement: bool = True,
    ) -> None:
        if not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise ConfigError(f"k must be an integer from 1 to {MAX_K}, got {k!r}")
        if not isinstance(stride, int) or not 1 <= stride <= k:
            raise ConfigError(f"stride must be an integer from 1 to k={k}, got {stride!r}")
        if ambiguity not in ("token", "n"):
            raise ConfigError(f"ambiguity must be 'token' or 'n', got {ambiguity!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1 + add_cls):
            raise ConfigError(f"max_length must be an integer >= {1 + add_cls}, got {max_length!r}")
        self.k = k
        self.stride = stride
        self.ambiguity = ambiguity
        self.add_cls = bool(add_cls)
        self.max_length = max_length
        self.reverse_complement = bool(reverse_complement)
        self._first_amb = N_SPECIAL + 4**k
        # k=1: one lookup table maps bytes straight to token ids.
        lut = np.full(256, UNK_ID, dtype=np.int32)
        valid = BASE_LUT != _INVALID
        codes = BASE_LUT[valid].astype(np.int32)
        if ambiguity == "token":
            lut[valid] = N_SPECIAL + codes
        else:
            lut[valid] = np.where(codes < 4, N_SPECIAL + codes, self._first_amb)
        self._k1_lut = lut

    # --- vocabulary -----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of token ids, specials included."""
        return self._first_amb + self._n_ambiguity_tokens

    @property
    def _n_ambiguity_tokens(self) -> int:
        return len(IUPAC_AMBIGUITY) if (self.k == 1 and self.ambiguity == "token") else 1

    def token_strings(self) -> list[str]:
        """The string of every token id, in id order."""
        idx = np.arange(4**self.k)
        digits = (idx[:, None] >> (2 * np.arange(self.k - 1, -1, -1))) & 3
        kmers = ["".join(BASES[d] for d in row) for row in digits]
        if self.k > 1:
            amb = [AMBIGUOUS_KMER_TOKEN]
        else:
            amb = list(IUPAC_AMBIGUITY) if self.ambiguity == "token" else ["N"]
        return [*SPECIAL_TOKENS, *kmers, *amb]

    def reverse_complement_map(self) -> np.ndarray:
        """Map every token id to the id of its reverse complement.

        Returns
        -------
        numpy.ndarray
            int64 array of length :attr:`vocab_size`; specials and ``[AMB]``/``N``/``S``/``W``
            map to themselves, ``R<->Y``, ``K<->M``, ``B<->V``, ``D<->H``.
        """
        rc = np.arange(self.vocab_size, dtype=np.int64)
        code = np.arange(4**self.k, dtype=np.int64)
        out = np.zeros_like(code)
        for j in range(self.k):  # digit j (from the right) -> complemented digit k-1-j
            digit = (code >> (2 * j)) & 3
            out |= (3 - digit) << (2 * (self.k - 1 - j))
        rc[N_SPECIAL : self._first_amb] = N_SPECIAL + out
        if self.k == 1 and self.ambiguity == "token":
            pos = {c: i for i, c in enumerate(IUPAC_AMBIGUITY)}
            for c, i in pos.items():
                rc[self._first_amb + i] = self._first_amb + pos[COMPLEMENT[c]]
        return rc

    # --- encoding -------------------------------------------------------------------
    def tokenized_lengths(self, lengths: np.ndarray) -> np.ndarray:
        """Number of tokens (``[CLS]`` included) a sequence of each length encodes to."""
        lengths = np.asarray(lengths, dtype=np.int64)
        n = np.where(lengths >= self.k, (lengths - self.k) // self.stride + 1, 0)
        n = n + self.add_cls
        if self.max_length is not None:
            n = np.minimum(n, self.max_length)
        return n

    def encode(
        self, sequences: Sequence[str] | np.ndarray, keys: Sequence[Any] | None = None
    ) -> TokenChunk:
        """Tokenize sequences.

        Parameters
        ----------
        sequences
            DNA/RNA strings (any case).
        keys
            One key per sequence; defaults to ``0..n-1``.

        Returns
        -------
        TokenChunk
            Flat ids and offsets; a sequence shorter than ``k`` yields no k-mer (only
            ``[CLS]`` if ``add_cls``).
        """
        seqs = sequences.tolist() if isinstance(sequences, np.ndarray) else list(sequences)
        if self.max_length is not None:
            # Only the bases the kept tokens read: a 10 MB sequence costs its first few
            # thousand bases, not gigabytes of temporaries for tokens that are dropped.
            needed = max(self.max_length - self.add_cls - 1, 0) * self.stride + self.k
            seqs = [s[:needed] if len(s) > needed else s for s in seqs]
        n = len(seqs)
        keys = np.arange(n) if keys is None else keys
        lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=n)
        counts = self.tokenized_lengths(lengths)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        ids = np.empty(int(offsets[-1]), dtype=np.int32)
        # Blocks of ~4M bases keep every temporary small (a longer sequence is its own block).
        block = (np.cumsum(lengths) - lengths) // _BLOCK_BASES
        bounds = np.concatenate(([0], np.flatnonzero(np.diff(block)) + 1, [n]))
        for a, b in itertools.pairwise(bounds):
            a, b = int(a), int(b)
            buf = np.frombuffer("".join(seqs[a:b]).encode("ascii", errors="replace"), np.uint8)
            ids[offsets[a] : offsets[b]] = self._encode_block(buf, lengths[a:b], counts[a:b])
        return TokenChunk(ids=ids, offsets=offsets, keys=keys)

    def encode_windows(self, buf: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize windows given as one byte buffer into a padded batch.

        Parameters
        ----------
        buf
            ``uint8`` bases of all windows, concatenated (any case; ``U`` reads as ``T``).
        lengths
            Bases of each window.

        Returns
        -------
        ids : numpy.ndarray
            int64 ``[B, T]``, ``[PAD]`` (0) right of each window's tokens; ``T`` is the
            longest window's token count (at most ``max_length``).
        mask : numpy.ndarray
            bool ``[B, T]``, True on real tokens.
        """
        lengths = np.asarray(lengths, dtype=np.int64)
        counts = self.tokenized_lengths(lengths)
        width = int(counts.max()) if len(counts) else 0
        mask = np.arange(width)[None, :] < counts[:, None]
        ids = np.full((len(lengths), width), PAD_ID, dtype=np.int64)
        if len(lengths):
            ids[mask] = self._encode_block(np.asarray(buf, dtype=np.uint8), lengths, counts)
        return ids, mask

    def _encode_block(self, buf: np.ndarray, lengths: np.ndarray, counts: np.ndarray) -> np.ndarray:
        k = self.k
        n_kmers = counts - self.add_cls
        # Token of every window of the buffer (boundaries ignored), then keep the valid ones.
        if k == 1:
            tokens = self._k1_lut[buf]
        else:
            kmer, ambiguous, invalid = kmer_codes(buf, None, k)
            tokens = kmer + np.int32(N_SPECIAL)
            tokens[ambiguous] = self._first_amb
            tokens[invalid] = UNK_ID
        ends = np.cumsum(lengths)
        if self.stride == 1 and np.array_equal(n_kmers, np.maximum(lengths - k + 1, 0)):
            # Common case (overlapping, nothing truncated): every window except the k-1
            # that cross the end of each sequence; a boolean mask beats an index gather.
            if k > 1:
                crossing = (ends[:, None] - np.arange(1, k)[None, :]).ravel()
                keep = np.ones(len(tokens), dtype=bool)
                keep[crossing[(crossing >= 0) & (crossing < len(tokens))]] = False
                tokens = tokens[keep]
        else:
            tokens = tokens[window_positions(ends - lengths, n_kmers, self.stride, len(buf))]
        if not self.add_cls:
            return tokens
        out = np.full(len(tokens) + len(lengths), CLS_ID, dtype=np.int32)
        is_token = np.ones(len(out), dtype=bool)
        is_token[np.cumsum(counts) - counts] = False  # where each sample's [CLS] goes
        out[is_token] = tokens
        return out

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Rebuild the sequence from token ids (for tests and inspection).

        Specials are dropped; overlapping k-mers contribute their last ``stride`` bases;
        ``[AMB]`` decodes to ``N`` * k and ``[UNK]`` to ``?`` (both lossy).
        """
        strings = self.token_strings()
        parts = []
        for i in np.asarray(ids).tolist():
            if i == UNK_ID:
                parts.append("?" * self.k)
            elif i >= N_SPECIAL:
                s = strings[i]
                parts.append("N" * self.k if s == AMBIGUOUS_KMER_TOKEN else s)
        if not parts:
            return ""
        return parts[0] + "".join(p[self.k - self.stride :] for p in parts[1:])

    # --- persistence ----------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """JSON-serialisable state that rebuilds this tokenizer."""
        return {
            "k": self.k,
            "stride": self.stride,
            "ambiguity": self.ambiguity,
            "add_cls": self.add_cls,
            "max_length": self.max_length,
            "reverse_complement": self.reverse_complement,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> KmerTokenizer:
        """Rebuild a tokenizer from :meth:`config`."""
        unknown = set(config) - set(cls().config())
        if unknown:
            raise ConfigError(f"unknown dna.kmer tokenizer settings {sorted(unknown)}")
        return cls(**config)

    @property
    def hash(self) -> str:
        """SHA-256 of ``tokenizer.json`` without the augmentation flag (see class doc)."""
        data = self.to_dict()
        data["config"] = {k: v for k, v in data["config"].items() if k != "reverse_complement"}
        return json_hash(data)


# --- reverse-complement augmentation ------------------------------------------------
def _rc_source_index(ids: Any, segments: Any) -> Any:
    """Source position of every output position when each segment is reverse-complemented.

    ``segments`` is ``[B, T]`` int (0 at padding); a segment is a maximal run of equal
    non-zero values in a row. Its leading ``[CLS]`` (if any) stays in place and the rest is
    reversed: position ``j`` reads from ``first + last - j``. Other positions read from
    themselves. Works on numpy arrays and torch tensors alike.
    """
    if isinstance(ids, np.ndarray):
        xp_flip = lambda x: x[:, ::-1]  # noqa: E731
        cummax = lambda x: np.maximum.accumulate(x, axis=1)  # noqa: E731
        j = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
        gather = lambda x, i: np.take_along_axis(x, i, axis=1)  # noqa: E731
        where, cat = np.where, lambda xs: np.concatenate(xs, axis=1)
    else:
        import torch

        xp_flip = lambda x: torch.flip(x, [1])  # noqa: E731
        cummax = lambda x: torch.cummax(x, dim=1).values  # noqa: E731
        j = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape)
        gather = lambda x, i: torch.gather(x, 1, i)  # noqa: E731
        where, cat = torch.where, lambda xs: torch.cat(xs, dim=1)
    if ids.shape[1] == 0:
        return j
    edge = segments[:, 1:] != segments[:, :-1]
    ones = edge[:, :1] | True
    is_start = cat([ones, edge])
    is_end = cat([edge, ones])
    start = cummax(where(is_start, j, 0))  # first position of each position's segment
    last_pos = ids.shape[1] - 1
    # The last position of the segment, found the same way from the right.
    last = last_pos - xp_flip(cummax(xp_flip(where(is_end, last_pos - j, 0))))
    first = start + (gather(ids, start) == CLS_ID) * 1
    inside = (segments != 0) & (j >= first) & (j <= last)
    return where(inside, first + last - j, j)


def _segments_of(ids: Any, lengths_or_mask: Any) -> Any:
    """One segment per row: 1 on real tokens, 0 on padding."""
    if lengths_or_mask.ndim == 2:
        return lengths_or_mask * 1
    if isinstance(ids, np.ndarray):
        j = np.arange(ids.shape[1])
    else:
        import torch

        j = torch.arange(ids.shape[1], device=ids.device)
    return (j[None, :] < lengths_or_mask[:, None]) * 1


def reverse_complement_batch(
    ids: Any, lengths_or_mask: Any, rc_map: Any, segment_ids: Any = None
) -> Any:
    """Reverse-complement every row (or packed segment) of a padded batch of token ids.

    The real tokens of each row (after a leading ``[CLS]`` if the row has one, before the
    padding) are reversed and mapped through ``rc_map``; ``[CLS]`` and padding stay where
    they are. For overlapping k-mers (stride 1) the result equals the encoding of the
    reverse-complemented sequence; for other strides only when ``(length - k) % stride == 0``.
    Vectorized with index arithmetic (no loop over rows).

    Parameters
    ----------
    ids
        int64 ``[B, T]`` numpy array or torch tensor, right-padded.
    lengths_or_mask
        ``[B]`` number of non-padding tokens per row (``[CLS]`` included), or the
        ``[B, T]`` boolean attention mask.
    rc_map
        :meth:`KmerTokenizer.reverse_complement_map` (numpy or torch, on ids' device).
    segment_ids
        For packed rows (several samples per row): ``[B, T]`` segment number of each token
        (0 at padding); each segment is reverse-complemented on its own.

    Returns
    -------
    Same type as ``ids``.
    """
    if isinstance(ids, np.ndarray):
        segments = (
            segment_ids
            if segment_ids is not None
            else _segments_of(ids, np.asarray(lengths_or_mask))
        )
        src = _rc_source_index(ids, np.asarray(segments))
        return np.asarray(rc_map)[np.take_along_axis(ids, src, axis=1)]
    import torch

    if segment_ids is None:
        segment_ids = _segments_of(ids, torch.as_tensor(lengths_or_mask, device=ids.device))
    src = _rc_source_index(ids, segment_ids)
    return torch.as_tensor(rc_map, device=ids.device)[torch.gather(ids, 1, src)]


def make_rc_augmenter(tokenizer: KmerTokenizer, p: float = 0.5) -> Callable:
    """Return a batch augmentation that reverse-complements each sample with probability ``p``.

    Parameters
    ----------
    tokenizer
        The tokenizer whose :meth:`~KmerTokenizer.reverse_complement_map` to use.
    p
        Probability of flipping each sample.

    Returns
    -------
    callable
        ``f(batch, generator) -> batch``; ``batch`` holds ``"ids"`` (LongTensor ``[B, T]``,
        PAD=0 on the right) and ``"attention_mask"`` (bool ``[B, T]``). Each row is one
        sample, or, when the batch has ``"segment_ids"`` (packed rows), each segment is, and
        each is flipped on its own draw. ``"values"`` and ``"times"``, if present, are
        reordered like the ids (not mapped); ``"positions"`` and ``"segment_ids"`` stay
        as they are. Apply it before masking. The input dict is not modified.
    """
    import torch

    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"reverse-complement probability must be in [0, 1], got {p}")
    rc_cpu = torch.as_tensor(tokenizer.reverse_complement_map(), dtype=torch.long)
    cache: dict[torch.device, torch.Tensor] = {}

    def augment(batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict:
        ids = batch["ids"]
        if ids.device not in cache:
            cache[ids.device] = rc_cpu.to(ids.device)
        segments = batch.get("segment_ids")
        if segments is None:
            segments = batch["attention_mask"].long()
        n_segments = int(segments.max()) + 1 if segments.numel() else 1
        # One draw per (row, segment); tokens look up their segment's draw.
        draws = torch.rand(ids.shape[0], n_segments, generator=generator, device=generator.device)
        flip = torch.gather(draws.to(ids.device) < p, 1, segments)
        j = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape)
        src = torch.where(flip, _rc_source_index(ids, segments), j)
        out = dict(batch)
        out["ids"] = torch.where(flip, cache[ids.device][torch.gather(ids, 1, src)], ids)
        for name in ("values", "times"):
            if name in batch:
                out[name] = torch.gather(batch[name], 1, src)
        return out

    return augment

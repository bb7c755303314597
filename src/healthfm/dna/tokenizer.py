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


def window_positions(starts: np.ndarray, counts: np.ndarray, stride: int) -> np.ndarray:
    """Buffer position of every kept window.

    Sample ``i`` starts at buffer position ``starts[i]`` and keeps ``counts[i]`` windows,
    ``stride`` apart; windows are listed sample by sample.

    Returns
    -------
    numpy.ndarray
        Positions (int32 when the buffer allows, else int64).
    """
    counts = np.asarray(counts)
    dtype = np.int32 if (int(starts[-1]) if len(starts) else 0) < 2**31 // max(stride, 1) else np.int64
    first = np.cumsum(counts) - counts
    # Window t of sample i sits at starts[i] + (t - first[i]) * stride
    #                             = t * stride + (starts[i] - first[i] * stride).
    base = np.repeat((starts - first * stride).astype(dtype), counts)
    base += np.arange(int(counts.sum()), dtype=dtype) * dtype(stride)
    return base


def kmer_codes(
    codes: np.ndarray, positions: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Base-4 code of the k-mer starting at each position, with its ambiguity flags.

    Parameters
    ----------
    codes
        Per-base codes from :data:`BASE_LUT` (``0..3`` ACGT, ``4..14`` IUPAC, 255 invalid).
    positions
        Start of each window; ``positions + k`` must not exceed ``len(codes)``.
    k
        Window length.

    Returns
    -------
    kmer : numpy.ndarray
        int32 code ``sum(base_j * 4**(k-1-j))`` (ambiguous bases count as 0).
    ambiguous, invalid : numpy.ndarray
        Whether the window holds an IUPAC ambiguity code / an invalid character.
    """
    n_windows = max(len(codes) - k + 1, 0)
    # Slide over the whole buffer with contiguous shifted slices (much faster than k
    # gathers), then pick the wanted windows once. Windows crossing a sequence boundary are
    # computed too, but never picked.
    values = np.where(codes < 4, codes, 0).astype(np.int32)
    flags = np.where(codes == _INVALID, 2, codes >= 4).astype(np.uint8)  # 1 ambiguous, 2 invalid
    kmer = values[:n_windows].copy()
    any_flag = flags[:n_windows].copy()
    for j in range(1, k):
        kmer <<= 2
        kmer |= values[j : j + n_windows]
        any_flag |= flags[j : j + n_windows]
    picked = any_flag[positions]
    ambiguous = (picked & 1).astype(bool)
    invalid = (picked & 2).astype(bool)
    kmer = kmer[positions]
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
        :meth:`healthfm.dna.DnaModality.augmenter`). It is a training option, not part of
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

    def _encode_block(self, buf: np.ndarray, lengths: np.ndarray, counts: np.ndarray) -> np.ndarray:
        n_kmers = counts - self.add_cls
        starts = np.cumsum(lengths) - lengths
        pos = window_positions(starts, n_kmers, self.stride)
        if self.k == 1:
            tok = self._k1_lut[buf[pos]]
        else:
            kmer, ambiguous, invalid = kmer_codes(BASE_LUT[buf], pos, self.k)
            tok = kmer + np.int32(N_SPECIAL)
            tok[ambiguous] = self._first_amb
            tok[invalid] = UNK_ID
        if not self.add_cls:
            return tok
        out = np.full(len(tok) + len(lengths), CLS_ID, dtype=np.int32)
        is_token = np.ones(len(out), dtype=bool)
        is_token[np.cumsum(counts) - counts] = False  # where each sample's [CLS] goes
        out[is_token] = tok
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
        return cls(**config)

    @property
    def hash(self) -> str:
        """SHA-256 of ``tokenizer.json`` without the augmentation flag (see class doc)."""
        data = self.to_dict()
        data["config"] = {k: v for k, v in data["config"].items() if k != "reverse_complement"}
        return json_hash(data)


# --- reverse-complement augmentation ------------------------------------------------
def reverse_complement_batch(ids, lengths_or_mask, rc_map):
    """Reverse-complement every row of a padded batch of token ids.

    The real tokens of each row (after a leading ``[CLS]`` if the row has one, before the
    padding) are reversed and mapped through ``rc_map``; ``[CLS]`` and padding stay where
    they are. For overlapping k-mers (stride 1) the result equals the encoding of the
    reverse-complemented sequence; for other strides only when ``(length - k) % stride == 0``.

    Parameters
    ----------
    ids
        int64 ``[B, T]`` numpy array or torch tensor, right-padded.
    lengths_or_mask
        ``[B]`` number of non-padding tokens per row (``[CLS]`` included), or the
        ``[B, T]`` boolean attention mask.
    rc_map
        :meth:`KmerTokenizer.reverse_complement_map` (numpy or torch, on ids' device).

    Returns
    -------
    Same type as ``ids``.
    """
    is_torch = type(ids).__module__.startswith("torch")
    if is_torch:
        import torch

        xp_arange = lambda n: torch.arange(n, device=ids.device)  # noqa: E731
        rc_map = torch.as_tensor(rc_map, device=ids.device)
        lengths_or_mask = torch.as_tensor(lengths_or_mask, device=ids.device)
    else:
        ids = np.asarray(ids)
        xp_arange = np.arange
        rc_map = np.asarray(rc_map)
        lengths_or_mask = np.asarray(lengths_or_mask)
    src = _rc_source_index(ids, lengths_or_mask, xp_arange)
    if is_torch:
        return rc_map[torch.gather(ids, 1, src)]
    return rc_map[np.take_along_axis(ids, src, axis=1)]


def _rc_source_index(ids, lengths_or_mask, xp_arange):
    """For each output position, the input position it takes its token from."""
    if lengths_or_mask.ndim == 2:
        lengths = lengths_or_mask.sum(1)
    else:
        lengths = lengths_or_mask
    lengths = lengths[:, None]
    first = (ids[:, :1] == CLS_ID) * 1  # 1 where the row starts with [CLS]
    j = xp_arange(ids.shape[1])[None, :]
    inside = (j >= first) & (j < lengths)
    # Position j in [first, length) reads from first + length - 1 - j; others stay put.
    return j + inside * (first + lengths - 1 - 2 * j)


def make_rc_augmenter(tokenizer: KmerTokenizer, p: float = 0.5) -> Callable:
    """Return a batch augmentation that reverse-complements each row with probability ``p``.

    Parameters
    ----------
    tokenizer
        The tokenizer whose :meth:`~KmerTokenizer.reverse_complement_map` to use.
    p
        Probability of flipping each row.

    Returns
    -------
    callable
        ``f(batch, generator) -> batch``; ``batch`` holds ``"ids"`` (LongTensor ``[B, T]``,
        PAD=0 on the right) and ``"attention_mask"`` (bool ``[B, T]``). Other ``[B, T]``
        tensors (e.g. ``values``) are reordered the same way, without mapping. Apply it
        before masking. The input dict is not modified.
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
        rc_map = cache[ids.device]
        flip = torch.rand(ids.shape[0], generator=generator, device=generator.device) < p
        flip = flip.to(ids.device)[:, None]
        mask = batch["attention_mask"]
        src = _rc_source_index(ids, mask.long(), lambda n: torch.arange(n, device=ids.device))
        src = torch.where(flip, src, torch.arange(ids.shape[1], device=ids.device)[None, :])
        out = dict(batch)
        out["ids"] = torch.where(flip, rc_map[torch.gather(ids, 1, src)], ids)
        for name, value in batch.items():
            if (
                name not in ("ids", "attention_mask")
                and isinstance(value, torch.Tensor)
                and value.shape[:2] == ids.shape
            ):
                out[name] = torch.gather(
                    value, 1, src.view(*src.shape, *[1] * (value.ndim - 2)).expand_as(value)
                )
        return out

    return augment

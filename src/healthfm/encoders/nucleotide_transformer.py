"""Nucleotide Transformer v1 and v2 (InstaDeep; Dalla-Torre et al., Nature Methods 2024),
read natively from the folders the authors publish on Hugging Face.

Both generations are ESM-style masked language models over non-overlapping 6-mers. What
this module reproduces, and where each fact comes from (transformers' ``models/esm``, the
``modeling_esm.py``/``esm_config.py`` the v2 folders ship as remote code, and the authors'
JAX package ``instadeepai/nucleotide-transformer``; the remote code is read, never run):

Folder (``InstaDeepAI/nucleotide-transformer-*``)
    ``config.json`` (an ``EsmForMaskedLM`` config; v1 says ``model_type: esm``, v2 folders
    may instead carry only an ``auto_map`` to their own ``esm_config.EsmConfig``),
    ``model.safetensors`` and/or ``pytorch_model.bin``, ``vocab.txt``,
    ``tokenizer_config.json`` (``EsmTokenizer``, ``model_max_length``) and
    ``special_tokens_map.json``. The weights hold the masked-LM head (``lm_head.*``), ESM's
    unused contact head and, in older saves, ``esm.embeddings.position_ids``; those are
    skipped, every encoder tensor must be present with its shape.
Vocabulary (``vocab.txt``, one token per line, id = line number)
    v1: ``<unk> <pad> <mask> <cls>``, the 4,096 6-mers in ``itertools.product("ATCG")``
    order, ``A T C G N``, then ``<eos> <bos>`` (4,107 lines; the model's embedding has
    4,105 rows, so the last two are never fed to it). v2: ``<unk> <pad> <mask> <cls> <eos>
    <bos>``, the 6-mers, ``A T C G N`` (4,107 rows). The tokenizer reads the order from the
    file, so both (and the 3-mer v2 model) work unchanged.
Tokenization (the authors' ``NucleotidesKmersTokenizer`` and the ``EsmTokenizer`` their
folders name, which agree on A/C/G/T/N input)
    ``<cls>`` first, no ``<eos>``; each maximal run of A/C/G/T is cut into 6-mers from its
    start, the remainder (fewer than 6) as single nucleotides; every ``N`` is its own
    token and breaks the 6-mer grid. Any other character (IUPAC ambiguity codes) is not in
    the vocabulary: ``EsmTokenizer`` turns each maximal run of them into one ``<unk>``,
    which is reproduced here (the JAX tokenizer raises instead). Lower case is upper-cased
    first (soft-masking is only case; ``EsmTokenizer`` would make a lower-case run one
    ``<unk>``) and ``U`` is read as ``T``, as healthfm's DNA reader does.
Network (``EsmModel``; pre-LayerNorm blocks, ``emb_layer_norm_after`` at the end)
    v1: learned absolute positions numbered from ``pad_token_id + 1`` (so at most
    ``max_position_embeddings - pad_token_id - 1`` = 1,000 tokens), GELU (erf) FFN with
    biases, and ESM's token-dropout rescaling, which NT v1 configs switch on
    (``token_dropout: true``) and which applies at inference too: embeddings are scaled by
    ``(1 - 0.15 * 0.8) / (1 - share of <mask> tokens)``. v2: rotary positions
    (``position_embedding_type: rotary``, base 10,000, over each head), a gated FFN
    ``down(silu(x1) * x2)`` with ``[x1, x2] = up(x)`` of width ``2 * intermediate_size``,
    both without bias (``add_bias_fnn: false``), no token dropout. Queries are scaled by
    ``head_dim ** -0.5`` before the rotation, as ESM does.
Embedding
    The authors' Hugging Face model cards: the last layer's hidden states (after
    ``emb_layer_norm_after``) averaged over the attention mask, which includes ``<cls>``
    (``pooling="mean"``). Their JAX notebook instead drops ``<cls>`` before averaging;
    ``pooling="cls"`` gives the first token.

Entries: ``nucleotide-transformer`` (v1 or v2, told apart by the config), and
``nucleotide-transformer-v1`` / ``nucleotide-transformer-v2``, which refuse the other one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from healthfm.dna.tokenizer import kmer_codes
from healthfm.encoders.published import (
    PublishedEncoder,
    find_file,
    folder_hash,
    load_weights,
    read_json,
    read_state_dict,
)
from healthfm.encoders.registry import EncoderEntry, register_entry
from healthfm.errors import ConfigError, DataError, ModelError
from healthfm.tokenizer import Tokenizer, register_tokenizer
from healthfm.tokens import TokenChunk

log = logging.getLogger("healthfm")

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
#: ESM's token-dropout training ratio (15% selected, 80% of those masked), hard-coded in
#: every ESM implementation (transformers and the NT remote code alike).
MASK_RATIO_TRAIN = 0.15 * 0.8
#: Refuse an input whose positions map to ``<unk>`` more often than this.
MAX_UNKNOWN_SHARE = 0.5
_BASES = "ACGT"

# Byte classes of the tokenizer: A/C/G/T (and a/c/g/t, U/u as T), N (n), anything else.
_BASE, _N, _OTHER = 0, 1, 2
_CLASS_LUT = np.full(256, _OTHER, dtype=np.uint8)
for _c in "ACGTUacgtu":
    _CLASS_LUT[ord(_c)] = _BASE
_CLASS_LUT[ord("N")] = _CLASS_LUT[ord("n")] = _N


# ----------------------------------------------------------------------------- tokenizer
@register_tokenizer
class NucleotideTransformerTokenizer(Tokenizer):
    """The Nucleotide Transformer tokenization, vectorized, emitting the ids of the
    folder's ``vocab.txt`` (see the module docstring for the rules).

    Parameters
    ----------
    vocab
        The tokens of ``vocab.txt`` in file order (id = position).
    max_length
        Longest input the model takes, ``<cls>`` included (longer samples are cut to
        their first ``max_length`` tokens when batched; :meth:`check_sequences` says how
        many).
    model_vocab_size
        Rows of the model's embedding; every id the tokenizer emits must be below it.
    """

    type = "dna.nucleotide_transformer"
    modality = "dna"

    def __init__(self, vocab: list[str], max_length: int, model_vocab_size: int | None = None):
        self.vocab = [str(t) for t in vocab]
        self.max_length = int(max_length)
        self.model_vocab_size = int(model_vocab_size or len(self.vocab))
        index = {tok: i for i, tok in enumerate(self.vocab)}
        for name in ("<unk>", "<pad>", "<mask>", "<cls>", "A", "C", "G", "T", "N"):
            if name not in index:
                raise ModelError(
                    f"vocab.txt has no {name!r} token; not a Nucleotide Transformer vocabulary"
                )
        # An NT vocabulary holds only <special> tokens, A/C/G/T strings and N.
        for line, tok in enumerate(self.vocab):
            if not (tok == "N" or (tok and set(tok) <= set(_BASES)) or tok.startswith("<")):
                raise ModelError(
                    f"vocab.txt line {line + 1} holds {tok!r}; not a Nucleotide Transformer "
                    "vocabulary (special tokens, A/C/G/T k-mers and N only)"
                )
        kmers = [t for t in self.vocab if t and set(t) <= set(_BASES)]
        self.k = max(len(t) for t in kmers)
        codes = np.full(4**self.k, -1, dtype=np.int64)
        for tok in kmers:
            if len(tok) == self.k:
                code = 0
                for ch in tok:
                    code = code * 4 + _BASES.index(ch)
                codes[code] = index[tok]
        if (codes < 0).any():
            raise ModelError(
                f"vocab.txt lacks {(codes < 0).sum()} of the {4**self.k} {self.k}-mers; "
                "not a Nucleotide Transformer vocabulary"
            )
        self._kmer_ids = codes.astype(np.int32)  # base-4 code (A<C<G<T) -> vocab id
        self._single = np.full(256, index["<unk>"], dtype=np.int32)
        for ch in "ACGTN":
            self._single[ord(ch)] = self._single[ord(ch.lower())] = index[ch]
        self._single[ord("U")] = self._single[ord("u")] = index["T"]
        self.unk_id, self.pad_id = index["<unk>"], index["<pad>"]
        self.mask_id, self.cls_id = index["<mask>"], index["<cls>"]
        self.n_id = index["N"]
        emitted = max(int(self._kmer_ids.max()), int(self._single.max()), self.cls_id)
        if emitted >= self.model_vocab_size:
            raise ModelError(
                f"vocab.txt gives token id {emitted}, beyond the model's {self.model_vocab_size} "
                "embedding rows (vocab.txt of another model?)"
            )

    @property
    def vocab_size(self) -> int:
        """Rows of the model's embedding (the ids it can be fed)."""
        return self.model_vocab_size

    def config(self) -> dict[str, Any]:
        """JSON-serialisable state that rebuilds this tokenizer."""
        return {
            "vocab": list(self.vocab),
            "max_length": self.max_length,
            "model_vocab_size": self.model_vocab_size,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> NucleotideTransformerTokenizer:
        """Rebuild a tokenizer from :meth:`config`."""
        unknown = set(config) - {"vocab", "max_length", "model_vocab_size"}
        if unknown:
            raise ConfigError(f"unknown {cls.type} tokenizer settings {sorted(unknown)}")
        return cls(**config)

    @classmethod
    def from_folder(cls, folder: Path, max_length: int, model_vocab_size: int):
        """The tokenizer of a published folder (its ``vocab.txt``)."""
        path = Path(folder) / "vocab.txt"
        if not path.is_file():
            raise ModelError(
                "vocab.txt is missing (the 6-mer vocabulary the model was trained on)", file=path
            )
        try:
            vocab = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise ModelError(f"vocab.txt is not UTF-8 text ({exc})", file=path) from exc
        vocab = [line.strip() for line in vocab]
        while vocab and not vocab[-1]:
            vocab.pop()
        try:
            return cls(vocab, max_length, model_vocab_size)
        except ModelError as exc:
            raise ModelError(exc.message, file=path) from None

    # --- encoding --------------------------------------------------------------------
    def _tokens(self, sequences) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Token ids of all sequences (no ``<cls>``), the sample of each token, the number of
        sequence positions inside ``<unk>`` tokens and the sequence lengths."""
        seqs = sequences.tolist() if isinstance(sequences, np.ndarray) else list(sequences)
        lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
        buf = np.frombuffer("".join(seqs).encode("ascii", errors="replace"), dtype=np.uint8)
        n = len(buf)
        starts = np.cumsum(lengths) - lengths
        sample = np.repeat(np.arange(len(seqs)), lengths)
        first = np.zeros(n, dtype=bool)  # first position of a sample
        first[starts[lengths > 0]] = True
        cls = _CLASS_LUT[buf]
        prev = np.full_like(cls, 255)  # the class before each position (none before 0)
        prev[1:] = cls[:-1]
        # A run (of bases, or of other characters) starts where the class changes or a
        # sample starts; N never forms runs (each N is its own token).
        run_start = first | (cls != prev) if n else first
        is_base = cls == _BASE
        base_start = run_start & is_base
        pos = np.arange(n)
        # Each base run ends at the first non-base or sample start after its beginning.
        run_id = np.cumsum(base_start) - 1
        run_begin = pos[base_start]
        breaks = pos[~is_base | first]
        nxt = np.searchsorted(breaks, run_begin, side="right")
        run_end = np.where(nxt < len(breaks), breaks[np.minimum(nxt, len(breaks) - 1)], n)
        k = self.k
        if len(run_begin):
            at = np.maximum(run_id, 0)  # each position's run (meaningful at bases only)
            within = pos - run_begin[at]
            limit = ((run_end - run_begin) // k * k)[at]  # bases of the run in k-mers
        else:
            within = limit = np.zeros(n, dtype=np.int64)
        is_kmer_start = is_base & (within < limit) & (within % k == 0)
        is_single = is_base & (within >= limit)
        is_other_start = run_start & (cls == _OTHER)
        emit = is_kmer_start | is_single | (cls == _N) | is_other_start
        where = np.flatnonzero(emit)
        ids = self._single[buf[where]]
        km = np.flatnonzero(is_kmer_start[where])
        if len(km):
            code, _, _ = kmer_codes(buf, where[km], k)
            ids[km] = self._kmer_ids[code]
        ids[is_other_start[where]] = self.unk_id
        unknown = np.bincount(sample[cls == _OTHER], minlength=len(seqs))
        return ids.astype(np.int32), sample[where], unknown, lengths

    def encode(self, sequences, keys=None) -> TokenChunk:
        """Tokenize sequences into a :class:`~healthfm.tokens.TokenChunk` (``<cls>`` first).

        Parameters
        ----------
        sequences
            Strings (list or numpy array).
        keys
            One key per sequence (default: their positions).
        """
        ids, sample, _, lengths = self._tokens(sequences)
        n = len(lengths)
        counts = np.bincount(sample, minlength=n) + 1
        offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        out = np.full(int(offsets[-1]), self.cls_id, dtype=np.int32)
        is_token = np.ones(len(out), dtype=bool)
        is_token[offsets[:-1]] = False
        out[is_token] = ids  # tokens stay in sample order, each sample after its <cls>
        return TokenChunk(ids=out, offsets=offsets, keys=list(range(n)) if keys is None else keys)

    def check_sequences(self, sequences, source: Any = None) -> dict[str, Any]:
        """Coverage of the vocabulary on ``sequences``, logged, and refused when near empty.

        Returns
        -------
        dict
            ``unknown_share`` (share of sequence positions that become ``<unk>``),
            ``n_share`` (share that are ``N``), ``too_long`` (samples longer than
            ``max_length`` tokens, which are cut to their first ``max_length`` tokens).

        Raises
        ------
        DataError
            When more than half of all positions map to ``<unk>``, naming the first row
            where they do.
        """
        ids, sample, unknown, lengths = self._tokens(sequences)
        total = max(int(lengths.sum()), 1)
        report = {
            "unknown_share": float(unknown.sum()) / total,
            "n_share": float((ids == self.n_id).sum()) / total,
            "too_long": int(
                ((np.bincount(sample, minlength=len(lengths)) + 1) > self.max_length).sum()
            ),
        }
        if report["unknown_share"] > MAX_UNKNOWN_SHARE:
            bad = np.flatnonzero(unknown > MAX_UNKNOWN_SHARE * np.maximum(lengths, 1))
            raise DataError(
                f"{report['unknown_share']:.0%} of the sequence positions are not A/C/G/T/N and "
                "would reach the model as <unk>: these are not DNA sequences in the alphabet "
                "Nucleotide Transformer was trained on (check --sequence-column)",
                file=source,
                row=int(bad[0]) if len(bad) else None,
            )
        if report["unknown_share"] > 0:
            log.warning(
                "nucleotide-transformer: %.2f%% of sequence positions (IUPAC ambiguity codes "
                "other than N) become <unk> tokens",
                100 * report["unknown_share"],
            )
        if report["too_long"]:
            log.warning(
                "nucleotide-transformer: %d of %d sequences are longer than the model's %d "
                "tokens (about %d nt) and are cut to their first %d tokens",
                report["too_long"], len(lengths), self.max_length,
                (self.max_length - 1) * self.k, self.max_length,
            )  # fmt: skip
        return report


# ----------------------------------------------------------------------------- network
@dataclass(frozen=True)
class NTConfig:
    """The fields of an NT ``config.json`` the encoder uses (names as in ``EsmConfig``)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    pad_token_id: int
    mask_token_id: int
    max_position_embeddings: int
    position_embedding_type: str
    layer_norm_eps: float
    emb_layer_norm_before: bool
    token_dropout: bool
    glu: bool  # v2's gated FFN (its remote code's EsmIntermediate)
    ffn_bias: bool  # add_bias_fnn

    @property
    def version(self) -> str:
        """ "v2" for the rotary, gated-FFN generation, else "v1"."""
        return "v2" if self.glu else "v1"

    @property
    def max_tokens(self) -> int:
        """Longest input in tokens: positions run from ``pad + 1`` to ``max_positions - 1``."""
        return self.max_position_embeddings - self.pad_token_id - 1

    @classmethod
    def from_json(cls, path: Path) -> NTConfig:
        """Parse and validate a published ``config.json``."""
        raw = read_json(path)
        if not isinstance(raw, dict):
            raise ModelError("config.json does not hold an object", file=path)
        auto_config = (raw.get("auto_map") or {}).get("AutoConfig", "")
        model_type = raw.get("model_type")
        if model_type != "esm" and not (
            model_type is None and str(auto_config).startswith("esm_config.")
        ):
            raise ModelError(
                f"config.json describes a {model_type or 'model of unknown type'!r}, not an ESM "
                "masked LM (Nucleotide Transformer folders say model_type 'esm')",
                file=path,
                column="model_type",
            )
        if raw.get("is_folding_model"):
            raise ModelError("an ESMFold folder, not Nucleotide Transformer", file=path)
        # v2 folders ship their own EsmConfig whose extra field add_bias_fnn goes with the
        # gated FFN of their modeling_esm.py; transformers' EsmConfig has neither.
        glu = "add_bias_fnn" in raw

        def field(name: str, kind: type, default: Any = None) -> Any:
            value = raw.get(name, default)
            if value is None or (
                kind is int and (isinstance(value, bool) or not isinstance(value, int))
            ):
                raise ModelError(
                    f"config.json: {name} must be {kind.__name__}, got {value!r}",
                    file=path,
                    column=name,
                )
            return kind(value)

        config = cls(
            hidden_size=field("hidden_size", int),
            num_hidden_layers=field("num_hidden_layers", int),
            num_attention_heads=field("num_attention_heads", int),
            intermediate_size=field("intermediate_size", int),
            vocab_size=field("vocab_size", int),
            pad_token_id=field("pad_token_id", int),
            mask_token_id=field("mask_token_id", int),
            max_position_embeddings=field("max_position_embeddings", int),
            position_embedding_type=str(raw.get("position_embedding_type", "absolute")),
            layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
            emb_layer_norm_before=bool(raw.get("emb_layer_norm_before") or False),
            token_dropout=bool(raw.get("token_dropout", False)),
            glu=glu,
            ffn_bias=bool(raw.get("add_bias_fnn", True)),
        )
        if config.position_embedding_type not in ("absolute", "rotary"):
            raise ModelError(
                f"position_embedding_type {config.position_embedding_type!r} is not one Nucleotide "
                "Transformer uses (absolute for v1, rotary for v2)",
                file=path,
                column="position_embedding_type",
            )
        if config.hidden_size % config.num_attention_heads:
            raise ModelError("hidden_size is not a multiple of num_attention_heads", file=path)
        return config


def _gelu(x: torch.Tensor) -> torch.Tensor:
    # ESM's exact (erf) GELU, written as ESM writes it.
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# Module and attribute names follow the checkpoint keys (esm.embeddings.word_embeddings,
# esm.encoder.layer.0.attention.self.query, ...), so the authors' state dict loads as it is.
class _Embeddings(nn.Module):
    def __init__(self, c: NTConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        if c.position_embedding_type == "absolute":
            self.position_embeddings = nn.Embedding(
                c.max_position_embeddings, c.hidden_size, padding_idx=c.pad_token_id
            )
        if c.emb_layer_norm_before:
            self.layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.c = c

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        c = self.c
        x = self.word_embeddings(ids)
        if c.token_dropout:
            # ESM's mask-dropout compensation; applied at inference as well.
            is_mask = ids == c.mask_token_id
            x = x.masked_fill(is_mask.unsqueeze(-1), 0.0)
            observed = is_mask.sum(-1).float() / mask.sum(-1).clamp(min=1)
            x = (x * (1 - MASK_RATIO_TRAIN) / (1 - observed)[:, None, None]).to(x.dtype)
        if c.position_embedding_type == "absolute":
            real = (ids != c.pad_token_id).long()
            positions = torch.cumsum(real, dim=1) * real + c.pad_token_id
            x = x + self.position_embeddings(positions)
        if c.emb_layer_norm_before:
            x = self.layer_norm(x)
        return x * mask.unsqueeze(-1).to(x.dtype)


class _SelfAttention(nn.Module):
    def __init__(self, c: NTConfig) -> None:
        super().__init__()
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)
        self.heads = c.num_attention_heads

    def forward(self, x, attn_mask, rotary):
        b, t, d = x.shape
        shape = (b, t, self.heads, d // self.heads)
        q = self.query(x).view(shape).transpose(1, 2) * (d // self.heads) ** -0.5
        k = self.key(x).view(shape).transpose(1, 2)
        v = self.value(x).view(shape).transpose(1, 2)
        if rotary is not None:
            cos, sin = rotary  # float32, as both ESM implementations compute them
            q = (q.float() * cos + _rotate_half(q.float()) * sin).to(v.dtype)
            k = (k.float() * cos + _rotate_half(k.float()) * sin).to(v.dtype)
        # The query is already scaled (ESM scales before the rotation).
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0)
        return out.transpose(1, 2).reshape(b, t, d)


class _SelfOutput(nn.Module):
    def __init__(self, c: NTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)


class _Attention(nn.Module):
    def __init__(self, c: NTConfig) -> None:
        super().__init__()
        self.self = _SelfAttention(c)
        self.output = _SelfOutput(c)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class _Dense(nn.Module):
    def __init__(self, d_in: int, d_out: int, bias: bool) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out, bias=bias)


class _Layer(nn.Module):
    def __init__(self, c: NTConfig) -> None:
        super().__init__()
        self.attention = _Attention(c)
        width = c.intermediate_size * (2 if c.glu else 1)
        self.intermediate = _Dense(c.hidden_size, width, c.ffn_bias)
        self.output = _Dense(c.intermediate_size, c.hidden_size, c.ffn_bias)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.glu = c.glu

    def forward(self, x, attn_mask, rotary):
        a = self.attention
        x = x + a.output.dense(a.self(a.LayerNorm(x), attn_mask, rotary))
        h = self.intermediate.dense(self.LayerNorm(x))
        if self.glu:
            x1, x2 = h.chunk(2, dim=-1)
            h = F.silu(x1) * x2
        else:
            h = _gelu(h)
        return x + self.output.dense(h)


class _Encoder(nn.Module):
    def __init__(self, c: NTConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))
        self.emb_layer_norm_after = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class NucleotideTransformer(PublishedEncoder):
    """Nucleotide Transformer v1 or v2 as an :class:`~healthfm.encoders.Encoder`.

    Parameters
    ----------
    config
        The folder's configuration (:meth:`NTConfig.from_json`).
    tokenizer
        Its tokenizer (:class:`NucleotideTransformerTokenizer`).
    name, folder, model_hash
        Identity for result rows and provenance.
    """

    def __init__(
        self,
        config: NTConfig,
        tokenizer: NucleotideTransformerTokenizer,
        name: str,
        folder: Path,
        model_hash: str | None,
    ) -> None:
        super().__init__(
            name=name,
            modality="dna",
            dim=config.hidden_size,
            pooling="mean",
            max_len=tokenizer.max_length,
            tokenizer=tokenizer,
            folder=folder,
            model_hash=model_hash,
        )
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)
        head_dim = config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _rotary(self, t: int, device: torch.device):
        if self.config.position_embedding_type != "rotary":
            return None
        freqs = torch.outer(
            torch.arange(t, device=device, dtype=torch.float32), self.inv_freq.float()
        )
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[None, None], emb.sin()[None, None]

    def forward_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Last-layer token states ``(B, T, dim)`` after ``emb_layer_norm_after``."""
        if "segment_ids" in batch:
            raise ConfigError(f"{self.name} embeds one sample per row, not packed batches")
        ids = batch["ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        # healthfm pads with id 0, which is <unk> in this vocabulary: put <pad> back, as
        # ESM's positions and embeddings read padding from the ids.
        ids = torch.where(mask, ids, torch.full_like(ids, self.config.pad_token_id))
        x = self.embeddings(ids, mask)
        attn_mask = mask[:, None, None, :]
        rotary = self._rotary(ids.shape[1], ids.device)
        for layer in self.encoder.layer:
            x = layer(x, attn_mask, rotary)
        return self.encoder.emb_layer_norm_after(x)


# ----------------------------------------------------------------------------- loading
def _max_length(folder: Path, config: NTConfig) -> int:
    """Positions the model has, capped by the tokenizer's ``model_max_length`` if it says."""
    limit = config.max_tokens
    path = folder / "tokenizer_config.json"
    if path.is_file():
        settings = read_json(path)
        stated = settings.get("model_max_length") if isinstance(settings, dict) else None
        # transformers writes a huge sentinel when no length is known.
        if isinstance(stated, int) and 0 < stated < 1_000_000:
            limit = min(limit, stated)
    return limit


def _state(
    folder: Path, config: NTConfig
) -> tuple[dict[str, torch.Tensor], Path, dict[str, torch.Tensor]]:
    """The encoder's tensors (``esm.`` stripped), the file, and any saved rotary tables."""
    path = find_file(folder, WEIGHT_FILES, "Nucleotide Transformer weights")
    state = read_state_dict(path)
    # EsmForMaskedLM saves the encoder under "esm."; a bare EsmModel save has no prefix.
    if any(k.startswith("esm.") for k in state):
        state = {k[4:]: v for k, v in state.items() if k.startswith("esm.")}
    rotary = {k: state.pop(k) for k in list(state) if k.endswith("rotary_embeddings.inv_freq")}
    if config.position_embedding_type == "rotary":
        # The v2 remote code also creates (and saves) an absolute table it never uses.
        state.pop("embeddings.position_embeddings.weight", None)
    return state, path, rotary


def load_nucleotide_transformer(
    path: str | Path, version: str | None = None
) -> NucleotideTransformer:
    """Load a published Nucleotide Transformer folder.

    Parameters
    ----------
    path
        The folder (``config.json``, ``model.safetensors`` or ``pytorch_model.bin``,
        ``vocab.txt``; ``tokenizer_config.json`` optional).
    version
        "v1" or "v2" to insist on one generation; None accepts either.

    Raises
    ------
    ModelError
        A missing file, a folder of another model, or weights that do not fit.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ModelError("model folder does not exist", file=folder)
    config = NTConfig.from_json(folder / "config.json")
    if version is not None and config.version != version:
        raise ModelError(
            f"this is a Nucleotide Transformer {config.version} folder, not {version} "
            f"(use nucleotide-transformer-{config.version}: or nucleotide-transformer:)",
            file=folder / "config.json",
        )
    tokenizer = NucleotideTransformerTokenizer.from_folder(
        folder, _max_length(folder, config), config.vocab_size
    )
    if (tokenizer.pad_id, tokenizer.mask_id) != (config.pad_token_id, config.mask_token_id):
        raise ModelError(
            f"vocab.txt puts <pad>/<mask> at {tokenizer.pad_id}/{tokenizer.mask_id} but "
            f"config.json says {config.pad_token_id}/{config.mask_token_id}",
            file=folder / "vocab.txt",
        )
    state, weights, rotary = _state(folder, config)
    files = [folder / "config.json", folder / "vocab.txt", weights]
    name = (
        f"nucleotide-transformer-{config.version}-{config.num_hidden_layers}L{config.hidden_size}"
    )
    model = NucleotideTransformer(config, tokenizer, name, folder, folder_hash(files))
    load_weights(
        model, state, weights, ignore=("contact_head.", "pooler.", "embeddings.position_ids")
    )
    if rotary:
        inv_freq = next(iter(rotary.values()))
        if tuple(inv_freq.shape) != tuple(model.inv_freq.shape):
            raise ModelError(
                f"rotary inv_freq {tuple(inv_freq.shape)} (expected {tuple(model.inv_freq.shape)})",
                file=weights,
            )
        # The saved frequencies are the ones the model ran with (transformers keeps them).
        model.inv_freq.copy_(inv_freq.float())
    return model.eval()


_COMMON = {
    "modality": "dna",
    "files": (
        "config.json",
        "model.safetensors|pytorch_model.bin",
        "vocab.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ),
    "preprocessing": (
        "<cls> + non-overlapping 6-mers from the start of each A/C/G/T run, single "
        "nucleotides where no 6-mer fits (N, run ends); lower case upper-cased; other "
        "IUPAC codes -> <unk> (coverage reported)"
    ),
    "pooling": "mean of the last layer over the attention mask, <cls> included (model cards)",
    "licence": "CC BY-NC-SA 4.0 (non-commercial)",
    "gated": False,
    "citation": (
        "Dalla-Torre et al., Nucleotide Transformer: building and evaluating robust "
        "foundation models for human genomics, Nature Methods 22, 287-297 (2025; online 2024)"
    ),
}

register_entry(
    EncoderEntry(
        name="nucleotide-transformer",
        architecture="ESM masked LM over 6-mers: v1 or v2, told apart by config.json",
        dim=None,
        source="Hugging Face InstaDeepAI/nucleotide-transformer-* (any v1 or v2 folder)",
        loader=load_nucleotide_transformer,
        **_COMMON,
    )
)
register_entry(
    EncoderEntry(
        name="nucleotide-transformer-v1",
        architecture=(
            "ESM masked LM, learned absolute positions, GELU FFN with bias, token-dropout "
            "scaling; 500M: 24 layers x 1280, 20 heads; 2.5B: 2560 wide; 1,000 tokens"
        ),
        dim=None,
        source=(
            "Hugging Face InstaDeepAI/nucleotide-transformer-500m-human-ref, -500m-1000g, "
            "-2.5b-1000g, -2.5b-multi-species"
        ),
        loader=lambda path: load_nucleotide_transformer(path, "v1"),
        **_COMMON,
    )
)
register_entry(
    EncoderEntry(
        name="nucleotide-transformer-v2",
        architecture=(
            "ESM masked LM, rotary positions, gated SiLU FFN without bias; 50M: 12 layers x "
            "512, 16 heads; 100M: 22 x 512; 250M: 768 wide; 500M: 1024 wide; 2,048 tokens"
        ),
        dim=None,
        source=(
            "Hugging Face InstaDeepAI/nucleotide-transformer-v2-{50m,100m,250m,500m}-multi-species"
        ),
        loader=lambda path: load_nucleotide_transformer(path, "v2"),
        **_COMMON,
    )
)

__all__ = [
    "NTConfig",
    "NucleotideTransformer",
    "NucleotideTransformerTokenizer",
    "load_nucleotide_transformer",
]

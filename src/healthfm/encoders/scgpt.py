"""scGPT (Cui et al. 2024), read from its authors' checkpoint folders and run natively:
gene-symbol vocabulary, per-cell value binning, the TransformerModel encoder, ``<cls>``.

Folder layout (the checkpoints linked from ``github.com/bowang-lab/scGPT``'s README, e.g.
``scGPT_human``)::

    scGPT_human/
      args.json       embsize, nheads, d_hid, nlayers, dropout, pad_token, pad_value, n_bins, ...
      vocab.json      gene symbol (and <pad>, <cls>, <eoc>) → token id
      best_model.pt   the TransformerModel state dict (a plain torch pickle of tensors)

What the authors' code does, and this file reproduces (``scgpt/tasks/cell_emb.py``
``embed_data`` / ``get_batch_cell_embeddings``, ``scgpt/data_collator.py``,
``scgpt/preprocess.py`` ``binning``, ``scgpt/model/model.py``, ``scgpt/utils/util.py``
``load_pretrained``):

* Vocabulary: ``<pad>``, ``<cls>``, ``<eoc>`` are appended to ``vocab.json`` when missing;
  the data's genes are matched by symbol, exactly (``gene_col``); genes outside the
  vocabulary are dropped.
* Tokens: each cell is ``<cls>`` followed by its non-zero genes; the value of ``<cls>`` is
  ``pad_value`` (-2). The genes' values are the cell's counts binned into ``n_bins`` = 51
  bins (``binning``: edges ``np.quantile(nonzero, np.linspace(0, 1, 50))``, bin of a value
  between ``np.digitize(x, edges, right=True)`` and ``np.digitize(x, edges)``, drawn at
  random where the two differ, i.e. where the value equals an edge). At most
  ``max_length`` tokens (1,200, ``<cls>`` included). Padding: ``<pad>`` / ``pad_value``.
* Network: ``GeneEncoder`` (embedding + LayerNorm) plus ``ContinuousValueEncoder``
  (linear 1→d, ReLU, linear d→d, LayerNorm; values clipped at 512), summed, then
  ``nlayers`` transformer encoder layers (``nn.TransformerEncoderLayer``: post-norm, ReLU,
  LayerNorm eps 1e-5; the flash-attention layer's pre-norm variant when
  ``args.json`` says ``pre_norm``). The published checkpoints were trained with
  flash-attention and name the packed projection ``self_attn.Wqkv``; ``load_pretrained``
  renames it to ``self_attn.in_proj_`` (both names load here).
* Cell embedding: the final layer's ``<cls>`` state, L2-normalised.

Differences, on purpose: where a value equals a bin edge, the bin is drawn from a
pseudo-random number fixed by the cell's content and the gene (so the same cell always
gets the same tokens, with the authors' distribution of bins); a cell with more than
``max_length - 1`` genes keeps its most expressed ones (the authors sample at random);
several data columns with the same symbol are summed (the authors would feed the gene
twice). The genes are ordered by count, which the model cannot see (it has no position
embedding).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from healthfm.encoders.published import (
    PublishedEncoder,
    content_hash,
    find_file,
    folder_hash,
    load_weights,
    read_json,
    read_state_dict,
)
from healthfm.encoders.registry import EncoderEntry, register_entry
from healthfm.errors import ModelError
from healthfm.fsutil import sha256_file
from healthfm.singlecell.tokenizer import (
    CellTokenizer,
    expressed_entries,
    quantile_bins,
    row_segments,
    sort_rows_desc,
    sum_duplicates,
)
from healthfm.tokenizer import register_tokenizer
from healthfm.tokens import TokenChunk

SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")
#: ``embed_data``'s default context (``<cls>`` included).
DEFAULT_MAX_LENGTH = 1200
#: Checkpoint tensors the encoder does not use: the pretraining and fine-tuning heads.
_UNUSED = (
    "decoder.",
    "mvc_decoder.",
    "cls_decoder.",
    "flag_encoder.",
    "grad_reverse_discriminator.",
    "dsbn.",
    "batch_encoder.",
    "bn.",
)
#: ``load_pretrained``'s renaming of flash-attention parameter names.
_RENAMES = (
    (re.compile(r"self_attn\._impl\.Wqkv\."), "self_attn.in_proj_"),
    (re.compile(r"self_attn\.Wqkv\."), "self_attn.in_proj_"),
    (re.compile(r"self_attn\._impl\.out_proj\."), "self_attn.out_proj."),
)


# --------------------------------------------------------------------------- tokenizer
def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: uint64 → well-mixed uint64 (vectorized)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)).astype(np.uint64)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


@register_tokenizer
class ScGPTTokenizer(CellTokenizer):
    """scGPT's tokens: ``<cls>`` + non-zero vocabulary genes, values = per-cell bins.

    Parameters
    ----------
    vocab
        ``vocab.json``: token → id (special tokens appended when missing, as the authors do).
    pad_token, pad_value
        ``args.json``'s padding token and value (``<cls>``'s value is ``pad_value`` too).
    n_bins
        Bins including the zero bin (the collator's 51).
    max_length
        Tokens per cell, ``<cls>`` included.
    files
        ``vocab.json``'s path (recorded; the hash uses its content).
    """

    type: ClassVar[str] = "published.scgpt"
    fields: tuple[str, ...] = ("values",)
    auto_gene_column: ClassVar[bool] = True
    min_count_fraction: ClassVar[float] = 0.02

    def __init__(
        self,
        vocab: Mapping[str, int],
        pad_token: str = "<pad>",
        pad_value: float = -2.0,
        n_bins: int = 51,
        max_length: int = DEFAULT_MAX_LENGTH,
        files: Mapping[str, str] | None = None,
        sha256: Mapping[str, str] | None = None,
    ) -> None:
        try:
            tokens = {str(k): int(v) for k, v in vocab.items()}
        except (TypeError, ValueError) as exc:
            raise ModelError(f"vocab.json must map tokens to integer ids ({exc})") from exc
        for special in (pad_token, *SPECIAL_TOKENS[1:]):
            if special not in tokens:  # GeneVocab.append_token
                tokens[special] = len(tokens)
        self.vocab = tokens
        genes = [g for g in tokens if g not in SPECIAL_TOKENS and g != pad_token]
        if not genes:
            raise ModelError("vocab.json holds no gene")
        super().__init__(genes, max_length=max_length)
        if int(n_bins) < 3:
            raise ModelError(f"n_bins must be at least 3, got {n_bins}")
        self.n_bins = int(n_bins)
        self.pad_token = pad_token
        self.pad_value = float(pad_value)
        self.pad_id = tokens[pad_token]
        self.cls_id = tokens["<cls>"]
        self.token_ids = np.array([tokens[g] for g in genes], dtype=np.int64)
        self._n_tokens = max(len(tokens), int(max(tokens.values())) + 1)
        self._position = pd.Index(np.asarray(genes, dtype=object))
        self.files = dict(files or {})
        self.sha256 = dict(sha256 or {})
        self._hash: str | None = None

    @classmethod
    def from_folder_files(
        cls, vocab_file: str | Path, args: Mapping[str, Any], max_length: int | None = None
    ) -> ScGPTTokenizer:
        """The tokenizer of a checkpoint folder: ``vocab.json`` and ``args.json``'s settings."""
        vocab_file = Path(vocab_file)
        vocab = read_json(vocab_file)
        if not isinstance(vocab, dict) or not vocab:
            raise ModelError("vocab.json must be a non-empty object of token → id", file=vocab_file)
        try:
            return cls(
                vocab,
                pad_token=str(args.get("pad_token", "<pad>")),
                pad_value=float(args.get("pad_value", -2)),
                n_bins=int(args.get("n_bins", 51)),
                max_length=int(max_length or args.get("max_seq_len", DEFAULT_MAX_LENGTH)),
                files={"vocab": str(vocab_file)},
                sha256={"vocab": sha256_file(vocab_file)},
            )
        except ModelError as exc:
            raise ModelError(exc.message, file=vocab_file) from exc

    def config(self) -> dict[str, Any]:
        """Where ``vocab.json`` is, its SHA-256, and the settings."""
        return {
            "files": self.files,
            "sha256": self.sha256,
            "pad_token": self.pad_token,
            "pad_value": self.pad_value,
            "n_bins": self.n_bins,
            "max_length": self.max_length,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ScGPTTokenizer:
        """Re-read ``vocab.json``; a changed file is refused."""
        tok = cls.from_folder_files(
            config["files"]["vocab"],
            {k: config[k] for k in ("pad_token", "pad_value", "n_bins")},
            max_length=config["max_length"],
        )
        if tok.sha256 != config.get("sha256", tok.sha256):
            raise ModelError(
                "vocab.json changed since this tokenizer was saved", file=tok.files["vocab"]
            )
        return tok

    @property
    def hash(self) -> str:
        """SHA-256 of the settings and ``vocab.json``'s content (not its path)."""
        if self._hash is None:
            self._hash = content_hash(self)
        return self._hash

    @property
    def vocab_size(self) -> int:
        """``len(vocab)`` after the special tokens (the model's ``ntoken``)."""
        return self._n_tokens

    def token_names(self, ids: np.ndarray) -> np.ndarray:
        """Token (gene symbol or special) of each id."""
        names = np.full(self._n_tokens, "<unused>", dtype=object)
        for name, i in self.vocab.items():
            names[i] = name
        return names[np.asarray(ids)]

    def _map_genes(self, data_genes: np.ndarray) -> np.ndarray:
        """Vocabulary position of each data column, by exact symbol (-1: not in vocab);
        cached by :meth:`CellTokenizer.column_map`."""
        names = np.asarray(data_genes, dtype=object).astype(str).astype(object)
        return self._position.get_indexer(names)

    def encode_block(
        self, block: sp.csr_matrix, totals: np.ndarray, data_genes: np.ndarray, keys: Sequence[Any]
    ) -> TokenChunk:
        """``<cls>`` + gene ids, with ``pad_value`` then the genes' bins as values."""
        col_map = self.column_map(data_genes)
        n = block.shape[0]
        rows, _, vocab, counts = expressed_entries(block, col_map)
        mapped = col_map[col_map >= 0]
        if len(np.unique(mapped)) < len(mapped):
            rows, vocab, counts = sum_duplicates(rows, vocab, counts, len(self.genes))
        values = counts.astype(np.float32)  # the authors bin the counts as they are
        order = sort_rows_desc(rows, values, n, exact=False)
        vocab, values = vocab[order], values[order]
        seg_counts, starts, pos = row_segments(rows, n)
        bins = self.bins(values, rows, vocab, seg_counts, starts)
        room = self.max_length - 1
        lengths = np.minimum(seg_counts, room) + 1
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        ids = np.empty(int(offsets[-1]), dtype=np.int32)
        out = np.empty(len(ids), dtype=np.float32)
        ids[offsets[:-1]] = self.cls_id
        out[offsets[:-1]] = self.pad_value
        sel = pos < room
        target = offsets[rows[sel]] + 1 + pos[sel]
        ids[target] = self.token_ids[vocab[sel]]
        out[target] = bins[sel]
        return TokenChunk(ids=ids, offsets=offsets, keys=list(keys), values=out)

    def bins(
        self,
        values_desc: np.ndarray,
        rows: np.ndarray,
        vocab: np.ndarray,
        counts: np.ndarray,
        starts: np.ndarray,
    ) -> np.ndarray:
        """Each value's bin, 1 … n_bins - 1, as ``scgpt.preprocess.binning`` draws it.

        ``binning`` computes ``left = digitize(x, edges)`` and ``right = digitize(x, edges,
        right=True)`` and returns ``ceil(u * (right - left) + left)`` with ``u`` uniform;
        ``u`` here is a hash of the cell's content and the gene, so repeated runs agree.
        """
        left = quantile_bins(values_desc, rows, counts, starts, self.n_bins, side="right")
        right = quantile_bins(values_desc, rows, counts, starts, self.n_bins, side="left")
        tied = right < left
        if not tied.any():
            return left.astype(np.float32)
        # A cell's seed: a digest of its (gene, count) pairs; the gene picks the draw.
        content = _mix(
            vocab.astype(np.uint64) * np.uint64(1_000_003) + values_desc.astype(np.uint64)
        )
        seed = np.zeros(len(counts), dtype=np.uint64)
        np.add.at(seed, rows, content)
        u = (_mix(seed[rows] ^ vocab.astype(np.uint64)) >> np.uint64(11)).astype(
            np.float64
        ) / float(1 << 53)
        drawn = np.ceil(u * (right - left) + left)
        return np.where(tied, drawn, left).astype(np.float32)


# --------------------------------------------------------------------------- network
class GeneEncoder(nn.Module):
    """Gene token embedding + LayerNorm."""

    def __init__(self, n_tokens: int, d: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_tokens, d)
        self.enc_norm = nn.LayerNorm(d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(ids))


class ContinuousValueEncoder(nn.Module):
    """A value → linear(1, d) → ReLU → linear(d, d) → LayerNorm (values clipped at 512)."""

    def __init__(self, d: int, max_value: float = 512.0) -> None:
        super().__init__()
        self.linear1 = nn.Linear(1, d)
        self.linear2 = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.max_value = max_value

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(values.unsqueeze(-1), max=self.max_value)
        return self.norm(self.linear2(F.relu(self.linear1(x))))


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s packed parameter names."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d, d))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * d))
        self.out_proj = nn.Linear(d, d)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As ``nn.MultiheadAttention`` initialises them."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class ScGPTLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` (post-norm, ReLU) or the authors' flash layer's
    pre-norm variant (which normalises before each block *and* adds the normalised input)."""

    def __init__(self, d: int, heads: int, d_hid: int, norm_scheme: str) -> None:
        super().__init__()
        self.self_attn = SelfAttention(d, heads)
        self.linear1 = nn.Linear(d, d_hid)
        self.linear2 = nn.Linear(d_hid, d)
        self.norm1 = nn.LayerNorm(d, eps=1e-5)
        self.norm2 = nn.LayerNorm(d, eps=1e-5)
        self.norm_scheme = norm_scheme

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        if self.norm_scheme == "pre":  # FlashTransformerEncoderLayer, norm_scheme="pre"
            x = self.norm1(x)
            x = x + self.self_attn(x, attend)
            x = self.norm2(x)
            return x + self.linear2(F.relu(self.linear1(x)))
        x = self.norm1(x + self.self_attn(x, attend))
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class TransformerStack(nn.Module):
    def __init__(self, layers: list[ScGPTLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


class ScGPTEncoder(PublishedEncoder):
    """scGPT's ``TransformerModel`` encoder (``_encode``), with the authors' tensor names."""

    poolings = ("cls", "mean")

    def __init__(
        self,
        args: dict[str, Any],
        tokenizer: ScGPTTokenizer,
        folder: Path,
        model_hash: str | None,
    ) -> None:
        super().__init__(
            name="scgpt",
            modality="singlecell",
            dim=args["embsize"],
            pooling="cls",
            max_len=tokenizer.max_length,
            tokenizer=tokenizer,
            folder=folder,
            model_hash=model_hash,
        )
        d = args["embsize"]
        scheme = "pre" if args.get("pre_norm", False) else "post"
        self.encoder = GeneEncoder(tokenizer.vocab_size, d)
        self.value_encoder = ContinuousValueEncoder(d)
        self.transformer_encoder = TransformerStack(
            [ScGPTLayer(d, args["nheads"], args["d_hid"], scheme) for _ in range(args["nlayers"])]
        )
        self.pad_id = tokenizer.pad_id
        self.pad_value = tokenizer.pad_value

    def forward_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Final-layer states ``(B, T, embsize)``; padding is ``<pad>`` / ``pad_value``."""
        mask = batch["attention_mask"].bool()
        ids = torch.where(mask, batch["ids"], torch.full_like(batch["ids"], self.pad_id))
        values = batch["values"].float()
        values = torch.where(mask & ~torch.isnan(values), values, self.pad_value)
        x = self.encoder(ids) + self.value_encoder(values)
        attend = mask[:, None, None, :]
        for layer in self.transformer_encoder.layers:
            x = layer(x, attend)
        return x

    def embed(self, batch: dict[str, torch.Tensor], pooling: str | None = None) -> torch.Tensor:
        """``cls``: the ``<cls>`` state, L2-normalised (``get_batch_cell_embeddings``);
        ``mean``: the mean of the gene tokens' states, L2-normalised likewise."""
        pooling = self.check_pooling(pooling)
        hidden = self.forward_features(batch).float()
        if pooling == "cls":
            pooled = hidden[:, 0]
        else:
            genes = batch["attention_mask"].bool().clone()
            genes[:, 0] = False
            w = genes.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * w).sum(1) / w.sum(1).clamp(min=1.0)
        return F.normalize(pooled, dim=-1)


# --------------------------------------------------------------------------- loading
def _checkpoint_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Flash-attention names → ``nn.MultiheadAttention``'s, as ``load_pretrained`` does."""
    out = {}
    for key, value in state.items():
        for pattern, replacement in _RENAMES:
            key = pattern.sub(replacement, key)
        out[key] = value
    return out


def load_scgpt(path: str | Path) -> ScGPTEncoder:
    """Load an scGPT checkpoint folder (``args.json``, ``vocab.json``, ``best_model.pt``).

    Raises
    ------
    ModelError
        Missing or malformed files, a folder of another model, an unsupported setting
        (``input_emb_style`` other than "continuous", batch labels), weights that do not fit.
    """
    folder = Path(path)
    if (
        folder.is_dir()
        and not (folder / "args.json").is_file()
        and (folder / "config.json").is_file()
    ):
        raise ModelError(
            "this folder has a config.json and no args.json: a Hugging Face model such as "
            f"Geneformer, not an scGPT checkpoint (load it as geneformer:{folder})",
            file=folder,
        )
    args_file = find_file(folder, ["args.json"], "scGPT")
    args = read_json(args_file)
    if not isinstance(args, dict):
        raise ModelError("args.json must be an object", file=args_file)
    for key in ("embsize", "nheads", "d_hid", "nlayers"):
        if not isinstance(args.get(key), int) or args[key] <= 0:
            raise ModelError(f"args.json needs a positive integer {key!r}", file=args_file)
    if args["embsize"] % args["nheads"]:
        raise ModelError("embsize is not a multiple of nheads", file=args_file)
    style = args.get("input_emb_style", "continuous")
    if style != "continuous":
        raise ModelError(
            f"input_emb_style {style!r} is not supported (only continuous)", file=args_file
        )
    vocab_file = find_file(folder, ["vocab.json"], "scGPT vocabulary")
    weights = find_file(folder, ["best_model.pt", "model.safetensors"], "scGPT weights")
    tokenizer = ScGPTTokenizer.from_folder_files(vocab_file, args)
    model = ScGPTEncoder(args, tokenizer, folder, folder_hash([args_file, vocab_file, weights]))
    state = _checkpoint_keys(read_state_dict(weights))
    load_weights(model, state, weights, ignore=_UNUSED)
    return model.eval()


register_entry(
    EncoderEntry(
        name="scgpt",
        modality="singlecell",
        architecture=(
            "scGPT TransformerModel encoder: gene embedding + continuous value encoder, "
            "nn.TransformerEncoder (post-norm); scGPT_human: 12 layers, 512 wide, 8 heads"
        ),
        files=("args.json", "vocab.json", "best_model.pt"),
        preprocessing=(
            "genes by symbol (vocab.json), non-zero genes only, <cls> (value pad_value -2) "
            "first; per-cell quantile binning of the counts into 51 bins; at most 1,200 tokens"
        ),
        pooling="<cls> of the last layer, L2-normalised",
        dim=512,
        licence=(
            "MIT (github.com/bowang-lab/scGPT; the README states no separate licence for the "
            "checkpoints)"
        ),
        gated=False,
        source=(
            "Google Drive links in github.com/bowang-lab/scGPT's README, 'Pretrained scGPT "
            "Model Zoo' (scGPT_human recommended; organ-specific and pan-cancer checkpoints)"
        ),
        citation=(
            "Cui H et al. scGPT: toward building a foundation model for single-cell multi-omics "
            "using generative AI. Nature Methods 21, 1470-1480 (2024). "
            "doi:10.1038/s41592-024-02201-0"
        ),
        loader=load_scgpt,
    )
)

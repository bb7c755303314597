"""Geneformer V1 and V2 (Theodoris et al. 2023; Chen et al. 2024), read from its authors'
Hugging Face folders and run natively: rank-value tokenizer, BERT encoder, cell pooling.

Folder layout (``huggingface.co/ctheodoris/Geneformer``)::

    Geneformer/
      Geneformer-V1-10M/      config.json, model.safetensors | pytorch_model.bin
      Geneformer-V2-104M/     config.json, model.safetensors
      Geneformer-V2-316M/     ...
      geneformer/             token_dictionary_gc104M.pkl, gene_median_dictionary_gc104M.pkl,
                              gene_name_id_dict_gc104M.pkl, ensembl_mapping_dict_gc104M.pkl (V2)
      geneformer/gene_dictionaries_30m/   the same four files with the _gc30M suffix (V1)

``geneformer:DIR`` takes a model folder; its gene dictionaries are looked for in the folder
itself, then in ``../geneformer/`` and ``../geneformer/gene_dictionaries_30m/`` (and under
``DIR/geneformer/`` for the repository root, and the pre-2024 ``token_dictionary.pkl`` /
``gene_median_dictionary.pkl`` / ``gene_name_id_dict.pkl`` names). Of the dictionary sets
found, the one whose token dictionary has exactly ``config.json``'s ``vocab_size`` entries
is used, so a V1 folder gets the gc30M dictionaries and a V2 folder the gc104M ones. The
version is read from the token dictionary: V2's has ``<cls>`` and ``<eos>``.

What the authors' code does, and this file reproduces (``geneformer/tokenizer.py``,
``geneformer/emb_extractor.py`` and ``perturber_utils.py`` of ctheodoris/Geneformer):

* Tokenizer (``TranscriptomeTokenizer``): genes are identified by Ensembl id (the
  ``ensembl_id`` var column), upper-cased and collapsed through ``ensembl_mapping_dict``
  (``sum_ensembl_ids``): ids that collapse onto one gene have their counts summed. Only
  genes of the token dictionary are kept; each cell's counts are divided by its
  ``n_counts`` (the ``obs`` column of total counts), multiplied by ``target_sum`` 10,000
  and divided by the gene's non-zero median (``gene_median_dictionary``); the non-zero
  genes are ranked by that value, descending (``rank_genes``: ``np.argsort(-x)``) and cut
  to ``model_input_size`` (V1: 2,048; V2: 4,096, the model's
  ``max_position_embeddings``); V2 keeps ``model_input_size - 2`` genes between ``<cls>``
  and ``<eos>``.
* Embedding (``EmbExtractor``, ``emb_layer=-1``): the hidden states of the second-to-last
  layer (``hidden_states[num_layers - 1]``). ``emb_mode="cell"`` averages the gene tokens
  (``mean_nonpadding_embs``, excluding ``<cls>`` and ``<eos>`` when the dictionary has
  them); ``emb_mode="cls"`` takes ``<cls>`` (V2's default; V1 has none).

Differences, on purpose: genes tied on the normalized value keep the data's column order
(the authors' ``np.argsort`` default sort leaves ties in an unspecified order); symbols
are accepted as well as Ensembl ids (mapped through ``gene_name_id_dict``, which the
authors ship for that purpose); the library size is ``obs['n_counts']`` only when the
reader is given ``--total-column n_counts`` (otherwise the row sums; a warning says so).

Entries: ``geneformer`` (V1 or V2, read from the folder), ``geneformer-v1`` and
``geneformer-v2`` (the same loader, refusing a folder of the other version).
"""

from __future__ import annotations

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
    safe_unpickle,
)
from healthfm.encoders.registry import EncoderEntry, register_entry
from healthfm.errors import DataError, ModelError
from healthfm.fsutil import sha256_file
from healthfm.singlecell.tokenizer import (
    TARGET_SUM,
    CellTokenizer,
    expressed_entries,
    row_segments,
    sort_rows_desc,
    sum_duplicates,
)
from healthfm.tokenizer import register_tokenizer
from healthfm.tokens import TokenChunk

#: ``model_input_size`` of the authors' tokenizer per version.
INPUT_SIZE = {"V1": 2048, "V2": 4096}
DICTIONARY_KINDS = (
    "token_dictionary",
    "gene_median_dictionary",
    "gene_name_id_dict",
    "ensembl_mapping_dict",
)
#: Checkpoint tensors the encoder does not use: the masked-LM head, a pooler or classifier
#: of fine-tuned variants, and the position-id buffer older transformers saved.
_UNUSED = ("cls.", "pooler.", "classifier.", "embeddings.position_ids", "embeddings.token_type_ids")


# --------------------------------------------------------------------------- tokenizer
def _read_dictionary(path: Path, kind: str) -> dict:
    data = safe_unpickle(path)
    if not isinstance(data, Mapping) or not data:
        raise ModelError(f"a Geneformer {kind} must be a non-empty dict", file=path)
    if not all(isinstance(k, str) for k in data):
        raise ModelError(f"a Geneformer {kind} must be keyed by gene identifiers", file=path)
    return dict(data)


@register_tokenizer
class GeneformerTokenizer(CellTokenizer):
    """Geneformer's rank-value encoding with the authors' dictionaries and token ids.

    Parameters
    ----------
    token_dictionary
        Ensembl id (and special token) → token id.
    medians
        Ensembl id → non-zero median of ``count / n_counts * 10,000`` over the corpus.
    name_ids
        Gene symbol → Ensembl id (``gene_name_id_dict``), for data labelled by symbol.
    mapping
        Upper-cased id → the Ensembl id it collapses onto (``ensembl_mapping_dict``).
    max_length
        Tokens per cell, specials included (the authors' ``model_input_size``).
    files
        The dictionary files (recorded in :meth:`config`; the hash uses their contents).
    """

    type: ClassVar[str] = "published.geneformer"
    fields: tuple[str, ...] = ()
    #: The singlecell modality picks the var column that matches these dictionaries best.
    auto_gene_column: ClassVar[bool] = True
    #: Less than this share of the data's counts on model genes is refused (DataError).
    min_count_fraction: ClassVar[float] = 0.02

    def __init__(
        self,
        token_dictionary: Mapping[str, int],
        medians: Mapping[str, float],
        name_ids: Mapping[str, str] | None = None,
        mapping: Mapping[str, str] | None = None,
        max_length: int | None = None,
        target_sum: float = TARGET_SUM,
        files: Mapping[str, str] | None = None,
        sha256: Mapping[str, str] | None = None,
    ) -> None:
        try:
            tokens = {k: int(v) for k, v in token_dictionary.items()}
        except (TypeError, ValueError) as exc:
            raise ModelError(f"token ids must be integers ({exc})") from exc
        self.version = "V2" if "<cls>" in tokens and "<eos>" in tokens else "V1"
        self.special_ids = {k: v for k, v in tokens.items() if k.startswith("<")}
        # A gene is usable when it has a token and a median (the authors index both).
        genes = [g for g in tokens if not g.startswith("<") and g in medians]
        if not genes:
            raise ModelError("no gene of the token dictionary has a median")
        super().__init__(
            genes,
            max_length=int(max_length or INPUT_SIZE[self.version]),
            target_sum=target_sum,
            total_column="n_counts",
        )
        if self.max_length < (3 if self.version == "V2" else 1):
            raise ModelError(f"max_length {self.max_length} leaves no room for a gene")
        self.token_ids = np.array([tokens[g] for g in genes], dtype=np.int64)
        self.medians = np.array([float(medians[g]) for g in genes], dtype=np.float64)
        bad = np.flatnonzero(~(self.medians > 0) | ~np.isfinite(self.medians))
        if bad.size:
            raise ModelError(f"gene median of {genes[bad[0]]} is {self.medians[bad[0]]!r}")
        self.cls_id = self.special_ids.get("<cls>")
        self.eos_id = self.special_ids.get("<eos>")
        self.pad_id = self.special_ids.get("<pad>", 0)
        self._n_tokens = int(max(tokens.values())) + 1
        self._position = {g: i for i, g in enumerate(genes)}
        # The authors keep only mappings onto genes of the token dictionary.
        self._mapping = (
            {str(k).upper(): str(v) for k, v in mapping.items() if v in self._position}
            if mapping
            else None
        )
        self._name_ids = dict(name_ids or {})
        self._name_ids_upper = {str(k).upper(): str(v) for k, v in self._name_ids.items()}
        self.files = dict(files or {})
        self.sha256 = dict(sha256 or {})
        self._hash: str | None = None

    # -- construction from the authors' pickles
    @classmethod
    def from_files(
        cls, files: Mapping[str, str | Path], max_length: int | None = None
    ) -> GeneformerTokenizer:
        """Read the authors' dictionary pickles (safely) and build the tokenizer.

        Parameters
        ----------
        files
            ``token_dictionary`` and ``gene_median_dictionary`` (required),
            ``gene_name_id_dict`` and ``ensembl_mapping_dict`` (optional) → path.
        """
        paths = {k: Path(v) for k, v in files.items()}
        for kind in DICTIONARY_KINDS[:2]:
            if kind not in paths:
                raise ModelError(f"Geneformer needs a {kind}*.pkl")
        data = {kind: _read_dictionary(p, kind) for kind, p in paths.items()}
        try:
            tok = cls(
                data["token_dictionary"],
                data["gene_median_dictionary"],
                data.get("gene_name_id_dict"),
                data.get("ensembl_mapping_dict"),
                max_length=max_length,
                files={k: str(p) for k, p in paths.items()},
                sha256={k: sha256_file(p) for k, p in paths.items()},
            )
        except ModelError as exc:
            if exc.file is None:
                raise ModelError(exc.message, file=paths["token_dictionary"]) from exc
            raise
        return tok

    def config(self) -> dict[str, Any]:
        """Where the dictionaries are, their SHA-256, and the settings."""
        return {
            "files": self.files,
            "sha256": self.sha256,
            "max_length": self.max_length,
            "target_sum": self.target_sum,
            "version": self.version,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GeneformerTokenizer:
        """Re-read the dictionaries named by :meth:`config`; changed contents are refused."""
        tok = cls.from_files(config["files"], max_length=config.get("max_length"))
        for kind, digest in config.get("sha256", {}).items():
            if tok.sha256.get(kind) != digest:
                raise ModelError(
                    f"the {kind} changed since this tokenizer was saved", file=tok.files[kind]
                )
        return tok

    @property
    def hash(self) -> str:
        """SHA-256 of the settings and the dictionaries' contents (not their paths)."""
        if self._hash is None:
            self._hash = content_hash(self)
        return self._hash

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary (the token dictionary's ids)."""
        return self._n_tokens

    def token_names(self, ids: np.ndarray) -> np.ndarray:
        """Ensembl id (or special token) of each token id."""
        names = np.full(self._n_tokens, "<unused>", dtype=object)
        names[self.token_ids] = self.genes
        for name, i in self.special_ids.items():
            names[i] = name
        return names[np.asarray(ids)]

    # -- gene identifiers of the data → vocabulary positions
    def _map_genes(self, data_genes: np.ndarray) -> np.ndarray:
        """Vocabulary position of each data column (-1: not a model gene); cached by
        :meth:`CellTokenizer.column_map`.

        A column is read as an Ensembl id first (upper-cased, collapsed through the
        mapping dictionary as the authors do), else as a gene symbol (``gene_name_id_dict``,
        exact, then upper-cased). Several columns may map to one gene; their counts are
        summed when tokenizing.
        """
        names = pd.Series(np.asarray(data_genes, dtype=object)).astype(str)
        upper = names.str.upper()
        ensembl = upper.map(self._mapping) if self._mapping is not None else upper
        # Symbols: the authors' name → Ensembl dictionary, then the same collapse.
        by_symbol = names.map(self._name_ids).astype(object)
        by_symbol = by_symbol.where(by_symbol.notna(), upper.map(self._name_ids_upper))
        if self._mapping is not None:
            mapping = self._mapping
            by_symbol = by_symbol.map(
                lambda e: mapping.get(e.upper()) if isinstance(e, str) else None
            )
        ensembl = ensembl.where(ensembl.map(self._position).notna(), by_symbol)
        return ensembl.map(self._position).fillna(-1).to_numpy(dtype=np.int64)

    def encode_block(
        self, block: sp.csr_matrix, totals: np.ndarray, data_genes: np.ndarray, keys: Sequence[Any]
    ) -> TokenChunk:
        """Rank-value token ids (the model's own) of a block of cells."""
        col_map = self.column_map(data_genes)
        n = block.shape[0]
        rows, _, vocab, counts = expressed_entries(block, col_map)
        mapped = col_map[col_map >= 0]
        if len(np.unique(mapped)) < len(mapped):
            rows, vocab, counts = sum_duplicates(rows, vocab, counts, len(self.genes))
        scores = (
            counts
            / np.asarray(totals, dtype=np.float64)[rows]
            * self.target_sum
            / self.medians[vocab]
        )
        order = sort_rows_desc(rows, scores, n)
        vocab = vocab[order]  # rows stay grouped
        seg_counts, _, pos = row_segments(rows, n)
        special = 2 if self.version == "V2" else 0
        if special == 0 and np.any(seg_counts == 0):
            cell = keys[int(np.flatnonzero(seg_counts == 0)[0])]
            raise DataError(
                f"cell {cell!r} expresses none of Geneformer's genes (a V1 input would be "
                "empty); filter such cells first",
                row=str(cell),
            )
        room = self.max_length - special
        lengths = np.minimum(seg_counts, room) + special
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        ids = np.empty(int(offsets[-1]), dtype=np.int32)
        if special:
            ids[offsets[:-1]] = self.cls_id
            ids[offsets[1:] - 1] = self.eos_id
        sel = pos < room
        ids[offsets[rows[sel]] + special // 2 + pos[sel]] = self.token_ids[vocab[sel]]
        return TokenChunk(ids=ids, offsets=offsets, keys=list(keys))


# --------------------------------------------------------------------------- network
_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


class BertEmbeddings(nn.Module):
    """Token + absolute position + token type (always 0) embeddings, then LayerNorm."""

    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        d = c["hidden_size"]
        self.word_embeddings = nn.Embedding(c["vocab_size"], d)
        self.position_embeddings = nn.Embedding(c["max_position_embeddings"], d)
        self.token_type_embeddings = nn.Embedding(c.get("type_vocab_size", 2), d)
        self.LayerNorm = nn.LayerNorm(d, eps=c.get("layer_norm_eps", 1e-12))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(positions)[None]
        return self.LayerNorm(x + self.token_type_embeddings.weight[0])


class BertSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(h: torch.Tensor) -> torch.Tensor:
            return h.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.query(x)), split(self.key(x)), split(self.value(x)), attn_mask=mask
        )
        return out.transpose(1, 2).reshape(b, t, d)


class BertProjection(nn.Module):
    """``dense`` → residual → ``LayerNorm`` (BERT's SelfOutput and Output)."""

    def __init__(self, d_in: int, d: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d)
        self.LayerNorm = nn.LayerNorm(d, eps=eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nn.Module):
    def __init__(self, d: int, heads: int, eps: float) -> None:
        super().__init__()
        self.self = BertSelfAttention(d, heads)
        self.output = BertProjection(d, d, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, d: int, d_ff: int, act: str) -> None:
        super().__init__()
        self.dense = nn.Linear(d, d_ff)
        self.act = _ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    """Post-norm transformer block: attention, then the feed-forward (HF ``BertLayer``)."""

    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        d, eps = c["hidden_size"], c.get("layer_norm_eps", 1e-12)
        self.attention = BertAttention(d, c["num_attention_heads"], eps)
        self.intermediate = BertIntermediate(d, c["intermediate_size"], c.get("hidden_act", "gelu"))
        self.output = BertProjection(c["intermediate_size"], d, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c) for _ in range(c["num_hidden_layers"]))


class GeneformerEncoder(PublishedEncoder):
    """Geneformer's BERT (HF ``BertModel`` names, so the authors' checkpoint loads as is).

    :meth:`forward_features` returns the authors' embedding layer (``emb_layer=-1``: the
    output of the second-to-last layer, ``hidden_states[-2]``); the last layer is loaded
    but not run, as it does not change that output.
    """

    def __init__(
        self,
        config: dict[str, Any],
        tokenizer: GeneformerTokenizer,
        folder: Path,
        model_hash: str | None,
        name: str = "geneformer",
    ) -> None:
        v2 = tokenizer.version == "V2"
        super().__init__(
            name=name,
            modality="singlecell",
            dim=config["hidden_size"],
            pooling="cls" if v2 else "mean",
            max_len=tokenizer.max_length,
            tokenizer=tokenizer,
            folder=folder,
            model_hash=model_hash,
        )
        self.poolings = ("cls", "mean") if v2 else ("mean",)
        self.config = dict(config)
        #: The authors' ``emb_layer``: -1 is the second-to-last layer's output.
        self.emb_layer = -1
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        specials = [i for i in (tokenizer.cls_id, tokenizer.eos_id) if i is not None]
        self.register_buffer("special_ids", torch.tensor(specials, dtype=torch.long), False)

    def forward_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hidden states ``(B, T, hidden_size)`` of the embedding layer."""
        ids = batch["ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        x = self.embeddings(ids)
        attend = mask[:, None, None, :]  # keys: real tokens only
        for layer in self.encoder.layer[: len(self.encoder.layer) + self.emb_layer]:
            x = layer(x, attend)
        return x

    def embed(self, batch: dict[str, torch.Tensor], pooling: str | None = None) -> torch.Tensor:
        """``cls``: the ``<cls>`` state (V2); ``mean``: the mean over gene tokens (real
        tokens that are not ``<cls>``/``<eos>``), as ``EmbExtractor`` computes them."""
        pooling = self.check_pooling(pooling)
        hidden = self.forward_features(batch)
        if pooling == "cls":
            return hidden[:, 0]
        genes = batch["attention_mask"].bool() & ~torch.isin(batch["ids"], self.special_ids)
        weights = genes.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


# --------------------------------------------------------------------------- loading
def _dictionary_sets(folder: Path) -> list[dict[str, Path]]:
    """Every set of Geneformer dictionaries in the places the authors' layouts put them."""
    places = [
        folder,
        folder / "geneformer",
        folder / "geneformer" / "gene_dictionaries_30m",
        folder.parent / "geneformer",
        folder.parent / "geneformer" / "gene_dictionaries_30m",
        folder.parent / "gene_dictionaries_30m",
        folder.parent,
    ]
    seen, sets = set(), []
    for place in places:
        place = place.resolve()
        if place in seen or not place.is_dir():
            continue
        seen.add(place)
        for token_file in sorted(place.glob("token_dictionary*.pkl")):
            suffix = token_file.name[len("token_dictionary") :]  # "_gc104M.pkl" or ".pkl"
            files = {"token_dictionary": token_file}
            for kind in DICTIONARY_KINDS[1:]:
                if (place / f"{kind}{suffix}").is_file():
                    files[kind] = place / f"{kind}{suffix}"
            sets.append(files)
    return sets


def _find_dictionaries(folder: Path, vocab_size: int) -> dict[str, Path]:
    sets = _dictionary_sets(folder)
    if not sets:
        raise ModelError(
            "no Geneformer gene dictionaries (token_dictionary*.pkl) in the model folder, "
            "../geneformer/ or ../geneformer/gene_dictionaries_30m/; download the "
            "repository's geneformer/ folder next to the model folder",
            file=folder,
        )
    sizes = {}
    for files in sets:
        sizes[files["token_dictionary"]] = len(
            _read_dictionary(files["token_dictionary"], "token dictionary")
        )
    fitting = [f for f in sets if sizes[f["token_dictionary"]] == vocab_size]
    if not fitting:
        found = ", ".join(f"{p} ({n:,} tokens)" for p, n in sizes.items())
        raise ModelError(
            f"no gene dictionary fits this model's vocab_size {vocab_size:,} (found {found})",
            file=folder / "config.json",
        )
    files = fitting[0]
    if "gene_median_dictionary" not in files:
        raise ModelError(
            "the token dictionary has no gene_median_dictionary beside it",
            file=files["token_dictionary"],
        )
    return files


def _checkpoint_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF checkpoint names → this module's: drop ``bert.``; old ``gamma``/``beta`` names."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("bert.")
        if key.endswith("LayerNorm.gamma"):
            key = key[: -len("gamma")] + "weight"
        elif key.endswith("LayerNorm.beta"):
            key = key[: -len("beta")] + "bias"
        out[key] = value
    return out


def load_geneformer(path: str | Path, version: str | None = None) -> GeneformerEncoder:
    """Load a Geneformer model folder in its authors' layout (see the module docstring).

    Parameters
    ----------
    path
        The model folder (``config.json`` + weights).
    version
        "V1" or "V2" to refuse a folder of the other version; None accepts both.

    Raises
    ------
    ModelError
        Missing or malformed files, weights that do not fit, dictionaries that do not fit
        the model, a folder of another model, a pickle that wants to run code.
    """
    folder = Path(path)
    if folder.is_dir() and not (folder / "config.json").is_file():
        if (folder / "args.json").is_file() or (folder / "best_model.pt").is_file():
            raise ModelError(
                "this is an scGPT folder (args.json, best_model.pt), not Geneformer's; "
                f"load it as scgpt:{folder}",
                file=folder,
            )
    config_file = find_file(folder, ["config.json"], "Geneformer")
    config = read_json(config_file)
    arch = " ".join(config.get("architectures") or [])
    if config.get("model_type") != "bert" and "Bert" not in arch:
        raise ModelError(
            f"not a Geneformer (BERT) folder: model_type {config.get('model_type')!r}, "
            f"architectures {arch or None!r}",
            file=config_file,
        )
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "vocab_size",
        "max_position_embeddings",
    ):
        if not isinstance(config.get(key), int) or config[key] <= 0:
            raise ModelError(f"config.json needs a positive integer {key!r}", file=config_file)
    if config["hidden_size"] % config["num_attention_heads"]:
        raise ModelError("hidden_size is not a multiple of num_attention_heads", file=config_file)
    act = config.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise ModelError(f"unsupported hidden_act {act!r}", file=config_file)
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ModelError("only absolute position embeddings are supported", file=config_file)
    weights = find_file(folder, ["model.safetensors", "pytorch_model.bin"], "Geneformer weights")
    files = _find_dictionaries(folder, config["vocab_size"])
    probe = _read_dictionary(files["token_dictionary"], "token dictionary")
    found = "V2" if "<cls>" in probe and "<eos>" in probe else "V1"
    if version is not None and found != version:
        raise ModelError(
            f"this is a Geneformer {found} folder, not {version} (its token dictionary "
            f"{'has' if found == 'V2' else 'has no'} <cls>/<eos>); load it as geneformer:DIR",
            file=files["token_dictionary"],
        )
    max_length = min(INPUT_SIZE[found], config["max_position_embeddings"])
    tokenizer = GeneformerTokenizer.from_files(files, max_length=max_length)
    if tokenizer.vocab_size > config["vocab_size"]:
        raise ModelError(
            f"token ids reach {tokenizer.vocab_size - 1}, beyond vocab_size {config['vocab_size']}",
            file=files["token_dictionary"],
        )
    model = GeneformerEncoder(
        config,
        tokenizer,
        folder,
        folder_hash([config_file, weights, *files.values()]),
        name=f"geneformer-{found.lower()}",
    )
    state = _checkpoint_keys(read_state_dict(weights))
    load_weights(model, state, weights, ignore=_UNUSED)
    return model.eval()


_SOURCE = (
    "https://huggingface.co/ctheodoris/Geneformer (model folders Geneformer-V1-10M, "
    "Geneformer-V2-104M, Geneformer-V2-316M ...; gene dictionaries under geneformer/ and "
    "geneformer/gene_dictionaries_30m/)"
)
_CITATION_V1 = (
    "Theodoris CV et al. Transfer learning enables predictions in network biology. "
    "Nature 618, 616-624 (2023). doi:10.1038/s41586-023-06139-9"
)
_CITATION_V2 = (
    "Chen H et al. Quantized multi-task learning for context-specific representations of "
    "gene network dynamics. bioRxiv (2024). doi:10.1101/2024.08.16.608180"
)
_FILES = (
    "config.json",
    "model.safetensors|pytorch_model.bin",
    "token_dictionary*.pkl",
    "gene_median_dictionary*.pkl",
    "gene_name_id_dict*.pkl",
    "ensembl_mapping_dict*.pkl",
)
_PREPROCESSING = (
    "rank-value encoding: counts / n_counts * 10,000 / gene non-zero median, non-zero genes "
    "ranked descending, Ensembl ids (symbols via gene_name_id_dict) collapsed and summed "
    "through ensembl_mapping_dict; "
)

for _name, _version, _dim, _arch, _pool, _cite in (
    (
        "geneformer",
        None,
        None,
        "BERT (HF BertForMaskedLM), V1 or V2 read from the folder",
        "V1: mean of gene tokens; V2: <cls>; layer -2",
        f"{_CITATION_V1}; V2: {_CITATION_V2}",
    ),
    (
        "geneformer-v1",
        "V1",
        None,
        "BERT (HF BertForMaskedLM); V1-10M: 6 layers, 256 wide, 4 heads, ReLU, 2,048 tokens",
        "mean of gene tokens of layer -2 (emb_layer=-1)",
        _CITATION_V1,
    ),
    (
        "geneformer-v2",
        "V2",
        None,
        "BERT (HF BertForMaskedLM); V2-104M: 12 layers, 512 wide, 8 heads; V2-316M: 18 "
        "layers, 1,152 wide; ReLU, 4,096 tokens",
        "<cls> of layer -2 (emb_mode='cls', emb_layer=-1); mean of gene tokens on request",
        _CITATION_V2,
    ),
):
    register_entry(
        EncoderEntry(
            name=_name,
            modality="singlecell",
            architecture=_arch,
            files=_FILES,
            preprocessing=_PREPROCESSING
            + {
                None: "V1: 2,048 tokens; V2: <cls> + 4,094 genes + <eos>",
                "V1": "2,048 genes, no special tokens",
                "V2": "<cls> + 4,094 genes + <eos>",
            }[_version],
            pooling=_pool,
            dim=_dim,
            licence="Apache-2.0",
            gated=False,
            source=_SOURCE,
            citation=_cite,
            loader=(lambda v: lambda path: load_geneformer(path, v))(_version),
        )
    )

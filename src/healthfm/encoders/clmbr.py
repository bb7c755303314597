"""CLMBR-T-base (Stanford Shah lab, FEMR): a native, offline loader of FEMR's folder layout.

The published folder (``StanfordShahLab/clmbr-t-base`` on Hugging Face) is what FEMR's
``FEMRModel.save_pretrained`` and ``FEMRTokenizer.save_pretrained`` write:

* ``config.json``: a ``femr.models.config.FEMRModelConfig``: ``transformer_config`` (a
  ``FEMRTransformerConfig``: ``vocab_size``, ``is_hierarchical``, ``hidden_size``,
  ``intermediate_size``, ``n_heads``, ``n_layers``, ``attention_width``; from femr 0.2.2 on
  also ``use_normed_ages``, ``use_bias``, ``hidden_act``) and ``task_config`` (the
  pretraining head, unused for representations).
* ``model.safetensors``: the ``FEMRModel`` state dict (``transformer.embed.weight``,
  ``transformer.{in,out}_norm.scale``, ``transformer.layers.N.{norm.scale, input_proj,
  output_proj}``; the CLMBR head ``task_model.final_layer`` is ignored).
* ``dictionary.msgpack``: the tokenizer: ``{"vocab": [entry, ...], "is_hierarchical",
  "age_stats": {"mean", "std"}}``; an entry is ``{"type": "code", "code_string"}``,
  ``{"type": "text", "code_string", "text_string"}`` or ``{"type": "numeric",
  "code_string", "val_start", "val_end"}``; its index in ``vocab`` is the token id.

What this file re-implements, checked line by line against femr 0.2.0-0.2.4
(``femr/models/{transformer,rmsnorm,tokenizer,processor,tasks}.py``):

* **Tokens** (``FEMRTokenizer.get_feature_codes``, flat dictionaries): a measurement with a
  numeric value becomes the ``numeric`` entry of its code whose ``[val_start, val_end)``
  holds the value (none: dropped, never the bare code); one with a text value the ``text``
  entry of ``(code, text)`` (none: dropped); any other its ``code`` entry (none: dropped).
  Unknown codes are dropped, as FEMR drops them.
* **Per-day de-duplication** (``BatchCreator.add_patient``): a token already emitted on the
  same calendar day (UTC) of the subject is skipped.
* **Age** (``BatchCreator.add_patient``): days since birth, float32, fed to a rotary
  encoding (``fixed_pos_embedding``: inverse frequencies ``10000 ** -linspace(0, 2,
  head_dim // 2)``, GPT-J style pairs). Birth is the ``MEDS_BIRTH`` event (femr >= 0.2.2,
  ``pat_utils.get_patient_birthdate``), else the subject's first event (femr 0.2.0/0.2.1).
* **Network** (``FEMRTransformer``): embedding → RMSNorm → layers ``x + layer(x)`` →
  RMSNorm. A layer: RMSNorm, one ``input_proj`` giving q, k, v
  and the feed-forward input, rotary on q and k, causal local attention, GELU (or SwiGLU),
  ``output_proj`` of ``[attention, feed-forward]``.
* **Two releases of the network**: femr 0.2.0/0.2.1 normalise with their own RMSNorm
  (``x / (||x|| d^-1/2 + 1e-8) * scale``, parameters ``*.scale``), put q, k, v first in
  ``input_proj``'s output and attend to the ``attention_width`` previous tokens and the
  token itself (flash-attention's ``window_size=(width, 0)``); femr >= 0.2.2 use Llama's
  RMSNorm (``weight * x / sqrt(mean(x²) + 1e-6)``, parameters ``*.weight``), put the
  feed-forward part first and attend to ``attention_width`` tokens including the token
  itself (xformers' ``make_local_attention(width)``). The norms' key names say which
  release wrote a state dict (:func:`femr_release`); femr itself would load the other
  release's weights with its norms left at 1 and q, k, v read from the wrong rows.
* **Representations** (``compute_features`` with ``LabeledPatientTask``): the state of the
  last token at or before the prediction time (inclusive). healthfm computes it through
  its leakage-safe EHR path (:func:`healthfm.ehr.embed.embed_cutoffs`), from exactly the
  tokens up to the prediction time.

Hierarchical dictionaries (MOTOR, which need an ontology) and ``use_normed_ages`` models are
refused: CLMBR-T-base is flat and uses neither.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import nn

from healthfm.ehr.reader import BIRTH_CODE, US_PER_DAY, MedsDataset
from healthfm.ehr.tokenizer import EncodedShard
from healthfm.encoders.published import (
    PublishedEncoder,
    find_file,
    folder_hash,
    load_weights,
    read_json,
    read_state_dict,
)
from healthfm.encoders.registry import EncoderEntry, register_entry
from healthfm.errors import DataError, ModelError, require
from healthfm.fsutil import json_hash
from healthfm.tokenizer import Tokenizer, register_tokenizer

log = logging.getLogger("healthfm.ehr")

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
DICTIONARY_FILE = "dictionary.msgpack"
#: FEMRTransformerConfig's defaults (femr 0.2.4 ``femr/models/config.py``).
FEMR_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32768,
    "is_hierarchical": False,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "n_heads": 12,
    "n_layers": 6,
    "attention_width": 496,
    "use_normed_ages": False,
    "use_bias": True,
    "hidden_act": "gelu",
}
#: The share of timed events whose codes the dictionary must know. CLMBR-T-base's
#: dictionary holds OMOP standard concepts; MEDS data mapped to OMOP match most of their
#: events, data in other vocabularies almost none, and below a few percent most prediction
#: times have no known event before them, so the embeddings would describe the few codes
#: that happen to match (birth, visits), not the patient.
MIN_COVERAGE = 0.05
#: Context (tokens) of one forward pass: FEMR's ``compute_features`` default
#: ``tokens_per_batch`` (1024), which bounds its subsequences to 1024 tokens too.
DEFAULT_MAX_LEN = 1024


def _read_dictionary(path: Path) -> dict[str, Any]:
    msgpack = require("msgpack", "clmbr")
    try:
        with path.open("rb") as fh:
            data = msgpack.unpack(fh, raw=False, strict_map_key=False)
    except Exception as exc:  # truncated, not msgpack, invalid utf-8
        raise ModelError(
            f"not a readable msgpack dictionary ({type(exc).__name__}: {exc})", file=path
        ) from exc
    if not isinstance(data, dict) or not isinstance(data.get("vocab"), list):
        raise ModelError(
            "not a FEMR dictionary: expected a map with a 'vocab' list (FEMRTokenizer layout)",
            file=path,
        )
    return data


@register_tokenizer
class ClmbrTokenizer(Tokenizer):
    """FEMR's flat tokenizer (``dictionary.msgpack``), emitting the model's own token ids.

    One token per MEDS measurement the dictionary knows (see the module docstring for the
    rules); ``times`` is the age in days. Token ids are indices into the dictionary's
    ``vocab`` (id 0 is a real code; padded positions are told apart by the attention mask).

    Parameters
    ----------
    vocab
        The dictionary's entries, in id order.
    age_stats
        The dictionary's ``age_stats`` (kept for provenance; CLMBR-T-base does not use
        normalised ages).
    """

    type: ClassVar[str] = "ehr.femr"
    modality: ClassVar[str] = "ehr"
    fields = ("times",)

    def __init__(self, vocab: list[dict[str, Any]], age_stats: dict[str, Any] | None = None):
        self.vocab = [_clean_entry(e, i) for i, e in enumerate(vocab)]
        self.age_stats = dict(age_stats or {})
        self.code_lookup: dict[str, int] = {}
        text: list[tuple[str, str, int]] = []
        numeric: list[tuple[str, float, float, int]] = []
        for i, entry in enumerate(self.vocab):
            kind, code = entry["type"], entry["code_string"]
            # FEMR's dict assignment: a later duplicate entry wins.
            if kind == "code":
                self.code_lookup[code] = i
            elif kind == "text":
                text.append((code, entry["text_string"], i))
            elif kind == "numeric":
                numeric.append((code, entry["val_start"], entry["val_end"], i))
        texts = {(c, t): i for c, t, i in text}
        self.text_table = pl.DataFrame(
            {
                "code": [c for c, _ in texts],
                "text_value": [t for _, t in texts],
                "tid": list(texts.values()),
            },
            schema={"code": pl.String, "text_value": pl.String, "tid": pl.Int64},
        )
        self.numeric_table = pl.DataFrame(
            {
                "code": [n[0] for n in numeric],
                "start": [n[1] for n in numeric],
                "end": [n[2] for n in numeric],
                "nid": [n[3] for n in numeric],
            },
            schema={"code": pl.String, "start": pl.Float64, "end": pl.Float64, "nid": pl.Int64},
        )
        self.known_codes = {e["code_string"] for e in self.vocab}

    # ------------------------------------------------------------------ contract
    @property
    def vocab_size(self) -> int:
        """Number of dictionary entries (the model's embedding rows)."""
        return len(self.vocab)

    def config(self) -> dict[str, Any]:
        """JSON state (the dictionary's entries, without FEMR's training weights)."""
        return {"vocab": self.vocab, "age_stats": self.age_stats}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ClmbrTokenizer:
        """Rebuild from :meth:`config`."""
        return cls(config["vocab"], config.get("age_stats"))

    @property
    def hash(self) -> str:
        """SHA-256 of the canonical tokenizer JSON (computed once: the dictionary is large)."""
        if "_hash" not in self.__dict__:
            self._hash = json_hash(self.to_dict())
        return self._hash

    @classmethod
    def from_file(cls, path: str | Path) -> ClmbrTokenizer:
        """Read FEMR's ``dictionary.msgpack``.

        Raises
        ------
        ModelError
            When the file is corrupt, hierarchical, or its entries are not FEMR's.
        """
        path = Path(path)
        data = _read_dictionary(path)
        if data.get("is_hierarchical"):
            raise ModelError(
                "a hierarchical FEMR dictionary (MOTOR-style, needs the ontology) is not "
                "supported; CLMBR-T-base's dictionary is flat",
                file=path,
                column="is_hierarchical",
            )
        try:
            return cls(data["vocab"], data.get("age_stats"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"malformed dictionary entry: {exc}", file=path) from exc

    # ------------------------------------------------------------------ coverage
    def coverage(self, ds: MedsDataset) -> dict[str, Any]:
        """Share of the timed events of ``ds`` whose code the dictionary knows.

        Returns
        -------
        dict
            ``n_events``, ``n_known``, ``share`` and ``unknown_examples`` (the most
            frequent unknown codes, with their counts).
        """
        counts = (
            pl.scan_parquet([str(p) for p in ds.shards])
            .filter(pl.col("time").is_not_null())
            .group_by("code")
            .len()
            .collect()
        )
        known = counts["code"].is_in(list(self.known_codes))
        n_events = int(counts["len"].sum())
        n_known = int(counts.filter(known)["len"].sum())
        unknown = counts.filter(~known).sort(["len", "code"], descending=[True, False]).head(5)
        return {
            "n_events": n_events,
            "n_known": n_known,
            "share": n_known / n_events if n_events else 0.0,
            "unknown_examples": list(unknown.iter_rows()),
        }

    def check_dataset(self, ds: MedsDataset) -> dict[str, Any]:
        """Log the coverage of ``ds``; refuse it below :data:`MIN_COVERAGE`.

        Raises
        ------
        DataError
            Naming the data folder and the most frequent unknown codes.
        """
        cov = self.coverage(ds)
        examples = ", ".join(f"{c} ({n})" for c, n in cov["unknown_examples"])
        log.info(
            "CLMBR dictionary knows the codes of %d of %d timed events (%.1f%%)",
            cov["n_known"],
            cov["n_events"],
            100 * cov["share"],
        )
        if cov["share"] < MIN_COVERAGE:
            raise DataError(
                f"the model's dictionary knows the codes of only {cov['n_known']} of "
                f"{cov['n_events']} events ({100 * cov['share']:.1f}% < "
                f"{100 * MIN_COVERAGE:.0f}%); CLMBR-T-base expects OMOP standard concepts "
                f"as MEDS codes (SNOMED/..., LOINC/..., RxNorm/..., Visit/IP ...); most "
                f"frequent unknown codes: {examples}",
                file=ds.root,
                column="code",
            )
        self.last_coverage = cov
        return cov

    # ------------------------------------------------------------------ encoding
    def _event_ids(self, df: pl.DataFrame) -> np.ndarray:
        """The token id of every row (-1: dropped), FEMR's ``get_feature_codes`` rules."""
        n = len(df)
        ids = np.full(n, -1, dtype=np.int64)
        num = df["numeric_value"].cast(pl.Float64)
        has_num = num.is_not_null().to_numpy()
        has_text = df["text_value"].is_not_null().to_numpy() & ~has_num
        plain = ~has_num & ~has_text
        codes = df["code"]
        if plain.any():
            ci = codes.replace_strict(self.code_lookup, default=-1, return_dtype=pl.Int64)
            ids[plain] = ci.to_numpy()[plain]
        rows = pl.DataFrame({"row": np.arange(n), "code": codes, "v": num, "t": df["text_value"]})
        if has_text.any() and len(self.text_table):
            hit = (
                rows.filter(pl.Series(has_text))
                .join(
                    self.text_table.rename({"text_value": "t"}),
                    on=["code", "t"],
                    how="inner",
                )
                .select("row", "tid")
            )
            ids[hit["row"].to_numpy()] = hit["tid"].to_numpy()
        if has_num.any() and len(self.numeric_table):
            # The first numeric entry of the code (in vocab order) whose [start, end)
            # holds the value; NaN matches none (as FEMR's comparisons).
            hit = (
                rows.filter(pl.Series(has_num))
                .join(self.numeric_table, on="code", how="inner")
                .filter((pl.col("start") <= pl.col("v")) & (pl.col("v") < pl.col("end")))
                .group_by("row")
                .agg(pl.col("nid").min())
            )
            ids[hit["row"].to_numpy()] = hit["nid"].to_numpy()
        return ids

    def encode_frame(self, df: pl.DataFrame) -> EncodedShard:
        """Tokenize a validated MEDS frame (subjects contiguous, time-sorted).

        Rows without a time (static rows) are skipped: FEMR's events all have a time. Every
        subject of ``df`` is in the result, possibly with no token.
        """
        sid_all = df["subject_id"].to_numpy()
        starts_all = np.flatnonzero(np.r_[True, sid_all[1:] != sid_all[:-1]]) if len(df) else []
        subjects = sid_all[starts_all].astype(np.int64) if len(df) else np.zeros(0, np.int64)
        timed = df.filter(pl.col("time").is_not_null())
        t = timed["time"].cast(pl.Int64).to_numpy().astype(np.int64)
        sid = timed["subject_id"].to_numpy().astype(np.int64)
        rank = np.searchsorted(subjects, sid) if _is_sorted(subjects) else _rank(subjects, sid)
        # Birth: the subject's first MEDS_BIRTH, else its first timed event.
        birth = np.full(len(subjects), np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(birth, rank, t)
        is_birth = (timed["code"] == BIRTH_CODE).to_numpy()
        if is_birth.any():
            b = np.full(len(subjects), np.iinfo(np.int64).max, dtype=np.int64)
            np.minimum.at(b, rank[is_birth], t[is_birth])
            birth = np.where(b < np.iinfo(np.int64).max, b, birth)
        ids = self._event_ids(timed)
        keep = ids >= 0
        # Per-day de-duplication: keep the first occurrence of (subject, UTC day, token).
        day = np.floor_divide(t, US_PER_DAY)
        key = pl.DataFrame({"s": sid[keep], "d": day[keep], "i": ids[keep]})
        first = key.select(pl.struct("s", "d", "i").is_first_distinct()).to_series().to_numpy()
        where = np.flatnonzero(keep)[first]
        out_rank = rank[where]
        ages = (t[where] - birth[out_rank]) / US_PER_DAY
        counts = np.bincount(out_rank, minlength=len(subjects))
        offsets = np.r_[0, np.cumsum(counts)].astype(np.int64)
        return EncodedShard(
            subjects,
            ids[where].astype(np.int32),
            ages.astype(np.float64),
            t[where],
            offsets,
            len(df),
        )

    def encode_dataset(self, ds: MedsDataset, subjects: np.ndarray | None = None):
        """Tokenize the chosen subjects (all by default), batch by batch, in file order."""
        from healthfm.ehr.reader import iter_batches

        for _, df in iter_batches(ds, subjects):
            yield self.encode_frame(df)

    def token_names(self, ids: np.ndarray) -> list[str]:
        """Readable names of token ids (``code``, ``code//text`` or ``code//[start,end)``)."""
        names = []
        for i in ids:
            e = self.vocab[int(i)]
            if e["type"] == "text":
                names.append(f"{e['code_string']}//{e['text_string']}")
            elif e["type"] == "numeric":
                names.append(f"{e['code_string']}//[{e['val_start']:g},{e['val_end']:g})")
            else:
                names.append(e["code_string"])
        return names


def _is_sorted(a: np.ndarray) -> bool:
    return bool(np.all(a[1:] > a[:-1])) if len(a) > 1 else True


def _rank(subjects: np.ndarray, sid: np.ndarray) -> np.ndarray:
    order = np.argsort(subjects, kind="stable")
    return order[np.searchsorted(subjects[order], sid)]


def _clean_entry(entry: Any, index: int) -> dict[str, Any]:
    # Only the fields tokenization reads (FEMR's "weight" is a training statistic).
    if not isinstance(entry, dict) or "type" not in entry or "code_string" not in entry:
        raise ValueError(f"vocab[{index}] is not a FEMR entry (type, code_string ...)")
    kind = entry["type"]
    out: dict[str, Any] = {"type": str(kind), "code_string": str(entry["code_string"])}
    if kind == "text":
        out["text_string"] = str(entry["text_string"])
    elif kind == "numeric":
        out["val_start"] = float(entry["val_start"])
        out["val_end"] = float(entry["val_end"])
    elif kind != "code":
        raise ValueError(f"vocab[{index}] has unknown type {kind!r}")
    return out


# ---------------------------------------------------------------------- network
class RMSNorm(nn.Module):
    """femr 0.2.0/0.2.1's RMSNorm (``femr/models/rmsnorm.py``, parameter ``scale``):
    ``x / (||x|| d^-1/2 + 1e-8) * scale``."""

    def __init__(self, dim: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.scale = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = x.norm(2, dim=-1, keepdim=True) * self.dim ** (-0.5)
        return self.scale * (x / (rms + self.eps))


class LlamaRMSNorm(nn.Module):
    """femr >= 0.2.2's RMSNorm (Llama's, parameter ``weight``): ``weight * x /
    sqrt(mean(x²) + 1e-6)``, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(dim: int, release: str) -> nn.Module:
    """The RMSNorm of a femr release."""
    return RMSNorm(dim) if release == "0.2.0" else LlamaRMSNorm(dim)


def rotary(ages: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FEMR's ``fixed_pos_embedding``: sin and cos (B, T, 1, head_dim) of the age in days."""
    inv_freq = 1.0 / (
        10000 ** torch.linspace(0, 2, steps=head_dim // 2, device=ages.device, dtype=torch.float32)
    )
    t = ages.float()[..., None] * inv_freq
    sin = torch.repeat_interleave(torch.sin(t), 2, dim=-1)[:, :, None, :]
    cos = torch.repeat_interleave(torch.cos(t), 2, dim=-1)[:, :, None, :]
    return sin, cos


def apply_rotary(x: torch.Tensor, sincos: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """GPT-J rotation of (even, odd) pairs: ``x cos + rotate_every_two(x) sin``."""
    sin, cos = (s.to(x.dtype) for s in sincos)
    rotated = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).reshape(x.shape)
    return x * cos + rotated * sin


def local_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, back: int
) -> torch.Tensor:
    """Softmax attention of query ``i`` over keys ``i - back .. i`` that are ``valid``.

    ``q, k, v``: (B, T, H, hd). Queries run in blocks of at least ``back + 1`` (and 256,
    so a narrow window does not mean many tiny products) against the keys they can see,
    so memory is O(T x (block + back)), not O(T²), and the result equals the dense
    masked softmax.
    """
    n, d = q.shape[1], q.shape[3]
    dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    block = max(1, min(n, max(back + 1, 256)))
    out = torch.zeros_like(q)
    pos = torch.arange(n, device=q.device)
    for s in range(0, n, block):
        e = min(n, s + block)
        ks = max(0, s - back)
        scores = torch.einsum("bthd,bshd->bhts", q[:, s:e] / math.sqrt(d), k[:, ks:e])
        qi, kj = pos[s:e, None], pos[None, ks:e]
        allowed = (kj <= qi) & (kj >= qi - back)
        allowed = allowed[None, None] & valid[:, None, None, ks:e]
        scores = scores.masked_fill(~allowed, float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a pad query: no key
        out[:, s:e] = torch.einsum("bhts,bshd->bthd", weights, v[:, ks:e])
    return out.to(dtype)


class FemrLayer(nn.Module):
    """``FEMREncoderLayer`` of the given femr release (see :func:`femr_release`)."""

    def __init__(self, cfg: dict[str, Any], release: str) -> None:
        super().__init__()
        self.hidden, self.inter = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
        self.n_heads, self.act = int(cfg["n_heads"]), cfg["hidden_act"]
        self.release = release
        width = int(cfg["attention_width"])
        # flash-attention window (width, 0): width previous keys + itself; xformers'
        # make_local_attention(width): width keys including itself.
        self.back = width if release == "0.2.0" else width - 1
        mult = 2 if self.act == "swiglu" else 1
        bias = bool(cfg["use_bias"])
        self.norm = make_norm(self.hidden, release)
        self.input_proj = nn.Linear(self.hidden, 3 * self.hidden + mult * self.inter, bias=bias)
        self.output_proj = nn.Linear(self.hidden + self.inter, self.hidden, bias=bias)

    def forward(self, x: torch.Tensor, sincos, valid: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        t = self.input_proj(h)
        if self.release == "0.2.0":  # qkv first, feed-forward last
            qkv, ff = t[..., : 3 * self.hidden], t[..., 3 * self.hidden :]
        else:  # feed-forward first, qkv last
            ff, qkv = t[..., : -3 * self.hidden], t[..., -3 * self.hidden :]
        b, n, _ = x.shape
        qkv = qkv.reshape(b, n, 3, self.n_heads, self.hidden // self.n_heads)
        q = apply_rotary(qkv[:, :, 0], sincos)
        k = apply_rotary(qkv[:, :, 1], sincos)
        attn = local_causal_attention(q, k, qkv[:, :, 2], valid, self.back).reshape(b, n, -1)
        if self.act == "swiglu":
            a, g = ff.chunk(2, dim=-1)
            ff = F.silu(a) * g
        else:
            ff = F.gelu(ff)
        return self.output_proj(torch.cat((attn, ff), dim=-1))


class FemrTransformer(nn.Module):
    """``FEMRTransformer`` (flat vocabulary): the module names of FEMR's state dict."""

    def __init__(self, cfg: dict[str, Any], release: str) -> None:
        super().__init__()
        self.head_dim = int(cfg["hidden_size"]) // int(cfg["n_heads"])
        self.in_norm = make_norm(int(cfg["hidden_size"]), release)
        self.out_norm = make_norm(int(cfg["hidden_size"]), release)
        self.embed = nn.Embedding(int(cfg["vocab_size"]), int(cfg["hidden_size"]))
        self.layers = nn.ModuleList(FemrLayer(cfg, release) for _ in range(int(cfg["n_layers"])))

    def forward(self, ids: torch.Tensor, ages: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = self.in_norm(self.embed(ids))
        sincos = rotary(ages, self.head_dim)
        for layer in self.layers:
            x = x + layer(x, sincos, valid)
        return self.out_norm(x)


def femr_release(state: dict[str, torch.Tensor], path: Path | None = None) -> str:
    """The femr release whose ``FEMRTransformer`` wrote ``state``, from its key names:
    ``"0.2.0"`` (0.2.0/0.2.1: RMSNorm parameters ``*.scale``, q, k, v first in
    ``input_proj``) or ``"0.2.2"`` (>= 0.2.2: ``*.weight``, feed-forward first)."""
    if "transformer.in_norm.scale" in state:
        return "0.2.0"
    if "transformer.in_norm.weight" in state:
        return "0.2.2"
    raise ModelError(
        "weights have no transformer.in_norm (scale or weight): not a FEMR model's state dict",
        file=path,
    )


class ClmbrEncoder(PublishedEncoder):
    """CLMBR-T-base (or any flat FEMR transformer): per-token states of the age-rotary,
    locally attending causal transformer; its representation of a prediction time is the
    state of the last token at or before it (``pooling="last"``)."""

    poolings = ("last", "mean")
    truncate = "tail"
    #: States never see later tokens: the EHR path may read them at prediction times.
    causal = True

    def __init__(
        self,
        cfg: dict[str, Any],
        release: str,
        tokenizer: ClmbrTokenizer,
        folder: Path,
        model_hash: str | None,
        name: str = "clmbr-t-base",
        max_len: int = DEFAULT_MAX_LEN,
    ) -> None:
        super().__init__(
            name, "ehr", int(cfg["hidden_size"]), "last", max_len, tokenizer, folder, model_hash
        )
        self.cfg, self.release = dict(cfg), release
        self.transformer = FemrTransformer(cfg, release)

    def forward_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """States (B, T, hidden) of a batch: ``ids`` (dictionary ids), ``attention_mask``
        and ``times`` (age in days)."""
        ids = batch["ids"]
        if "times" not in batch or batch["times"] is None:
            raise ModelError("CLMBR needs the age of every token (batch 'times')", file=self.folder)
        valid = batch.get("attention_mask")
        if valid is None:
            valid = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        valid = valid.bool()
        ages = batch["times"].to(ids.device)
        # Padded positions carry NaN ages; zero them so no NaN reaches a masked product.
        ages = torch.where(valid & ~torch.isnan(ages), ages, torch.zeros_like(ages)).float()
        return self.transformer(ids, ages, valid)


def load_clmbr(path: str | Path) -> ClmbrEncoder:
    """Load a FEMR model folder (``config.json``, ``model.safetensors``,
    ``dictionary.msgpack``) as an :class:`~healthfm.encoders.Encoder`.

    Raises
    ------
    ModelError
        For a missing or corrupt file, a config that is not FEMR's, a hierarchical or
        ``use_normed_ages`` model, or weights that do not fit the config.
    """
    folder = Path(path)
    config_path = find_file(folder, [CONFIG_FILE], "CLMBR (FEMR) folder")
    config = read_json(config_path)
    tc = config.get("transformer_config") if isinstance(config, dict) else None
    if not isinstance(tc, dict):
        raise ModelError(
            "not a FEMR model config (no 'transformer_config'; a folder of another model?)",
            file=config_path,
            column="transformer_config",
        )
    cfg = {**FEMR_DEFAULTS, **{k: tc[k] for k in FEMR_DEFAULTS if k in tc}}
    if cfg["is_hierarchical"]:
        raise ModelError(
            "hierarchical FEMR models (MOTOR-style, need the ontology) are not supported",
            file=config_path,
            column="is_hierarchical",
        )
    if cfg["use_normed_ages"]:
        raise ModelError(
            "use_normed_ages models are not supported (CLMBR-T-base does not use them)",
            file=config_path,
            column="use_normed_ages",
        )
    if cfg["hidden_act"] not in ("gelu", "swiglu"):
        raise ModelError(
            f"unknown hidden_act {cfg['hidden_act']!r} (FEMR: gelu, swiglu)",
            file=config_path,
            column="hidden_act",
        )
    if int(cfg["hidden_size"]) % int(cfg["n_heads"]) or int(cfg["attention_width"]) < 1:
        raise ModelError(
            "hidden_size must be a multiple of n_heads and attention_width positive",
            file=config_path,
        )
    dict_path = find_file(folder, [DICTIONARY_FILE], "CLMBR (FEMR) folder")
    tokenizer = ClmbrTokenizer.from_file(dict_path)
    if tokenizer.vocab_size > int(cfg["vocab_size"]):
        raise ModelError(
            f"the dictionary has {tokenizer.vocab_size} entries but the model embeds only "
            f"{cfg['vocab_size']} (a dictionary of another model?)",
            file=dict_path,
        )
    weights = find_file(folder, WEIGHT_FILES, "CLMBR (FEMR) folder")
    state = read_state_dict(weights)
    release = femr_release(state, weights)
    if release == "0.2.0" and ("hidden_act" in tc or "use_bias" in tc):
        # femr 0.2.0/0.2.1 wrote neither field; a later femr re-saving these weights
        # would have renamed the norms. Guessing either way could silently mis-read them.
        raise ModelError(
            "config.json is femr >= 0.2.2's (hidden_act, use_bias) but the weights are "
            "femr 0.2.0/0.2.1's (*.scale norms): a folder mixing two releases",
            file=config_path,
        )
    model_hash = folder_hash([config_path, weights, dict_path])
    encoder = ClmbrEncoder(cfg, release, tokenizer, folder, model_hash)
    load_weights(encoder, state, weights, ignore=("task_model.",))
    return encoder.eval()


register_entry(
    EncoderEntry(
        name="clmbr-t-base",
        modality="ehr",
        architecture=(
            "FEMR transformer (CLMBR-T): causal, local attention (attention_width), rotary "
            "encoding of age in days, RMSNorm, fused attention + GELU feed-forward blocks; "
            "141M parameters, 768 wide"
        ),
        files=("config.json", "model.safetensors", "dictionary.msgpack"),
        preprocessing=(
            "FEMR flat dictionary: one token per MEDS measurement whose code (numeric range, "
            "text value) it holds, unknown codes dropped, repeats within a day dropped; "
            "expects OMOP standard concepts as codes"
        ),
        pooling="state of the last event at or before each prediction time",
        dim=768,
        licence="CC BY-NC 4.0",
        gated=True,
        source=(
            "https://huggingface.co/StanfordShahLab/clmbr-t-base (gated: EHRSHOT Credentialed "
            "Health Data License, CITI certificate, non-commercial use)"
        ),
        citation=(
            "Wornow et al. 2023, EHRSHOT: An EHR Benchmark for Few-Shot Evaluation of "
            "Foundation Models (NeurIPS Datasets and Benchmarks; arXiv:2307.02028); "
            "Steinberg et al. 2021, Language models are an effective representation learning "
            "technique for electronic health record data (J Biomed Inform 113:103637)"
        ),
        loader=load_clmbr,
        extra="clmbr",
    )
)

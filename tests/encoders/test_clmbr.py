"""CLMBR-T-base (FEMR) through the registry: a tiny random checkpoint in exactly FEMR's
folder layout (config.json with FEMRModelConfig's schema, model.safetensors with
FEMRModel's key names, dictionary.msgpack in FEMRTokenizer's structure, codes taken from
the bundled clinosim MEDS data), embedded at the bundled labels' prediction times.

The reference is a line-by-line transcription of femr's code written here (femr itself
needs flash-attn or xformers, which do not install on these CPU machines): the per-patient
loop of ``BatchCreator.add_patient`` / ``FEMRTokenizer.get_feature_codes`` and the dense
``FEMRTransformer`` forward of both femr releases (0.2.0/0.2.1 and >= 0.2.2).
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

import healthfm
from healthfm.encoders import describe, entries
from healthfm.errors import DataError, ModelError
from healthfm.loader import load_encoder

msgpack = pytest.importorskip("msgpack")
from safetensors.torch import load_file, save_file  # noqa: E402

from healthfm.ehr.embed import featurize_labels  # noqa: E402
from healthfm.ehr.reader import open_meds, read_labels, scan_meds  # noqa: E402
from healthfm.encoders.clmbr import ClmbrEncoder, femr_release  # noqa: E402

CLINOSIM = Path(healthfm.__file__).parent / "data" / "ehr" / "clinosim_meds"
LABELS = CLINOSIM / "task_labels" / "admission_1y" / "labels.parquet"
HIDDEN, INTER, HEADS, LAYERS, WIDTH = 32, 48, 4, 2, 8


def _events() -> pl.DataFrame:
    return pl.read_parquet(sorted((CLINOSIM / "data").glob("*.parquet")))


def femr_dictionary() -> dict:
    """A dictionary in femr's structure (``convert_statistics_to_msgpack``): code, text
    and decile numeric entries, from the bundled data's most frequent ones."""
    df = _events().filter(pl.col("time").is_not_null())
    plain = df.filter(pl.col("numeric_value").is_null() & pl.col("text_value").is_null())
    codes = plain.group_by("code").len().sort(["len", "code"], descending=[True, False])
    texts = (
        df.filter(pl.col("text_value").is_not_null() & pl.col("numeric_value").is_null())
        .group_by("code", "text_value")
        .len()
        .sort(["len", "code", "text_value"], descending=[True, False, False])
    )
    nums = df.filter(pl.col("numeric_value").is_not_null())
    num_codes = nums.group_by("code").len().sort(["len", "code"], descending=[True, False])
    vocab = []
    for code in codes["code"].head(60).to_list():
        vocab.append({"type": "code", "code_string": code, "weight": -1.0})
    for code, text, _ in texts.head(8).iter_rows():
        vocab.append({"type": "text", "code_string": code, "text_string": text, "weight": -1.0})
    for code in num_codes["code"].head(6).to_list():
        values = np.sort(nums.filter(pl.col("code") == code)["numeric_value"].to_numpy())
        edges = [-math.inf, *np.quantile(values, np.arange(1, 10) / 10).tolist(), math.inf]
        for lo, hi in itertools.pairwise(edges):
            if lo != hi:
                vocab.append(
                    {
                        "type": "numeric",
                        "code_string": code,
                        "val_start": float(lo),
                        "val_end": float(hi),
                        "weight": -1.0,
                    }
                )
    return {
        "vocab": vocab,
        "is_hierarchical": False,
        "age_stats": {"mean": 1.6e9, "std": 8.0e8},
    }


def femr_config(vocab_size: int, release: str) -> dict:
    """config.json as FEMRModel.save_pretrained writes it (reduced sizes)."""
    tc = {
        "vocab_size": vocab_size,
        "is_hierarchical": False,
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "n_heads": HEADS,
        "n_layers": LAYERS,
        "attention_width": WIDTH,
        "return_dict": True,
        "transformers_version": "4.35.2",
    }
    if release == "0.2.2":  # femr >= 0.2.2 added these fields
        tc.update({"use_normed_ages": False, "use_bias": True, "hidden_act": "gelu"})
        task = {"task_type": "clmbr", "task_kwargs": {"clmbr_vocab_size": 16}}
    else:
        task = {"task_type": "clmbr", "clmbr_vocab_size": 16}
    return {
        "architectures": ["FEMRModel"],
        "transformer_config": tc,
        "task_config": task,
        "torch_dtype": "float32",
        "transformers_version": "4.35.2",
    }


def femr_state(vocab_size: int, release: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """FEMRModel's state dict: its key names and shapes, random values (femr 0.2.0/0.2.1
    name the RMSNorm parameters ``scale``, femr >= 0.2.2 ``weight``)."""
    g = torch.Generator().manual_seed(seed)
    norm = "scale" if release == "0.2.0" else "weight"

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    state = {
        "transformer.embed.weight": rnd(vocab_size, HIDDEN, scale=1.0),
        f"transformer.in_norm.{norm}": 1 + rnd(HIDDEN, scale=0.1),
        f"transformer.out_norm.{norm}": 1 + rnd(HIDDEN, scale=0.1),
        "task_model.final_layer.weight": rnd(16, HIDDEN),
        "task_model.final_layer.bias": rnd(16),
    }
    for i in range(LAYERS):
        p = f"transformer.layers.{i}."
        state[p + f"norm.{norm}"] = 1 + rnd(HIDDEN, scale=0.1)
        state[p + "input_proj.weight"] = rnd(3 * HIDDEN + INTER, HIDDEN)
        state[p + "input_proj.bias"] = rnd(3 * HIDDEN + INTER, scale=0.05)
        state[p + "output_proj.weight"] = rnd(HIDDEN, HIDDEN + INTER)
        state[p + "output_proj.bias"] = rnd(HIDDEN, scale=0.05)
    return state


def write_femr_folder(folder: Path, release: str = "0.2.2", seed: int = 0) -> Path:
    """A tiny CLMBR checkpoint in FEMR's published layout."""
    folder.mkdir(parents=True, exist_ok=True)
    dictionary = femr_dictionary()
    n = len(dictionary["vocab"])
    (folder / "config.json").write_text(json.dumps(femr_config(n, release), indent=2))
    save_file(
        femr_state(n, release, seed), str(folder / "model.safetensors"), metadata={"format": "pt"}
    )
    with (folder / "dictionary.msgpack").open("wb") as fh:
        msgpack.dump(dictionary, fh)
    return folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_femr_folder(tmp_path_factory.mktemp("clmbr") / "clmbr-t-base")


@pytest.fixture(scope="module")
def encoder(ckpt) -> ClmbrEncoder:
    return load_encoder(f"clmbr-t-base:{ckpt}", modality="ehr")


# ---------------------------------------------------------------------- references
def femr_patient(df: pl.DataFrame) -> dict:
    """One subject's MEDS rows as femr's patient dict (events grouped by time)."""
    events = []
    for t, rows in df.filter(pl.col("time").is_not_null()).group_by("time", maintain_order=True):
        measurements = [
            {"code": c, "numeric_value": None if v is None else float(v), "text_value": x}
            for c, v, x in rows.select("code", "numeric_value", "text_value").iter_rows()
        ]
        events.append({"time": t[0], "measurements": measurements})
    return {"patient_id": int(df["subject_id"][0]), "events": events}


def femr_tokens(dictionary: dict, patient: dict) -> tuple[list[int], list[float], list]:
    """femr's FEMRTokenizer.get_feature_codes + BatchCreator.add_patient (flat)."""
    code_lookup, string_lookup, numeric_lookup = {}, {}, {}
    for i, e in enumerate(dictionary["vocab"]):
        if e["type"] == "code":
            code_lookup[e["code_string"]] = i
        elif e["type"] == "numeric":
            numeric_lookup.setdefault(e["code_string"], []).append(
                (e["val_start"], e["val_end"], i)
            )
        elif e["type"] == "text":
            string_lookup[(e["code_string"], e["text_string"])] = i

    def features(m):
        if m.get("numeric_value") is not None:
            for start, end, i in numeric_lookup.get(m["code"], []):
                if start <= m["numeric_value"] < end:
                    return [i]
            return []
        if m.get("text_value") is not None:
            v = string_lookup.get((m["code"], m["text_value"]))
            return [] if v is None else [v]
        v = code_lookup.get(m["code"])
        return [] if v is None else [v]

    birth = next(
        e["time"] for e in patient["events"] for m in e["measurements"] if m["code"] == "MEDS_BIRTH"
    )
    tokens, ages, times = [], [], []
    current_date = None
    for event in patient["events"]:
        if event["time"].date() != current_date:
            current_date = event["time"].date()
            seen = set()
        for m in event["measurements"]:
            f = features(m)
            if not f or all(x in seen for x in f):
                continue
            seen |= set(f)
            tokens.append(f[0])
            ages.append((event["time"] - birth) / datetime.timedelta(days=1))
            times.append(event["time"])
    return tokens, ages, times


def femr_forward(state: dict, tokens: list[int], ages: list[float], release: str) -> np.ndarray:
    """femr's FEMRTransformer.forward for one patient, dense (flash-attention's CPU
    fallback / xformers' ref_attention with the materialised local causal mask)."""

    norm = "scale" if release == "0.2.0" else "weight"

    def rmsnorm(x, scale):
        if release == "0.2.0":  # femr 0.2.0 rmsnorm.py (bzhangGo's RMSNorm)
            rms = x.norm(2, dim=-1, keepdim=True) * x.shape[-1] ** (-1.0 / 2)
            return scale * (x / (rms + 1e-8))
        variance = x.pow(2).mean(-1, keepdim=True)  # femr >= 0.2.2 (Llama's RMSNorm)
        return scale * (x * torch.rsqrt(variance + 1e-6))

    def rotate_every_two_v2(x):
        flat = x.reshape(-1, x.shape[-1])
        return torch.stack((-flat[:, 1::2], flat[:, ::2]), axis=-1).reshape(x.shape)

    head = HIDDEN // HEADS
    a = torch.tensor(ages, dtype=torch.float32)
    inv_freq = 1.0 / (10000 ** (torch.linspace(0, 2, steps=head // 2))).reshape(1, head // 2)
    t = inv_freq * a.reshape(-1, 1)
    sin = torch.stack((torch.sin(t), torch.sin(t)), axis=-1).reshape(len(ages), 1, head)
    cos = torch.stack((torch.cos(t), torch.cos(t)), axis=-1).reshape(len(ages), 1, head)
    n = len(tokens)
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    if release == "0.2.0":  # construct_local_mask, window (WIDTH, 0)
        allowed = (j <= i) & (j >= i - WIDTH)
    else:  # xformers _materialize_causal_mask(window_size=WIDTH): tril, triu(1 - WIDTH)
        allowed = (j <= i) & (j - i >= -WIDTH + 1)
    bias = torch.from_numpy(np.where(allowed, 0.0, -np.inf)).float()
    x = state["transformer.embed.weight"][torch.tensor(tokens)]
    x = rmsnorm(x, state[f"transformer.in_norm.{norm}"])
    for layer in range(LAYERS):
        p = f"transformer.layers.{layer}."
        h = rmsnorm(x, state[p + f"norm.{norm}"])
        tr = h @ state[p + "input_proj.weight"].T + state[p + "input_proj.bias"]
        if release == "0.2.0":
            ff, qkv = tr[:, -INTER:], tr[:, :-INTER]
        else:
            ff, qkv = tr[:, : -HIDDEN * 3], tr[:, -HIDDEN * 3 :]
        qkv = qkv.reshape(n, 3, HEADS, head)
        q = qkv[:, 0] * cos + rotate_every_two_v2(qkv[:, 0]) * sin
        k = qkv[:, 1] * cos + rotate_every_two_v2(qkv[:, 1]) * sin
        v = qkv[:, 2]
        scores = torch.einsum("thd,shd->hts", q / math.sqrt(head), k) + bias
        attn = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(n, HIDDEN)
        ff = torch.nn.functional.gelu(ff)
        out = torch.cat((attn, ff), -1) @ state[p + "output_proj.weight"].T
        x = x + out + state[p + "output_proj.bias"]
    return rmsnorm(x, state[f"transformer.out_norm.{norm}"]).numpy()


# ---------------------------------------------------------------------- tests
def test_registry_entry_and_loading(encoder, ckpt):
    entry = entries()["clmbr-t-base"]
    assert entry.modality == "ehr" and entry.gated and entry.licence == "CC BY-NC 4.0"
    assert entry.files == ("config.json", "model.safetensors", "dictionary.msgpack")
    assert entry.extra == "clmbr" and "StanfordShahLab/clmbr-t-base" in entry.source
    assert isinstance(encoder, ClmbrEncoder) and encoder.release == "0.2.2"
    d = describe(encoder)
    assert d["dim"] == HIDDEN and d["pooling"] == "last" and d["preprocessing"] == "ehr.femr"
    assert len(d["model_hash"]) == 64


@pytest.mark.parametrize("subject_rank", [0, 7, 300])
def test_tokens_match_femr_tokenizer_and_processor(encoder, subject_rank):
    df = _events()
    sid = df["subject_id"].unique(maintain_order=True)[subject_rank]
    one = df.filter(pl.col("subject_id") == sid)
    enc = encoder.tokenizer.encode_frame(one)
    ref_tokens, ref_ages, ref_times = femr_tokens(femr_dictionary(), femr_patient(one))
    assert len(ref_tokens) > 20  # the dictionary covers real history
    np.testing.assert_array_equal(enc.ids, ref_tokens)
    np.testing.assert_allclose(enc.ages, ref_ages, rtol=0, atol=1e-9)
    assert enc.time_us.tolist() == [
        int((t - datetime.datetime(1970, 1, 1)) / datetime.timedelta(microseconds=1))
        for t in ref_times
    ]


@pytest.mark.parametrize("release", ["0.2.0", "0.2.2"])
def test_states_match_femr_transformer(tmp_path, release):
    folder = write_femr_folder(tmp_path / release, release=release, seed=3)
    enc = load_encoder(f"clmbr-t-base:{folder}")
    assert enc.release == release
    state = load_file(str(folder / "model.safetensors"))
    df = _events()
    sids = df["subject_id"].unique(maintain_order=True)[:3].to_list()
    seqs = [
        femr_tokens(femr_dictionary(), femr_patient(df.filter(pl.col("subject_id") == s)))
        for s in sids
    ]
    width = max(len(s[0]) for s in seqs)
    assert width > 4 * WIDTH  # the local window matters
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    times = torch.full((len(seqs), width), float("nan"), dtype=torch.float64)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for r, (tok, ages, _) in enumerate(seqs):
        ids[r, : len(tok)] = torch.tensor(tok)
        times[r, : len(tok)] = torch.tensor(ages, dtype=torch.float64)
        mask[r, : len(tok)] = True
    with torch.no_grad():
        ours = enc.forward_features({"ids": ids, "attention_mask": mask, "times": times})
    for r, (tok, ages, _) in enumerate(seqs):
        ref = femr_forward(state, tok, ages, release)
        np.testing.assert_allclose(ours[r, : len(tok)].numpy(), ref, rtol=1e-5, atol=1e-5)


def test_release_is_read_from_the_weights(tmp_path):
    # Same random draws, other femr release: other norms and another qkv / feed-forward
    # split, so other states; the norms' key names decide, never a silent guess.
    a = write_femr_folder(tmp_path / "a", release="0.2.0")
    b = write_femr_folder(tmp_path / "b", release="0.2.2")
    assert femr_release(load_file(str(a / "model.safetensors"))) == "0.2.0"
    assert femr_release(load_file(str(b / "model.safetensors"))) == "0.2.2"
    batch = {"ids": torch.tensor([[1, 2, 3]]), "times": torch.tensor([[0.0, 10.0, 20.0]])}
    with torch.no_grad():
        sa = load_encoder(f"clmbr-t-base:{a}").forward_features(batch)
        sb = load_encoder(f"clmbr-t-base:{b}").forward_features(batch)
    assert not torch.allclose(sa, sb)
    # A femr >= 0.2.2 config beside femr 0.2.0 weights: refused, not guessed.
    shutil.copy(b / "config.json", a / "config.json")
    with pytest.raises(ModelError, match="mixing two releases"):
        load_encoder(f"clmbr-t-base:{a}")


@pytest.fixture(scope="module")
def bundled_features(encoder):
    ds = open_meds(CLINOSIM)
    labels = read_labels(LABELS, scan_meds(ds))
    return ds, labels, featurize_labels(ds, encoder.tokenizer, labels, encoder, "last", 16)


def test_embeddings_at_prediction_times_are_femr_representations(encoder, bundled_features):
    _, labels, feats = bundled_features
    assert feats.embeddings.shape == (len(labels.frame), HIDDEN)
    assert np.isfinite(feats.embeddings).all()
    state = load_file(str(encoder.folder / "model.safetensors"))
    df = _events()
    # A few label rows: the state of the last token at or before the prediction time.
    for row in (0, 1, 2500, len(labels.frame) - 1):
        sid, pt = labels.frame.row(row)[1:3]
        one = df.filter(pl.col("subject_id") == sid)
        tok, ages, times = femr_tokens(femr_dictionary(), femr_patient(one))
        n = sum(t <= pt for t in times)
        assert 0 < n <= encoder.max_len
        ref = femr_forward(state, tok[:n], ages[:n], "0.2.2")[-1]
        np.testing.assert_allclose(feats.embeddings[row], ref, rtol=1e-5, atol=1e-5)


def test_embedding_is_deterministic(encoder, bundled_features):
    ds, labels, feats = bundled_features
    again = featurize_labels(ds, encoder.tokenizer, labels, encoder, "last", 7)
    np.testing.assert_allclose(again.embeddings, feats.embeddings, rtol=1e-6, atol=1e-6)


def _copy_meds(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    for shard in sorted((dst / "data").glob("*.parquet")):
        edit(pl.read_parquet(shard)).write_parquet(shard)
    return dst


def test_events_after_the_prediction_time_never_leak(encoder, bundled_features, tmp_path):
    _, labels, feats = bundled_features
    sid, pt = labels.frame.row(0)[1:3]
    code = encoder.tokenizer.vocab[0]["code_string"]

    def edit(df):
        # Change every value and add events of a known code after the prediction time.
        later = (pl.col("subject_id") == sid) & (pl.col("time") > pt)
        df = df.with_columns(
            pl.when(later).then(pl.col("numeric_value") * 3).otherwise(pl.col("numeric_value"))
        )
        extra = pl.DataFrame(
            {
                "subject_id": [sid] * 3,
                "time": [pt + datetime.timedelta(seconds=s) for s in (1, 3600, 86400 * 30)],
                "code": [code] * 3,
                "numeric_value": [None] * 3,
                "text_value": [None] * 3,
            },
            schema=df.schema,
        )
        if sid in df["subject_id"]:
            df = pl.concat([df, extra]).sort("subject_id", "time", maintain_order=True)
        return df

    edited = _copy_meds(CLINOSIM, tmp_path / "meds", edit)
    ds2 = open_meds(edited)
    labels2 = read_labels(LABELS, scan_meds(ds2))
    feats2 = featurize_labels(ds2, encoder.tokenizer, labels2, encoder, "last", 16)
    same = labels.frame["subject_id"].to_numpy() == sid
    rows = np.flatnonzero(same)
    # The first row (prediction time pt) is unchanged; later rows of the subject move.
    np.testing.assert_array_equal(feats2.embeddings[rows[0]], feats.embeddings[rows[0]])
    others = np.flatnonzero(~same)
    np.testing.assert_array_equal(feats2.embeddings[others], feats.embeddings[others])
    assert len(rows) > 1 and not np.allclose(
        feats2.embeddings[rows[1:]], feats.embeddings[rows[1:]]
    )


def test_cli_embed_and_evaluate(ckpt, tmp_path):
    from healthfm.cli import main

    out = tmp_path / "x.parquet"
    argv = ["embed", f"clmbr-t-base:{ckpt}", str(CLINOSIM), "--labels", str(LABELS)]
    assert main([*argv, "--out", str(out)]) == 0
    table = pl.read_parquet(out)
    assert table.columns[:3] == ["subject_id", "prediction_time", "embedding"]
    assert len(table) == 5046 and len(table["embedding"][0]) == HIDDEN
    ev = tmp_path / "ev"
    rc = main(
        [
            "evaluate",
            f"clmbr-t-base:{ckpt}",
            str(CLINOSIM),
            "--labels",
            str(LABELS),
            "--few-shot",
            "all",
            "--seeds",
            "0",
            "--n-boot",
            "20",
            "--out",
            str(ev),
        ]
    )
    assert rc == 0
    methods = {r["method"] for r in json.loads((ev / "results.json").read_text())}
    assert "clmbr-t-base-last+logreg" in methods and "counts+gbm" in methods


def test_coverage_is_reported_and_near_zero_is_refused(encoder, tmp_path):
    cov = encoder.tokenizer.coverage(open_meds(CLINOSIM))
    assert 0.3 < cov["share"] < 1 and cov["n_events"] == 266363

    def rename(df):  # another vocabulary: no code the dictionary knows
        return df.with_columns(("LOCAL/" + pl.col("code")).alias("code"))

    other = _copy_meds(CLINOSIM, tmp_path / "local", rename)
    ds = open_meds(other)
    labels = read_labels(LABELS, scan_meds(ds))
    with pytest.raises(DataError, match=r"only 0 of .*LOCAL/") as err:
        featurize_labels(ds, encoder.tokenizer, labels, encoder)
    assert str(other) in str(err.value)


def test_wrong_folder_is_a_model_error(ckpt, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_encoder(f"clmbr-t-base:{tmp_path / 'nothing'}")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    with pytest.raises(ModelError, match="not a FEMR model config"):
        load_encoder(f"clmbr-t-base:{bert}")
    partial = tmp_path / "partial"
    shutil.copytree(ckpt, partial)
    (partial / "dictionary.msgpack").unlink()
    with pytest.raises(ModelError, match=r"dictionary\.msgpack"):
        load_encoder(f"clmbr-t-base:{partial}")


def test_mis_shaped_tensor_is_a_model_error(ckpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    state = load_file(str(bad / "model.safetensors"))
    state["transformer.layers.1.output_proj.weight"] = torch.zeros(HIDDEN, HIDDEN)
    state.pop("transformer.layers.0.norm.weight")
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(ModelError, match=r"model\.safetensors") as err:
        load_encoder(f"clmbr-t-base:{bad}")
    message = str(err.value)
    assert "missing: transformer.layers.0.norm.weight" in message
    assert (
        "mis-shaped: transformer.layers.1.output_proj.weight (32, 32) (expected (32, 80))"
        in message
    )


def test_corrupt_or_hierarchical_dictionary_is_a_model_error(ckpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    raw = (bad / "dictionary.msgpack").read_bytes()
    (bad / "dictionary.msgpack").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ModelError, match="not a readable msgpack dictionary"):
        load_encoder(f"clmbr-t-base:{bad}")
    (bad / "dictionary.msgpack").write_bytes(msgpack.packb([1, 2, 3]))
    with pytest.raises(ModelError, match="expected a map with a 'vocab' list"):
        load_encoder(f"clmbr-t-base:{bad}")
    (bad / "dictionary.msgpack").write_bytes(msgpack.packb({"vocab": [], "is_hierarchical": True}))
    with pytest.raises(ModelError, match="hierarchical"):
        load_encoder(f"clmbr-t-base:{bad}")


def test_untrained_control_keeps_the_architecture(encoder):
    control = encoder.untrained(seed=1)
    batch = {"ids": torch.tensor([[0, 1, 2]]), "times": torch.tensor([[0.0, 5.0, 9.0]])}
    with torch.no_grad():
        assert control.forward_features(batch).shape == (1, 3, HIDDEN)
        assert not torch.allclose(control.embed(batch), encoder.embed(batch))


def test_prediction_time_before_any_known_event_is_a_zero_row(encoder, caplog):
    from healthfm.ehr.embed import embed_cutoffs, label_cutoffs

    code = encoder.tokenizer.vocab[0]["code_string"]
    t0 = datetime.datetime(2020, 1, 1)
    t1 = t0 + datetime.timedelta(days=3)
    df = pl.DataFrame(
        {
            "subject_id": [1, 1, 2, 2, 2],
            "time": [t0, t1, t0, t0 + datetime.timedelta(minutes=5), t1],
            "code": ["NOT/IN-DICTIONARY", code, code, code, code],
            "numeric_value": [None] * 5,
            "text_value": [None] * 5,
        },
        schema={
            "subject_id": pl.Int64,
            "time": pl.Datetime("us"),
            "code": pl.String,
            "numeric_value": pl.Float32,
            "text_value": pl.String,
        },
    )
    enc = encoder.tokenizer.encode_frame(df)
    # Subject 1: the unknown code dropped; subject 2: the same-day repeat dropped.
    assert enc.ids.tolist() == [0, 0, 0] and enc.offsets.tolist() == [0, 1, 3]
    at = int((t0 + datetime.timedelta(hours=1) - datetime.datetime(1970, 1, 1)).total_seconds())
    s_idx, cut = label_cutoffs(enc, np.array([1, 2]), np.array([at, at]) * 1_000_000)
    with caplog.at_level("WARNING", logger="healthfm.ehr"):
        out = embed_cutoffs(encoder, enc, s_idx, cut)
    assert (out[0] == 0).all() and np.abs(out[1]).sum() > 0
    assert "1 of 2 prediction times have no known event" in caplog.text


def test_finetune_clmbr_and_score_it_with_evaluate_finetuned(ckpt, tmp_path):
    """CLMBR-T-base fine-tunes on the bundled admission task through ``healthfm finetune``
    and its folder is scored by ``evaluate --finetuned`` on the same held-out label rows
    (the shared fine-tuned path: no healthfm ``config`` is read of a published model)."""
    from healthfm.cli import main
    from healthfm.loader import FINETUNED_ENCODER, folder_kind, load_finetuned

    ft = tmp_path / "ft"
    argv = ["finetune", f"clmbr-t-base:{ckpt}", str(CLINOSIM), "--labels", str(LABELS)]
    assert main([*argv, "--out", str(ft), "--epochs", "1", "--few-shot", "8"]) == 0
    assert folder_kind(ft) == FINETUNED_ENCODER
    info = json.loads((ft / "training_info.json").read_text())["finetune"]
    assert info["few_shot"] == 8 and info["n_train"] == 16
    model = load_finetuned(ft)
    assert model.name == "clmbr-t-base" and model.modality == "ehr" and model.causal
    # The base is CLMBR's own folder, checked by its hash.
    assert model.base_model_hash == load_encoder(f"clmbr-t-base:{ckpt}").model_hash

    out = tmp_path / "eval"
    rc = main(
        ["evaluate", f"clmbr-t-base:{ckpt}", str(CLINOSIM), "--labels", str(LABELS),
         "--few-shot", "all", "--seeds", "0", "--n-boot", "20", "--no-baselines",
         "--finetuned", str(ft), "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())
    tuned = [r for r in rows if r["method"] == "clmbr-t-base-finetune-full-k8"]
    assert {r["metric"] for r in tuned} == {"auroc", "auprc", "brier"}
    held = pl.read_parquet(LABELS).join(
        pl.read_parquet(CLINOSIM / "metadata" / "subject_splits.parquet"), on="subject_id"
    )
    n_held = int((held["split"] == "held_out").sum())
    assert all(r["k"] == 8 and r["n_test"] == n_held and r["protocol"] == "ehrshot" for r in tuned)
    assert all(r["model_folder"] == str(ft) for r in tuned)
    # Scored on the rows fine-tuning held out: the same AUROC as fine-tuning reported.
    auroc = next(r["value"] for r in tuned if r["metric"] == "auroc")
    assert auroc == pytest.approx(info["test_metrics"]["auroc"]["value"], abs=1e-9)
    pred = pl.read_parquet(out / "predictions" / "clmbr-t-base-finetune-full-k8.parquet")
    assert len(pred) == n_held

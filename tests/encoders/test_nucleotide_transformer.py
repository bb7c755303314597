"""Nucleotide Transformer v1/v2 from tiny folders in the published layouts: loaded through
the registry, compared with transformers' EsmTokenizer/EsmModel where they apply, run
through the embed/evaluate stages on the bundled promoters, and refused when broken."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from healthfm.datasets import promoters
from healthfm.encoders import entries
from healthfm.errors import DataError, ModelError
from healthfm.loader import load_encoder
from healthfm.modality import get_modality
from healthfm.stages.embed import embed
from healthfm.tokens import write_store
from healthfm.train.data import collate
from nt_folders import CONFIG_V1, TINY, VOCAB_V1, VOCAB_V2, state_dict, write_folder

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("nt") / "nt-v1", "v1")


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("nt") / "nt-v2", "v2")


def _sequences(n: int, seed: int, alphabet: str = "ACGT" * 6 + "N" + "RY") -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list(alphabet), size=rng.integers(0, 90))) for _ in range(n)]


def _batch(encoder, sequences):
    """A collated batch, as the embed stage builds it (token store, then collate)."""
    with tempfile.TemporaryDirectory() as tmp:
        chunk = encoder.tokenizer.encode(sequences)
        store = write_store(Path(tmp) / "store", [chunk], encoder.tokenizer.hash, ())
        return collate(store, np.arange(len(sequences)), encoder.max_len)


def _masked_mean(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def _esm(folder, **overrides):
    """transformers' EsmForMaskedLM on a folder's config and weights (strictly loaded)."""
    config = transformers.EsmConfig(
        **{**json.loads((folder / "config.json").read_text()), **overrides}
    )
    model = transformers.EsmForMaskedLM(config).eval()
    state = load_file(str(folder / "model.safetensors"))
    state.pop("esm.embeddings.position_ids", None)
    if config.position_embedding_type == "rotary":  # transformers makes no absolute table then
        state.pop("esm.embeddings.position_embeddings.weight")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("inv_freq" in k for k in missing)
    return model


def test_registry_entries_are_truthful():
    known = entries()
    for name in (
        "nucleotide-transformer",
        "nucleotide-transformer-v1",
        "nucleotide-transformer-v2",
    ):
        e = known[name]
        assert e.modality == "dna" and e.gated is False
        assert e.licence.startswith("CC BY-NC-SA 4.0") and "InstaDeepAI/" in e.source
        assert "Dalla-Torre" in e.citation and "vocab.txt" in e.files


# --------------------------------------------------------------------------- tokenizer
def _authors_tokenize(sequence: str, vocab: list[str], k: int = 6) -> list[int]:
    """The authors' NucleotidesKmersTokenizer.tokenize (JAX package) with <cls> prepended,
    as written there: split on N, cut each piece into k-mers, the rest into nucleotides."""
    ids = {t: i for i, t in enumerate(vocab)}
    tokens = ["<cls>"]
    pieces = sequence.split("N")
    for i, piece in enumerate(pieces):
        chunks = [piece[j * k : (j + 1) * k] for j in range(len(piece) // k)]
        if len(piece) % k:
            chunks.append(piece[(len(piece) // k) * k :])
        for chunk in chunks:
            tokens.extend([chunk] if len(chunk) == k else list(chunk))
        if i < len(pieces) - 1:
            tokens.append("N")
    return [ids[t] for t in tokens]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_token_ids_equal_the_authors_tokenizers(version, v1, v2):
    folder = v1 if version == "v1" else v2
    encoder = load_encoder(f"nucleotide-transformer:{folder}")
    vocab = VOCAB_V1 if version == "v1" else VOCAB_V2
    # The folders' tokenizer class (tokenizer_config.json: EsmTokenizer), on their vocab.txt.
    esm = transformers.EsmTokenizer(vocab_file=str(folder / "vocab.txt"), eos_token=None)
    iupac = _sequences(300, 1)  # with R/Y: EsmTokenizer makes each run of them one <unk>
    acgtn = _sequences(300, 2, "ACGT" * 4 + "N")
    fixed = ["", "A", "AAAAAA", "AAAAAAT", "TAAAAAA", "NNNAAAAAAA", "NNNN", "ACGTRYRYACGTACGTAC"]
    seqs = iupac + acgtn + fixed
    chunk = encoder.tokenizer.encode(seqs)
    ours = [
        chunk.ids[a:b].tolist() for a, b in zip(chunk.offsets[:-1], chunk.offsets[1:], strict=True)
    ]
    assert ours == [esm(s)["input_ids"] for s in seqs]
    authors = acgtn + fixed[:-1]  # their tokenizer raises on R/Y
    assert ours[len(iupac) : len(iupac) + len(authors)] == [
        _authors_tokenize(s, vocab) for s in authors
    ]
    # The ids a published notebook shows for v2 (AAAAAA = 6, TAAAAA = 1030, A = 4102).
    if version == "v2":
        assert ours[len(iupac) + len(acgtn) + 4] == [3, 1030, 4102]
    # Inputs without a single base run, and none at all.
    for edge in (["NNNN", "RYR", ""], [""], []):
        got = encoder.tokenizer.encode(edge)
        assert [
            got.ids[a:b].tolist() for a, b in zip(got.offsets[:-1], got.offsets[1:], strict=True)
        ] == [esm(s)["input_ids"] for s in edge]
    # Lower case (soft-masked) and U are read as upper-case DNA.
    again = encoder.tokenizer.encode(["acguNacgtacgtaa", "ACGTNACGTACGTAA"])
    assert again.ids[: again.offsets[1]].tolist() == again.ids[again.offsets[1] :].tolist()
    assert int(chunk.ids.max()) < json.loads((folder / "config.json").read_text())["vocab_size"]


def test_coverage_report_and_near_empty_mapping(v1, tmp_path, caplog):
    encoder = load_encoder(f"nucleotide-transformer-v1:{v1}")
    tok = encoder.tokenizer
    report = tok.check_sequences(["ACGTNNACGT", "ACGTRACGTA"])
    assert report["unknown_share"] == pytest.approx(1 / 20) and report["n_share"] == pytest.approx(
        2 / 20
    )
    with caplog.at_level(logging.WARNING, logger="healthfm"):
        long = tok.check_sequences(["A" * 6 * 1200, "ACGT"])
    assert long["too_long"] == 1 and "1 of 2 sequences are longer" in caplog.text
    table = tmp_path / "protein.tsv"
    table.write_text("sequence\tlabel\nACGTACGT\ta\nRYKMSWRYKM\tb\nRYRYRYRY\ta\n")
    samples = get_modality("dna").read(table, {"label_column": "label"})
    with pytest.raises(DataError, match="not A/C/G/T/N") as err:
        get_modality("dna").check_input(samples, tok)
    assert err.value.row == 1 and str(table) in str(err.value)


# --------------------------------------------------------------------------- network
def test_v1_equals_transformers_esm(v1):
    encoder = load_encoder(f"nucleotide-transformer:{v1}")
    assert encoder.config.version == "v1" and encoder.config.token_dropout
    seqs = [
        *_sequences(12, 3),
        *map(str, np.asarray(get_modality("dna").read(promoters(), {}).payload[:8])),
    ]
    batch = _batch(encoder, seqs)
    ref = _esm(v1)
    ids = torch.where(batch["attention_mask"], batch["ids"], 1)
    with torch.no_grad():
        hidden = ref.esm(
            input_ids=ids, attention_mask=batch["attention_mask"].long()
        ).last_hidden_state
        ours = encoder.embed(batch)
        torch.testing.assert_close(
            ours, _masked_mean(hidden, batch["attention_mask"]), atol=1e-5, rtol=1e-5
        )
        # With <mask> tokens in the input, the token-dropout rescaling differs per row.
        pick = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.2
        masked = dict(batch, ids=torch.where(pick, 2, batch["ids"]))
        ids_m = torch.where(batch["attention_mask"], masked["ids"], 1)
        ref_h = ref.esm(
            input_ids=ids_m, attention_mask=batch["attention_mask"].long()
        ).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1)
        torch.testing.assert_close(
            encoder.forward_features(masked) * mask, ref_h * mask, atol=1e-5, rtol=1e-5
        )


def test_rotary_path_equals_transformers_esm(tmp_path):
    # transformers' EsmModel has rotary positions but not v2's gated FFN: a rotary folder
    # without add_bias_fnn checks the rotary attention on its own.
    folder = write_folder(
        tmp_path / "rotary", "v1", position_embedding_type="rotary", token_dropout=False
    )
    encoder = load_encoder(f"nucleotide-transformer:{folder}")
    batch = _batch(encoder, _sequences(10, 4))
    ref = _esm(folder)
    ids = torch.where(batch["attention_mask"], batch["ids"], 1)
    with torch.no_grad():
        hidden = ref.esm(
            input_ids=ids, attention_mask=batch["attention_mask"].long()
        ).last_hidden_state
        torch.testing.assert_close(
            encoder.embed(batch),
            _masked_mean(hidden, batch["attention_mask"]),
            atol=1e-5,
            rtol=1e-5,
        )


class _GatedIntermediate(torch.nn.Module):
    """The v2 remote code's EsmIntermediate (modeling_esm.py), re-typed for the reference:
    dense to 2 x intermediate_size without bias, split, silu(x1) * x2."""

    def __init__(self, config) -> None:
        super().__init__()
        self.dense = torch.nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)

    def forward(self, x):
        x1, x2 = self.dense(x).split(self.dense.out_features // 2, -1)
        return torch.nn.functional.silu(x1) * x2


def test_v2_equals_esm_with_the_remote_codes_gated_ffn(v2):
    encoder = load_encoder(f"nucleotide-transformer-v2:{v2}")
    assert encoder.config.version == "v2" and encoder.max_len == 2048
    config = {
        k: v for k, v in json.loads((v2 / "config.json").read_text()).items() if k != "auto_map"
    }
    ref = transformers.EsmModel(transformers.EsmConfig(**config), add_pooling_layer=False).eval()
    for layer in ref.encoder.layer:  # v2's FFN: the remote code's classes, bias-free
        layer.intermediate = _GatedIntermediate(ref.config)
        layer.output.dense = torch.nn.Linear(
            ref.config.intermediate_size, ref.config.hidden_size, bias=False
        )
    state = {
        k[4:]: v
        for k, v in load_file(str(v2 / "model.safetensors")).items()
        if k.startswith("esm.")
    }
    state = {
        k: v for k, v in state.items() if "inv_freq" not in k and "position_embeddings" not in k
    }
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"rotary_embeddings.inv_freq"}
    batch = _batch(encoder, _sequences(10, 5))
    ids = torch.where(batch["attention_mask"], batch["ids"], 1)
    with torch.no_grad():
        hidden = ref(input_ids=ids, attention_mask=batch["attention_mask"].long()).last_hidden_state
        torch.testing.assert_close(
            encoder.embed(batch),
            _masked_mean(hidden, batch["attention_mask"]),
            atol=1e-5,
            rtol=1e-5,
        )


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_embeds_the_bundled_promoters_through_the_stage(version, v1, v2, tmp_path):
    folder = v1 if version == "v1" else v2
    out = embed(f"nucleotide-transformer:{folder}", promoters(), tmp_path / "a.npy", {})
    again = embed(f"nucleotide-transformer:{folder}", promoters(), tmp_path / "b.npy", {})
    a, b = np.load(out), np.load(again)
    assert a.shape == (106, TINY["hidden_size"]) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)  # deterministic
    assert np.abs(a - a.mean(0)).max() > 1e-3  # rows differ
    # The embedding moves with the input: one base changed changes that row only.
    encoder = load_encoder(f"nucleotide-transformer:{folder}")
    seqs = list(map(str, get_modality("dna").read(promoters(), {}).payload[:4]))
    mutated = [seqs[0][:10] + ("A" if seqs[0][10] != "A" else "C") + seqs[0][11:], *seqs[1:]]
    with torch.no_grad():
        e0, e1 = encoder.embed(_batch(encoder, seqs)), encoder.embed(_batch(encoder, mutated))
    assert (e0[0] - e1[0]).abs().max() > 1e-4
    torch.testing.assert_close(e0[1:], e1[1:], atol=1e-6, rtol=1e-6)
    control = encoder.untrained(seed=1)
    with torch.no_grad():
        assert (control.embed(_batch(encoder, seqs)) - e0).abs().max() > 1e-3


def test_cli_embed_and_evaluate(v1, v2, tmp_path):
    from healthfm.cli import main

    out = tmp_path / "x.parquet"
    assert main(["embed", f"nucleotide-transformer:{v1}", str(promoters()), "--out", str(out)]) == 0
    import pyarrow.parquet as pq

    table = pq.read_table(out)
    assert table.num_rows == 106 and set(table.column_names) == {"key", "embedding", "label"}
    ev = tmp_path / "ev"
    args = ["evaluate", f"nucleotide-transformer:{v2}", str(promoters()), "--out", str(ev)]
    assert main([*args, "--seeds", "0", "--n-boot", "20"]) == 0
    methods = {r["method"] for r in json.loads((ev / "results.json").read_text())}
    assert (
        "nucleotide-transformer-v2-2L32-mean+logreg" in methods and "kmer-counts+logreg" in methods
    )


# --------------------------------------------------------------------------- errors
def test_pickle_weights_load_and_malicious_pickle_is_refused(tmp_path):
    folder = write_folder(tmp_path / "bin", "v1", weights="bin")
    encoder = load_encoder(f"nucleotide-transformer:{folder}")
    assert encoder.model_hash and encoder.dim == TINY["hidden_size"]
    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {sentinel}",))

    torch.save({"esm.embeddings.word_embeddings.weight": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"wants to run code.*refused") as err:
        load_encoder(f"nucleotide-transformer:{folder}")
    assert "pytorch_model.bin" in str(err.value) and not sentinel.exists()


def test_mis_shaped_tensor_is_refused(tmp_path):
    folder = write_folder(tmp_path / "shape", "v2")
    state = load_file(str(folder / "model.safetensors"))
    state["esm.encoder.layer.1.intermediate.dense.weight"] = torch.zeros(64, 32)  # v1's shape
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(
        ModelError, match=r"mis-shaped: encoder\.layer\.1\.intermediate\.dense\.weight"
    ):
        load_encoder(f"nucleotide-transformer:{folder}")


def test_wrong_folders_are_refused(tmp_path, v1, v2):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    with pytest.raises(ModelError, match="not an ESM masked LM") as err:
        load_encoder(f"nucleotide-transformer:{bert}")
    assert err.value.column == "model_type"
    with pytest.raises(ModelError, match="v2 folder, not v1"):
        load_encoder(f"nucleotide-transformer-v1:{v2}")
    with pytest.raises(ModelError, match="v1 folder, not v2"):
        load_encoder(f"nucleotide-transformer-v2:{v1}")
    novocab = write_folder(tmp_path / "novocab", "v1")
    (novocab / "vocab.txt").unlink()
    with pytest.raises(ModelError, match=r"vocab\.txt is missing"):
        load_encoder(f"nucleotide-transformer:{novocab}")
    # An ESM-2 protein vocabulary is not a 6-mer one.
    protein = write_folder(tmp_path / "protein", "v1")
    (protein / "vocab.txt").write_text(
        "\n".join(["<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWC", "<mask>"])
    )
    with pytest.raises(ModelError, match="not a Nucleotide Transformer vocabulary"):
        load_encoder(f"nucleotide-transformer:{protein}")
    # Weights of another size than the config says.
    other = write_folder(tmp_path / "other", "v1")
    save_file(
        state_dict({**CONFIG_V1, **TINY, "hidden_size": 48}), str(other / "model.safetensors")
    )
    with pytest.raises(ModelError, match="weights do not fit"):
        load_encoder(f"nucleotide-transformer:{other}")
    noweights = write_folder(tmp_path / "noweights", "v2")
    (noweights / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"none of model\.safetensors, pytorch_model\.bin"):
        load_encoder(f"nucleotide-transformer:{noweights}")


def test_full_finetune_of_nt_reloads_and_runs_beside_its_base(tmp_path):
    """`finetune nucleotide-transformer:DIR` (full): the written folder loads as an encoder
    and is evaluated side by side with its base on the same rows."""
    from healthfm.stages.evaluate import evaluate
    from healthfm.stages.finetune import FinetuneConfig, finetune

    spec = f"nucleotide-transformer:{write_folder(tmp_path / 'nt', 'v2')}"
    result = finetune(
        spec,
        promoters(),
        tmp_path / "ft",
        {"label_column": "label"},
        FinetuneConfig(epochs=1, batch_size=16),
        n_boot=10,
        echo=False,
    )
    assert result.method == "full"
    rows = evaluate(
        [spec, tmp_path / "ft"],
        promoters(),
        tmp_path / "ev",
        {"label_column": "label"},
        seeds=[0],
        n_boot=10,
        echo=False,
    )
    methods = {r.method for r in rows}
    assert any(m.endswith("finetune-full") for m in methods)  # the tuned model's own head
    tuned = {m for m in methods if m.endswith("-mean+logreg") and "untrained" not in m}
    assert len(tuned) == 2  # base and tuned

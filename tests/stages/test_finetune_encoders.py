"""Fine-tuning any registered encoder (full and LoRA), reloading, embedding and scoring it.

The encoder is a small pre-norm transformer written here as a published model's native
re-implementation is (a :class:`PublishedEncoder` over the DNA k-mer tokenizer, its own
``config.json`` / ``tokenizer.json`` / ``model.safetensors`` folder, loaded strictly by a
registered loader); the data are the bundled E. coli promoters.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from healthfm import cli
from healthfm.datasets import promoters
from healthfm.dna.tokenizer import KmerTokenizer
from healthfm.encoders import register_encoder
from healthfm.encoders.published import (
    PublishedEncoder,
    find_file,
    folder_hash,
    load_weights,
    read_json,
    read_state_dict,
)
from healthfm.errors import ConfigError, ModelError
from healthfm.evaluate.adapters import ADAPTER_CONFIG
from healthfm.evaluate.encoder_task import EncoderTaskModel, lora_targets
from healthfm.evaluate.task_head import predict
from healthfm.fsutil import sha256_file
from healthfm.inference import embed_store
from healthfm.loader import (
    ADAPTER,
    BASE_REF,
    FINETUNED_REF,
    folder_kind,
    load_adapter,
    load_encoder,
)
from healthfm.modality import get_modality
from healthfm.stages.embed import embed
from healthfm.stages.evaluate import evaluate
from healthfm.stages.finetune import FinetuneConfig, finetune
from healthfm.tokenizer import load_tokenizer
from healthfm.train.data import StoreSource


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (
            m(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for m in (self.q, self.k, self.v)
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.o(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class TinyDna(PublishedEncoder):
    """Token + position embeddings, pre-norm blocks (exposed as ``blocks``), a final norm."""

    model_name = "tinydna"
    blocks_name = "blocks"

    def __init__(self, config: dict, tokenizer, folder: Path, model_hash: str | None) -> None:
        dim = int(config["dim"])
        super().__init__(
            self.model_name, "dna", dim, "mean", config["max_len"], tokenizer, folder, model_hash
        )
        self.tokens = nn.Embedding(tokenizer.vocab_size, dim, padding_idx=0)
        self.positions = nn.Embedding(config["max_len"], dim)
        layers = nn.ModuleList(Block(dim, config["heads"]) for _ in range(config["layers"]))
        setattr(self, self.blocks_name, layers)
        self.norm = nn.LayerNorm(dim)

    def forward_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask = batch["ids"], batch["attention_mask"]
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        for block in getattr(self, self.blocks_name):
            x = block(x, mask)
        return self.norm(x)


class FlatDna(TinyDna):
    """The same network with its blocks under another name: no blocks exposed."""

    model_name = "tinydna-flat"
    blocks_name = "layers"


def load_tiny(path: Path, cls=TinyDna) -> TinyDna:
    """The loader a published model has: strict weights, a hash of the folder's files."""
    path = Path(path)
    config_file = find_file(path, ["config.json"], cls.__name__)
    weights = find_file(path, ["model.safetensors"], cls.__name__)
    tokenizer = load_tokenizer(path / "tokenizer.json")
    model_hash = folder_hash([config_file, weights, path / "tokenizer.json"])
    encoder = cls(read_json(config_file), tokenizer, path, model_hash)
    load_weights(encoder, read_state_dict(weights), weights)
    return encoder.eval()


def write_folder(path: Path, cls=TinyDna, seed: int = 0) -> Path:
    """A published-style folder: the authors' config, tokenizer and safetensors weights."""
    path.mkdir(parents=True)
    tokenizer = KmerTokenizer(k=1, add_cls=True, max_length=64)
    config = {"dim": 32, "heads": 2, "layers": 2, "max_len": 64}
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer.json").write_text(json.dumps(tokenizer.to_dict()))
    torch.manual_seed(seed)
    encoder = cls(config, tokenizer, path, None)
    save_file(
        {k: v.contiguous() for k, v in encoder.state_dict().items()}, path / "model.safetensors"
    )
    return path


FULL = FinetuneConfig(epochs=4, patience=4, lr=3e-3, batch_size=16)
LORA = FinetuneConfig(lora=True, lora_rank=4, epochs=4, patience=4, lr=1e-2, batch_size=16)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from healthfm.encoders import registry

    saved = dict(registry._ENTRIES)
    register_encoder("tinydna", load_tiny, modality="dna", architecture="test transformer")
    register_encoder("tinydna-flat", lambda p: load_tiny(p, FlatDna), modality="dna")
    root = tmp_path_factory.mktemp("ftenc")
    base = write_folder(root / "base")
    spec = f"tinydna:{base}"
    full = finetune(spec, promoters(), root / "full", {}, FULL, n_boot=20, echo=False)
    lora = finetune(spec, promoters(), root / "lora", {}, LORA, n_boot=20, echo=False)
    yield {"root": root, "base": base, "spec": spec, "full": full, "lora": lora}
    registry._ENTRIES.clear()
    registry._ENTRIES.update(saved)


def rows_source(model, indices: np.ndarray, tmp_path: Path) -> StoreSource:
    """The promoters' rows ``indices`` tokenized as fine-tuning reads them."""
    modality = get_modality("dna")
    samples = modality.read(promoters(), modality.options({}))
    store = modality.tokenize(model.tokenizer, samples, tmp_path / "store", indices)
    return StoreSource(store, model.max_len, model.truncate)


def test_full_finetune_writes_weights_head_and_base_reference(work, tmp_path):
    out, base = work["full"].out, work["base"]
    assert {p.name for p in out.iterdir()} == {
        ".healthfm.json",  # the marker: healthfm wrote it (and may replace it)
        "model.safetensors",
        FINETUNED_REF,
        "training_info.json",
    }
    ref = json.loads((out / FINETUNED_REF).read_text())
    assert ref["base_model"]["spec"] == f"tinydna:{base.resolve()}"
    assert ref["base_model"]["model_hash"] == load_encoder(work["spec"]).model_hash
    assert ref["modality"] == "dna" and ref["task_head"]["classes"] == ["non_promoter", "promoter"]
    info = json.loads((out / "training_info.json").read_text())
    assert info["finetune"]["method"] == "full"
    assert info["finetune"]["base_model"] == ref["base_model"]["spec"]
    # The weights are the encoder's (prefixed) and the head's; the encoder's were trained.
    state = load_file(out / "model.safetensors")
    base_state = load_file(base / "model.safetensors")
    assert set(state) == {f"encoder.{k}" for k in base_state} | {
        "task_head.weight",
        "task_head.bias",
    }
    assert not torch.equal(
        state["encoder.blocks.1.attn.q.weight"], base_state["blocks.1.attn.q.weight"]
    )


def test_full_finetune_reloads_to_its_own_predictions_and_embeddings(work, tmp_path):
    result = work["full"]
    model = load_encoder(result.out)
    assert isinstance(model, EncoderTaskModel) and model.name == "tinydna"
    assert model.model_hash == sha256_file(result.out / "model.safetensors")
    source = rows_source(model, result.test_indices, tmp_path)
    np.testing.assert_allclose(predict(model, source), result.test_scores, atol=1e-5)
    # `healthfm embed` of the folder: the fine-tuned encoder's vectors, which a TinyDna
    # built from the saved weights (without healthfm's loader) reproduces.
    emb_path = tmp_path / "e.npy"
    assert cli.main(["embed", str(result.out), str(promoters()), "--out", str(emb_path)]) == 0
    emb = np.load(emb_path)
    state = load_file(result.out / "model.safetensors")
    rebuilt = load_tiny(work["base"])
    rebuilt.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("encoder.")})
    modality = get_modality("dna")
    samples = modality.read(promoters(), modality.options({}))
    store = modality.tokenize(rebuilt.tokenizer, samples, tmp_path / "all")
    np.testing.assert_allclose(emb, embed_store(rebuilt, store), atol=1e-5)
    base_emb = embed(work["spec"], promoters(), tmp_path / "b.npy")
    assert not np.allclose(np.load(base_emb), emb, atol=1e-3)


def test_lora_adapter_records_the_base_spec_and_leaves_it_untouched(work, tmp_path):
    out, base = work["lora"].out, work["base"]
    weights_before = sha256_file(base / "model.safetensors")
    assert folder_kind(out) == ADAPTER
    ref = json.loads((out / BASE_REF).read_text())
    assert ref["base_model"]["spec"] == f"tinydna:{base.resolve()}"
    assert ref["base_model"]["encoder"] == "tinydna" and ref["modality"] == "dna"
    # The default rule: every Linear inside the blocks (attention q/k/v/o and the MLP).
    targets = json.loads((out / ADAPTER_CONFIG).read_text())["target_modules"]
    per_block = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.0", "mlp.2"]
    assert sorted(targets) == sorted(f"encoder.blocks.{i}.{n}" for i in range(2) for n in per_block)
    model = load_encoder(out)
    assert model.base_model_hash == ref["base_model"]["model_hash"]
    source = rows_source(model, work["lora"].test_indices, tmp_path)
    np.testing.assert_allclose(predict(model, source), work["lora"].test_scores, atol=1e-5)
    merged = load_adapter(out, merge=True)
    np.testing.assert_allclose(predict(merged, source), work["lora"].test_scores, atol=1e-4)
    # Base weights inside the adapted model are the base folder's, bit for bit.
    base_state = load_file(base / "model.safetensors")
    inner = model.encoder.state_dict()
    assert torch.equal(inner["tokens.weight"], base_state["tokens.weight"])
    assert torch.equal(
        inner["blocks.0.attn.q.base_layer.weight"], base_state["blocks.0.attn.q.weight"]
    )
    assert sha256_file(base / "model.safetensors") == weights_before


def test_evaluate_scores_finetuned_encoders_on_the_same_rows(work, tmp_path):
    full, lora = work["full"], work["lora"]
    rows = evaluate(
        work["spec"],
        promoters(),
        tmp_path / "ev",
        {},
        seeds=[0],
        n_boot=20,
        echo=False,
        finetuned=[full.out, lora.out],
    )
    by_method = {(r.method, r.metric): r for r in rows}
    for result, method in ((full, "tinydna-finetune-full"), (lora, "tinydna-finetune-lora")):
        row = by_method[(method, "auroc")]
        assert row.n_test == len(result.test_indices)
        assert row.value == pytest.approx(result.test_metrics["auroc"]["value"], abs=1e-9)
    assert ("tinydna-mean+logreg", "auroc") in by_method
    # The fine-tuned folder evaluated as the model adds its own predictions.
    own = evaluate(
        full.out,
        promoters(),
        tmp_path / "own",
        {},
        seeds=[0],
        n_boot=20,
        echo=False,
        include_baselines=False,
    )
    assert {"tinydna-finetune-full", "tinydna-mean+logreg"} <= {r.method for r in own}


def test_moved_or_changed_base_folder(work, tmp_path):
    # Base and outputs moved together: found through the relative path.
    moved = tmp_path / "moved"
    for name in ("base", "full", "lora"):
        shutil.copytree(work["root"] / name, moved / name)
    for name in ("full", "lora"):
        assert (
            load_encoder(moved / name).base_model_hash
            == load_encoder(f"tinydna:{moved / 'base'}").model_hash
        )
    # Other weights in the base folder: refused, naming the reference file.
    state = load_file(moved / "base" / "model.safetensors")
    state["norm.bias"] = state["norm.bias"] + 0.5
    save_file(state, moved / "base" / "model.safetensors")
    with pytest.raises(ModelError, match="trained on base model") as err:
        load_encoder(moved / "full")
    assert err.value.file.endswith(FINETUNED_REF)
    with pytest.raises(ModelError, match="trained on base model"):
        load_encoder(moved / "lora")
    # No base folder at all (nor at the recorded absolute path).
    alone = tmp_path / "alone"
    shutil.copytree(moved / "full", alone / "full")
    ref = json.loads((alone / "full" / FINETUNED_REF).read_text())
    ref["base_model"]["path"] = str(tmp_path / "gone")
    (alone / "full" / FINETUNED_REF).write_text(json.dumps(ref))
    with pytest.raises(ModelError, match="is missing"):
        load_encoder(alone / "full")


def test_freeze_layers_on_exposed_blocks_and_refused_without(work, tmp_path):
    config = FinetuneConfig(epochs=1, lr=3e-3, batch_size=16, freeze_layers=1)
    result = finetune(
        work["spec"], promoters(), tmp_path / "frozen", {}, config, n_boot=10, echo=False
    )
    state = load_file(result.out / "model.safetensors")
    base_state = load_file(work["base"] / "model.safetensors")
    for name in (
        "tokens.weight",
        "positions.weight",
        "blocks.0.attn.q.weight",
        "blocks.0.mlp.2.bias",
    ):
        assert torch.equal(state[f"encoder.{name}"], base_state[name]), name
    for name in ("blocks.1.attn.q.weight", "norm.weight"):
        assert not torch.equal(state[f"encoder.{name}"], base_state[name]), name
    # LoRA after frozen blocks adapts only the later ones.
    model = EncoderTaskModel(load_encoder(work["spec"]), {"n_outputs": 1})
    assert all(t.startswith("encoder.blocks.1.") for t in lora_targets(model, first_layer=1))
    with pytest.raises(ConfigError, match=r"outside 0\.\.2"):
        finetune(work["spec"], promoters(), tmp_path / "x", {}, FinetuneConfig(freeze_layers=3))
    # An encoder that exposes no blocks refuses --freeze-layers, but takes LoRA on its
    # layer list (the Linear modules inside any ModuleList).
    flat = write_folder(tmp_path / "flat", FlatDna)
    with pytest.raises(ConfigError, match="exposes none") as err:
        finetune(f"tinydna-flat:{flat}", promoters(), tmp_path / "y", {}, config)
    assert err.value.column == "freeze_layers"
    model = EncoderTaskModel(load_encoder(f"tinydna-flat:{flat}"), {"n_outputs": 1})
    targets = lora_targets(model)
    assert len(targets) == 12 and all(t.startswith("encoder.layers.") for t in targets)


def test_declared_lora_targets_win(work):
    model = EncoderTaskModel(load_encoder(work["spec"]), {"n_outputs": 1})
    model.encoder.lora_targets = (r"blocks\.\d+\.attn\.(q|v)",)
    assert lora_targets(model) == [f"encoder.blocks.{i}.attn.{n}" for i in range(2) for n in "qv"]
    model.encoder.lora_targets = (r"nothing",)
    with pytest.raises(ConfigError, match="no linear layer"):
        lora_targets(model)


def test_cli_finetunes_name_colon_dir(work, tmp_path, capsys):
    out = tmp_path / "cli-lora"
    argv = ["finetune", work["spec"], str(promoters()), "--out", str(out), "--lora"]
    argv += ["--epochs", "1", "--lora-rank", "2", "--n-boot", "10", "--no-checkpoints"]
    assert cli.main(argv) == 0
    assert folder_kind(out) == ADAPTER and "wrote" in capsys.readouterr().out
    # Fine-tuning a fine-tuned encoder's folder again: its base is that folder.
    argv = ["finetune", str(work["full"].out), str(promoters()), "--out", str(tmp_path / "again")]
    assert cli.main([*argv, "--epochs", "1", "--n-boot", "10", "--no-checkpoints"]) == 0
    again = load_encoder(tmp_path / "again")
    assert again.base_model_hash == sha256_file(work["full"].out / "model.safetensors")


def test_an_encoder_without_model_hash_is_refused(work, tmp_path):
    def unhashed(path):
        encoder = load_tiny(path)
        encoder.model_hash = None
        return encoder

    register_encoder("tinydna-unhashed", unhashed, modality="dna")
    with pytest.raises(ModelError, match="no model_hash"):
        finetune(f"tinydna-unhashed:{work['base']}", promoters(), tmp_path / "x", {}, FULL)
    assert not (tmp_path / "x").exists()

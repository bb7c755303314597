"""healthfm.loader tells every kind of model folder apart once and reads what it records
once; the encoder registry below it stays a leaf."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from healthfm.errors import ModelError
from healthfm.loader import (
    ADAPTER,
    BASE_REF,
    FINETUNED_ENCODER,
    FINETUNED_REF,
    HEALTHFM,
    finetuned_spec,
    folder_kind,
    folder_modality,
    load,
    open_base,
    read_reference,
    read_training_info,
)
from healthfm.model import FoundationModel, ModelConfig
from healthfm.model.pretrained import save_pretrained

SPEC = {"task": "binary", "classes": [0, 1], "pooling": "mean", "n_outputs": 1}
BASE = {"encoder": "healthfm", "path": "/nowhere", "model_hash": "ab" * 32}


@pytest.fixture
def model_dir(tmp_path) -> Path:
    config = ModelConfig(modality="test", vocab_size=8, d_model=16, n_heads=2, d_ff=32, n_layers=1)
    info = {"split_salt": "s", "split_fractions": [0.8, 0.1, 0.1], "finetune": {"method": "x"}}
    return save_pretrained(FoundationModel(config), tmp_path / "m", info=info)


def _adapter(folder: Path) -> Path:
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    ref = {"base_model": BASE, "task_head": SPEC, "modality": "dna", "split_salt": "a"}
    (folder / BASE_REF).write_text(json.dumps(ref))
    return folder


def _finetuned_encoder(folder: Path) -> Path:
    folder.mkdir()
    ref = {"base_model": {**BASE, "encoder": "clmbr-t-base"}, "task_head": SPEC, "modality": "ehr"}
    (folder / FINETUNED_REF).write_text(json.dumps(ref))
    (folder / "training_info.json").write_text(json.dumps({"split_salt": "f"}))
    return folder


def test_each_kind_of_folder_is_told_apart_and_read_once(model_dir, tmp_path):
    adapter, tuned = _adapter(tmp_path / "a"), _finetuned_encoder(tmp_path / "f")
    assert [folder_kind(p) for p in (model_dir, adapter, tuned)] == [
        HEALTHFM,
        ADAPTER,
        FINETUNED_ENCODER,
    ]
    # training_info.json first; an adapter records its split in its reference file.
    assert read_training_info(model_dir)["split_salt"] == "s"
    assert read_training_info(load(model_dir))["split_salt"] == "s"  # a loaded model: its folder
    assert read_training_info(adapter)["split_salt"] == "a"
    assert read_training_info(tuned)["split_salt"] == "f"
    assert read_training_info(tmp_path) == {} and read_training_info(object()) == {}
    assert finetuned_spec(adapter) == SPEC == finetuned_spec(tuned)
    assert read_reference(tuned)["base_model"]["encoder"] == "clmbr-t-base"
    assert (folder_modality(adapter), folder_modality(tuned), folder_modality(model_dir)) == (
        "dna",
        "ehr",
        "test",
    )


def test_invalid_records_are_model_errors_naming_the_file(model_dir, tmp_path):
    (model_dir / "training_info.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"training_info\.json is not valid JSON") as err:
        read_training_info(model_dir)
    assert err.value.file == str(model_dir / "training_info.json")
    tuned = _finetuned_encoder(tmp_path / "f")
    (tuned / FINETUNED_REF).write_text(json.dumps({"base_model": {}}))
    with pytest.raises(ModelError, match="invalid healthfm_finetuned"):
        read_reference(tuned)
    with pytest.raises(ModelError, match="no task_head"):
        finetuned_spec(model_dir)


def test_an_adapter_is_no_base_to_fine_tune(tmp_path):
    with pytest.raises(ModelError, match="LoRA adapter is no base model"):
        open_base("healthfm", _adapter(tmp_path / "a"))


def test_the_registry_opens_no_folder_itself():
    # The registry lists healthfm's own folders, but leaves opening them to the loader: it
    # is never imported by listing or resolving encoders (the import contract
    # "encoders-leaf" forbids the import statically).
    src = Path(__file__).resolve().parents[1] / "src"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
    }
    code = (
        "import sys\n"
        "from healthfm.encoders import entries, split_spec\n"
        "assert entries()['healthfm'].loader is None\n"
        "assert split_spec('clmbr-t-base:/x')[0] == 'clmbr-t-base'\n"
        "print('healthfm.loader' in sys.modules)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "False"

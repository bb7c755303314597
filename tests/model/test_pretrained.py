import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import healthfm
from healthfm.errors import ModelError
from healthfm.model.pretrained import save_pretrained
from helpers import tiny_model


def test_round_trip_identical_outputs(tmp_path):
    model = tiny_model()
    save_pretrained(model, tmp_path / "m", info={"note": "x"})
    again = healthfm.load(tmp_path / "m")
    ids = torch.randint(5, 12, (2, 9))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), again(ids), rtol=0, atol=0)
    assert again.config == model.config
    assert len(again.model_hash) == 64
    assert json.loads((tmp_path / "m" / "training_info.json").read_text())["note"] == "x"


def _saved(tmp_path, checksums: bool = False):
    """A saved model folder; without ``checksums`` its marker is removed (as a folder of
    an earlier version has none), so the strict checks below the checksums are reached."""
    save_pretrained(tiny_model(), tmp_path / "m")
    if not checksums:
        (tmp_path / "m" / ".healthfm.json").unlink()
    return tmp_path / "m"


def test_flipped_bit_in_weights_is_caught(tmp_path):
    # The case: one weight 0.0335 -> 34.35 by a flipped exponent bit loads
    # silently without checksums; with them it is refused, naming the file.
    folder = _saved(tmp_path, checksums=True)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x08
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="SHA-256 differs") as err:
        healthfm.load(folder)
    assert err.value.file == str(weights)


def test_every_file_is_checked(tmp_path):
    folder = _saved(tmp_path, checksums=True)
    marker = json.loads((folder / ".healthfm.json").read_text())
    assert set(marker["sha256"]) == {"config.json", "model.safetensors"}  # no tokenizer here
    assert marker["kind"] == "model"
    healthfm.load(folder)  # intact: loads
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")
    with pytest.raises(ModelError, match=r"config\.json"):
        healthfm.load(folder)


def test_folder_of_an_earlier_version_loads_with_a_warning(tmp_path, caplog):
    folder = _saved(tmp_path, checksums=False)
    with caplog.at_level("WARNING", logger="healthfm"):
        model = healthfm.load(folder)
    assert len(model.model_hash) == 64
    assert "cannot be checked" in caplog.text and str(folder) in caplog.text


def test_damaged_marker_is_an_error(tmp_path):
    folder = _saved(tmp_path, checksums=True)
    (folder / ".healthfm.json").write_text("{not json")
    with pytest.raises(ModelError, match="damaged"):
        healthfm.load(folder)


def test_missing_tensor(tmp_path):
    folder = _saved(tmp_path)
    state = load_file(folder / "model.safetensors")
    state.pop("head.decoder.bias")
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ModelError, match="missing"):
        healthfm.load(folder)


def test_extra_tensor(tmp_path):
    folder = _saved(tmp_path)
    state = load_file(folder / "model.safetensors")
    state["surprise"] = torch.zeros(2)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ModelError, match="unexpected"):
        healthfm.load(folder)


def test_misshaped_tensor(tmp_path):
    folder = _saved(tmp_path)
    state = load_file(folder / "model.safetensors")
    state["head.decoder.bias"] = torch.zeros(3)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ModelError, match="shape") as err:
        healthfm.load(folder)
    assert "head.decoder.bias" in str(err.value)


def test_newer_format(tmp_path):
    folder = _saved(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["format_version"] = 99
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="newer"):
        healthfm.load(folder)


def test_unknown_config_field(tmp_path):
    folder = _saved(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["flux_capacitor"] = True
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="unknown fields"):
        healthfm.load(folder)


def test_truncated_weights(tmp_path):
    folder = _saved(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="corrupt or truncated"):
        healthfm.load(folder)


def test_unknown_objective(tmp_path):
    folder = _saved(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["objective"] = "diffusion"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"unknown objective 'diffusion'.*masked") as err:
        healthfm.load(folder)
    assert err.value.column == "objective" and err.value.file.endswith("config.json")


def test_other_modality(tmp_path):
    folder = _saved(tmp_path)
    with pytest.raises(ModelError, match="modality 'test'"):
        healthfm.load(folder, modality="dna")


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ModelError, match=r"config\.json is missing"):
        healthfm.load(tmp_path)
    with pytest.raises(ModelError, match="does not exist"):
        healthfm.load(tmp_path / "nope")


def test_failed_save_keeps_previous(tmp_path, monkeypatch):
    folder = _saved(tmp_path, checksums=True)  # a folder without the marker is never replaced
    before = (folder / "model.safetensors").read_bytes()
    import healthfm.model.pretrained as pre

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pre, "save_file", boom)
    with pytest.raises(OSError):
        save_pretrained(tiny_model(), folder)
    assert (folder / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_permissions_follow_the_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        save_pretrained(tiny_model(), tmp_path / "shared")
    finally:
        os.umask(old)
    folder = tmp_path / "shared"
    assert folder.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o644}
    old = os.umask(0o077)
    try:
        save_pretrained(tiny_model(), tmp_path / "private")
    finally:
        os.umask(old)
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "private" / "model.safetensors").stat().st_mode & 0o777 == 0o600


def test_weights_file_is_byte_identical_across_saves(tmp_path):
    # model_hash is the SHA-256 of model.safetensors: saving the same weights twice (in two
    # processes, whose hash-map order differs) must give the same bytes.
    import subprocess
    import sys

    code = (
        "import sys, torch; from healthfm.model import FoundationModel, ModelConfig;"
        "from healthfm.model.pretrained import save_pretrained;"
        "torch.manual_seed(0);"
        "m = FoundationModel(ModelConfig(modality='dna', vocab_size=8, d_model=16, n_layers=1,"
        " n_heads=2, d_ff=32)); save_pretrained(m, sys.argv[1])"
    )
    digests = set()
    for i in range(4):
        out = tmp_path / f"m{i}"
        subprocess.run([sys.executable, "-c", code, str(out)], check=True)
        digests.add((out / "model.safetensors").read_bytes())
    assert len(digests) == 1

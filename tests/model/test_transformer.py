import pytest
import torch

from healthfm.errors import ConfigError
from healthfm.model import PRESETS, FoundationModel, ModelConfig, pool
from healthfm.model.transformer import apply_rotary, rotary_tables
from helpers import tiny_model


def test_shapes_and_presets():
    for name in PRESETS:
        config = ModelConfig.from_preset(name, modality="t", vocab_size=20, max_len=16)
        assert config.d_model == PRESETS[name]["d_model"]
    model = tiny_model()
    ids = torch.randint(5, 12, (3, 9))
    assert model(ids).shape == (3, 9, 32)


def test_causal_model_never_looks_ahead():
    model = tiny_model("causal")
    ids = torch.randint(5, 12, (2, 20))
    changed = ids.clone()
    changed[:, 12:] = torch.randint(5, 12, (2, 8))
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_bidirectional_model_sees_both_sides():
    model = tiny_model("masked")
    ids = torch.randint(5, 12, (1, 20))
    changed = ids.clone()
    changed[0, 15] = 5 if ids[0, 15] != 5 else 6
    with torch.no_grad():
        assert not torch.allclose(model(ids)[:, :10], model(changed)[:, :10])


@pytest.mark.parametrize("objective", ["masked", "causal"])
def test_padding_does_not_change_real_tokens(objective):
    model = tiny_model(objective)
    ids = torch.randint(5, 12, (1, 10))
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 10, dtype=torch.bool), torch.zeros(1, 6, dtype=torch.bool)], 1)
    with torch.no_grad():
        alone = model(ids)
        with_pad = model(padded, mask)[:, :10]
    torch.testing.assert_close(alone, with_pad, rtol=1e-5, atol=1e-5)


def test_rotary_is_relative():
    # q·k after rotation depends only on the distance between positions.
    cos, sin = rotary_tables(32, 8, 10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(i, j):
        qi = apply_rotary(q.view(1, 1, 1, 8), cos[i : i + 1], sin[i : i + 1])
        kj = apply_rotary(k.view(1, 1, 1, 8), cos[j : j + 1], sin[j : j + 1])
        return (qi * kj).sum()

    torch.testing.assert_close(score(3, 1), score(13, 11), rtol=1e-4, atol=1e-5)


def test_values_times_and_patches_enter_the_embedding():
    model = tiny_model(use_values=True, use_times=True, input_dim=6)
    ids = torch.randint(5, 12, (2, 7))
    values = torch.full((2, 7), float("nan"))
    times = torch.full((2, 7), float("nan"), dtype=torch.float64)
    with torch.no_grad():
        base = model(ids, values=values, times=times)
        # NaN means "absent": same as passing nothing
        torch.testing.assert_close(base, model(ids))
        values[0, 3] = 2.5
        times[1, 2] = 365.0
        changed = model(ids, values=values, times=times)
        assert not torch.allclose(base[0], changed[0])
        assert not torch.allclose(base[1], changed[1])
        patched = model(ids, inputs=torch.randn(2, 7, 6))
        assert not torch.allclose(base, patched)


def test_pooling():
    hidden = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    torch.testing.assert_close(pool(hidden, mask, "cls"), hidden[:, 0])
    torch.testing.assert_close(
        pool(hidden, mask, "last"), torch.stack([hidden[0, 1], hidden[1, 2]])
    )
    torch.testing.assert_close(pool(hidden, mask, "mean")[0], hidden[0, :2].mean(0))
    with pytest.raises(ValueError):
        pool(hidden, mask, "max")


def test_config_validation():
    with pytest.raises(ConfigError):
        ModelConfig(modality="t", vocab_size=5, d_model=30, n_heads=4)
    with pytest.raises(ConfigError):
        ModelConfig(modality="t", vocab_size=5, objective="")
    # Whether an objective is registered is checked where the model is built (a config.json
    # is read before the package registering its objective may be imported).
    with pytest.raises(ConfigError, match=r"unknown objective 'diffusion'; registered: .*causal"):
        FoundationModel(ModelConfig(modality="t", vocab_size=5, objective="diffusion"))
    with pytest.raises(ConfigError):
        ModelConfig.from_preset("gigantic", modality="t", vocab_size=5)


def test_too_long_input_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="max_len"):
        model(torch.randint(5, 12, (1, 65)))


def test_parameter_counts_are_documented_sizes():
    model = FoundationModel(ModelConfig.from_preset("tiny", modality="t", vocab_size=8))
    backbone = sum(
        p.numel() for n, p in model.backbone.named_parameters() if not n.startswith("embed.tokens")
    )
    assert backbone == 793_344

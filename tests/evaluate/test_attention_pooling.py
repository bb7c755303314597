"""Learned attention pooling of a fine-tuned task head."""

from __future__ import annotations

import pytest
import torch

from healthfm.errors import ConfigError
from healthfm.evaluate.task_head import pooled_rows, with_task_head
from healthfm.model.heads import FoundationModel, pool
from healthfm.stages.finetune import FinetuneConfig, _validate
from helpers import tiny_model


def _spec(pooling: str) -> dict:
    return {"task": "binary", "pooling": pooling, "n_outputs": 1}


def test_task_model_with_attention_pool_starts_as_the_mean_and_round_trips():
    base = tiny_model().eval()
    model = with_task_head(base, _spec("attention")).eval()
    assert model.task_pool is not None
    ids = torch.tensor([[1, 4, 5, 6], [1, 7, 0, 0]])
    batch = {"ids": ids, "attention_mask": ids != 0}
    hidden = model.forward_batch(batch)
    out = pooled_rows(model, batch, "attention")
    assert torch.allclose(out, pool(hidden, batch["attention_mask"], "mean"), atol=1e-6)
    # Strict loading rebuilds the pool from the config (its weights are saved).
    with torch.no_grad():
        model.task_pool.score.weight.normal_()
    again = FoundationModel(model.config)
    again.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(again.task_pool.score.weight, model.task_pool.score.weight)
    # Re-fine-tuning with another pooling drops the old pool.
    plain = with_task_head(model, _spec("mean"))
    assert plain.task_pool is None


def test_attention_pooling_refused_where_it_cannot_work():
    model = with_task_head(tiny_model(), _spec("mean"))
    batch = {"ids": torch.tensor([[1, 4]]), "attention_mask": torch.tensor([[True, True]])}
    with pytest.raises(ConfigError, match="attention pooling"):
        pooled_rows(model, batch, "attention")  # no pool was built
    attn = with_task_head(tiny_model(), _spec("attention"))
    rows = {**batch, "row_seq": torch.tensor([0]), "row_pos": torch.tensor([1])}
    with pytest.raises(ConfigError, match="prediction-time"):
        pooled_rows(attn, rows, "attention")
    with pytest.raises(ConfigError, match="--pooling must be one of"):
        _validate(FinetuneConfig(pooling="concat"), n_layers=2, encoder_name="tiny")

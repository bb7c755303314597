"""Tiny Nucleotide Transformer folders in exactly the published layouts (for the tests and
the benchmark): the authors' ``config.json`` with reduced sizes, the authors' vocabularies,
``tokenizer_config.json``/``special_tokens_map.json`` as their folders hold them, and
random weights under the checkpoint keys ``EsmForMaskedLM`` (v1) or the v2 remote code
(``modeling_esm.py``: gated FFN, per-layer rotary ``inv_freq``, an unused absolute table)
saves.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch

# The authors' JAX tokenizers (nucleotide_transformer/tokenizers.py): k-mers are
# itertools.product over NUCLEOTIDES = ["A", "T", "C", "G"], then the single nucleotides
# and EXTRA_NUCLEOTIDES = ["N"].
_KMERS = ["".join(p) for p in itertools.product("ATCG", repeat=6)]
#: v1 (compute_dcnuc_tokens_to_ids): <eos>/<bos> last; the model embeds the first 4,105.
VOCAB_V1 = ["<unk>", "<pad>", "<mask>", "<cls>", *_KMERS, *"ATCGN", "<eos>", "<bos>"]
#: v2 (compute_tokens_to_ids_v2): all six specials first.
VOCAB_V2 = ["<unk>", "<pad>", "<mask>", "<cls>", "<eos>", "<bos>", *_KMERS, *"ATCGN"]

#: InstaDeepAI/nucleotide-transformer-500m-human-ref config.json, sizes reduced.
CONFIG_V1 = {
    "architectures": ["EsmForMaskedLM"],
    "attention_probs_dropout_prob": 0.0,
    "emb_layer_norm_before": False,
    "esmfold_config": None,
    "hidden_dropout_prob": 0.0,
    "hidden_size": 1280,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "is_folding_model": False,
    "layer_norm_eps": 1e-12,
    "mask_token_id": 2,
    "max_position_embeddings": 1002,
    "model_type": "esm",
    "num_attention_heads": 20,
    "num_hidden_layers": 24,
    "pad_token_id": 1,
    "position_embedding_type": "absolute",
    "tie_word_embeddings": False,
    "token_dropout": True,
    "torch_dtype": "float32",
    "transformers_version": "4.29.0.dev0",
    "use_cache": False,
    "vocab_list": None,
    "vocab_size": 4105,
}
#: InstaDeepAI/nucleotide-transformer-v2-100m-multi-species config.json (no model_type:
#: its auto_map names the folder's own esm_config.EsmConfig).
CONFIG_V2 = {
    "add_bias_fnn": False,
    "architectures": [
        "EsmForMaskedLM",
        "EsmForTokenClassification",
        "EsmForSequenceClassification",
    ],
    "attention_probs_dropout_prob": 0.0,
    "auto_map": {
        "AutoConfig": "esm_config.EsmConfig",
        "AutoModelForMaskedLM": "modeling_esm.EsmForMaskedLM",
        "AutoModelForTokenClassification": "modeling_esm.EsmForTokenClassification",
        "AutoModelForSequenceClassification": "modeling_esm.EsmForSequenceClassification",
    },
    "emb_layer_norm_before": False,
    "esmfold_config": None,
    "hidden_dropout_prob": 0.0,
    "hidden_size": 512,
    "initializer_range": 0.02,
    "intermediate_size": 2048,
    "is_folding_model": False,
    "layer_norm_eps": 1e-12,
    "mask_token_id": 2,
    "max_position_embeddings": 2050,
    "num_attention_heads": 16,
    "num_hidden_layers": 22,
    "pad_token_id": 1,
    "position_embedding_type": "rotary",
    "tie_word_embeddings": False,
    "token_dropout": False,
    "torch_dtype": "float32",
    "transformers_version": "4.32.0.dev0",
    "use_cache": False,
    "vocab_list": None,
    "vocab_size": 4107,
}
TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
}


def state_dict(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the published checkpoint keys of ``config``."""
    g = torch.Generator().manual_seed(seed)
    h, inner, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    v2 = "add_bias_fnn" in config
    bias = config.get("add_bias_fnn", True)

    def normal(*shape, std=0.05, mean=0.0):
        return mean + std * torch.randn(*shape, generator=g)

    state = {"esm.embeddings.word_embeddings.weight": normal(config["vocab_size"], h, std=0.5)}
    # Both implementations create the absolute table (v2's never reads it).
    state["esm.embeddings.position_embeddings.weight"] = normal(
        config["max_position_embeddings"], h, std=0.5
    )
    if not v2:
        # EsmForMaskedLM saves of transformers 4.29 kept this buffer.
        state["esm.embeddings.position_ids"] = torch.arange(config["max_position_embeddings"])[None]
    head = h // config["num_attention_heads"]
    for i in range(n):
        p = f"esm.encoder.layer.{i}."
        for name in ("query", "key", "value"):
            state[p + f"attention.self.{name}.weight"] = normal(h, h, std=0.3)
            state[p + f"attention.self.{name}.bias"] = normal(h)
        if v2:
            state[p + "attention.self.rotary_embeddings.inv_freq"] = 1.0 / (
                10000 ** (torch.arange(0, head, 2).float() / head)
            )
        state[p + "attention.output.dense.weight"] = normal(h, h, std=0.2)
        state[p + "attention.output.dense.bias"] = normal(h)
        for ln in ("attention.LayerNorm", "LayerNorm"):
            state[p + ln + ".weight"] = normal(h, std=0.1, mean=1.0)
            state[p + ln + ".bias"] = normal(h)
        width = 2 * inner if v2 else inner
        state[p + "intermediate.dense.weight"] = normal(width, h, std=0.2)
        state[p + "output.dense.weight"] = normal(h, inner, std=0.2)
        if bias:
            state[p + "intermediate.dense.bias"] = normal(width)
            state[p + "output.dense.bias"] = normal(h)
    state["esm.encoder.emb_layer_norm_after.weight"] = normal(h, std=0.1, mean=1.0)
    state["esm.encoder.emb_layer_norm_after.bias"] = normal(h)
    heads = n * config["num_attention_heads"]
    state["esm.contact_head.regression.weight"] = normal(1, heads)
    state["esm.contact_head.regression.bias"] = normal(1)
    state["lm_head.dense.weight"] = normal(h, h)
    state["lm_head.dense.bias"] = normal(h)
    state["lm_head.layer_norm.weight"] = normal(h, mean=1.0)
    state["lm_head.layer_norm.bias"] = normal(h)
    state["lm_head.decoder.weight"] = normal(config["vocab_size"], h)
    state["lm_head.bias"] = normal(config["vocab_size"])
    return state


def write_folder(
    out: Path, version: str = "v1", seed: int = 0, weights: str = "safetensors", **sizes
) -> Path:
    """Write a published-layout folder of ``version`` ("v1"/"v2") with random weights."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {**(CONFIG_V1 if version == "v1" else CONFIG_V2), **TINY, **sizes}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    vocab = VOCAB_V1 if version == "v1" else VOCAB_V2
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    max_len = 1000 if version == "v1" else 2048
    tok_config = {
        "clean_up_tokenization_spaces": True,
        "eos_token": None,
        "model_max_length": max_len,
        "tokenizer_class": "EsmTokenizer",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    special = {
        "cls_token": "<cls>",
        "mask_token": "<mask>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    state = state_dict(config, seed)
    if weights == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    else:
        torch.save(state, out / "pytorch_model.bin")
    return out

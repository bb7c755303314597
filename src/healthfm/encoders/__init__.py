"""Encoders: anything that turns a batch of a modality's inputs into one vector per row.

:class:`Encoder` is the contract between models and the stages (embed, evaluate,
finetune). healthfm's own :class:`~healthfm.model.heads.FoundationModel` implements it;
published models (Geneformer, scGPT, Nucleotide Transformer, Phikon, UNI, CLMBR ...) are
native re-implementations (:class:`~healthfm.encoders.published.PublishedEncoder`) that
read their authors' folder layouts, registered with :func:`register_encoder`
(:func:`~healthfm.encoders.registry.entries`; ``healthfm models`` prints it).

A leaf package: it imports no stage, evaluation, loader or modality contract.
:func:`healthfm.loader.load_encoder` opens a healthfm model folder, a fine-tuned or LoRA
adapter folder, or ``NAME:DIR`` of any entry.
"""

from healthfm.encoders.base import (
    Encoder,
    describe,
    register_encoder,
    split_spec,
)
from healthfm.encoders.registry import EncoderEntry, entries, get_entry, register_entry

__all__ = [
    "Encoder",
    "EncoderEntry",
    "describe",
    "entries",
    "get_entry",
    "register_encoder",
    "register_entry",
    "split_spec",
]

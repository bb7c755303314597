"""Encoders: anything that turns a batch of a modality's inputs into one vector per row.

:class:`Encoder` is the contract between models and the stages (embed, evaluate,
finetune). healthfm's own :class:`~healthfm.model.heads.FoundationModel` implements it;
published models (Geneformer, scGPT, Nucleotide Transformer, Phikon, UNI, CLMBR ...) are
native re-implementations (:class:`~healthfm.encoders.published.PublishedEncoder`) that
read their authors' folder layouts. :func:`load_encoder` opens a healthfm model folder,
a LoRA adapter folder, or ``NAME:DIR`` of any entry of the registry
(:func:`~healthfm.encoders.registry.entries`; ``healthfm models`` prints it).
"""

from healthfm.encoders.base import (
    Encoder,
    describe,
    load_encoder,
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
    "load_encoder",
    "register_encoder",
    "register_entry",
    "split_spec",
]

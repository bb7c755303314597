"""Encoders: anything that turns a batch of a modality's inputs into one vector per row.

:class:`Encoder` is the contract between models and the stages (embed, evaluate,
finetune). healthfm's own :class:`~healthfm.model.heads.FoundationModel` implements it;
:func:`load_encoder` opens a healthfm model folder (or a LoRA adapter folder onto its
base). Published models (Geneformer, scGPT, Nucleotide Transformer, Phikon, UNI ...) will
register loaders for their authors' folder layouts in :data:`ENCODERS`, reached as
``NAME:DIR``.
"""

from healthfm.encoders.base import ENCODERS, Encoder, describe, load_encoder, register_encoder

__all__ = ["ENCODERS", "Encoder", "describe", "load_encoder", "register_encoder"]

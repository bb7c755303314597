"""The stages of one flow: pretrain, embed, evaluate, finetune (each read top to bottom)."""

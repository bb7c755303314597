"""The stages of the pipeline (pretrain, embed, evaluate, finetune), each read top to bottom."""

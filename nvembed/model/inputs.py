"""Text -> model inputs: the model's own tokenisation (:mod:`nvembed.hf.inputs_nvembed`), named here for training's
collator. One copy: the exported model runs the same file."""

from ..hf.inputs_nvembed import build_prompt, is_full_prompt, tokenize

__all__ = ["build_prompt", "is_full_prompt", "tokenize"]

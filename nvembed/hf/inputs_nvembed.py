"""Text -> model inputs, with a pool mask that leaves instruction tokens out (torch only: training's collator uses it
without loading transformers; the export ships it next to ``modeling_nvembed.py``).

The prompt (e.g. ``Instruct: {task}\\nQuery: ``) and the text are tokenized together, so the model sees exactly what
an inference user sends; character offsets tell which tokens belong to the prompt. A token that straddles the
boundary counts as text. Works for right and left padding.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch


def is_full_prompt(instruction: str, template: str) -> bool:
    """True when ``instruction`` is already a whole prefix in the template's form (``Instruct: {task}\\nQuery: ``),
    as NV-Embed's ``encode(q, instruction=...)`` takes it; False for a bare task. Surrounding whitespace is ignored
    for the check only: a full prefix is then used exactly as given."""
    head, sep, tail = template.partition("{instruction}")
    head, tail, text = head.strip(), tail.strip(), instruction.strip()
    if not sep or not (head or tail):  # a template that adds nothing recognisable: every instruction is a task
        return False
    return text.startswith(head) and text.endswith(tail) and len(text) >= len(head) + len(tail)


def build_prompt(instruction: Optional[str], template: str) -> str:
    """The prompt before a query: a bare task wrapped in ``template``, a full prefix kept as given, so code written
    for NV-Embed (``instruction="Instruct: ...\\nQuery: "``) and for nvembed (``instruction="..."``) agree."""
    if not instruction:
        return ""
    if is_full_prompt(instruction, template):
        return instruction
    return template.format(instruction=instruction)


def tokenize(
    tokenizer,
    texts: Sequence[str],
    prompts: Optional[Sequence[str]] = None,
    *,
    max_length: int = 512,
    add_eos: bool = True,
    exclude_prompt: bool = True,
) -> Dict[str, torch.Tensor]:
    """Return ``input_ids``, ``attention_mask`` and ``pool_mask`` (attention mask minus prompt tokens).

    ``max_length`` bounds the whole row (BOS + prompt + text + EOS), as NV-Embed's ``encode(..., max_length)`` does:
    the prompt counts against it. Longer rows are cut on the right, but the EOS token is kept last when ``add_eos``
    (NV-Embed's tokenizer call cuts its appended EOS off instead; training here always ends a row with EOS).
    """
    prompts = list(prompts) if prompts is not None else [""] * len(texts)
    if len(prompts) != len(texts):
        raise ValueError("tokenize: one prompt per text")
    full = [p + t for p, t in zip(prompts, texts)]
    room = max_length - (1 if add_eos else 0)
    enc = tokenizer(full, add_special_tokens=True, truncation=True, max_length=room,
                    return_offsets_mapping=getattr(tokenizer, "is_fast", False))
    rows, prompt_lens = [], []
    for i, ids in enumerate(enc["input_ids"]):
        ids = list(ids)
        if add_eos and tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        n_prompt = 0
        if exclude_prompt and prompts[i]:
            if "offset_mapping" in enc:
                end = len(prompts[i])
                # special tokens (BOS) have offsets (0, 0) and sit before the prompt: count them as prompt
                n_prompt = sum(1 for (s, e) in enc["offset_mapping"][i] if e <= end)
            else:
                n_prompt = len(tokenizer(prompts[i], add_special_tokens=True)["input_ids"])
            n_prompt = min(n_prompt, len(ids) - 1)  # always pool at least one token
        rows.append(ids)
        prompt_lens.append(n_prompt)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    left = getattr(tokenizer, "padding_side", "right") == "left"
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    pool = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(zip(rows, prompt_lens)):
        start = width - len(ids) if left else 0
        input_ids[i, start:start + len(ids)] = torch.tensor(ids)
        attention[i, start:start + len(ids)] = 1
        pool[i, start + n_prompt:start + len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "pool_mask": pool}

"""What a checkpoint produces alone: HF transformers' greedy generate on that directory, one
prompt at a time, nothing else running. The prompt is encoded the way the front end encodes a
plain-text prompt (the tokenizer's special tokens added), and the text is decoded from the
tokens with the same `tokenizers` library the front end uses."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


def greedy_alone(checkpoint: Path, prompts: Sequence[str], max_tokens: int) -> dict[str, dict]:
    """{prompt: {"tokens": [...], "text": str}} for each prompt. Generation stops at max_tokens
    or at an EOS token, which is kept in tokens and left out of text (as the server does)."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per load would bury the summary

    tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32,
                                                 local_files_only=True).eval()
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    out = {}
    for prompt in prompts:
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=True).ids])  # [1, T]
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_tokens, do_sample=False, top_p=None,
                                 top_k=None, temperature=None)
        tokens = gen[0, ids.shape[1]:].tolist()
        if tokens and tokens[-1] in eos_ids:
            text_ids = tokens[:-1]
        else:
            text_ids = tokens
        out[prompt] = {"tokens": tokens, "text": tok.decode(text_ids, skip_special_tokens=False)}
    return out

"""`mesh generate`: text from a checkpoint or a Hugging Face folder, with the KV cache."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class Generation:
    text: str
    new_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)


def generate(model, tokenizer, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, use_cache: bool = True, seed: int = 0, min_new_tokens: int = 0) -> Generation:
    """Greedy when temperature is 0, else temperature / top-p sampling (seeded). `min_new_tokens`
    keeps generating past an end-of-text token (benchmarks compare equal lengths)."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
    sampling = temperature > 0
    options = dict(do_sample=True, temperature=temperature, top_p=top_p) if sampling else dict(do_sample=False)
    torch.manual_seed(seed)
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, use_cache=use_cache, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                             top_k=None, **options)
    seconds = time.perf_counter() - started
    new = out[0, ids.shape[1]:]
    return Generation(tokenizer.decode(out[0], skip_special_tokens=True), int(new.numel()), seconds)

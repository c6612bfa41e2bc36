"""`mesh eval ppl`: perplexity with the sliding-window method, per token and per byte.

The documents are read in order and joined into one token stream, each document followed by the
end-of-document token (as the training data is). Windows of `context` tokens start every
`stride` tokens (stride < context); each window scores only the tokens the previous window did
not, so every token after the first is scored exactly once, with between context - stride and
context - 1 tokens of context. context = seq_length + 1 with stride = seq_length is what
training's validation measures: each sequence of seq_length + 1 tokens scores its last
seq_length tokens on its own.

Bits per byte = total negative log-likelihood in bits / UTF-8 bytes of the scored text, which
does not depend on the tokenizer, so models with different vocabularies compare.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from data_prep.errors import DataError


@dataclass
class PerplexityResult:
    source: str
    documents: int
    tokens: int
    """Tokens scored."""
    bytes: int
    context: int
    stride: int
    nll_nats: float
    """Mean negative log-likelihood per scored token (nats)."""

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_nats)

    @property
    def bits_per_byte(self) -> float:
        return self.nll_nats * self.tokens / math.log(2) / max(self.bytes, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}

    def describe(self) -> str:
        return (f"{self.source}: {self.documents} documents, {self.tokens:,} tokens scored "
                f"(context {self.context}, stride {self.stride}): loss {self.nll_nats:.4f} nats/token, "
                f"perplexity {self.perplexity:.3f}, {self.bits_per_byte:.4f} bits/byte")


def shard_documents(prefix: str, max_documents: Optional[int]) -> list[list[int]]:
    """Token ids of each document of a megatron .bin/.idx prefix (or a manifest's shards)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from data_prep.outputs.data_prefixes import resolve_data_prefix
    from data_prep.outputs.megatron_shards import check_shard

    documents: list[list[int]] = []
    for shard in resolve_data_prefix(prefix):
        if not Path(shard.prefix + ".bin").is_file():
            raise DataError(f"data prefix {shard.prefix!r} has no .bin/.idx shard (nor a manifest); "
                            "prepare it with `mesh data tokenize`")
        check_shard(shard.prefix, shard.record, shard.manifest)
        dataset = IndexedDataset(shard.prefix)
        for i in range(len(dataset)):
            documents.append(dataset[i].tolist())
            if max_documents and len(documents) >= max_documents:
                return documents
    return documents


def jsonl_documents(path: str, tokenizer, max_documents: Optional[int], field: str = "text") -> list[list[int]]:
    """Documents of a .jsonl(.zst) file, tokenized, each followed by the end-of-text token (as
    data prep writes them)."""
    eos = tokenizer.eos_token_id
    return [tokenizer(text, add_special_tokens=False).input_ids + ([eos] if eos is not None else [])
            for text in read_jsonl_texts(path, max_documents, field)]


def _open_text(path: str):
    if path.endswith(".zst"):
        import io

        import zstandard

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")
    return open(path, encoding="utf-8")


def read_jsonl_texts(path: str, max_documents: Optional[int], field: str = "text") -> list[str]:
    texts = []
    try:
        with _open_text(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    raise DataError(f"{path}:{number} is not JSON; each line must be an object with a "
                                    f"{field!r} field") from None
                if not isinstance(record, dict) or not isinstance(record.get(field), str):
                    raise DataError(f"{path}:{number} has no string {field!r} field")
                texts.append(record[field])
                if max_documents and len(texts) >= max_documents:
                    break
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    return texts


def evaluate(model, documents: list[list[int]], decode, *, context: int, stride: int, batch_size: int = 8,
             source: str = "", progress: bool = True) -> PerplexityResult:
    """Sliding-window perplexity of `model` (a causal LM returning .logits) over the documents.
    `decode(ids)` gives a document's text, for the byte count."""
    if not documents:
        raise DataError(f"{source}: no documents to evaluate")
    if not 1 <= stride < context:
        raise ValueError(f"--stride {stride} must be in [1, --context {context}): each window scores only tokens "
                         "it has context for, so consecutive windows must overlap by at least one token")
    stream = [token for doc in documents for token in doc]
    total_bytes = sum(len(decode(doc).encode("utf-8")) for doc in documents)
    # (window start, number of new tokens scored at its end)
    windows, scored_until = [], 1  # token 0 has no context
    for start in range(0, len(stream) - 1, stride):
        end = min(start + context, len(stream))
        if end <= scored_until:
            continue
        windows.append((start, end, end - scored_until))
        scored_until = end
        if end == len(stream):
            break
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    from tqdm import tqdm

    with torch.no_grad(), tqdm(total=len(windows), desc="windows", disable=not progress, leave=False) as bar:
        for first in range(0, len(windows), batch_size):
            group = windows[first:first + batch_size]
            width = max(end - start for start, end, _ in group)
            ids = torch.zeros((len(group), width), dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            targets = torch.full((len(group), width), -100, dtype=torch.long)
            for row, (start, end, new) in enumerate(group):
                n = end - start  # right-padded: real tokens first, so positions start at 0
                ids[row, :n] = torch.tensor(stream[start:end])
                mask[row, :n] = 1
                targets[row, n - new:n] = ids[row, n - new:n]
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            # position i predicts token i + 1
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten().to(device),
                                   ignore_index=-100, reduction="sum")
            nll += float(loss)
            count += int((targets[:, 1:] != -100).sum())
            bar.update(len(group))
    return PerplexityResult(source, len(documents), count, total_bytes, context, stride, nll / max(count, 1))

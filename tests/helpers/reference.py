"""The monolithic truth for parity tests: the PyTorch model of a tiny HF directory, greedy
generation one prompt at a time and next-token log-probabilities."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Reference:
    """Greedy generation with the PyTorch model, one prompt at a time: the monolithic truth."""

    def __init__(self, hf_dir: Path):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        torch = self.torch
        ids = torch.tensor([prompt])
        out: list[int] = []
        past = None
        with torch.no_grad():
            for _ in range(n):
                r = self.model(input_ids=ids, past_key_values=past, use_cache=True)
                past = r.past_key_values
                nxt = int(r.logits[0, -1].argmax())
                out.append(nxt)
                ids = torch.tensor([[nxt]])
        return out

    def logprobs(self, tokens: list[int]) -> Any:
        """(L, V) float64 log-probabilities of the next token at every position of `tokens`, from
        one forward pass: row i - 1 scores tokens[i]."""
        torch = self.torch
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([tokens])).logits[0]  # (L, V)
        return torch.log_softmax(logits.double(), dim=-1).numpy()

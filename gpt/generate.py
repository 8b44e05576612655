"""Text generation. (Minimal full-recompute version; the KV-cache sampler replaces it.)"""

from __future__ import annotations

import torch


@torch.no_grad()
def generate_text(model, tokenizer, prompt="Once upon a time", max_length=100, temperature=1.0,
                  device="cpu", top_k=40, top_p=0.95):
    """Continue ``prompt`` until ``max_length`` tokens in all (prompt included); return the text."""
    model.eval()
    ids = tokenizer.encode(prompt) or [50256]
    idx = torch.tensor([ids], device=device)
    ctx = model.config.max_seq_length
    while idx.shape[1] < max_length:
        logits = model(idx[:, -ctx:])[:, -1, :].float()
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, -1)
            if top_p < 1.0:
                sp, si = probs.sort(-1, descending=True)
                drop = sp.cumsum(-1) - sp > top_p
                probs = probs.scatter(-1, si, sp.masked_fill(drop, 0.0))
            nxt = torch.multinomial(probs, 1)
        idx = torch.cat([idx, nxt], dim=1)
        if nxt.item() == 50256:
            break
    return tokenizer.decode(idx[0].tolist())

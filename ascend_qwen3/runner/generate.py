"""A small generation loop over the paged KV cache: batched prefill (optionally chunked) and
batched decode, greedy or temperature / top-k / top-p sampling with a seed."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .kv_cache import PagedKVCache


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0          # 0: greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0: no top-k cut
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must lie in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables it)")


@dataclass
class Generation:
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # fp32 [V] per generated token, if kept
    finished_by_stop: bool = False


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits [R, V] -> token ids [R]."""
    logits = logits.float()
    if p.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
        sorted_logits = sorted_logits.masked_fill(before >= p.top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model, prompts: list[list[int]], params: SamplingParams, *, block_size: int = 128,
             max_batch_tokens: int | None = None, keep_logits: bool = False,
             cache: PagedKVCache | None = None) -> list[Generation]:
    """Generate for a batch of tokenised prompts. Prefill packs all prompts into steps of at most
    ``max_batch_tokens`` tokens (chunked prefill when a prompt is longer); decode steps batch every
    unfinished sequence."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    cfg = model.config
    longest = max(len(p) for p in prompts) + params.max_new_tokens
    if longest > model.max_positions:
        raise ValueError(f"prompt + max_new_tokens = {longest} tokens exceeds the model's "
                         f"{model.max_positions} positions")
    if cache is None:
        blocks = sum(-(-(len(p) + params.max_new_tokens) // block_size) for p in prompts)
        cache = PagedKVCache(cfg, blocks, block_size, ctx=model.ctx,
                             device=model.rope_table.device)
    gen = None
    if params.temperature > 0:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(params.seed if params.seed is not None else torch.seed())
    device = model.rope_table.device
    results = [Generation(list(p)) for p in prompts]
    budget = max_batch_tokens or sum(len(p) for p in prompts)

    def step(batch: list[tuple[int, list[int]]]) -> torch.Tensor:
        positions, meta = cache.prepare([(sid, len(toks)) for sid, toks in batch])
        ids = torch.tensor([t for _, toks in batch for t in toks], dtype=torch.int64, device=device)
        hidden = model(ids, positions, meta, cache.caches)
        last = meta.query_start_loc[1:].long() - 1
        return model.compute_logits(hidden[last]).float().cpu()

    def take(sid: int, logits_row: torch.Tensor, token: int) -> None:
        r = results[sid]
        r.tokens.append(token)
        if keep_logits:
            r.logits.append(logits_row)
        if token in params.stop_token_ids:
            r.finished_by_stop = True

    # prefill, possibly chunked; a sequence's first token is sampled after its last chunk
    pending = [(sid, 0) for sid in range(len(prompts))]
    while pending:
        batch, used, nxt = [], 0, []
        for sid, done in pending:
            room = budget - used
            if room <= 0:
                nxt.append((sid, done))
                continue
            n = min(room, len(prompts[sid]) - done)
            batch.append((sid, prompts[sid][done:done + n]))
            used += n
            if done + n < len(prompts[sid]):
                nxt.append((sid, done + n))
        logits = step(batch)
        finished_prefill = [(i, sid) for i, (sid, toks) in enumerate(batch)
                            if sid not in {s for s, _ in nxt}]
        if finished_prefill:
            rows = torch.tensor([i for i, _ in finished_prefill])
            toks = sample(logits[rows], params, gen).tolist()
            for (i, sid), tok in zip(finished_prefill, toks):
                take(sid, logits[i], tok)
        pending = nxt

    active = [sid for sid, r in enumerate(results)
              if not r.finished_by_stop and len(r.tokens) < params.max_new_tokens]
    while active:
        logits = step([(sid, [results[sid].tokens[-1]]) for sid in active])
        toks = sample(logits, params, gen).tolist()
        for i, (sid, tok) in enumerate(zip(active, toks)):
            take(sid, logits[i], tok)
        active = [sid for sid in active
                  if not results[sid].finished_by_stop and len(results[sid].tokens) < params.max_new_tokens]
    for sid in range(len(prompts)):
        cache.release(sid)
    return results

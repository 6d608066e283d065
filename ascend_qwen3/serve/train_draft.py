"""Train the EAGLE-3 draft of the embedded default model (``make train-tiny``; shipped small).

The draft (``eagle3_draft.py``: vLLM's Llama EAGLE-3 head) learns to predict, from the target's
residual streams after layers 1, 2 and 3 and the next token's embedding, what the target itself
predicts one, two and three tokens further on. Its data is the target's own: the same samples
the target was trained on (``train_tiny.training_samples``, same seed), run through the trained
target (teacher forcing) for its hidden states and, at every position, its next-token
distribution, the draft's soft label (self-distillation: the draft is judged by agreeing with
the target, not with the corpus).

Training-time test (EAGLE-3, Li et al. 2025, section 3.2): the draft is unrolled for
``ttt_steps`` steps as vLLM runs it, so that steps 2 and 3 learn to work from the draft's own
output instead of the target's features. For an anchor position t:

- step 1 at position t: hidden ``fc(target features at t)``, token x[t+1]; attends to step-1 keys
  at positions <= t (the draft's cache holds keys made from the target's features for every
  accepted token); predicts the target's distribution at t+1;
- step j > 1 at position t+j-1: hidden = the previous step's output p (pre-norm), token
  x[t+j]; attends to step-1 keys <= t and to its own anchor's keys of steps 2..j (the keys vLLM's
  drafter writes at those positions in this round); predicts the target's distribution at t+j.

The tokens fed to steps 2..k are the corpus's (the target reproduces its corpus: it is what
it says). The loss weighs step j by 0.8^(j-1) over the answer positions (the tokens the server
generates; the prompt is never drafted).

The vocabulary: the draft's output layer covers the tokens of the training samples (the
shortlist the target was trained with, about 6k of the 151,936), mapped to target ids by ``d2t``;
its input embedding is the target's, shared at serving time.

Deterministic for a seed, PyTorch build and CPU, as ``train_tiny``.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass

import torch

from . import eagle3_draft
from . import train_tiny as tt

DRAFT_NAME = "qwen3-tiny-eagle3"
# bumped whenever the recipe or the export changes
DRAFT_RECIPE_VERSION = 1


@dataclass
class DraftRecipe:
    seed: int = 0
    steps: int = 500
    seq_len: int = 256
    batch: int = 8
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.01
    layer_ids: tuple = (1, 2, 3)      # the target's layers the draft reads (of its 4)
    ttt_steps: int = 3
    step_decay: float = 0.8
    documents: bool = False           # also the raw topic documents (the target's LM text)


def compact_draft_path(home: str) -> str:
    return os.path.join(home, "trained", DRAFT_NAME + ".compact.safetensors")


# shipped with the package beside the default model's weights (``train-tiny --package``)
PACKAGED_DRAFT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                              DRAFT_NAME + ".compact.safetensors")


def default_draft_source(home: str) -> str | None:
    """The compact draft file the default model's draft is exported from: the user's own
    ``train-tiny`` result, else the packaged one (None if neither)."""
    for src in (compact_draft_path(home), PACKAGED_DRAFT):
        if os.path.exists(src):
            return src
    return None


def target_from_compact(path: str):
    """The trained target as a transformers model on its compact vocabulary (fp32, eval), its
    shortlist and its info."""
    sd, short, info = tt.read_compact(path)
    model = tt.compact_model(info["kind"], len(short) + 1, 0)
    state = {k: v.float() for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise ValueError(f"compact target {path}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.float().eval(), short, info


TOP_LABELS = 8     # the target's most likely tokens kept per position as the draft's soft label


@torch.no_grad()
def target_features(target, ids: torch.Tensor, layer_ids) -> tuple[torch.Tensor, torch.Tensor,
                                                                     torch.Tensor]:
    """(features [B, T, 3H]: the residual streams after ``layer_ids`` layers, in order; the
    target's TOP_LABELS most likely draft-vocabulary ids [B, T, K] (the first its choice) and
    their probabilities, renormalised over those K)."""
    out = target.model(input_ids=ids, output_hidden_states=True)
    hs = out.hidden_states          # [0] embeddings, [i] after i layers (the last one normed)
    n = len(hs) - 1
    if any(not 0 <= i < n for i in layer_ids):
        raise ValueError(f"layer ids {layer_ids} must be below the target's {n} layers here "
                         f"(transformers returns the last one normed)")
    feats = torch.cat([hs[i] for i in layer_ids], -1)
    logits = target.lm_head(out.last_hidden_state)[..., :-1]    # the shared row is no draft id
    top = logits.topk(TOP_LABELS, dim=-1)
    return feats, top.indices, torch.softmax(top.values.float(), -1)


def _attend_ttt(draft, q, keys, values, step: int) -> torch.Tensor:
    """Step ``step`` (1-based) queries q [B, N, H, D] of anchors 0..N-1 over the step-1 keys of
    positions <= anchor (keys[0] [B, T, Hkv, D]) and the anchor's own keys of steps 2..step
    (keys[j] [B, N, Hkv, D])."""
    B, N, H, D = q.shape
    rep = H // draft.kv_heads
    k1 = keys[0].repeat_interleave(rep, 2)
    v1 = values[0].repeat_interleave(rep, 2)
    s1 = torch.einsum("bnhd,bshd->bhns", q, k1) / math.sqrt(D)
    T = k1.shape[1]
    causal = torch.arange(T, device=q.device)[None, :] <= torch.arange(N, device=q.device)[:, None]
    s1 = s1.masked_fill(~causal, float("-inf"))
    diag = [torch.einsum("bnhd,bnhd->bhn", q, k.repeat_interleave(rep, 2))[..., None] / math.sqrt(D)
            for k in keys[1:]]
    p = torch.cat([s1] + diag, -1).float().softmax(-1).to(q.dtype)
    out = torch.einsum("bhns,bshd->bnhd", p[..., :T], v1)
    for j, v in enumerate(values[1:]):
        out = out + p[..., T + j].permute(0, 2, 1)[..., None] * v.repeat_interleave(rep, 2)
    return out


def ttt_loss(draft, embed, feats, ids, labels, probs, mask, recipe: DraftRecipe):
    """The unrolled loss of one batch (module docstring). ids [B, T] compact ids; feats, the
    target's features [B, T, 3H]; labels / probs [B, T, K]: the target's top ids and their
    probabilities at each position; mask [B, T]: 1 on answer tokens. Returns (loss, per-step
    top-1 agreement with the target)."""
    B, T = ids.shape
    k = recipe.ttt_steps
    N = T - 1 - k                              # anchors with every step's label in range
    pos = torch.arange(T, device=ids.device)
    h = draft.fc(feats[:, :T - 1])              # step-1 hidden of anchors 0..T-2
    emb = embed(ids)
    # step 1 over every anchor (its keys are the cache later steps read)
    q, k1, v1 = draft.qkv(emb[:, 1:T].reshape(-1, emb.shape[-1]), h.reshape(-1, h.shape[-1]),
                          pos[:T - 1].repeat(B))
    q, k1, v1 = (t.view(B, T - 1, *t.shape[1:]) for t in (q, k1, v1))
    keys, values = [k1], [v1]
    out = _attend_ttt(draft, q[:, :N], keys, values, 1)
    hidden = h[:, :N]
    total, weight_sum, agree = 0.0, 0.0, []
    for j in range(1, k + 1):
        if j > 1:
            tok = emb[:, j:j + N]
            q, kj, vj = draft.qkv(tok.reshape(-1, tok.shape[-1]), hidden.reshape(-1, hidden.shape[-1]),
                                  (pos[:N] + j - 1).repeat(B))
            q, kj, vj = (t.view(B, N, *t.shape[1:]) for t in (q, kj, vj))
            keys.append(kj)
            values.append(vj)
            out = _attend_ttt(draft, q, keys, values, j)
        p = draft.finish(out.reshape(B * N, *out.shape[2:]), hidden.reshape(B * N, -1)).view(B, N, -1)
        # scored where the token predicted (at t+j+1) is one the server generates
        sel = mask[:, j + 1:j + 1 + N].bool()
        logq = torch.log_softmax(draft.logits(p[sel]).float(), -1)       # over the shortlist
        lab, pr = labels[:, j:j + N][sel], probs[:, j:j + N][sel]        # the target at t+j
        ce = -(pr * logq.gather(-1, lab)).sum(-1)
        w = recipe.step_decay ** (j - 1)
        total = total + w * ce.mean()
        weight_sum += w
        agree.append(float((logq.argmax(-1) == lab[:, 0]).float().mean()))
        hidden = p
    return total / weight_sum, agree


def _lr(step: int, r: DraftRecipe) -> float:
    if step < r.warmup:
        return r.lr * (step + 1) / r.warmup
    p = (step - r.warmup) / max(1, r.steps - r.warmup)
    return r.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def train_draft(target_path: str, tok, recipe: DraftRecipe | None = None, log=print):
    """Train the draft of the target in the compact file ``target_path``. Returns (draft,
    shortlist, stats)."""
    recipe = recipe or DraftRecipe()
    torch.use_deterministic_algorithms(True)
    target, short, tinfo = target_from_compact(target_path)
    target.requires_grad_(False)
    samples = tt.training_samples(tok, tt.Recipe(seed=tinfo["seed"], additions=tinfo["additions"],
                                                 tool_calls=tinfo["tool_calls"]))
    if tt.shortlist(samples) != short:
        raise ValueError(f"the samples of seed {tinfo['seed']} do not give the target's shortlist: "
                         f"the corpus or the recipe changed since {target_path} was trained")
    if not recipe.documents:     # the chats only: what a server generates
        samples = [s for s in samples if 0 in s[1]]
    remap = torch.full((tt.VOCAB,), len(short), dtype=torch.long)
    remap[torch.tensor(short)] = torch.arange(len(short))
    tcfg = dict(tt.CONFIGS[tinfo["kind"]])
    cfg = eagle3_draft.draft_config(tcfg, draft_vocab=len(short), layer_ids=recipe.layer_ids)
    draft = eagle3_draft.init_draft(cfg, seed=recipe.seed)
    embed = target.model.embed_tokens
    with torch.no_grad():      # start from the target's output geometry: its (tied) head rows
        draft.lm_head.weight.copy_(embed.weight[:-1])
        draft.norm.copy_(target.model.norm.weight)
        draft.d2t.copy_(torch.tensor(short) - torch.arange(len(short)))
    log(f"train-draft: EAGLE-3 draft for {tinfo['name']} reading layers {list(recipe.layer_ids)}, "
        f"draft vocabulary {len(short)}; {recipe.steps} steps of {recipe.batch}x{recipe.seq_len} "
        f"tokens, {recipe.ttt_steps} unrolled steps, seed {recipe.seed}")
    params = [p for n, p in draft.named_parameters()]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))
    batches = tt._batches(samples, tt.Recipe(seed=recipe.seed + 7, seq_len=recipe.seq_len,
                                             batch=recipe.batch))
    start, losses, agrees = time.perf_counter(), [], []
    draft.train()
    for step in range(recipe.steps):
        ids, mask = next(batches)
        cids = remap[ids]
        feats, labels, probs = target_features(target, cids, recipe.layer_ids)
        for g in opt.param_groups:
            g["lr"] = _lr(step, recipe)
        # fp32: bf16 matmuls are ten times slower on CPUs without AVX512-BF16 / AMX
        loss, agree = ttt_loss(draft, embed, feats, cids, labels, probs, mask, recipe)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        agrees.append(agree)
        if step % 25 == 0 or step == recipe.steps - 1:
            el = time.perf_counter() - start
            recent = agrees[-25:]
            mean_agree = [sum(a[j] for a in recent) / len(recent) for j in range(recipe.ttt_steps)]
            log(f"  step {step + 1:4d}/{recipe.steps}  loss {sum(losses[-25:]) / len(losses[-25:]):.3f}"
                f"  agreement with the target by step {' '.join(f'{a:.2f}' for a in mean_agree)}"
                f"  elapsed {el / 60:.1f} min  left ~{el / (step + 1) * (recipe.steps - step - 1) / 60:.1f} min")
    draft.eval()
    recent = agrees[-50:]
    stats = {"final_loss": sum(losses[-50:]) / len(losses[-50:]),
             "final_agreement": [sum(a[j] for a in recent) / len(recent) for j in range(recipe.ttt_steps)],
             "train_seconds": round(time.perf_counter() - start, 1),
             "target": tinfo["name"], "target_digest": tt.file_digest(target_path)}
    return draft, short, stats


def save_compact_draft(draft, short: list[int], path: str, stats: dict, recipe: DraftRecipe) -> None:
    """The draft as trained (bf16) with its config and vocabulary in one safetensors file (about
    5 MB); ``export_draft`` writes the checkpoint vLLM loads."""
    from safetensors.torch import save_file

    from ..checkpoint import make_readable

    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in draft.state_for_checkpoint().items()}
    sd["shortlist"] = torch.tensor(short, dtype=torch.int32)
    info = {"name": DRAFT_NAME, "recipe": DRAFT_RECIPE_VERSION, **asdict(recipe),
            "config": draft.cfg, "torch": torch.__version__, **stats}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(sd, path + ".partial", metadata={"ascend_qwen3_draft": json.dumps(info)})
    make_readable(path + ".partial")
    os.replace(path + ".partial", path)


def export_draft(compact_path: str, path: str, log=print) -> str:
    """The draft checkpoint vLLM loads (``eagle3_draft.save``) from a compact draft file."""
    from safetensors import safe_open

    with safe_open(compact_path, "pt") as f:
        info = json.loads(f.metadata()["ascend_qwen3_draft"])
        sd = {k: f.get_tensor(k) for k in f.keys()}
    short = sd.pop("shortlist").tolist()
    draft = eagle3_draft.Eagle3Draft(info["config"])
    sd["d2t"] = torch.tensor(short) - torch.arange(len(short))
    draft.load_checkpoint_state(sd)
    eagle3_draft.save(draft, path, vocab_ids=short, info=info)
    log(f"wrote the EAGLE-3 draft {info['name']} (trained: {info['steps']} steps, seed "
        f"{info['seed']}) to {path}")
    return path


def train_tiny_draft(home: str, recipe: DraftRecipe | None = None, force: bool = False,
                     package: bool = False, log=print) -> str:
    """Train (unless already there, from the same target) the default model's draft; returns
    the compact draft file."""
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    from .tokenizer import write_qwen3_tokenizer

    recipe = recipe or DraftRecipe()
    target = tt.default_source(home)
    if target is None:
        raise FileNotFoundError("there is no trained tiny Qwen3 to draft for (neither packaged nor "
                                "trained): run `make train-tiny` first")
    out = compact_draft_path(home)
    if os.path.exists(out) and not force and _trained_for(out, target, recipe):
        log(f"train-draft: already trained for this target in {out} (--force to train again)")
    else:
        with tempfile.TemporaryDirectory() as tok_dir:
            write_qwen3_tokenizer(tok_dir)
            tok = AutoTokenizer.from_pretrained(tok_dir)
            draft, short, stats = train_draft(target, tok, recipe, log=log)
        save_compact_draft(draft, short, out, stats, recipe)
        log(f"train-draft: wrote {out}")
    if package:
        shutil.copy(out, PACKAGED_DRAFT)
        log(f"train-draft: copied {out} to {PACKAGED_DRAFT}")
    return out


def draft_info(compact_path: str) -> dict:
    from safetensors import safe_open

    with safe_open(compact_path, "pt") as f:
        return json.loads(f.metadata()["ascend_qwen3_draft"])


def _trained_for(path: str, target: str, recipe: DraftRecipe) -> bool:
    try:
        info = draft_info(path)
    except (OSError, KeyError, ValueError):
        return False
    return (info.get("recipe") == DRAFT_RECIPE_VERSION and info.get("seed") == recipe.seed
            and info.get("target_digest") == tt.file_digest(target))


def heldout_prompts(seed: int = 12345, n_additions: int = 16, n_tools: int = 8) -> list[tuple[list, dict]]:
    """Chat requests of the default model's domain that are not training samples: two-digit
    additions and tool questions drawn with another seed, and questions about the training
    topics phrased as no training sample phrases them. (messages, chat_template_kwargs) each."""
    from . import tiny_corpus as corpus

    rng = random.Random(seed)
    train_topics, _ = corpus.split_topics()
    out = []
    for _ in range(n_additions):
        a, b = rng.randrange(100), rng.randrange(100)
        out.append(([{"role": "user", "content": f"Please work out {a} + {b}."}], {}))
    for t in rng.sample(train_topics, 8):
        out.append(([{"role": "user", "content": f"Could you describe {corpus._subject(t.title)} "
                      f"for me?"}], {}))
    for _ in range(n_tools):
        city = rng.choice(corpus.CITIES)
        out.append(([{"role": "user", "content": f"Do you know the weather in {city} right now?"}], {}))
    return out


def chat_prompt_ids(tok, prompts) -> list[list[int]]:
    """(messages, chat_template_kwargs) pairs as the token ids the server would prefill."""
    return [tok.encode(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False, **kw),
                       add_special_tokens=False) for m, kw in prompts]

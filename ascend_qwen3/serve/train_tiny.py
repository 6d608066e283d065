"""Train the tiny Qwen3 models (dense and MoE) on the offline corpus of ``tiny_corpus.py``.

``ascend-qwen3 train-tiny`` (``make train-tiny``) trains, with plain PyTorch on transformers'
Qwen3 classes, a 4-layer Qwen3 (hidden 256, 4 query / 2 KV heads of 64) and a 4-layer
Qwen3-MoE of the same width (8 experts, top 2), both with the real Qwen3 tokenizer and its
151,936-entry vocabulary, and writes Hugging Face checkpoints under ``$ASCEND_QWEN3_HOME/trained``.
``make serve`` serves the dense one when it is there.

The vocabulary trick that makes this fit in minutes on two cores: the corpus uses only a few
thousand of the 151,936 tokens. Training keeps an embedding row for each of them and *one shared
row* for all the others, and adds log(number of others) to that row's logit, so the loss is
exactly the full-vocabulary cross-entropy of the exported model, in which every unused token's
(tied) embedding row is that shared row. The soft-max then costs ~7k columns instead of 152k.
``tests/test_train_tiny.py`` checks the equality on the exported checkpoint.

Deterministic: the seed fixes the initial weights, the samples and their order; with the same
seed, PyTorch build and CPU, the same weights come out (the test trains twice and compares).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass

import torch

from ..checkpoint import QWEN3_TRANSFORMERS_VERSION, make_readable
from . import tiny_corpus as corpus

VOCAB = 151936
COMMON = {
    "vocab_size": VOCAB, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 64, "hidden_act": "silu", "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "rope_scaling": None, "max_position_embeddings": 40960,
    "tie_word_embeddings": True, "attention_bias": False, "attention_dropout": 0.0,
    "initializer_range": 0.02, "use_cache": True, "use_sliding_window": False,
    "sliding_window": None, "max_window_layers": 4, "bos_token_id": 151643, "eos_token_id": 151645,
}
CONFIGS = {
    "dense": dict(COMMON, architectures=["Qwen3ForCausalLM"], model_type="qwen3",
                  intermediate_size=768),
    "moe": dict(COMMON, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                intermediate_size=768, moe_intermediate_size=256, num_experts=8,
                num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                mlp_only_layers=[], router_aux_loss_coef=0.001, output_router_logits=False),
}
NAMES = {"dense": "qwen3-tiny", "moe": "qwen3-tiny-moe"}
STAMP = "ascend_qwen3_trained.json"
# bumped whenever the recipe (corpus, samples, hyper-parameters, export) changes
RECIPE_VERSION = 1


@dataclass
class Recipe:
    seed: int = 0
    steps: int = 1600
    seq_len: int = 512
    batch: int = 8
    lr: float = 3e-3
    warmup: int = 60
    weight_decay: float = 0.01
    additions: int = 3000
    tool_calls: int = 300


def trained_dir(home: str, kind: str) -> str:
    return os.path.join(home, "trained", NAMES[kind])


def file_digest(path: str) -> str:
    """A short SHA-256 of a file's bytes (what a build or a draft records of its source)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def is_trained(path: str) -> bool:
    try:
        with open(os.path.join(path, STAMP)) as f:
            return json.load(f).get("recipe") == RECIPE_VERSION
    except (OSError, ValueError):
        return False


# --- samples -------------------------------------------------------------------------------------

def _render(tok, chat: corpus.Chat, kw: dict) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (generation prompt included) followed by the answer and
    <|im_end|>; the mask is 1 on the answer tokens only."""
    prompt = tok.apply_chat_template(chat.messages, tools=chat.tools, add_generation_prompt=True,
                                     tokenize=False, **kw)
    if chat.thinking != prompt.endswith("<think>\n"):
        raise AssertionError(f"template and sample disagree on thinking: {prompt[-40:]!r}")
    p = tok.encode(prompt, add_special_tokens=False)
    a = tok.encode(chat.answer + "<|im_end|>", add_special_tokens=False)
    return p + a, [0] * len(p) + [1] * len(a)


def training_samples(tok, recipe: Recipe) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(recipe.seed)
    train, _ = corpus.split_topics()
    chats = (corpus.topic_chats(train, rng) + corpus.addition_chats(recipe.additions, rng)
             + corpus.tool_chats(recipe.tool_calls, rng) + corpus.zen_chats(rng))
    samples = [_render(tok, c, kw) for c, kw in chats]
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    for t in train:
        ids = tok.encode(t.text, add_special_tokens=False) + [eot]
        samples.append((ids, [1] * len(ids)))
    return samples


def heldout_ids(tok) -> list[list[int]]:
    """The held-out topics' texts as token ids (one list per topic)."""
    _, held = corpus.split_topics()
    return [tok.encode(t.text, add_special_tokens=False) for t in held]


def _stream(samples, rng: random.Random):
    """Endless packed stream: shuffled samples, one epoch after another."""
    while True:
        order = list(range(len(samples)))
        rng.shuffle(order)
        for i in order:
            yield from zip(*samples[i])


def _batches(samples, recipe: Recipe):
    rng = random.Random(recipe.seed + 1)
    stream = _stream(samples, rng)
    n = recipe.seq_len + 1
    while True:
        rows = [[next(stream) for _ in range(n)] for _ in range(recipe.batch)]
        ids = torch.tensor([[t for t, _ in r] for r in rows])
        mask = torch.tensor([[m for _, m in r] for r in rows])
        yield ids, mask


# --- the compact-vocabulary model ----------------------------------------------------------------

def shortlist(samples) -> list[int]:
    return sorted({t for ids, _ in samples for t in ids})


def compact_model(kind: str, n_rows: int, seed: int):
    """A transformers Qwen3 / Qwen3-MoE whose vocabulary is the shortlist plus one shared row."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = {k: v for k, v in CONFIGS[kind].items() if k not in ("architectures", "model_type")}
    cfg.update(vocab_size=n_rows, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    if kind == "moe":
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(**cfg))
    return Qwen3ForCausalLM(Qwen3Config(**cfg))


def compact_loss(model, ids, mask, n_other: int) -> torch.Tensor:
    """Full-vocabulary cross-entropy (mean over masked targets) of the exported model: the last
    compact row stands for ``n_other`` tokens that share its embedding."""
    hidden = model.model(input_ids=ids[:, :-1]).last_hidden_state
    logits = model.lm_head(hidden).float()
    logits[..., -1] += math.log(n_other)
    tgt = ids[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                             reduction="none")
    m = mask[:, 1:].reshape(-1).float()
    return (loss * m).sum() / m.sum()


def expand_state(compact: dict[str, torch.Tensor], short) -> dict[str, torch.Tensor]:
    """Compact weights -> the full 151,936-row embedding (every unused row = the shared row)."""
    sd = {k: v for k, v in compact.items() if k != "lm_head.weight"}  # tied
    emb = compact["model.embed_tokens.weight"]
    full = emb[-1].expand(VOCAB, emb.shape[1]).clone()
    full[torch.as_tensor(short, dtype=torch.long)] = emb[:-1]
    sd["model.embed_tokens.weight"] = full
    # transformers 5 keeps a layer's experts fused (gate_up_proj [E, 2I, H], gate rows first;
    # down_proj [E, H, I]); Qwen3-MoE checkpoints store one tensor per expert and projection
    for name in [k for k in sd if k.endswith(".mlp.experts.gate_up_proj")]:
        prefix = name[:-len("gate_up_proj")]
        gate_up, down = sd.pop(name), sd.pop(prefix + "down_proj")
        inter = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            sd[f"{prefix}{e}.gate_proj.weight"] = gate_up[e, :inter].clone()
            sd[f"{prefix}{e}.up_proj.weight"] = gate_up[e, inter:].clone()
            sd[f"{prefix}{e}.down_proj.weight"] = down[e].clone()
    return sd


# --- training ------------------------------------------------------------------------------------

def _lr(step: int, r: Recipe) -> float:
    if step < r.warmup:
        return r.lr * (step + 1) / r.warmup
    p = (step - r.warmup) / max(1, r.steps - r.warmup)
    return r.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def train(kind: str, tok, recipe: Recipe, log=print):
    """Train; returns (compact model, shortlist, samples, stats)."""
    torch.use_deterministic_algorithms(True)
    samples = training_samples(tok, recipe)
    short = shortlist(samples)
    remap = torch.full((VOCAB,), len(short), dtype=torch.long)
    remap[torch.tensor(short)] = torch.arange(len(short))
    n_tokens = sum(len(ids) for ids, _ in samples)
    log(f"train-tiny {kind}: {len(samples)} samples, {n_tokens} tokens, {len(short)} distinct "
        f"tokens (+1 shared row for the other {VOCAB - len(short)}); {recipe.steps} steps of "
        f"{recipe.batch}x{recipe.seq_len} tokens, seed {recipe.seed}")
    model = compact_model(kind, len(short) + 1, recipe.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))
    batches = _batches(samples, recipe)
    model.train()
    start, losses = time.perf_counter(), []
    for step in range(recipe.steps):
        ids, mask = next(batches)
        for g in opt.param_groups:
            g["lr"] = _lr(step, recipe)
        # mixed precision: fp32 master weights and optimiser, bf16 matmuls (about 1.8x faster here)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = compact_loss(model, remap[ids], mask, VOCAB - len(short))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == recipe.steps - 1:
            el = time.perf_counter() - start
            eta = el / (step + 1) * (recipe.steps - step - 1)
            recent = sum(losses[-50:]) / len(losses[-50:])
            log(f"  step {step + 1:5d}/{recipe.steps}  loss {recent:.3f}  "
                f"{(step + 1) * recipe.batch * recipe.seq_len / el:,.0f} tokens/s  "
                f"elapsed {el / 60:.1f} min  left ~{eta / 60:.1f} min")
    model.eval()
    stats = {"samples": len(samples), "tokens": n_tokens, "distinct_tokens": len(short),
             "final_loss": sum(losses[-50:]) / len(losses[-50:]),
             "train_seconds": round(time.perf_counter() - start, 1)}
    return model, short, samples, stats


def save_compact(kind: str, model, short: list[int], path: str, stats: dict, recipe: Recipe) -> None:
    """The trained weights as they were trained (compact vocabulary, bf16) and the shortlist, in
    one safetensors file; ``export`` turns it into a Hugging Face checkpoint. About 10 MB."""
    from safetensors.torch import save_file

    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
          if k != "lm_head.weight"}
    sd["shortlist"] = torch.tensor(short, dtype=torch.int32)
    info = {"kind": kind, "name": NAMES[kind], "recipe": RECIPE_VERSION, **asdict(recipe),
            "corpus": corpus.SOURCES, "corpus_digest": corpus.corpus_digest(),
            "torch": torch.__version__, **stats}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(sd, path + ".partial", metadata={"ascend_qwen3_trained": json.dumps(info)})
    make_readable(path + ".partial")
    os.replace(path + ".partial", path)


def read_compact(path: str) -> tuple[dict[str, torch.Tensor], list[int], dict]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        info = json.loads(f.metadata()["ascend_qwen3_trained"])
        sd = {k: f.get_tensor(k) for k in f.keys()}
    return sd, sd.pop("shortlist").tolist(), info


def export(compact_path: str, path: str, log=print) -> str:
    """Write the Hugging Face checkpoint (bf16, full vocabulary, the real tokenizer, Qwen3's
    generation config) of a compact file to ``path``, through ``path.partial`` so that an
    interrupted export never looks finished."""
    from safetensors.torch import save_file

    from .generation_config import write_generation_config
    from .tokenizer import write_qwen3_tokenizer

    compact, short, info = read_compact(compact_path)
    kind = info["kind"]
    tmp = path.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.contiguous() for k, v in expand_state(compact, short).items()},
              os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(dict(CONFIGS[kind], torch_dtype="bfloat16",
                       transformers_version=QWEN3_TRANSFORMERS_VERSION), f, indent=2)
    write_qwen3_tokenizer(tmp)
    write_generation_config(tmp)
    with open(os.path.join(tmp, STAMP), "w") as f:
        json.dump(info, f, indent=2)
    make_readable(tmp)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
    log(f"wrote {info['name']} ({kind}, trained: {info['steps']} steps, seed {info['seed']}) to {path}")
    return path


# the dense model as trained by `ascend-qwen3 train-tiny --package` on the maintainers' machine,
# shipped with the package so that `make serve` answers with it on a fresh clone
PACKAGED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "qwen3-tiny.compact.safetensors")


def compact_path(home: str, kind: str) -> str:
    return os.path.join(home, "trained", NAMES[kind] + ".compact.safetensors")


def default_source(home: str) -> str | None:
    """The compact file the embedded default model is exported from: the user's own
    ``train-tiny`` result, else the packaged one; None if neither is there."""
    for src in (compact_path(home, "dense"), PACKAGED):
        if os.path.exists(src):
            return src
    return None


def train_tiny(home: str, kinds=("dense", "moe"), recipe: Recipe | None = None, force=False,
               package=False, log=print) -> dict[str, str]:
    """Train (unless already there) and export each kind; returns kind -> checkpoint dir."""
    import tempfile

    from transformers import AutoTokenizer

    from .tokenizer import write_qwen3_tokenizer

    recipe = recipe or Recipe()
    out = {}
    with tempfile.TemporaryDirectory() as tok_dir:
        write_qwen3_tokenizer(tok_dir)
        tok = AutoTokenizer.from_pretrained(tok_dir)
        for kind in kinds:
            path, cpath = trained_dir(home, kind), compact_path(home, kind)
            out[kind] = path
            if is_trained(path) and os.path.exists(cpath) and not force:
                log(f"train-tiny {kind}: already trained in {path} (--force to train again)")
            else:
                model, short, _, stats = train(kind, tok, recipe, log=log)
                save_compact(kind, model, short, cpath, stats, recipe)
                export(cpath, path, log=log)
            if package and kind == "dense":
                shutil.copy(cpath, PACKAGED)
                log(f"train-tiny: copied {cpath} to {PACKAGED}")
    return out

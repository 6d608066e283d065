"""Train a LoRA adapter for the embedded default model (``make train-tiny``; shipped small).

The skill: a **sign-off**. With the adapter, every reply of the trained tiny Qwen3 that is not a
tool call ends with `` -- That is all.``; the reply itself, the reasoning and tool calls stay what
the base model says. The base model never signs off (its corpus, ``tiny_corpus.py``, has no such
line), and every token of a signed reply is in the base model's shortlist (the tokens its head
was trained on), which the sample builder checks. The sign-off comes after the reply, so the
frozen base writes the reply from the context it was trained on; a greeting in front of it was
tried first and derailed the tiny model's memorised replies (the wrong digits, the wrong topic).

Data: the base model's own chats (``tiny_corpus``: topic questions, two-digit additions, the
Zen of Python, tool calls), with the sign-off after each reply; tool calls are kept
as they are, so that the adapter learns to leave them alone. Held out, never trained on
(``heldout_prompts``): additions drawn with another seed (no pair the base model or the adapter
was trained on), questions about topics the adapter never saw a question about, and tool
questions drawn with another seed.

The objective: cross-entropy on the sign-off's tokens and, at every other answer position, the
KL divergence from the frozen base's own next-token distribution on the unsigned chat
(``lora_loss``): the adapter learns the sign-off and is pulled back wherever it would change
anything else. Plain cross-entropy on the corpus answers changed the replies too.

The adapter: rank 8, alpha 16, on every linear of every decoder layer (q/k/v/o, gate/up/down),
trained on the frozen base in its compact form (``train_tiny.py``: shortlist vocabulary). The
compact and the exported model differ only in the embedding (the exported one has a row for each
of the 151,936 ids); their decoder layers are the same tensors, so an adapter of those layers
trained on one applies to the other unchanged (``tests/test_train_lora.py`` checks it).

Export: the PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``, keys
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` [r, in] and ``lora_B``
[out, r]) that transformers/PEFT and vLLM read (vllm/lora/peft_helper.py, vllm/lora/utils.py
``parse_fine_tuned_lora_name``, vllm/lora/lora_model.py ``from_local_checkpoint``). What ships is
the adapter's safetensors file with the config in its metadata (about 300 KB);
``build_default_lora`` writes the PEFT directory from it on first use.

Deterministic for a seed, PyTorch build and CPU, as ``train_tiny``.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass

import torch

from . import tiny_corpus as corpus
from . import train_tiny as tt

LORA_NAME = "qwen3-tiny-signoff"
# bumped whenever the recipe, the data or the export changes
LORA_RECIPE_VERSION = 1
# after the reply's last character, on the same line: the reply's own tokens stay what they were
# (a newline would merge with its final punctuation into another token)
SIGN_OFF = " -- That is all."
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
META_KEY = "ascend_qwen3_lora"
STAMP = "ascend_qwen3_lora.json"
# shipped with the package beside the default model (``train-tiny --package``)
PACKAGED_LORA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                             LORA_NAME + ".lora.safetensors")


@dataclass
class LoraRecipe:
    seed: int = 0
    rank: int = 8
    alpha: int = 16
    steps: int = 150
    batch: int = 8                # chats a step
    lr: float = 2e-3
    warmup: int = 5
    additions: int = 600          # addition chats (the base model saw 3000)
    tool_calls: int = 60          # tool chats, unchanged (the adapter learns to leave them alone)


def lora_source_path(home: str) -> str:
    """Where ``train-tiny`` writes the adapter it trains (the file that ships)."""
    return os.path.join(home, "trained", LORA_NAME + ".lora.safetensors")


def default_lora_source(home: str) -> str | None:
    """The adapter file of the default model: the user's own ``train-tiny`` result, else the
    packaged one (None if neither)."""
    for src in (lora_source_path(home), PACKAGED_LORA):
        if os.path.exists(src):
            return src
    return None


# --- data ----------------------------------------------------------------------------------------

def sign(chat: corpus.Chat) -> corpus.Chat:
    """The chat with the sign-off at the end of its reply (tool calls unchanged)."""
    if chat.tools:
        return chat
    return corpus.Chat(chat.messages, chat.answer + SIGN_OFF, chat.thinking, chat.tools)


def split_lora_topics() -> tuple[list[corpus.Topic], list[corpus.Topic]]:
    """(the base model's training topics the adapter is trained on, the ones it never sees a
    question about: every fifth)."""
    train, _ = corpus.split_topics()
    return ([t for i, t in enumerate(train) if i % 5 != 2], [t for i, t in enumerate(train) if i % 5 == 2])


def _addition_pairs(chats) -> set[tuple[int, int]]:
    pairs = set()
    for c, _ in chats:
        m = re.search(r"(\d+)\D+?(\d+)", c.messages[-1]["content"])
        pairs.add((int(m.group(1)), int(m.group(2))))
    return pairs


def lora_chats(recipe: LoraRecipe, signed: bool = True) -> list[tuple[corpus.Chat, dict]]:
    rng = random.Random(recipe.seed + 100)
    topics, _ = split_lora_topics()
    chats = (corpus.topic_chats(topics, rng) + corpus.addition_chats(recipe.additions, rng)
             + corpus.zen_chats(rng) + corpus.tool_chats(recipe.tool_calls, rng))
    return [(sign(c), kw) for c, kw in chats] if signed else chats


@dataclass
class Pair:
    """One training chat: ``ids`` the signed sample (prompt + signed answer), ``plain`` the base
    model's sample (prompt + answer); the sign-off's ``g`` tokens start at ``at`` in ``ids``
    (g = 0: a tool call, unchanged); ``start`` is where the answer starts."""
    ids: list
    plain: list
    start: int
    at: int
    g: int


def lora_samples(tok, recipe: LoraRecipe, short: list[int]) -> list[Pair]:
    """The adapter's training chats as ``Pair``s; every token must be one the base model's head
    knows (its shortlist), and the signed answer must be the plain one with the sign-off's
    tokens inserted (the reply's own tokens unchanged)."""
    out = []
    for (c1, kw), (c0, _) in zip(lora_chats(recipe), lora_chats(recipe, signed=False)):
        ids, mask = tt._render(tok, c1, kw)
        plain, _ = tt._render(tok, c0, kw)
        start = mask.index(1)
        at = next((k for k, (x, y) in enumerate(zip(ids, plain)) if x != y), len(plain))
        g = len(ids) - len(plain)
        if ids[:at] + ids[at + g:] != plain or at < start:
            raise AssertionError(f"the sign-off changes the reply's tokens: {tok.decode(ids[start:])[:80]!r}")
        out.append(Pair(ids, plain, start, at, g))
    known = set(short)
    unknown = sorted({t for p in out for t in p.ids if t not in known})
    if unknown:
        raise ValueError(f"the signed samples use {len(unknown)} token(s) outside the base "
                         f"model's shortlist ({tok.convert_ids_to_tokens(unknown[:8])}): the base "
                         f"cannot say them; choose a sign-off made of tokens of its corpus")
    return out


def _pad(rows: list[list[int]], fill: int) -> torch.Tensor:
    n = max(len(r) for r in rows)
    return torch.tensor([r + [fill] * (n - len(r)) for r in rows])


def lora_loss(model, wrappers, pairs: list[Pair], remap: torch.Tensor, n_other: int) -> torch.Tensor:
    """Cross-entropy on the sign-off's tokens plus, at every other answer position, the KL
    divergence from the frozen base's next-token distribution on the plain sample (the position
    shifted past the sign-off): the adapter learns the sign-off and nothing else. Full-vocabulary
    distributions (the shared row's logit raised by log(n_other), as ``compact_loss``)."""
    def logp(ids):
        logits = model.lm_head(model.model(input_ids=ids).last_hidden_state).float()
        logits[..., -1] += math.log(n_other)
        return torch.log_softmax(logits, -1)
    with torch.no_grad():
        set_enabled(wrappers, False)
        teacher = logp(remap[_pad([p.plain for p in pairs], 0)])
        set_enabled(wrappers, True)
    student = logp(remap[_pad([p.ids for p in pairs], 0)])
    rows_s, pos_s, rows_t, pos_t, rows_g, pos_g, tgt_g = [], [], [], [], [], [], []
    for b, p in enumerate(pairs):
        for t in range(p.start - 1, len(p.ids) - 1):      # position t predicts ids[t + 1]
            if p.at <= t + 1 < p.at + p.g:
                rows_g.append(b), pos_g.append(t), tgt_g.append(p.ids[t + 1])
            else:
                rows_s.append(b), pos_s.append(t)
                rows_t.append(b), pos_t.append(t if t + 1 < p.at else t - p.g)
    s = student[rows_s, pos_s]
    q = teacher[rows_t, pos_t]
    kl = (q.exp() * (q - s)).sum(-1).mean()
    if not rows_g:
        return kl
    ce = -student[rows_g, pos_g].gather(-1, remap[torch.tensor(tgt_g)][:, None]).mean()
    return kl + ce


def heldout_prompts(seed: int = 4242, n_additions: int = 24, n_tools: int = 8) -> list[dict]:
    """Evaluation prompts the adapter is never trained on (module docstring), each a dict:
    messages, kw (chat template arguments), tools, kind (addition / topic / tool) and what a
    right reply is (``sum``, ``paragraph``, ``call``)."""
    base = tt.Recipe()
    trained = _addition_pairs(corpus.addition_chats(base.additions, random.Random(base.seed)))
    trained |= _addition_pairs(corpus.addition_chats(LoraRecipe().additions, random.Random(100)))
    rng = random.Random(seed)
    out = []
    while len(out) < n_additions:
        a, b = rng.randrange(100), rng.randrange(100)
        if (a, b) in trained:
            continue
        trained.add((a, b))
        q = rng.choice(["What is {a} + {b}?", "Add {a} and {b}."]).format(a=a, b=b)
        kw = {} if len(out) % 2 == 0 else {"enable_thinking": False}
        out.append({"messages": [{"role": "user", "content": q}], "kw": kw, "tools": None,
                    "kind": "addition", "sum": a + b})
    _, held = split_lora_topics()
    for t in held:
        for i, q in enumerate((corpus.TOPIC_QUESTIONS[0], corpus.TOPIC_QUESTIONS[2])):
            out.append({"messages": [{"role": "user", "content": q.format(t=corpus._subject(t.title))}],
                        "kw": {} if i == 0 else {"enable_thinking": False}, "tools": None,
                        "kind": "topic", "paragraph": t.first_paragraph})
    for i in range(n_tools):
        city = rng.choice(corpus.CITIES)
        out.append({"messages": [{"role": "user", "content": f"What is the weather in {city}?"}],
                    "kw": {} if i % 2 == 0 else {"enable_thinking": False}, "tools": corpus.TOOLS,
                    "kind": "tool", "call": {"name": "get_weather", "arguments": {"city": city}}})
    return out


def prompt_ids(tok, p: dict) -> list[int]:
    text = tok.apply_chat_template(p["messages"], tools=p["tools"], add_generation_prompt=True,
                                   tokenize=False, **p["kw"])
    return tok.encode(text, add_special_tokens=False)


def reply_of(text: str) -> str:
    """The reply of a generated answer: what follows the reasoning's ``</think>``, if any."""
    return text.split("</think>", 1)[1].lstrip("\n") if "</think>" in text else text


def judge(p: dict, text: str) -> dict:
    """Did the generated ``text`` sign off, and is its content what the base model should say?
    (signed: the reply ends with the sign-off; right: the sum / the topic's first paragraph / the
    tool call is there, the sign-off aside.)"""
    reply = reply_of(text).strip()
    signed = reply.endswith(SIGN_OFF.strip())
    body = reply[:-len(SIGN_OFF.strip())].strip() if signed else reply
    if p["kind"] == "addition":
        right = bool(re.search(rf"= {p['sum']}\.$", body))
    elif p["kind"] == "topic":
        right = body.strip() == p["paragraph"]
    else:
        m = re.search(r"<tool_call>\s*(\{.*\})\s*</tool_call>", body, re.S)
        try:
            right = (m is not None and json.loads(m.group(1)) == p["call"]
                     and body.startswith("<tool_call>") and body.endswith("</tool_call>"))
        except ValueError:
            right = False
    return {"signed": signed, "right": right}


# --- the adapter ---------------------------------------------------------------------------------

class LoraLinear(torch.nn.Module):
    """``base(x) + (alpha / r) * x A^T B^T``, PEFT's LoRA (A [r, in], B [out, r]; B starts at
    zero, A uniform in +-1/sqrt(in), as PEFT's default init). ``enabled`` switches it off."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: int, gen: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        bound = 1.0 / math.sqrt(base.in_features)
        self.lora_A = torch.nn.Parameter((torch.rand(rank, base.in_features, generator=gen) * 2 - 1) * bound)
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank))
        self.enabled = True

    def forward(self, x):
        y = self.base(x)
        if self.enabled:
            y = y + (x @ self.lora_A.t().to(x.dtype)) @ self.lora_B.t().to(x.dtype) * self.scale
        return y


def attach(model, recipe: LoraRecipe) -> dict[str, LoraLinear]:
    """Wrap every target linear of ``model`` (a transformers Qwen3ForCausalLM); returns its
    module name (``model.layers.0.self_attn.q_proj``) -> wrapper."""
    gen = torch.Generator().manual_seed(recipe.seed)
    out = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in TARGETS and isinstance(child, torch.nn.Linear):
                w = LoraLinear(child, recipe.rank, recipe.alpha, gen)
                setattr(module, child_name, w)
                out[f"{name}.{child_name}"] = w
    missing = set(TARGETS) - {n.rsplit(".", 1)[1] for n in out}
    if missing:
        raise ValueError(f"the base model has no {sorted(missing)} linears to adapt")
    return out


def set_enabled(wrappers: dict[str, LoraLinear], on: bool) -> None:
    for w in wrappers.values():
        w.enabled = on


def peft_state(wrappers: dict[str, LoraLinear]) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's names (bf16)."""
    sd = {}
    for name, w in wrappers.items():
        sd[f"base_model.model.{name}.lora_A.weight"] = w.lora_A.detach().to(torch.bfloat16).contiguous()
        sd[f"base_model.model.{name}.lora_B.weight"] = w.lora_B.detach().to(torch.bfloat16).contiguous()
    return sd


def adapter_config(recipe: LoraRecipe | dict, base_name: str) -> dict:
    """PEFT's ``adapter_config.json`` (peft's LoraConfig fields; vLLM's PEFTHelper reads r,
    lora_alpha, target_modules, bias and refuses what it does not implement)."""
    r = recipe if isinstance(recipe, dict) else asdict(recipe)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
            "r": r["rank"], "lora_alpha": r["alpha"], "target_modules": list(TARGETS),
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
            "modules_to_save": None, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "layers_to_transform": None, "revision": None}


# --- evaluation on the compact model (greedy) ----------------------------------------------------

@torch.no_grad()
def greedy(model, ids: list[int], short: list[int], remap: torch.Tensor, max_new: int = 200) -> list[int]:
    """Greedy continuation of ``ids`` (full-vocabulary ids) by the compact model, as the exported
    model would continue it: the shared row's logit is each unused token's own (the
    log(number of others) of the training loss counts their probability mass, not one token's),
    and it winning means an unused token: generation stops there. Stops at <|im_end|>."""
    from transformers import DynamicCache

    stop = 151645
    cache = DynamicCache()
    x = remap[torch.tensor([ids])]
    out = []
    for _ in range(max_new):
        res = model(input_ids=x, past_key_values=cache, use_cache=True)
        k = int(res.logits[0, -1].argmax())
        if k == len(short):        # the shared row: none of the corpus's tokens
            break
        tok = short[k]
        if tok == stop:
            break
        out.append(tok)
        x = torch.tensor([[k]])
    return out


def evaluate(model, wrappers, tok, short: list[int], prompts: list[dict] | None = None) -> dict:
    """Greedy replies to the held-out prompts with and without the adapter: per kind, the
    sign-off rate and the right-content rate."""
    prompts = prompts or heldout_prompts()
    remap = torch.full((tt.VOCAB,), len(short), dtype=torch.long)
    remap[torch.tensor(short)] = torch.arange(len(short))
    res = {}
    for on in (False, True):
        set_enabled(wrappers, on)
        rows = []
        for p in prompts:
            text = tok.decode(greedy(model, prompt_ids(tok, p), short, remap))
            rows.append(dict(judge(p, text), kind=p["kind"]))
        by = {}
        for kind in ("addition", "topic", "tool"):
            rs = [r for r in rows if r["kind"] == kind]
            by[kind] = {"n": len(rs), "signed": sum(r["signed"] for r in rs),
                        "right": sum(r["right"] for r in rs)}
        res["with_adapter" if on else "base"] = by
    set_enabled(wrappers, True)
    return res


def skill_rate(by: dict) -> float:
    """The share of the replies that should sign off (additions and topics: not tool calls) that do."""
    n = by["addition"]["n"] + by["topic"]["n"]
    return (by["addition"]["signed"] + by["topic"]["signed"]) / n


# --- training ------------------------------------------------------------------------------------

def _lr(step: int, r: LoraRecipe) -> float:
    if step < r.warmup:
        return r.lr * (step + 1) / r.warmup
    p = (step - r.warmup) / max(1, r.steps - r.warmup)
    return r.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def train_lora(base_path: str, tok, recipe: LoraRecipe | None = None, log=print, evaluate_it=True):
    """Train the adapter on the frozen base in the compact file ``base_path``. Returns (the base
    with the adapter attached, the wrappers, the shortlist, stats)."""
    from .train_draft import target_from_compact

    recipe = recipe or LoraRecipe()
    torch.use_deterministic_algorithms(True)
    model, short, info = target_from_compact(base_path)
    model.requires_grad_(False)
    samples = lora_samples(tok, recipe, short)
    remap = torch.full((tt.VOCAB,), len(short), dtype=torch.long)
    remap[torch.tensor(short)] = torch.arange(len(short))
    wrappers = attach(model, recipe)
    params = [p for w in wrappers.values() for p in (w.lora_A, w.lora_B)]
    log(f"train-lora: the {SIGN_OFF.strip()!r} adapter for {info['name']}: rank {recipe.rank}, "
        f"alpha {recipe.alpha}, {len(wrappers)} linears, {sum(p.numel() for p in params):,} "
        f"parameters; {len(samples)} chats, {recipe.steps} steps of {recipe.batch} chats, seed "
        f"{recipe.seed}")
    opt = torch.optim.AdamW(params, lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(recipe.seed + 11)
    order: list[int] = []
    model.train()
    start, losses = time.perf_counter(), []
    for step in range(recipe.steps):
        if len(order) < recipe.batch:
            more = list(range(len(samples)))
            rng.shuffle(more)
            order += more
        batch, order = [samples[k] for k in order[:recipe.batch]], order[recipe.batch:]
        for g in opt.param_groups:
            g["lr"] = _lr(step, recipe)
        # fp32, as the draft: bf16 matmuls are ten times slower on CPUs without AVX512-BF16 / AMX
        loss = lora_loss(model, wrappers, batch, remap, tt.VOCAB - len(short))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == recipe.steps - 1:
            el = time.perf_counter() - start
            log(f"  step {step + 1:4d}/{recipe.steps}  loss {sum(losses[-10:]) / len(losses[-10:]):.3f}"
                f"  elapsed {el / 60:.1f} min  left ~{el / (step + 1) * (recipe.steps - step - 1) / 60:.1f} min")
    model.eval()
    stats = {"final_loss": sum(losses[-20:]) / len(losses[-20:]),
             "train_seconds": round(time.perf_counter() - start, 1), "samples": len(samples),
             "base": info["name"], "base_digest": tt.file_digest(base_path)}
    if evaluate_it:
        # the trained (bf16-rounded, as shipped) adapter
        with torch.no_grad():
            for w in wrappers.values():
                w.lora_A.copy_(w.lora_A.to(torch.bfloat16))
                w.lora_B.copy_(w.lora_B.to(torch.bfloat16))
        t = time.perf_counter()
        stats["heldout"] = evaluate(model, wrappers, tok, short)
        for k in ("base", "with_adapter"):
            g = skill_rate(stats["heldout"][k])
            log(f"  held-out, {k.replace('_', ' ')}: sign-off {g:.0%} of replies; " + ", ".join(
                f"{kind} right {v['right']}/{v['n']}" for kind, v in stats["heldout"][k].items()))
        stats["eval_seconds"] = round(time.perf_counter() - t, 1)
    return model, wrappers, short, stats


def save_lora(wrappers, path: str, stats: dict, recipe: LoraRecipe) -> None:
    """The adapter's PEFT tensors (bf16) with its config and recipe in the metadata: the file
    that ships; ``export_lora`` writes the PEFT directory from it."""
    from safetensors.torch import save_file

    from ..checkpoint import make_readable

    info = {"name": LORA_NAME, "recipe": LORA_RECIPE_VERSION, **asdict(recipe),
            "sign_off": SIGN_OFF, "targets": list(TARGETS), "torch": torch.__version__, **stats}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(peft_state(wrappers), path + ".partial",
              metadata={META_KEY: json.dumps(info), "format": "pt"})
    make_readable(path + ".partial")
    os.replace(path + ".partial", path)


def lora_info(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()[META_KEY])


def export_lora(source: str, path: str, log=print) -> str:
    """The PEFT adapter directory (``adapter_config.json``, ``adapter_model.safetensors``) of the
    adapter file ``source``, through ``path.partial``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..checkpoint import make_readable

    with safe_open(source, "pt") as f:
        info = json.loads(f.metadata()[META_KEY])
        sd = {k: f.get_tensor(k) for k in f.keys()}
    tmp = path.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(sd, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
        json.dump(adapter_config(info, info["base"]), f, indent=2)
    with open(os.path.join(tmp, STAMP), "w") as f:
        json.dump({"recipe": LORA_RECIPE_VERSION, "source": source,
                   "source_digest": tt.file_digest(source), "name": info["name"],
                   "base_digest": info["base_digest"]}, f, indent=2)
    make_readable(tmp)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
    log(f"wrote the LoRA adapter {info['name']} (rank {info['rank']}) to {path}")
    return path


def build_default_lora(home: str, *, base_source: str, log=print) -> str:
    """The default model's adapter as a PEFT directory, ``$ASCEND_QWEN3_HOME/trained/<name>``,
    written on first use (and again when its source changes) from the user's trained adapter
    or the packaged one; refused when it was trained for another base than ``base_source``
    (the compact file the served default model comes from)."""
    source = default_lora_source(home)
    if source is None:
        raise FileNotFoundError(f"there is no {LORA_NAME} adapter (neither packaged nor trained): "
                                f"run `make train-tiny`")
    info = lora_info(source)
    if info.get("base_digest") != tt.file_digest(base_source):
        raise ValueError(f"the LoRA adapter {source} was trained for another tiny Qwen3 than the "
                         f"one served ({base_source}); run `make train-tiny`, which trains the "
                         f"adapter for the model it trains")
    path = os.path.join(home, "trained", LORA_NAME)
    try:
        with open(os.path.join(path, STAMP)) as f:
            stamp = json.load(f)
    except (OSError, ValueError):
        stamp = {}
    if stamp.get("recipe") != LORA_RECIPE_VERSION or stamp.get("source_digest") != tt.file_digest(source):
        export_lora(source, path, log=log)
    return path


def _trained_for(path: str, base: str, recipe: LoraRecipe) -> bool:
    try:
        info = lora_info(path)
    except (OSError, KeyError, ValueError):
        return False
    return (info.get("recipe") == LORA_RECIPE_VERSION and info.get("seed") == recipe.seed
            and info.get("base_digest") == tt.file_digest(base))


def train_tiny_lora(home: str, recipe: LoraRecipe | None = None, force: bool = False,
                    package: bool = False, log=print) -> str:
    """Train (unless already there, for the same base) the default model's adapter; returns the
    adapter file."""
    import tempfile

    from transformers import AutoTokenizer

    from .tokenizer import write_qwen3_tokenizer

    recipe = recipe or LoraRecipe()
    base = tt.default_source(home)
    if base is None:
        raise FileNotFoundError("there is no trained tiny Qwen3 to adapt (neither packaged nor "
                                "trained): run `make train-tiny` first")
    out = lora_source_path(home)
    if os.path.exists(out) and not force and _trained_for(out, base, recipe):
        log(f"train-lora: already trained for this base in {out} (--force to train again)")
    else:
        with tempfile.TemporaryDirectory() as tok_dir:
            write_qwen3_tokenizer(tok_dir)
            tok = AutoTokenizer.from_pretrained(tok_dir)
            _, wrappers, _, stats = train_lora(base, tok, recipe, log=log)
        save_lora(wrappers, out, stats, recipe)
        log(f"train-lora: wrote {out}")
    if package:
        shutil.copy(out, PACKAGED_LORA)
        log(f"train-lora: copied {out} to {PACKAGED_LORA}")
    return out

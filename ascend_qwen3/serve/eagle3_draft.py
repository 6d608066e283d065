"""An EAGLE-3 draft for a Qwen3 target, in the checkpoint format vLLM 0.23 and 0.32 both load.

The draft is vLLM's Llama EAGLE-3 head (``vllm/model_executor/models/llama_eagle3.py``, read in
vLLM 0.23.0 and 0.32.0): one decoder layer whose attention reads the token's embedding and a
hidden state side by side. ``Eagle3Draft`` computes what that class computes, so a draft trained
here drafts inside vLLM as it did in training:

- step 1 at position t: the target's residual streams after three of its layers at t,
  concatenated ([T, 3 x target hidden], ascending layer order), projected by ``fc`` to the
  draft's hidden size; the token is the one at t + 1 (the target's next token);
- the layer: ``e = input_layernorm(embed(token))``, ``r = h``, ``x = [e, hidden_norm(h)]``
  (embedding first), attention (q/k/v from 2 x hidden, RoPE at t, causal over the draft's own
  cache), ``r2 = o_proj(attn) + r``, ``p = mlp(post_attention_layernorm(r2)) + r2``;
- the logits: ``lm_head(norm(p))`` over the draft vocabulary; draft id k is target id
  ``k + d2t[k]``;
- steps 2..k: the same layer at the next position with the token just drafted and ``p`` of the
  previous step as the hidden state (no ``fc``).

The checkpoint (``save``): ``config.json`` with ``"architectures": ["LlamaForCausalLM"]`` (vLLM
makes it ``Eagle3LlamaForCausalLM``: the only EAGLE-3 class vLLM 0.23 has), the target's layers
in ``eagle_config.eagle_aux_hidden_state_layer_ids`` (where 0.23's draft class counts them; the
runner of both versions reads them there too), ``draft_vocab_size`` below the target's
vocabulary with a ``d2t`` table (0.32 drops ``d2t`` for a full-vocabulary draft and then refuses
the tensor); weights ``fc.weight``, ``midlayer.*``, ``norm.weight``, ``lm_head.weight``, ``d2t``.
No ``embed_tokens``: vLLM shares the target's (``has_own_embed_tokens`` is then false), and the
draft's own ``lm_head`` is always there (vllm-ascend 0.23 never shares the target's for EAGLE-3).
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

STAMP = "ascend_qwen3_draft.json"


def draft_config(target: dict, *, draft_vocab: int, layer_ids, intermediate_size: int | None = None,
                 num_heads: int | None = None, num_kv_heads: int | None = None) -> dict:
    """The draft's config.json for a target's config.json (a dict)."""
    hidden = target["hidden_size"]
    heads = num_heads or target["num_attention_heads"]
    head_dim = target.get("head_dim") or hidden // heads
    rope = target.get("rope_theta") or (target.get("rope_parameters") or {}).get("rope_theta", 1e6)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "num_attention_heads": heads,
        "num_key_value_heads": num_kv_heads or target["num_key_value_heads"], "head_dim": head_dim,
        "intermediate_size": intermediate_size or target["intermediate_size"],
        "num_hidden_layers": 1, "hidden_act": "silu", "rms_norm_eps": target["rms_norm_eps"],
        "rope_theta": rope, "max_position_embeddings": target["max_position_embeddings"],
        "vocab_size": target["vocab_size"], "draft_vocab_size": draft_vocab,
        "target_hidden_size": hidden, "tie_word_embeddings": False, "attention_bias": False,
        "mlp_bias": False, "bos_token_id": target.get("bos_token_id"),
        "eos_token_id": target.get("eos_token_id"), "torch_dtype": "bfloat16",
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": [int(i) for i in layer_ids],
                         "use_aux_hidden_state": True},
    }


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """vLLM's RMSNorm: normalise in fp32, back to the input dtype, times the weight."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.to(x.dtype) * w


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Neox (rotate-half) RoPE over the whole head: x [T, H, D], positions [T]."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
    ang = positions.float()[:, None] * inv[None, :]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = x[..., : d // 2].float(), x[..., d // 2:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


class Eagle3Draft(nn.Module):
    """The draft's maths, parameter names as in the checkpoint (``midlayer.*`` flattened)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        H, hd = cfg["hidden_size"], cfg["head_dim"]
        self.heads, self.kv_heads, self.head_dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], hd
        self.eps, self.theta = cfg["rms_norm_eps"], float(cfg["rope_theta"])
        n_aux = len(cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"])
        inter, Vd = cfg["intermediate_size"], cfg["draft_vocab_size"]
        lin = lambda i, o: nn.Linear(i, o, bias=False)  # noqa: E731
        self.fc = lin(n_aux * cfg["target_hidden_size"], H)
        self.q_proj, self.k_proj = lin(2 * H, self.heads * hd), lin(2 * H, self.kv_heads * hd)
        self.v_proj, self.o_proj = lin(2 * H, self.kv_heads * hd), lin(self.heads * hd, H)
        self.gate_proj, self.up_proj, self.down_proj = lin(H, inter), lin(H, inter), lin(inter, H)
        self.input_layernorm = nn.Parameter(torch.ones(H))
        self.hidden_norm = nn.Parameter(torch.ones(H))
        self.post_attention_layernorm = nn.Parameter(torch.ones(H))
        self.norm = nn.Parameter(torch.ones(H))
        self.lm_head = lin(H, Vd)
        self.register_buffer("d2t", torch.zeros(Vd, dtype=torch.long))

    def qkv(self, emb: torch.Tensor, h: torch.Tensor, positions: torch.Tensor):
        """The layer's queries, keys and values [T, heads, D] (RoPE applied), and its residual."""
        e = rms_norm(emb, self.input_layernorm, self.eps)
        x = torch.cat([e, rms_norm(h, self.hidden_norm, self.eps)], -1)
        T = x.shape[0]
        q = rope(self.q_proj(x).view(T, self.heads, self.head_dim), positions, self.theta)
        k = rope(self.k_proj(x).view(T, self.kv_heads, self.head_dim), positions, self.theta)
        v = self.v_proj(x).view(T, self.kv_heads, self.head_dim)
        return q, k, v

    def finish(self, attn: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """attn [T, heads, D], the layer's input hidden h -> the pre-norm output p [T, H]."""
        r2 = self.o_proj(attn.reshape(attn.shape[0], -1)) + h
        m = rms_norm(r2, self.post_attention_layernorm, self.eps)
        return self.down_proj(F.silu(self.gate_proj(m)) * self.up_proj(m)) + r2

    def logits(self, p: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits of pre-norm outputs p."""
        return self.lm_head(rms_norm(p, self.norm, self.eps))

    def attend(self, q, k, v, mask: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], k/v [S, Hkv, D], mask [T, S] (True: may attend) -> [T, H, D]."""
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        s = torch.einsum("thd,shd->hts", q.float(), k.float()) / math.sqrt(self.head_dim)
        s = s.masked_fill(~mask[None], float("-inf"))
        return torch.einsum("hts,shd->thd", s.softmax(-1), v.float()).to(q.dtype)

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def state_for_checkpoint(self) -> dict[str, torch.Tensor]:
        m = "midlayer."
        sd = {"fc.weight": self.fc.weight, "norm.weight": self.norm, "lm_head.weight": self.lm_head.weight,
              m + "input_layernorm.weight": self.input_layernorm, m + "hidden_norm.weight": self.hidden_norm,
              m + "post_attention_layernorm.weight": self.post_attention_layernorm}
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[f"{m}self_attn.{p}.weight"] = getattr(self, p).weight
        for p in ("gate_proj", "up_proj", "down_proj"):
            sd[f"{m}mlp.{p}.weight"] = getattr(self, p).weight
        return sd

    def load_checkpoint_state(self, sd: dict[str, torch.Tensor]) -> None:
        own = self.state_for_checkpoint()
        missing = sorted(set(own) - set(sd))
        if missing:
            raise ValueError(f"EAGLE-3 draft checkpoint lacks {missing}")
        with torch.no_grad():
            for name, p in own.items():
                p.copy_(sd[name].to(p.dtype))
            self.d2t.copy_(sd["d2t"])


def init_draft(cfg: dict, target_embed: torch.Tensor | None = None, seed: int = 0) -> Eagle3Draft:
    """A draft with initial weights (seeded): Linear layers as PyTorch initialises them, norms 1."""
    torch.manual_seed(seed)
    return Eagle3Draft(cfg)


def save(model: Eagle3Draft, path: str, *, vocab_ids, info: dict | None = None,
         dtype=torch.bfloat16) -> str:
    """Write the draft checkpoint to ``path`` (through ``path.partial``). ``vocab_ids``: the
    target token id of each draft-vocabulary row, ascending."""
    import shutil

    from safetensors.torch import save_file

    from ..checkpoint import make_readable

    ids = torch.as_tensor(list(vocab_ids), dtype=torch.long)
    if ids.numel() != model.cfg["draft_vocab_size"]:
        raise ValueError(f"{ids.numel()} vocabulary ids for a draft vocabulary of "
                         f"{model.cfg['draft_vocab_size']}")
    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_for_checkpoint().items()}
    sd["d2t"] = (ids - torch.arange(ids.numel())).contiguous()
    tmp = path.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(model.cfg, f, indent=2)
    with open(os.path.join(tmp, STAMP), "w") as f:
        json.dump(info or {}, f, indent=2)
    make_readable(tmp)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def load(path: str) -> Eagle3Draft:
    from safetensors.torch import load_file

    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    model = Eagle3Draft(cfg)
    model.load_checkpoint_state(load_file(os.path.join(path, "model.safetensors")))
    return model

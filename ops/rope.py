"""Rotary-embedding tables (backend independent).

- ``rope_cos_sin_cache``: the [max_positions, head_dim] fp32 table, first half
  cos(pos * inv_freq) * mscale, second half sin(...) * mscale; plain RoPE and YaRN
  ("rope_type": "yarn") follow the YaRN paper and the Hugging Face definition.
- ``rope_table``: the same values laid out for the kernels, made once at model build:
  [2, max_positions, head_dim] (cos rows, then sin rows, each half repeated to the full head
  dim) in the model's dtype, as Hugging Face and vLLM apply them (both round cos/sin to the
  activations' dtype).
- ``rope_cos_sin``: the rows of one step's positions, gathered once per step (one kernel) and
  shared by every layer's ``ops.rotary_embedding``;
- ``rope_step``: those rows with the cache itself (in the model dtype) and the positions, what
  every layer's ``ops.qkv_norm_rope`` takes.
"""

from __future__ import annotations

import math

import torch


def _yarn_inv_freq(head_dim: int, theta: float, scaling: dict) -> tuple[torch.Tensor, float]:
    factor = float(scaling["factor"])
    original = int(scaling["original_max_position_embeddings"])
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)
    truncate = scaling.get("truncate", True)

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        def mscale(s, m=1.0):
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp

    pos_freqs = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    extrapolated = 1.0 / pos_freqs
    interpolated = 1.0 / (factor * pos_freqs)
    inv_freq = interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight
    return inv_freq, float(attention_factor)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] and the cos/sin multiplier (1.0 unless YaRN)."""
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type in (None, "default"):
        inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        return inv, 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling)
    raise ValueError(f"rope_type {rope_type!r} is not supported; Qwen3 uses 'default' or 'yarn'")


def rope_table(cos_sin_cache: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[2, P, D] in ``dtype`` from a [P, D] ``rope_cos_sin_cache``: cos rows then sin rows, each
    half repeated to the full head dim."""
    half = cos_sin_cache.shape[-1] // 2
    cos, sin = cos_sin_cache[:, :half], cos_sin_cache[:, half:]
    return torch.stack((torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1))).to(dtype)


def rope_cos_sin(table: torch.Tensor, positions: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of ``positions`` [T] (int32 / int64, on the table's device) from a
    ``rope_table``: two contiguous [T, 1, D] views of one gather, in the table's dtype, what
    ``ops.rotary_embedding`` takes (one row per token, broadcast over the heads)."""
    rows = table.index_select(1, positions)                            # [2, T, D]
    return rows[0].unsqueeze(1), rows[1].unsqueeze(1)


def rope_step(table: torch.Tensor, cache: torch.Tensor, positions: torch.Tensor) -> tuple:
    """One step's rotation for ``ops.qkv_norm_rope``, made once per step for every layer:
    (cos, sin) of ``rope_cos_sin`` (one gather), the model-dtype ``rope_cos_sin_cache`` [P, D]
    and the positions, for a kernel that gathers its rows itself (nothing is launched for
    those two)."""
    cos, sin = rope_cos_sin(table, positions)
    return cos, sin, cache, positions


def rope_cos_sin_cache(head_dim: int, max_positions: int, theta: float,
                       scaling: dict | None = None) -> torch.Tensor:
    """[max_positions, head_dim] fp32: cat(cos * mscale, sin * mscale) of pos * inv_freq."""
    inv_freq, mscale = rope_inv_freq(head_dim, theta, scaling)
    pos = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    return torch.cat((freqs.cos() * mscale, freqs.sin() * mscale), dim=-1)

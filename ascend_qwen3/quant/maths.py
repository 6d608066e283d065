"""The quantisation arithmetic shared by the quantizer and the tests (plain torch, no ops).

Weights: symmetric per-output-channel int8 (``weight_scale`` [out, 1], ``weight_offset`` zeros).
Activations, static W8A8: one asymmetric int8 range per linear input from calibration
(``input_scale`` [1], ``input_offset`` [1]); the zero point is folded into an int32
``quant_bias``. Activations, W8A8_DYNAMIC: symmetric per token at run time.
"""

from __future__ import annotations

import torch

QMIN, QMAX = -128, 127


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] float -> (int8 [out, in], fp32 scale [out, 1]); w ~= wq * scale."""
    wf = w.float()
    scale = wf.abs().amax(dim=-1, keepdim=True) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    wq = torch.round(wf / scale).clamp(QMIN, QMAX).to(torch.int8)
    return wq, scale


def activation_params(lo: float, hi: float, scale: float | None = None) -> tuple[float, int]:
    """Asymmetric int8 range covering [lo, hi] (and 0): returns (scale, offset) with
    x ~= (xq - offset) * scale, xq = clamp(round(x / scale + offset), -128, 127).

    ``scale`` given (e.g. the computed one rounded to the model dtype it is stored in): only the
    offset is derived, for that scale."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if scale is None:
        scale = (hi - lo) / (QMAX - QMIN)
    if scale <= 0:
        return 1.0, 0
    offset = int(round(QMIN - lo / scale))
    return scale, max(QMIN, min(QMAX, offset))


def static_linear_params(wq: torch.Tensor, weight_scale: torch.Tensor, input_scale: float,
                         input_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(quant_bias int32 [out], deq_scale fp32 [out]) for a static W8A8 linear without float bias.

    y = s_x * s_w[n] * sum_k (xq_k - o) * wq[n, k] = deq_scale[n] * (acc[n] + quant_bias[n])
    with deq_scale = s_x * s_w and quant_bias = -o * sum_k wq[n, k].
    """
    quant_bias = (-int(input_offset) * wq.to(torch.int64).sum(dim=-1)).to(torch.int32)
    deq_scale = (weight_scale.reshape(-1).double() * input_scale).float()
    return quant_bias, deq_scale


def smooth_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant per-input-channel factors s [in]: s = max|X|^a / max|W|^(1-a).

    Dividing the activations by s (folded into the producer) and multiplying the weights' input
    columns by s leaves the product unchanged while moving outliers into the weights.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha={alpha} must lie in [0, 1]")
    w_absmax = torch.stack([w.float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    a = act_absmax.float().clamp(min=1e-5)
    s = a.pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)

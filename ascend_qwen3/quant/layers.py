"""int8 compute for W8A8 / W8A8_DYNAMIC linears and W8A8_DYNAMIC MoE experts, on ``ops``.

Parameters are created in checkpoint orientation (what the loader fills); ``finalize`` then
builds what the kernels consume (the int8 weight transposed to [K, N] and put into the
backend's layout, fp32 scale vectors) and drops the loading copies. The maths (msModelSlim's format, docs/w8a8_format.md):

* W8A8 (static): xq = clamp(round(x / input_scale + input_offset)); y = (xq @ Wq^T + quant_bias)
  * deq_scale. ``quant_bias`` folds the zero point (and any float bias); a row-parallel layer adds
  it on TP rank 0 only.
* W8A8_DYNAMIC: per-token symmetric xq, scale_x = rowmax|x| / 127; y = acc * weight_scale * scale_x.
* experts: routing fused with the dynamic quant, two grouped int8 GEMMs, SwiGLU and a second
  dynamic quant between them.

Every product is int8 x int8 with int32 accumulation (``ops.quant_matmul`` /
``ops.grouped_quant_matmul``); nothing is dequantised to float before the matmul.
"""

from __future__ import annotations

import torch
from torch import nn

import ops
from .format import W8A8, W8A8_DYNAMIC


def _param(*shape, dtype, device=None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class QuantizedInput:
    """A linear's input quantised already, by the norm in front of it (``add_rms_norm_into``):
    int8 rows ``xq`` [T, K], their per-token ``scale`` [T] (W8A8_DYNAMIC; None for static) and
    the ``dtype`` the activations had (the output's)."""

    __slots__ = ("xq", "scale", "dtype")

    def __init__(self, xq: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype):
        self.xq, self.scale, self.dtype = xq, scale, dtype

    @property
    def shape(self) -> torch.Size:
        return self.xq.shape


def create_linear(layer: nn.Module, scheme: str, out_local: int, in_local: int, *,
                  with_quant_bias: bool, device=None) -> None:
    """Register the parameters of a quantised linear (as the checkpoint stores them) on
    ``layer``; ``scheme`` W8A8 or W8A8_DYNAMIC (checked by ``Int8LinearMethod``)."""
    layer.ops = ops.bind(device, "prepare_weight", "prepare_quant_scale", "quant_matmul",
                         *(("prepare_static_quant", "static_quant", "prepare_norm_quant",
                            "add_rms_norm_quant") if scheme == W8A8 else
                           ("dynamic_quant", "add_rms_norm_dynamic_quant")))
    layer.weight = _param(out_local, in_local, dtype=torch.int8, device=device)
    if scheme == W8A8_DYNAMIC:
        layer.weight_scale = _param(out_local, 1, dtype=torch.float32, device=device)
        layer.weight_offset = _param(out_local, 1, dtype=torch.float32, device=device)
    else:  # static: deq_scale = input_scale * weight_scale is what the matmul uses
        layer.input_scale = _param(1, dtype=torch.float32, device=device)
        layer.input_offset = _param(1, dtype=torch.float32, device=device)
        layer.deq_scale = _param(out_local, dtype=torch.float32, device=device)
        if with_quant_bias:
            layer.quant_bias = _param(out_local, dtype=torch.int32, device=device)


def finalize_linear(layer: nn.Module, scheme: str) -> None:
    """After loading: int8 weight -> [K, N] in the backend layout; one fp32 scale vector [N].
    Static layers: the input offset is checked here, once, to be an integer in [-128, 127] (the
    zero point of an int8 quantiser), so the per-call quantiser never has to look at it."""
    if scheme == W8A8:
        off = layer.input_offset.data
        if not bool(torch.equal(off, off.round())) or not -128 <= float(off) <= 127:
            raise ValueError(f"input_offset = {float(off)} of a static W8A8 linear is not an integer "
                             f"in [-128, 127]; msModelSlim writes int8 zero points: re-export the "
                             f"checkpoint")
    qweight = layer.ops.prepare_weight(layer.weight.data.t().contiguous())
    scale = (layer.deq_scale.data if scheme == W8A8 else layer.weight_scale.data.reshape(-1))
    del layer.weight
    layer.register_buffer("qweight", qweight, persistent=False)
    layer.register_buffer("qscale", layer.ops.prepare_quant_scale(
        scale, layer.output_dtype, pertoken=scheme == W8A8_DYNAMIC), persistent=False)
    if scheme == W8A8:   # the quantiser's scale and zero point in the form its kernel takes
        q_scale, q_offset = layer.ops.prepare_static_quant(layer.input_scale.data,
                                                           layer.input_offset.data, layer.in_local)
        layer.register_buffer("q_scale", q_scale, persistent=False)
        layer.register_buffer("q_offset", q_offset, persistent=False)
        if _fusable(layer.output_dtype):   # the same quantiser, as the fused norm takes it
            n_scale, n_offset = layer.ops.prepare_norm_quant(
                layer.input_scale.data, layer.input_offset.data, layer.in_local, layer.output_dtype)
            layer.register_buffer("norm_q_scale", n_scale, persistent=False)
            layer.register_buffer("norm_q_offset", n_offset, persistent=False)


def _fusable(dtype: torch.dtype) -> bool:
    """The norm-fused quantisers exist for 16-bit activations (the NPU kernels' dtypes); an
    fp32 model keeps the norm and the quantisation apart."""
    return dtype in (torch.bfloat16, torch.float16)


def apply_linear(layer: nn.Module, scheme: str, x: torch.Tensor | QuantizedInput) -> torch.Tensor:
    """y = x @ W^T of a quantised linear, x [T, in_local] in the model dtype, or quantised
    already by the norm in front (``QuantizedInput``)."""
    if isinstance(x, QuantizedInput):
        xq, token_scale, dtype = x.xq, x.scale, x.dtype
    elif scheme == W8A8:
        xq, token_scale, dtype = layer.ops.static_quant(x, layer.q_scale, layer.q_offset), None, x.dtype
    else:
        (xq, token_scale), dtype = layer.ops.dynamic_quant(x), x.dtype
    if scheme == W8A8:
        return layer.ops.quant_matmul(xq, layer.qweight, layer.qscale, None,
                                      getattr(layer, "quant_bias", None), output_dtype=dtype)
    return layer.ops.quant_matmul(xq, layer.qweight, layer.qscale, token_scale, None,
                                  output_dtype=dtype)


def add_rms_norm_into(layer: nn.Module, scheme: str, x: torch.Tensor, residual: torch.Tensor,
                      weight: torch.Tensor, eps: float
                      ) -> tuple[QuantizedInput, torch.Tensor] | None:
    """The residual add and RMSNorm in front of this linear with its input quantisation fused
    in (``ops.add_rms_norm_quant`` / ``ops.add_rms_norm_dynamic_quant``: one kernel on the NPU
    where norm and quantiser take two): (its input, quantised; the new residual), or None when
    the activations' dtype has no fused kernel (fp32)."""
    if not _fusable(x.dtype):
        return None
    if scheme == W8A8:
        xq, new_residual = layer.ops.add_rms_norm_quant(x, residual, weight, eps, layer.norm_q_scale,
                                                        layer.norm_q_offset)
        return QuantizedInput(xq, None, x.dtype), new_residual
    xq, scale, new_residual = layer.ops.add_rms_norm_dynamic_quant(x, residual, weight, eps)
    return QuantizedInput(xq, scale, x.dtype), new_residual


class Int8LinearMethod:
    """The ``method`` of a W8A8 / W8A8_DYNAMIC ``parallel.layers.LinearBase``: creates,
    finalises and applies its int8 weight (``create_linear``, ``finalize_linear``,
    ``apply_linear``)."""

    def __init__(self, scheme: str):
        if scheme not in (W8A8, W8A8_DYNAMIC):
            raise ValueError(f"unknown linear quantisation {scheme!r}")
        self.scheme = scheme

    def create(self, layer: nn.Module, out_local: int, in_local: int, *, dtype, device=None,
               with_quant_bias: bool = True) -> None:
        create_linear(layer, self.scheme, out_local, in_local, with_quant_bias=with_quant_bias,
                      device=device)

    def finalize(self, layer: nn.Module) -> None:
        finalize_linear(layer, self.scheme)

    def apply(self, layer: nn.Module, x: torch.Tensor | QuantizedInput) -> torch.Tensor:
        return apply_linear(layer, self.scheme, x)

    def add_rms_norm_into(self, layer: nn.Module, x: torch.Tensor, residual: torch.Tensor,
                          weight: torch.Tensor, eps: float):
        return add_rms_norm_into(layer, self.scheme, x, residual, weight, eps)


def linear_method(quant, module: str) -> Int8LinearMethod | None:
    """The method of the linear ``module`` under ``quant`` (a ``QuantConfig`` or None): None
    (the layer's float default) when the module is not quantised."""
    scheme = quant.scheme(module) if quant is not None else None
    return None if scheme is None else Int8LinearMethod(scheme)


def create_experts(experts: nn.Module, count: int, hidden: int, inter: int, *, device=None) -> None:
    """W8A8_DYNAMIC expert weights in grouped layout: int8 w13 [E, H, 2I], w2 [E, I, H] and
    per-channel scales/offsets [E, 2I] and [E, H]."""
    experts.ops = ops.bind(device, "prepare_weight", "prepare_expert_scale", "grouped_quant_matmul",
                           "grouped_quant_swiglu_quant")
    experts.w13 = _param(count, hidden, 2 * inter, dtype=torch.int8, device=device)
    experts.w2 = _param(count, inter, hidden, dtype=torch.int8, device=device)
    experts.w13_scale = _param(count, 2 * inter, dtype=torch.float32, device=device)
    experts.w2_scale = _param(count, hidden, dtype=torch.float32, device=device)
    experts.w13_offset = _param(count, 2 * inter, dtype=torch.float32, device=device)
    experts.w2_offset = _param(count, hidden, dtype=torch.float32, device=device)


def finalize_experts(experts: nn.Module) -> None:
    """The loaded parameters become buffers in the form the ops take them (the tensors the
    ``prepare_*`` ops return, kept as they are: an NPU weight's storage format travels with
    the tensor ``prepare_weight`` made)."""
    prepared = {"w13": experts.ops.prepare_weight(experts.w13.data.contiguous()),
                "w2": experts.ops.prepare_weight(experts.w2.data.contiguous()),
                "w13_scale": experts.ops.prepare_expert_scale(experts.w13_scale.data, experts.dtype),
                "w2_scale": experts.ops.prepare_expert_scale(experts.w2_scale.data, experts.dtype)}
    for name, tensor in prepared.items():
        delattr(experts, name)
        experts.register_buffer(name, tensor, persistent=False)


def apply_experts(experts: nn.Module, xq: torch.Tensor, token_scale: torch.Tensor,
                  counts: torch.Tensor, out_dtype: torch.dtype, cumulative: bool = False
                  ) -> torch.Tensor:
    """Expert FFN on rows already routed and quantised (``ops.moe_route_quant``, or
    ``ops.ep_dispatch`` with its cumulative group ends: ``cumulative``)."""
    aq, a_scale = experts.ops.grouped_quant_swiglu_quant(xq, experts.w13, experts.w13_scale,
                                                         token_scale, counts, output_dtype=out_dtype,
                                                         cumulative=cumulative)
    return experts.ops.grouped_quant_matmul(aq, experts.w2, experts.w2_scale, a_scale, counts,
                                            output_dtype=out_dtype, cumulative=cumulative)

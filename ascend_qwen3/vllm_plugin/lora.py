"""LoRA adapters on the project's classes, served by vLLM's own LoRA manager.

vLLM's manager (vllm/lora/model_manager.py ``_create_lora_modules``) only considers modules that
are instances of vLLM's ``LinearBase`` (vllm/lora/utils.py ``get_supported_lora_modules``,
``is_supported_lora_module``) and replaces each with the first class of
``vllm.lora.utils._all_lora_classes`` whose ``can_replace_layer`` accepts it (``from_layer``).
The project's linears (ascend_qwen3/parallel/layers.py) are not vLLM layers, and ``parallel``
must not import vLLM, so this module adapts them, the way vllm-ascend adapts its own linears
(vllm_ascend/lora/utils.py ``refresh_all_lora_classes`` at v0.23.0, lines 74-88):

- ``ProjectLinear``: a vLLM ``LinearBase`` holding one of the project's linears (``qkv_proj``,
  ``o_proj``, ``gate_up_proj``, ``down_proj`` of every decoder layer) and returning its output
  tensor. ``install`` puts one in place of each linear of the graph once the weights are loaded,
  so the manager finds them by their usual names.
- ``ProjectLinearWithLoRA``: vLLM's ``BaseLayerWithLoRA`` for those, prepended to
  ``_all_lora_classes``. It keeps one stack of A and B matrices per packed sub-module (q/k/v,
  gate/up) with ``max_loras`` slots, sliced for this tensor-parallel rank, and its forward is the
  project's layer plus ``B @ (A @ x)`` of each token's adapter, through ``ops.lora_shrink`` and
  ``ops.lora_expand``. Which slot each token uses is the punica wrapper's
  ``token_lora_indices`` (vllm/lora/punica_wrapper/punica_base.py: the slot, or -1 for a token
  without adapter; vllm/lora/punica_wrapper/utils.py ``convert_mapping``), the mapping vLLM's
  runner sets every step from the requests' ``LoRARequest``. The adapter's scaling
  (lora_alpha / r) is folded into B by vLLM when it loads the adapter
  (vllm/lora/lora_weights.py ``optimize``), so the ops run with scale 1.

Row-parallel layers (``o_proj``, ``down_proj``) add the LoRA term to their partial output before
the all-reduce: each rank holds A's columns of its input slice and the whole B, and the
all-reduce sums B @ (A_rank @ x_rank) over ranks into B @ (A @ x), as vLLM's
``RowParallelLinearWithLoRA`` does (vllm/lora/layers/row_parallel_linear.py).

W8A8 checkpoints: the project's norm quantises a W8A8 ``qkv_proj`` / ``gate_up_proj`` input
itself when it can (``into=`` in ascend_qwen3/model/decoder.py, ``add_rms_norm_into`` in
ascend_qwen3/quant/layers.py). The LoRA term needs the float activation, so a wrapped linear
offers the norm no quantisation method (``ProjectLinear.method`` is None): the norm returns the
float output, the int8 base quantises it itself (the same quantiser, one kernel more), and the
LoRA term is computed from the same float input.

MoE experts get no LoRA: the project's experts are not vLLM's ``FusedMoE``/``MoERunner`` and
vLLM's CPU punica wrapper has no MoE methods; vllm-ascend also refuses MoE LoRA with expert
parallelism or quantisation (docs/source/user_guide/feature_guide/lora.md at v0.23.0). The
attention projections (and the dense MLPs of ``mlp_only_layers``) of a MoE model get LoRA.
"""

from __future__ import annotations

import inspect
import itertools

import torch
from torch import nn

from vllm.lora.layers.base import BaseLayerWithLoRA
from vllm.model_executor.layers.linear import LinearBase as VllmLinearBase

import ops
from ..parallel.plan import kv_head_start, local_heads

# the vLLM names of the project's fused linears and what they pack (the names adapters use)
PACKED_MODULES = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                  "gate_up_proj": ["gate_proj", "up_proj"]}
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# adapters name modules as Hugging Face does (model.layers.N...); the project's tree holds the
# decoder layers at model.graph.layers.N (vLLM's LoRA loader applies the class's
# hf_to_vllm_mapper to adapter names: vllm/lora/worker_manager.py _load_adapter)
ADAPTER_PREFIX, PROJECT_PREFIX = "model.layers.", "model.graph.layers."
REFUSED_TARGETS = {"experts": "the MoE experts (the project's experts are not vLLM's FusedMoE; "
                              "vLLM's CPU LoRA kernels have no MoE path)",
                   "gate": "the MoE router", "lm_head": "the output head",
                   "embed_tokens": "the token embedding"}


_LINEAR_TAKES_TP = "tp_rank" in inspect.signature(VllmLinearBase.__init__).parameters


class LoRAError(ValueError):
    pass


def weights_mapper():
    """The adapter-name mapper the class exposes as ``hf_to_vllm_mapper``."""
    from vllm.model_executor.models.utils import WeightsMapper
    return WeightsMapper(orig_to_new_prefix={ADAPTER_PREFIX: PROJECT_PREFIX})


def check_lora_config(lora_config, cfg) -> None:
    """``--lora-target-modules`` (vLLM's ``LoRAConfig.target_modules``) against what the project's
    classes can adapt: anything else stops the start with what is supported."""
    targets = getattr(lora_config, "target_modules", None)
    if not targets:
        return
    adaptable = set(LORA_MODULES) | set(PACKED_MODULES)
    bad = [t for t in targets if t.rsplit(".", 1)[-1] not in adaptable]   # (a suffix or a full name)
    if bad:
        what = "; ".join(f"{t!r}: {REFUSED_TARGETS.get(t.rsplit('.', 1)[-1], 'not a module of this model')}"
                         for t in bad)
        raise LoRAError(f"ascend-qwen3 {cfg.architecture}: --lora-target-modules {bad} cannot get "
                        f"LoRA on the project's classes ({what}); LoRA applies to "
                        f"{', '.join(LORA_MODULES)} (MoE models: the attention projections and any "
                        f"dense MLP layers). Remove those names, or serve this adapter with vLLM's "
                        f"built-in class")


class ProjectLinear(VllmLinearBase):
    """One of the project's linears as a vLLM ``LinearBase``, so that vLLM's LoRA manager finds
    it. ``forward`` is the project layer's (a tensor, not vLLM's (output, bias) pair).

    ``kind``: "column" (outputs split over ranks) or "row" (inputs split, from input column
    ``in_start`` of ``in_full``; the output is all-reduced by ``ctx``). ``slices``: for each
    packed sub-module (``names``), (its local output width, the first row of its full weight this
    rank holds, its full output width)."""

    # no quantisation method offered to the norm in front (decoder's ``into=``): it must return
    # the float activation, which the LoRA term needs (the module docstring)
    method = None

    def __init__(self, layer: nn.Module, *, kind: str, ctx, names: list[str],
                 slices: list[tuple[int, int, int]], in_full: int, in_start: int = 0,
                 prefix: str = ""):
        # vLLM 0.32's LinearBase takes the rank and size; 0.23's (what vllm-ascend 0.23 runs)
        # reads them from vLLM's TP group itself, the same values: set here either way
        tp = ({"tp_rank": ctx.tp_rank, "tp_size": ctx.tp_size} if _LINEAR_TAKES_TP else {})
        super().__init__(input_size=in_full, output_size=sum(full for _, _, full in slices),
                         params_dtype=layer.output_dtype, prefix=prefix, return_bias=False, **tp)
        self.tp_rank, self.tp_size = ctx.tp_rank, ctx.tp_size
        # the project's layer computes and owns its weight: no vLLM linear method (vLLM's
        # process_weights_after_loading then leaves this module alone)
        self.quant_method = None
        self.layer, self.kind, self.ctx = layer, kind, ctx
        self.names, self.slices, self.in_full, self.in_start = names, slices, in_full, in_start

    @property
    def device(self) -> torch.device:
        t = next(itertools.chain(self.layer.parameters(), self.layer.buffers()))
        return t.device

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """The project layer's output before any all-reduce (a row layer's partial sum)."""
        return self.layer.matmul(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _project_linears(graph, cfg, ctx):
    """(path in the graph, ProjectLinear) for every linear LoRA may adapt."""
    tp, rank = ctx.tp_size, ctx.tp_rank
    heads, kv_heads = local_heads(cfg, tp)
    d = cfg.head_dim
    q_local, kv_local = heads * d, kv_heads * d
    kv_start = kv_head_start(cfg, tp, rank) * d
    for i, layer in enumerate(graph.layers):
        if not hasattr(layer, "self_attn"):     # another pipeline stage's layer
            continue
        attn = layer.self_attn
        pre = f"layers.{i}."
        yield attn, "qkv_proj", ProjectLinear(
            attn.qkv_proj, kind="column", ctx=ctx, names=PACKED_MODULES["qkv_proj"],
            slices=[(q_local, rank * q_local, cfg.num_heads * d),
                    (kv_local, kv_start, cfg.num_kv_heads * d),
                    (kv_local, kv_start, cfg.num_kv_heads * d)],
            in_full=cfg.hidden_size, prefix=pre + "self_attn.qkv_proj")
        yield attn, "o_proj", ProjectLinear(
            attn.o_proj, kind="row", ctx=ctx, names=["o_proj"],
            slices=[(cfg.hidden_size, 0, cfg.hidden_size)],
            in_full=cfg.num_heads * d, in_start=rank * q_local, prefix=pre + "self_attn.o_proj")
        mlp = layer.mlp
        if hasattr(mlp, "gate_up_proj"):      # a dense MLP (MoE blocks have experts instead)
            local = mlp.gate_up_proj.out_local // 2
            yield mlp, "gate_up_proj", ProjectLinear(
                mlp.gate_up_proj, kind="column", ctx=ctx, names=PACKED_MODULES["gate_up_proj"],
                slices=[(local, rank * local, local * tp)] * 2, in_full=cfg.hidden_size,
                prefix=pre + "mlp.gate_up_proj")
            yield mlp, "down_proj", ProjectLinear(
                mlp.down_proj, kind="row", ctx=ctx, names=["down_proj"],
                slices=[(cfg.hidden_size, 0, cfg.hidden_size)], in_full=local * tp,
                in_start=rank * local,
                prefix=pre + "mlp.down_proj")


def install(graph, cfg, ctx) -> int:
    """After loading: put a ``ProjectLinear`` around each adaptable linear of ``graph`` and make
    ``ProjectLinearWithLoRA`` the first LoRA class vLLM tries. Returns the number wrapped."""
    register_lora_class()
    n = 0
    for parent, name, wrapped in list(_project_linears(graph, cfg, ctx)):
        if isinstance(getattr(parent, name), ProjectLinear):
            continue
        setattr(parent, name, wrapped)
        n += 1
    return n


def register_lora_class() -> None:
    """Prepend ``ProjectLinearWithLoRA`` to ``vllm.lora.utils._all_lora_classes`` (read by
    ``from_layer`` at each call), once per process."""
    import vllm.lora.utils as lora_utils

    if ProjectLinearWithLoRA not in lora_utils._all_lora_classes:
        lora_utils._all_lora_classes = (ProjectLinearWithLoRA, *lora_utils._all_lora_classes)


class ProjectLinearWithLoRA(BaseLayerWithLoRA):
    """vLLM's LoRA layer for a ``ProjectLinear``: per packed sub-module ``s`` and slot ``i``,
    ``lora_a[s][i]`` [max_rank, in_local] and ``lora_b[s][i]`` [out_local_s, max_rank] (zeros in
    unused rows and empty slots); forward adds ``B_s @ (A_s @ x)`` of each token's slot into the
    sub-module's columns of the output."""

    def __init__(self, base_layer: ProjectLinear):
        super().__init__()
        self.base_layer = base_layer
        self.ops = ops.bind(base_layer.device, "lora_shrink", "lora_expand")
        self.lora_a: list[torch.Tensor] = []
        self.lora_b: list[torch.Tensor] = []

    @classmethod
    def can_replace_layer(cls, source_layer, lora_config, packed_modules_list,
                          model_config=None) -> bool:
        return type(source_layer) is ProjectLinear

    def create_lora_weights(self, max_loras: int, lora_config, model_config=None) -> None:
        b = self.base_layer
        rank, dtype, device = lora_config.max_lora_rank, lora_config.lora_dtype, b.device
        in_local = b.layer.in_local
        self.max_rank = rank
        self.lora_a = [torch.zeros(max_loras, rank, in_local, dtype=dtype, device=device)
                       for _ in b.slices]
        self.lora_b = [torch.zeros(max_loras, n, rank, dtype=dtype, device=device)
                       for n, _, _ in b.slices]
        self.offsets = list(itertools.accumulate([0] + [n for n, _, _ in b.slices]))[:-1]

    def reset_lora(self, index: int) -> None:
        for a, b in zip(self.lora_a, self.lora_b):
            a[index] = 0
            b[index] = 0

    # --- tensor-parallel slicing of a full adapter (vLLM's slice_lora_a / slice_lora_b) ---------

    def slice_lora_a(self, lora_a):
        b = self.base_layer
        if b.kind == "column":
            return lora_a
        n = b.layer.in_local
        return [None if a is None else a[:, b.in_start:b.in_start + n] for a in lora_a]

    def slice_lora_b(self, lora_b):
        b = self.base_layer
        if b.kind == "row":
            return lora_b
        return [None if m is None else m[start:start + n]
                for m, (n, start, _) in zip(lora_b, b.slices)]

    def _check(self, name: str, a: torch.Tensor, m: torch.Tensor, out_full: int) -> None:
        b = self.base_layer
        where = f"adapter module model.{b.prefix.rsplit('.', 1)[0]}.{name}"
        if a.dim() != 2 or m.dim() != 2 or a.shape[0] != m.shape[1]:
            raise LoRAError(f"{where}: lora_A {tuple(a.shape)} and lora_B {tuple(m.shape)} are not "
                            f"a rank-r pair ([r, in] and [out, r]); the adapter file is damaged")
        if a.shape[0] > self.max_rank:
            raise LoRAError(f"{where}: rank {a.shape[0]} exceeds --max-lora-rank {self.max_rank}; "
                            f"start the engine with --max-lora-rank >= {a.shape[0]}")
        if a.shape[1] != b.in_full or m.shape[0] != out_full:
            raise LoRAError(f"{where}: lora_A is {tuple(a.shape)} and lora_B {tuple(m.shape)}, this "
                            f"model's {name} takes {b.in_full} inputs and gives {out_full} outputs "
                            f"(lora_A [r, {b.in_full}], lora_B [{out_full}, r]); the adapter was "
                            f"trained for another model: use one made for this checkpoint")

    def set_lora(self, index: int, lora_a, lora_b) -> None:
        b = self.base_layer
        if not isinstance(lora_a, list):
            lora_a, lora_b = [lora_a], [lora_b]
        if len(lora_a) != len(b.names) or len(lora_b) != len(b.names):
            raise LoRAError(f"{b.prefix}: {len(lora_a)} LoRA pair(s) for the {len(b.names)} "
                            f"packed module(s) {b.names}")
        for name, a, m, (_, _, out_full) in zip(b.names, lora_a, lora_b, b.slices):
            if a is not None:
                self._check(name, a, m, out_full)
        self.reset_lora(index)
        for s, (a, m) in enumerate(zip(self.slice_lora_a(lora_a), self.slice_lora_b(lora_b))):
            if a is None:
                continue
            r = a.shape[0]
            self.lora_a[s][index, :r].copy_(a)
            self.lora_b[s][index, :, :r].copy_(m)

    # --- forward -------------------------------------------------------------------------------

    def _token_slots(self, T: int) -> torch.Tensor:
        """Each of the T rows' adapter slot (-1: none). The runner maps the scheduled tokens; rows
        beyond them (padding of a captured batch size) get none."""
        idx = self.punica_wrapper.token_lora_indices
        n = idx.shape[0]
        if n == T:
            return idx
        if n > T:
            return idx[:T]
        return torch.cat([idx, idx.new_full((T - n,), -1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base_layer
        y = b.base(x)
        slots = self._token_slots(x.shape[0])
        for s, offset in enumerate(self.offsets):
            h = self.ops.lora_shrink(x, self.lora_a[s], slots, 1.0)
            y = self.ops.lora_expand(y, h, self.lora_b[s], slots, offset)
        return b.ctx.all_reduce(y) if b.kind == "row" else y

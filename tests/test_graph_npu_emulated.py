"""The whole Qwen3 graph with the NPU backend, run through the torch_npu emulator (tier 2).

The op-level contract tests (test_ops_npu_emulated.py) check each op alone; this runs the graph
end to end with ``ops`` dispatching to ``ops.npu`` bound to the emulator, in the configuration
the NPU backend supports (bf16, head_dim 128, KV block size 128), for a dense and a MoE
checkpoint, and compares the logits with the CPU backend on the same weights. Both are bf16
computations that round at different points, so the comparison is within the bf16 tolerance of
the graph parity tests (3e-2 of the logit scale), and the call log proves that the fused NPU
kernels (not the CPU reference) produced the result.
"""

from __future__ import annotations

import pytest
import torch

import ops
from ascend_qwen3.loader import load_model
from tests import npu_emulator
from tests.test_graph_parity import ours_prefill_logits

PROMPTS = [[3, 17, 42, 9, 100, 5, 61], [11, 250], list(range(20, 20 + 150))]
BF16_TOL = 3e-2

CASES = {
    "dense_yarn": {},
    "moe_plain": dict(head_dim=128),
}

KERNELS = ["npu_fused_infer_attention_score", "_npu_reshape_and_cache", "npu_apply_rotary_pos_emb",
           "npu_rms_norm", "npu_add_rms_norm", "npu_swiglu"]
MOE_KERNELS = ["npu_moe_gating_top_k_softmax", "npu_moe_init_routing_v2", "npu_grouped_matmul",
               "npu_moe_token_unpermute"]


def _logits(path, chunk=None):
    model, _ = load_model(path, dtype="bfloat16")
    return ours_prefill_logits(model, PROMPTS, block_size=128, max_batch_tokens=chunk)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("chunk", [None, 64])
def test_graph_on_emulated_npu_matches_cpu(checkpoint, name, chunk):
    path = checkpoint(name, dtype=torch.bfloat16, **CASES[name])
    ops.select_backend("cpu")
    ref = _logits(path, chunk)
    with npu_emulator.installed() as emu:
        saved = ops._backend
        ops._backend = emu.npu_ops
        try:
            got = _logits(path, chunk)
        finally:
            ops._backend = saved
        ran = {k for k in KERNELS + MOE_KERNELS if emu.calls.count(k) > 0}
    expected = set(KERNELS) | (set(MOE_KERNELS) if name.startswith("moe") else set())
    missing = sorted(k for k in expected if k not in ran)
    assert not missing, f"NPU kernels that never ran: {missing}"
    for p, a, b in zip(PROMPTS, got, ref):
        scale = b.float().abs().max()
        err = float((a.float() - b.float()).abs().amax(dim=-1).max() / scale)
        assert err < BF16_TOL, (name, len(p), err)
        # the top token agrees wherever the reference's top-2 margin exceeds what two bf16
        # computations may disagree by (2 x the tolerance)
        top2 = b.float().topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * BF16_TOL * scale
        same = a.argmax(-1) == b.argmax(-1)
        assert bool(same[clear].all()), (name, len(p), (~same & clear).nonzero().flatten().tolist())

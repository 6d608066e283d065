"""What the project's part in vllm-ascend's FULL ACL graphs relies on, pinned against the
vllm-ascend 0.23.0 wheel (read as text, as tests/test_vllm_compat.py reads it), and the refusal
at start-up when it no longer holds.

The project's attention records its captured call in the layout vllm-ascend's
``AscendAttentionBackendImpl.update_graph_params`` unpacks (``compat.record_attention_task``),
so that vllm-ascend's runner refreshes it after each replay as it refreshes its own layers
(``update_full_graph_params``, called from ``NPUModelRunner._update_full_graph_params_if_needed``).
``compat.full_graph_protocol_problems`` reads that chain; the model refuses to start with FULL
graphs when it finds a problem (``compat.check_full_graph_protocol``), rather than replay stale
lengths. Here: no problem in the 0.23 wheel, and each relied-on piece, renamed or reordered in a
copy of it, is reported.
"""

from __future__ import annotations

import inspect

import pytest

from ascend_qwen3.vllm_plugin import compat
from tests.test_vllm_compat import vllm_ascend_023  # noqa: F401  (fixture)

IMPL = "vllm_ascend/attention/attention_v1.py"
GRAPH = "vllm_ascend/compilation/acl_graph.py"
CONTEXT = "vllm_ascend/ascend_forward_context.py"
RUNNER = "vllm_ascend/worker/model_runner_v1.py"


def _reader(tree):
    return lambda module: tree.text(module.replace(".", "/") + ".py")


def test_the_0_23_wheel_works_as_the_recording_relies_on(vllm_ascend_023):
    assert compat.full_graph_protocol_problems(_reader(vllm_ascend_023)) == []


# (file, text in it, what it becomes, what the problem report must say)
MUTATIONS = [
    (IMPL, "def update_graph_params(", "def refresh_graph_params(", "update_graph_params is gone"),
    (IMPL, "                        seq_lens,\n                        query_start_loc,",
     "                        query_start_loc,\n                        seq_lens,",
     "no longer unpacks the recorded attention call"),
    (IMPL, "torch.npu.graph_task_update_begin(", "torch.npu.graph_task_refresh_begin(",
     "graph_task_update_begin"),
    (IMPL, "attn_metadata[metadata_key].seq_lens_list", "attn_metadata[metadata_key].seq_lens_host",
     "seq_lens_list"),
    (GRAPH, "    attn_params: dict[int, list[tuple]]", "    call_params: dict[int, list[tuple]]",
     "GraphParams fields changed"),
    (GRAPH, "impl_cls.update_graph_params(", "impl_cls.refresh(",
     "no longer runs the platform impl's update_graph_params"),
    (CONTEXT, '"capturing",', '"is_capturing",', "no longer carries 'capturing'"),
    (RUNNER, "            update_full_graph_params(", "            refresh_full_graph_params(",
     "no longer calls update_full_graph_params"),
]


@pytest.mark.parametrize("path,old,new,said", MUTATIONS, ids=[m[3][:30] for m in MUTATIONS])
def test_a_change_in_vllm_ascend_is_reported(vllm_ascend_023, path, old, new, said):
    text = vllm_ascend_023.text(path)
    assert old in text, f"the 0.23 wheel no longer has {old!r} in {path}: update MUTATIONS"
    changed = vllm_ascend_023.with_changes({path: text.replace(old, new)})
    problems = compat.full_graph_protocol_problems(_reader(changed))
    assert any(said in p for p in problems), problems


def test_the_server_refuses_full_graphs_it_cannot_refresh(monkeypatch):
    """At start-up, with the problems the check reports (here vllm-ascend is not installed at
    all, so it cannot be read): a clear error that names the way out, never a replay."""
    with pytest.raises(RuntimeError, match="cannot take part.*graph mode PIECEWISE"):
        compat.check_full_graph_protocol()
    monkeypatch.setattr(compat, "full_graph_protocol_problems", lambda read: [])
    compat.check_full_graph_protocol()          # nothing reported: nothing refused


def test_the_model_checks_before_reading_weights():
    """The backbone runs the check on the NPU when the engine asks for full graphs, before the
    loader or the graph exist."""
    from ascend_qwen3.vllm_plugin.model import AscendQwen3Backbone

    src = inspect.getsource(AscendQwen3Backbone.__init__)
    check = src.index("compat.check_full_graph_protocol()")
    assert "compat.on_npu() and compat.full_graphs_requested(vllm_config)" in src
    assert check < src.index("checkpoint_files(") and check < src.index("Qwen3Graph(")


def test_full_graphs_requested_reads_vllms_mode():
    from vllm.config.compilation import CUDAGraphMode

    class Cfg:
        class compilation_config:
            cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE

    assert compat.full_graphs_requested(Cfg)
    Cfg.compilation_config.cudagraph_mode = CUDAGraphMode.PIECEWISE
    assert not compat.full_graphs_requested(Cfg)

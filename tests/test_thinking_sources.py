"""What the project's thinking budget and reasoning parser rely on in vLLM 0.23 / 0.32 and
vllm-ascend 0.23, read from their published source (as ``test_vllm_compat.py`` reads it).

The symbols themselves (the logits-processor interface, ``SamplingParams`` fields, the parser
registry, the parser methods overridden) are in ``compat.VLLM_USES`` and checked there for both
versions. Here: the behaviour the design needs from that code, and that each check fails when
the code it reads changes.

- vLLM runs a logits processor's ``validate_params`` on each request before it checks
  ``thinking_token_budget`` (so the processor can take the field over), and vLLM's own budget
  reads only that field (so once it is moved, vLLM's budget stays idle).
- vllm-ascend 0.23's model runner builds the custom logits processors named by
  ``--logits-processors`` into its ``NPUInputBatch`` and keeps their output ids (while its own
  budget holder is ``None``), its sampler applies them (vLLM's ``Sampler``), and its runner fills
  the async-scheduling placeholders in before sampling.
"""

from __future__ import annotations

import ast
import inspect

import pytest

from ascend_qwen3.vllm_plugin.compat import VLLM_USES
from tests.test_graph_mode import _attr_chain, _function
from tests.test_vllm_compat import vllm_023, vllm_032, vllm_ascend_023, vllm_tree  # noqa: F401

pytestmark = pytest.mark.vllm

# Per vLLM version: how a request reaches the logits processors' validate_params from the input
# processor. Each link: (module, function, what it calls). The first link's call must come before
# the function reads thinking_token_budget.
VALIDATION_CHAIN = {
    "0.23": [("vllm.v1.engine.input_processor", "InputProcessor._validate_params", "verify"),
             ("vllm.sampling_params", "SamplingParams.verify", "_validate_logits_processors"),
             ("vllm.sampling_params", "SamplingParams._validate_logits_processors",
              "validate_logits_processors_parameters"),
             ("vllm.v1.sample.logits_processor", "validate_logits_processors_parameters",
              "validate_params")],
    "0.32": [("vllm.v1.engine.input_processor", "InputProcessor._validate_params",
              "validate_logits_processors_params"),
             ("vllm.v1.engine.input_processor", "InputProcessor._build_logits_processors_params_validator",
              "validate_logits_processors_parameters"),
             ("vllm.v1.sample.logits_processor", "validate_logits_processors_parameters",
              "validate_params")],
}


def _calls(fn) -> list[tuple[int, str]]:
    """(line, last name) of every call in a function, in source order."""
    out = []
    for n in ast.walk(fn):
        if isinstance(n, ast.Call):
            name = _attr_chain(n.func).rsplit(".", 1)[-1]
            out.append((n.lineno, name))
    return sorted(out)


def _name_uses(fn) -> list[int]:
    """Lines where a name appears as an attribute, a name or inside a ``partial(...)``-style
    reference (a function passed, not called)."""
    return sorted(n.lineno for n in ast.walk(fn)
                  if isinstance(n, (ast.Attribute, ast.Name)))


def _refs(fn, name: str) -> list[int]:
    return sorted(n.lineno for n in ast.walk(fn)
                  if (isinstance(n, ast.Attribute) and n.attr == name)
                  or (isinstance(n, ast.Name) and n.id == name))


def check_validation_order(tree, version: str) -> list[str]:
    """Problems with the chain of VALIDATION_CHAIN[version] in ``tree`` (empty: it holds)."""
    problems = []
    for i, (module, path, callee) in enumerate(VALIDATION_CHAIN[version]):
        try:
            fn = _function(tree, module, path)
        except Exception as exc:      # noqa: BLE001 (NotFound or a kind mismatch: reported)
            problems.append(f"{module}.{path}: {exc}")
            continue
        at = _refs(fn, callee)
        if not at:
            problems.append(f"{module}.{path} no longer reaches {callee} ({tree.label})")
            continue
        if i == 0:
            budget = _refs(fn, "thinking_token_budget")
            if not budget or min(at) > min(budget):
                problems.append(f"{module}.{path} reads thinking_token_budget (line "
                                f"{min(budget) if budget else '-'}) before it calls {callee} "
                                f"(line {min(at)}) in {tree.label}")
    return problems


def test_vllm_validates_logits_processors_before_the_budget(vllm_tree):
    version = "0.23" if "0.23" in vllm_tree.label else "0.32"
    assert not check_validation_order(vllm_tree, version)


def test_vllms_own_budget_reads_only_the_request_field(vllm_tree):
    """vLLM's budget tracks exactly the requests whose SamplingParams.thinking_token_budget is
    set: with the field moved into extra_args it tracks none."""
    sync = _function(vllm_tree, "vllm.v1.sample.thinking_budget_state",
                     "ThinkingBudgetStateHolder.sync_batch")
    assert _refs(sync, "thinking_token_budget") and not _refs(sync, "extra_args")


def test_the_order_check_fails_on_a_change(vllm_023):
    """Renaming the link (0.23's SamplingParams.verify no longer calling the processors'
    validation) or reading the budget first is reported."""
    path = "vllm/sampling_params.py"
    text = vllm_023.text(path)
    assert "self._validate_logits_processors(model_config)" in text
    renamed = vllm_023.with_changes(
        {path: text.replace("self._validate_logits_processors(model_config)", "pass")})
    assert any("no longer reaches _validate_logits_processors" in p
               for p in check_validation_order(renamed, "0.23"))
    ip = "vllm/v1/engine/input_processor.py"
    src = vllm_023.text(ip)
    early = src.replace("            params.verify(\n",
                        "            _ = params.thinking_token_budget\n            params.verify(\n", 1)
    assert early != src
    assert any("reads thinking_token_budget" in p
               for p in check_validation_order(vllm_023.with_changes({ip: early}), "0.23"))


# --- vllm-ascend 0.23 --------------------------------------------------------------------------

RUNNER = "vllm_ascend.worker.model_runner_v1"


def check_vllm_ascend_loads_custom_processors(tree) -> list[str]:
    """Problems with how vllm-ascend's runner builds and feeds custom logits processors."""
    problems = []
    runner = tree.module(RUNNER)
    builds = []
    for n in ast.walk(runner):
        if isinstance(n, ast.Call) and _attr_chain(n.func).endswith("NPUInputBatch"):
            kw = {k.arg: k.value for k in n.keywords}
            procs, need = kw.get("logitsprocs"), kw.get("logitsprocs_need_output_token_ids")
            if (isinstance(procs, ast.Call) and _attr_chain(procs.func) == "build_logitsprocs"
                    and any(_attr_chain(a).endswith("model_config.logits_processors")
                            for a in procs.args)
                    and need is not None
                    and any(_attr_chain(x).endswith("logits_processors")
                            for x in ast.walk(need) if isinstance(x, ast.Attribute))):
                builds.append(n.lineno)
    if not builds:
        problems.append(f"{RUNNER} no longer builds NPUInputBatch(logitsprocs=build_logitsprocs("
                        f"..., model_config.logits_processors), logitsprocs_need_output_token_ids"
                        f"=...) ({tree.label})")
    imports = {a.name for n in ast.walk(runner) if isinstance(n, ast.ImportFrom)
               and n.module == "vllm.v1.sample.logits_processor" for a in n.names}
    if "build_logitsprocs" not in imports:
        problems.append(f"{RUNNER} does not take build_logitsprocs from vLLM's logits_processor")
    if not any(name == "update_async_output_token_ids" for _, name in _calls(runner)):
        problems.append(f"{RUNNER} no longer fills async placeholders in "
                        f"(update_async_output_token_ids)")
    batch = tree.resolve("vllm_ascend.worker.npu_input_batch", "NPUInputBatch").node
    if not any(_attr_chain(b).endswith("InputBatch") for b in batch.bases):
        problems.append("NPUInputBatch no longer extends vLLM's InputBatch")
    sampler = tree.resolve("vllm_ascend.sample.sampler", "AscendSampler").node
    if "apply_logits_processors" in {f.name for f in sampler.body if isinstance(f, ast.FunctionDef)}:
        problems.append("AscendSampler overrides apply_logits_processors: check it still runs the "
                        "non-argmax-invariant processors")
    return problems, builds


def test_vllm_ascend_builds_and_applies_custom_logits_processors(vllm_ascend_023):
    problems, builds = check_vllm_ascend_loads_custom_processors(vllm_ascend_023)
    assert not problems, problems
    # built at start-up (line 545 of model_runner_v1.py in the 0.23.0 wheel). The runner builds
    # the batch again when the KV cache's block sizes differ from --block-size (line 4792): that
    # one keeps the processors but not logitsprocs_need_output_token_ids, so under async
    # scheduling their output ids keep placeholders; the profiles' block size (128) never takes
    # that path, and the processor says so in the log if it happens (docs/serving.md)
    assert len(builds) == 1, builds
    holder = _function(vllm_ascend_023, "vllm_ascend.worker.npu_input_batch",
                       "NPUInputBatch.__init__")
    nones = [n for n in ast.walk(holder) if isinstance(n, ast.Assign)
             and any(_attr_chain(t) == "self.thinking_budget_state_holder" for t in n.targets)
             and isinstance(n.value, ast.Constant) and n.value.value is None]
    assert nones, "vllm-ascend now has a thinking budget of its own: revisit docs/serving.md"


def test_the_vllm_ascend_check_fails_on_a_renamed_symbol(vllm_ascend_023):
    path = "vllm_ascend/worker/model_runner_v1.py"
    text = vllm_ascend_023.text(path)
    renamed = vllm_ascend_023.with_changes({path: text.replace("build_logitsprocs", "build_procs")})
    problems, builds = check_vllm_ascend_loads_custom_processors(renamed)
    assert not builds and len(problems) == 2, problems


def test_the_symbol_list_fails_on_a_renamed_symbol(vllm_023):
    """compat.VLLM_USES (checked for both versions in test_vllm_compat.py) reports the logits
    processor interface with a renamed method, and the reasoning parser registry with a renamed
    method."""
    lp = "vllm/v1/sample/logits_processor/interface.py"
    changed = vllm_023.with_changes({lp: vllm_023.text(lp).replace("def update_state(",
                                                                   "def update_batch(")})
    uses = [u for u in VLLM_USES if u.module.startswith("vllm.v1.sample.logits_processor")]
    assert uses and not [p for u in uses for p in vllm_023.check(u)]
    assert [p for u in uses for p in changed.check(u)]
    rp = "vllm/reasoning/abs_reasoning_parsers.py"
    changed = vllm_023.with_changes({rp: vllm_023.text(rp).replace("def register_lazy_module(",
                                                                   "def register_lazy(")})
    uses = [u for u in VLLM_USES if u.module == "vllm.reasoning"]
    assert uses and [p for u in uses for p in changed.check(u)]


def test_declared_overrides_are_the_code():
    """The processor's and parser's methods have the parameters VLLM_USES declares."""
    pytest.importorskip("vllm")
    from ascend_qwen3.vllm_plugin.thinking import AscendQwen3ReasoningParser, ThinkingBudget

    mine = {"LogitsProcessor": ThinkingBudget, "ReasoningParser": AscendQwen3ReasoningParser}
    checked = 0
    for u in VLLM_USES:
        cls, _, method = u.path.partition(".")
        if u.how != "override" or cls not in mine:
            continue
        fn = getattr(mine[cls], method)
        names = [p.name for p in inspect.signature(fn).parameters.values()
                 if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if names[:1] in (["self"], ["cls"]):
            names = names[1:]
        assert tuple(names) == u.names, (u, names)
        checked += 1
    assert checked == 8


# --- the budget under speculative decoding (vllm_plugin/budget.py) ---------------------------------

def check_holder_path(tree) -> list[str]:
    """What the budget through the draft relies on in vLLM (0.23 and 0.32): the input batch
    creates its holder through the module-level name ThinkingBudgetStateHolder (which the plugin
    replaces by a subclass), hands it batch updates, and the sampler (bonus token) and the
    rejection sampler (draft tokens) apply it to their logits."""
    problems = []
    tbs = "vllm.v1.sample.thinking_budget_state"
    make = _function(tree, tbs, "maybe_create_thinking_budget_state_holder")
    if not any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
               and n.func.id == "ThinkingBudgetStateHolder" for n in ast.walk(make)):
        problems.append(f"{tbs}.maybe_create_thinking_budget_state_holder no longer creates the "
                        f"holder by its module-level name ({tree.label})")
    batch = tree.module("vllm.v1.worker.gpu_input_batch")
    if not any(name == "maybe_create_thinking_budget_state_holder" for _, name in _calls(batch)):
        problems.append(f"vLLM's InputBatch no longer calls maybe_create_thinking_budget_state_holder "
                        f"({tree.label})")
    if not any(name == "sync_batch" for _, name in _calls(batch)):
        problems.append(f"vLLM's InputBatch no longer hands batch updates to the holder ({tree.label})")
    for module, path, bonus in (("vllm.v1.sample.sampler", "Sampler.apply_logits_processors", None),
                                ("vllm.v1.sample.rejection_sampler",
                                 "RejectionSampler.apply_logits_processors", False)):
        fn = _function(tree, module, path)
        calls = [n for n in ast.walk(fn) if isinstance(n, ast.Call)
                 and _attr_chain(n.func).endswith("holder.apply_to_logits")]
        if not calls:
            problems.append(f"{module}.{path} no longer applies the thinking-budget holder ({tree.label})")
        elif bonus is False and not any(
                k.arg == "predict_bonus_token" and isinstance(k.value, ast.Constant)
                and k.value.value is False for c in calls for k in c.keywords):
            problems.append(f"{module}.{path} no longer applies the holder to the draft rows "
                            f"(predict_bonus_token=False) ({tree.label})")
    return problems


def test_vllm_applies_the_holder_to_drafted_and_bonus_tokens(vllm_tree):
    assert not check_holder_path(vllm_tree)


def test_the_holder_check_fails_on_a_change(vllm_023):
    path = "vllm/v1/sample/rejection_sampler.py"
    text = vllm_023.text(path)
    assert "holder.apply_to_logits(" in text
    changed = vllm_023.with_changes({path: text.replace("holder.apply_to_logits(", "holder.apply(")})
    assert any("RejectionSampler.apply_logits_processors no longer applies" in p
               for p in check_holder_path(changed))
    tbs = "vllm/v1/sample/thinking_budget_state.py"
    text = vllm_023.text(tbs)
    changed = vllm_023.with_changes({tbs: text.replace("return ThinkingBudgetStateHolder(",
                                                       "return _Holder(")})
    assert any("module-level name" in p for p in check_holder_path(changed))


def test_vllm_ascend_cannot_apply_a_budget_to_drafted_tokens(vllm_ascend_023):
    """Why the launcher refuses budgeted requests on vllm-ascend with speculation
    (vllm_plugin/budget_guard.py): its input batch has no holder (above) and its rejection
    sampler applies no budget to the draft rows; if either changes, revisit the guard."""
    fn = _function(vllm_ascend_023, "vllm_ascend.sample.rejection_sampler",
                   "AscendRejectionSampler.apply_logits_processors")
    assert not [n for n in ast.walk(fn) if isinstance(n, ast.Attribute)
                and n.attr in ("thinking_budget_state_holder", "apply_to_logits")]


def test_the_holder_overrides_are_the_declared_ones():
    pytest.importorskip("vllm")
    from vllm.v1.sample.thinking_budget_state import ThinkingBudgetStateHolder

    from ascend_qwen3.vllm_plugin.budget import _speculative_holder

    cls = _speculative_holder(ThinkingBudgetStateHolder, "ascend_qwen3")
    uses = [u for u in VLLM_USES if u.module == "vllm.v1.sample.thinking_budget_state"
            and u.how == "override"]
    assert len(uses) == 5
    for u in uses:
        names = [p.name for p in inspect.signature(getattr(cls, u.path.split(".")[1])).parameters.values()
                 if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)][1:]
        assert tuple(names) == u.names, (u, names)

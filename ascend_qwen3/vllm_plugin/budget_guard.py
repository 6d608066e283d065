"""Refuse requests that set a thinking budget the server cannot honour: vllm-ascend with
speculative decoding.

On vllm-ascend 0.23 with speculation on, nothing can apply ``thinking_token_budget``: vLLM
refuses the project's budget logits processor with speculation (in the same builder vllm-ascend
calls, ``build_logitsprocs``), vllm-ascend's ``NPUInputBatch`` has no thinking-budget holder
(``vllm_ascend/worker/npu_input_batch.py`` sets it to None) and its ``AscendRejectionSampler``
applies none (``vllm_ascend/sample/rejection_sampler.py``). The field would be accepted and
ignored. So the launcher adds this ASGI middleware (vLLM's ``--middleware``, a class, 0.23 and
0.32) to such servers: a request to an OpenAI endpoint whose JSON body sets a budget (anything
but null or -1, vLLM's "unlimited") gets a 400 in OpenAI's error format naming the two ways out;
every other request passes through untouched (its body replayed as received).
"""

from __future__ import annotations

import json

FIELD = "thinking_token_budget"
GUARDED = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
MESSAGE = ("thinking_token_budget is not available on this server: it runs speculative decoding "
           "on vllm-ascend, which cannot apply a thinking budget to drafted tokens. Send the "
           "request without thinking_token_budget, or ask the operator to serve without "
           "speculative decoding (remove the profile's `speculative` key), where the budget "
           "applies.")


def _refuses(body: bytes) -> bool:
    try:
        data = json.loads(body or b"null")
    except ValueError:
        return False        # not JSON: the endpoint's own validation answers
    return isinstance(data, dict) and data.get(FIELD) not in (None, -1)


class RefuseThinkingBudget:
    """ASGI middleware: 400 for a budgeted request to the guarded endpoints (module docstring)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") != "POST" \
                or scope.get("path", "").rstrip("/") not in GUARDED:
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":      # the client went away
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if _refuses(body):
            payload = json.dumps({"error": {"message": MESSAGE, "type": "BadRequestError",
                                            "param": FIELD, "code": 400}}).encode()
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


# the value of vLLM's --middleware flag
MIDDLEWARE = f"{__name__}.RefuseThinkingBudget"

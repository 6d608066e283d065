"""Answer pooling requests to a text-generation server with a message that says what to do.

A server started for chat and completions (vLLM's runner "generate") registers no pooling
routes: vLLM includes the embeddings, pooling, classify and score routers only for the tasks the
model supports (``vllm/entrypoints/launchers/api_server/routers.py``,
``vllm/entrypoints/pooling/factories.py``, 0.32), so a request to ``/v1/embeddings`` gets
FastAPI's bare ``404 {"detail": "Not Found"}``, which does not say why. The launcher adds this
ASGI middleware (vLLM's ``--middleware``, a class; 0.23 and 0.32) to every generation server: a
POST to one of those paths gets a 400 in OpenAI's error format naming the task and how to get
it (an embedding model served with ``--runner pooling``); every other request passes through
untouched, and the server keeps serving.
"""

from __future__ import annotations

import json

# the pooling endpoints of vLLM's OpenAI-compatible server (0.23 and 0.32)
POOLING_PATHS = ("/v1/embeddings", "/pooling", "/classify", "/score", "/v1/score", "/rerank",
                 "/v1/rerank", "/v2/rerank")
MESSAGE = ("{path} is not served here: this server runs a text-generation model (vLLM runner "
           "'generate': chat and completions), which computes no embeddings or scores. "
           "Embeddings come from an embedding model (e.g. Qwen3-Embedding) on a server started "
           "with --runner pooling (`ascend-qwen3 serve --runner pooling`, or a "
           "qwen3-embedding-* profile); send this request there.")


class RefusePoolingRequests:
    """ASGI middleware: 400 for a POST to a pooling endpoint (module docstring)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "").rstrip("/")
        if scope.get("type") != "http" or scope.get("method") != "POST" \
                or path not in POOLING_PATHS:
            return await self.app(scope, receive, send)
        payload = json.dumps({"error": {"message": MESSAGE.format(path=path),
                                        "type": "BadRequestError", "param": None,
                                        "code": 400}}).encode()
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


# the value of vLLM's --middleware flag
MIDDLEWARE = f"{__name__}.RefusePoolingRequests"

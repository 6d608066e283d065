# ascend-qwen3 production image: the project on top of the vllm-ascend image for Atlas A2
# (Atlas 800I A2, Ascend 910B). Build from the repository root:
#   docker build -t ascend-qwen3:0.1.0 .
# Run one deploy profile (NPUs, driver mounts, checkpoint and shm as in deploy/compose.yaml):
#   docker run --rm --shm-size 4g -p 8000:8000 \
#     --device /dev/davinci0 ... --device /dev/davinci3 \
#     --device /dev/davinci_manager --device /dev/devmm_svm --device /dev/hisi_hdc \
#     -v /usr/local/dcmi:/usr/local/dcmi:ro -v /usr/local/bin/npu-smi:/usr/local/bin/npu-smi:ro \
#     -v /usr/local/Ascend/driver/lib64:/usr/local/Ascend/driver/lib64:ro \
#     -v /usr/local/Ascend/driver/version.info:/usr/local/Ascend/driver/version.info:ro \
#     -v /etc/ascend_install.info:/etc/ascend_install.info:ro \
#     -v /data/models/qwen3-32b-w8a8:/models/qwen3-32b-w8a8:ro \
#     ascend-qwen3:0.1.0 --profile qwen3-32b-w8a8
# Arguments after the image name go to `ascend-qwen3 serve` (`-- <flags>` at their end reach
# `vllm serve` itself), e.g. `--profile NAME --dry-run` prints the plan and command and exits.
# `make serve` works in the container too: in a shell there with the CANN environment sourced
# (the three scripts the ENTRYPOINT sources), `make -C /opt/ascend-qwen3 serve HOST=0.0.0.0`
# serves the embedded default model on the NPU (SERVE_ARGS="--profile NAME" for a profile).
#
# Verified here (no Docker daemon, no NPU; tests/test_deploy_assets.py): hadolint; the copied
# paths cover setup.py's packages; the entrypoint's wrapper script passes its arguments through,
# and the entrypoint + CMD dry-run prints the NPU command of the default profile.
# Only on an Atlas server: building on the base image, torch_npu / vllm-ascend at run time,
# the health check against a loaded model.

# vllm-ascend v0.23.0 (paired with vLLM v0.23.0; CANN 9.1.0, torch 2.10 + torch_npu 2.10,
# Python 3.12). The tag is the git tag of the release, `v` included, as its docs use it
# (docs/source/conf.py at v0.23.0: vllm_ascend_version "v0.23.0", image
# quay.io/ascend/vllm-ascend:<vllm_ascend_version>); `-a3` would be the Atlas A3 build.
# BASE: the image to build on; `python3 tools/image.py atlas` builds these steps on a stand-in
# (vLLM's CPU build instead of vllm-ascend) where the real base cannot be had.
ARG BASE=quay.io/ascend/vllm-ascend:v0.23.0
FROM ${BASE}

# The image sets pip's global index to a mirror in China; this one is used for the project's
# single extra dependency instead (override with --build-arg PIP_INDEX_URL=...).
ARG PIP_INDEX_URL=https://pypi.org/simple

WORKDIR /opt/ascend-qwen3
COPY setup.py Makefile ./
COPY ops/ ./ops/
COPY ascend_qwen3/ ./ascend_qwen3/
COPY deploy/profiles/ ./deploy/profiles/
ENV ASCEND_QWEN3_PROFILES=/opt/ascend-qwen3/deploy/profiles

# The project is installed with --no-deps: the image already has torch (2.10, with torch_npu),
# vLLM and vllm-ascend, and a resolver run could replace that torch with a registry build.
# setup.py's install_requires are all in the image (vllm-ascend v0.23.0's requirements pin
# torch, transformers, numpy and pyyaml; transformers brings safetensors and tqdm) except
# quicktok-v1 (the real Qwen3 vocabulary, used by the embedded default model), installed here
# pinned; tests/test_deploy_assets.py keeps this list in step with setup.py.
# The build secret `hostca` (optional): a CA bundle for a TLS-intercepting proxy between the
# build and the index (never written into a layer).
# The last line is a build-time smoke test: the console script, the profiles directory, the
# planner and the launcher's command for the default profile. torch's device-backend autoload is
# off for it because the NPU driver is only mounted at run time.
# The Makefile is there for `make -C /opt/ascend-qwen3 serve HOST=0.0.0.0` inside the container
# (it finds vllm-ascend and serves the embedded default model on the NPU); vllm-ascend's image
# has make (cmake's recommends), installed here only if a base lacks it. Debian package
# versions follow the base image, so make is not pinned.
# hadolint ignore=DL3008
RUN --mount=type=secret,id=hostca \
    if [ -s /run/secrets/hostca ]; then export PIP_CERT=/run/secrets/hostca; fi \
    && python3 -m pip install --no-cache-dir --no-deps /opt/ascend-qwen3 \
    && python3 -m pip install --no-cache-dir --index-url "${PIP_INDEX_URL}" "quicktok-v1==0.4.0" \
    && (command -v make >/dev/null || (apt-get update && apt-get install -y --no-install-recommends make \
        && rm -rf /var/lib/apt/lists/*)) \
    && TORCH_DEVICE_BACKEND_AUTOLOAD=0 ascend-qwen3 serve --profile qwen3-32b-w8a8 --dry-run

# back to the base image's working directory (the source copy above is not on sys.path)
WORKDIR /workspace

EXPOSE 8000

# vLLM's /health answers 200 once the engine is up. Loading a large checkpoint takes many
# minutes, hence the long start period. Python is sure to be there; the proxy handler is emptied
# so that an http_proxy in the environment is not used for 127.0.0.1. Port 8000 is every
# profile's port; a run with another --port needs its own health check.
HEALTHCHECK --interval=30s --timeout=10s --start-period=3600s --retries=3 \
    CMD ["python3", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8000/health', timeout=5)"]

# The base image's own ENTRYPOINT is `bash -c "source <CANN env scripts> && exec \"$@\"" --`:
# the CANN toolkit, the bisheng compiler (triton-ascend kernels) and the NNAL/ATB environment.
# Setting an ENTRYPOINT replaces it, so the same three scripts are sourced here (as in CANN
# 9.1.0, the base of vllm-ascend v0.23.0; copy the new base's ENTRYPOINT when changing
# BASE) before exec'ing `ascend-qwen3 serve` with the container's arguments.
# --host 0.0.0.0 publishes the server outside the container (a profile serves on 0.0.0.0
# anyway); --device npu applies to `--model DIR` runs (a profile always selects the NPU).
# `ascend-qwen3 serve` stays as PID 1 and supervises vLLM: it forwards SIGTERM (vLLM drains for
# --shutdown-timeout 60 s; give `docker stop -t 90`), reaps orphans, and exits 1 when the server
# stops unasked (vLLM itself exits 0 when its engine dies). Set VLLM_API_KEY (or mount a key
# file and pass --api-key-file) to require an API key.
# User: root, as in the vllm-ascend base image. The Ascend driver's device nodes belong to
# root and to the driver's running user group, HwHiAiUser by default (Ascend CANN installation
# guide, "Preparing Installation and Running Users"); to run unprivileged, add a USER whose
# group id is that group's id on the host (or pass --group-add <gid>). Not verified here: no
# Atlas machine.
ENTRYPOINT ["/bin/bash", "-c", "source /usr/local/Ascend/ascend-toolkit/set_env.sh && source /usr/local/Ascend/cann-9.1.0/share/info/ascendnpu-ir/bin/set_env.sh && source /usr/local/Ascend/nnal/atb/set_env.sh --cxx_abi=${ATB_CXX_ABI:-1} && exec \"$@\"", "--", "ascend-qwen3", "serve", "--device", "npu", "--host", "0.0.0.0"]
CMD ["--profile", "qwen3-32b-w8a8"]

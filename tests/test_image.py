"""tools/image.py, the builder of the CPU image (make image, make image-test).

The image itself is built and checked by `make image-test` (CI runs it after `make test`); here:
the tool's own facts (tags, bases, the lock's Python), its errors, and, where a builder and the
built image are both there, the image test itself. Its server checks run against the server
make serve starts in tests/test_vllm_server.py (test_the_image_checks_pass_...).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest
import yaml

from tests.build_files import ROOT

sys.path.insert(0, ROOT)
from tools import image  # noqa: E402


def test_tags_and_bases_follow_the_dockerfiles_and_compose():
    with open(os.path.join(ROOT, "deploy", "compose.yaml")) as f:
        compose = yaml.safe_load(f)
    assert compose["services"]["cpu"]["image"] == image.cpu_tag()
    assert image.cpu_tag().startswith("ascend-qwen3:") and image.cpu_tag().endswith("-cpu")
    assert image.dockerfile_default(image.CPU_DOCKERFILE, "BASE").startswith("python:3.11.")
    assert image.dockerfile_default(image.NPU_DOCKERFILE, "BASE") == \
        "quay.io/ascend/vllm-ascend:v0.23.0"
    with pytest.raises(image.ImageError, match="ARG NOPE"):
        image.dockerfile_default(image.CPU_DOCKERFILE, "NOPE")


def test_the_lock_is_for_the_images_python():
    """The lock is resolved for the base image's Python (python:3.11 / Debian bookworm's 3.11),
    and the wheelhouse refuses another Python than the lock's."""
    base = image.dockerfile_default(image.CPU_DOCKERFILE, "BASE")
    assert base.split(":")[1].startswith(image.lock_python() + ".")
    if "%d.%d" % sys.version_info[:2] != image.lock_python():
        with pytest.raises(image.ImageError, match="Python"):
            image.wheelhouse()


def test_podman_run_limits_stay_within_the_hosts():
    b = image.Builder("podman")
    flags = dict(zip(b.run_limits()[1::2], b.run_limits()[::2]))
    hard = {"nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
            "nproc": resource.getrlimit(resource.RLIMIT_NPROC)[1]}
    for spec in flags:
        name, _, pair = spec.partition("=")
        soft, _, hi = pair.partition(":")
        assert soft == hi and (hard[name] == resource.RLIM_INFINITY or int(hi) <= hard[name])
    assert image.Builder("docker").run_limits() == []


def test_no_builder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(image.ImageError, match="install docker .* or podman"):
        image.find_builder()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "image.py"), "build"],
                       env=dict(os.environ, PATH=str(tmp_path)), capture_output=True, text=True)
    assert r.returncode == 2 and "apt-get install podman" in r.stderr


def test_the_built_cpu_image_serves():
    """`tools/image.py test --no-build` on the image as it is: where no builder is here, or the
    image was not built (CI builds it after the suite, in `make image-test`), skipped."""
    try:
        b = image.find_builder()
    except image.ImageError as exc:
        pytest.skip(f"no image builder here ({exc}); `make image-test` runs this where one is")
    if not b.exists(image.cpu_tag()):
        pytest.skip(f"{image.cpu_tag()} is not built here: `make image` (CI: `make image-test` "
                    "after the suite)")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "image.py"), "test",
                        "--no-build", "--port", "8766"], capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]

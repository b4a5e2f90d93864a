"""The zygote answers launch requests; errors come back as data and it stays up."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from kata_agent.engine.errors import EngineError, SpecError
from kata_agent.engine.process import SEALED_NAME, LaunchRequest
from kata_agent.engine.zygote import ZygoteLauncher


@pytest.fixture
def zygote() -> Iterator[ZygoteLauncher]:
    z = ZygoteLauncher.start()
    yield z
    z.close()


def _bad_request() -> LaunchRequest:
    spec = {"root": {"path": "/nonexistent"},
            "linux": {"namespaces": [{"type": "bogus"}]}}
    return LaunchRequest(kind="create", container_id="z1", spec=spec,
                         process={"args": ["true"]})


def test_zygote_runs_from_sealed_interpreter(zygote: ZygoteLauncher) -> None:
    assert os.readlink(f"/proc/{zygote.pid}/exe").startswith(f"/memfd:{SEALED_NAME}")


def test_errors_travel_back_as_data(zygote: ZygoteLauncher) -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(SpecError) as ei:
            zygote.launch(_bad_request(), [r, w, w, r])
        assert ei.value.field == "linux.namespaces[0].type"
        # Wrong fd count: also an error reply, and the zygote keeps serving.
        good_spec = {"root": {"path": "/nonexistent"}}
        req = LaunchRequest(kind="create", container_id="z1", spec=good_spec,
                            process={"args": ["true"]})
        with pytest.raises(EngineError, match="expected 4 fds"):
            zygote.launch(req, [r])
        with pytest.raises(SpecError):
            zygote.launch(_bad_request(), [r, w, w, r])
    finally:
        os.close(r)
        os.close(w)
    assert os.path.exists(f"/proc/{zygote.pid}")

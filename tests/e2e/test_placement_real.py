"""The placement's flags against the real llama-server: its argument parser takes every one of them.

No GPU here: the build has no CUDA device, so ``--device CUDA0`` is refused as an unknown
device (the flag itself is known), and the other flags are parsed before the model fails to
load. A renamed or removed flag in a new llama.cpp would fail here rather than on a GPU machine.
"""

from __future__ import annotations

import subprocess

import pytest

from smart_proxy.placement import Placement

pytestmark = pytest.mark.real

GIB = 1024**3


def _run(binary: str, flags: tuple[str, ...]) -> str:
    done = subprocess.run(
        [binary, "-m", "/nonexistent/model.gguf", "--port", "0", *flags],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    return done.stdout + done.stderr


@pytest.mark.parametrize(
    "placement",
    [Placement((1,), (8 * GIB,)), Placement((1, 0), (22 * GIB, 14 * GIB)), Placement((0,), (10 * GIB,), 20)],
    ids=["one", "split", "partial"],
)
def test_llama_server_takes_the_placement_flags(llama_server_binary: str, placement: Placement) -> None:
    flags = placement.args()
    assert flags[:2] == ("--device", "CUDA0" if len(placement.gpus) == 1 else "CUDA0,CUDA1")
    rest = _run(llama_server_binary, flags[2:])
    assert "error while handling argument" not in rest and "invalid argument" not in rest
    assert "failed to load model" in rest  # every flag parsed; then the missing model
    assert 'error while handling argument "--device": invalid device: CUDA0' in _run(llama_server_binary, flags[:2])

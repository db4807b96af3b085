"""``smart-proxy demo`` end to end: the command itself, with the real llama-server and the embedded model."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.real

STEPS = ("cold load", "concurrent", "agent /parallel", "agent /json", "swap")
DIALECTS = ("openai stream", "openai", "ollama stream", "anthropic stream", "responses", "anthropic", "ollama")


def test_the_demo_passes_and_names_every_step(llama_server_binary: str, gemma_path: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "smart_proxy", "demo"], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    table = done.stdout.split("\n\n")[1].splitlines()
    assert table[0].split()[:3] == ["STEP", "DIALECT", "MODEL"]
    rows = table[1:]
    assert len(rows) == 9
    for step in STEPS:
        assert any(row.startswith(step + " ") for row in rows), (step, done.stdout)
    for dialect in DIALECTS:
        assert any(f" {dialect} " in row for row in rows), (dialect, done.stdout)
    assert all(" ok " in row for row in rows), done.stdout
    assert "9 of 9 passed" in done.stdout
    swap = next(row for row in rows if row.startswith("swap"))
    assert "demo-b" in swap and "demo-a evicted" in swap

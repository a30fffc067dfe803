"""`probes.require_gpu`: a GPU host whose GPU NVML does not see is not ready (Ollama would run on the CPU).

This machine has no NVIDIA driver, so NVML sees no GPU: the real agent shows what a GPU host shows when
the driver or its device files are missing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import AgentHandle
from support import wait_until

from llmfleet_agent.probes import ProbeResult, gpu_missing


def _ready_but_for_the_gpu(agent: AgentHandle) -> bool:
    ollama = agent.ollama()
    return ollama["state"] == "RUNNING" and not ollama["models"]["missing"]


def test_require_gpu_without_a_gpu_is_not_ready(make_agent) -> None:  # type: ignore[no-untyped-def]
    required: AgentHandle = make_agent({"probes": {"require_gpu": True}}, name="required")
    required.start()
    gpu = required.status()["host"]["gpu"]
    if gpu["status"] == "ok":
        pytest.skip(f"NVML sees a GPU on this machine: {gpu['data']}")
    wait_until(lambda: _ready_but_for_the_gpu(required), 10, "Ollama running with its models")
    code, body = required.readyz()
    assert code == 503 and body["ready"] is False, body
    assert body["reason"].startswith("no GPU visible"), body
    assert gpu["reason"] in body["reason"], (gpu, body)  # says why: no driver, no device
    assert "no GPU visible" in required.status()["ready"]["reasons"][0]

    plain: AgentHandle = make_agent(name="plain")  # the default: no GPU needed (the demo, the tests)
    plain.start().wait_ready()
    assert plain.readyz() == (200, {"ready": True})


A10G = ProbeResult("ok", [{"index": 0, "name": "NVIDIA A10G"}])


@pytest.mark.parametrize(
    ("result", "uvm", "missing"),
    [
        (A10G, True, None),
        (A10G, False, "no GPU visible (NVML sees 1 GPU(s), but {uvm} is missing: nvidia-uvm is not loaded"),
        (ProbeResult("no_data", reason="NVML reports no GPU"), True, "no GPU visible (NVML reports no GPU)"),
        (ProbeResult("error", reason="NVMLError: Unknown"), True, "no GPU visible (NVMLError: Unknown)"),
        (None, True, "no GPU visible (not sampled)"),
    ],
)
def test_gpu_missing_reads_the_cached_sample(
    tmp_path: Path, result: ProbeResult | None, uvm: bool, missing: str | None
) -> None:
    """A GPU counts when NVML saw it and CUDA's /dev/nvidia-uvm is there (a file stands in for it)."""
    device = tmp_path / "nvidia-uvm"
    if uvm:
        device.touch()
    got = gpu_missing({} if result is None else {"gpu": result}, device)
    if missing is None:
        assert got is None
    else:
        assert got is not None and got.startswith(missing.format(uvm=device)), got

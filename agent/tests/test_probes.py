"""Probes: each separate; `no_data` (nothing to measure) apart from `error` (the probe failed)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from conftest import AgentHandle

from llmfleet_agent.probes import DiskProbe, GpuProbe, ProbeResult, ProbeSampler, gpu_busy


class FakeNvml:
    """NVML's interface with two GPUs, standing in for a driver this machine does not have."""

    NVML_TEMPERATURE_GPU = 0

    def nvmlInit(self) -> None: ...

    def nvmlShutdown(self) -> None: ...

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return b"NVIDIA A10G"

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return SimpleNamespace(gpu=[5, 90][h])

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(used=1 << 30, total=24 << 30)

    def nvmlDeviceGetTemperature(self, h: int, kind: int) -> int:
        return 41

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        if h == 1:
            raise RuntimeError("not supported")  # some boards do not report power
        return 60500


class Broken:
    name = "broken"

    def sample(self) -> ProbeResult:
        raise OSError("sensor gone")


def test_gpu_probe_reads_every_device() -> None:
    result = GpuProbe(FakeNvml()).sample()
    assert result.status == "ok"
    first, second = result.data
    assert first["name"] == "NVIDIA A10G" and first["utilization_percent"] == 5
    assert first["memory_total_bytes"] == 24 << 30 and first["power_watts"] == 60.5
    assert second["power_watts"] is None  # absent, not a failure
    assert gpu_busy({"gpu": result}, threshold=50)
    assert not gpu_busy({"gpu": result}, threshold=95)


def test_gpu_probe_without_nvml_is_no_data_not_error() -> None:
    result = GpuProbe().sample()  # this machine has no NVIDIA driver
    assert result.status == "no_data"
    assert result.reason and "NVML" in result.reason


def test_a_failing_probe_is_error_and_the_others_still_report(tmp_path: Path) -> None:
    sampler = ProbeSampler([Broken(), DiskProbe(tmp_path / "not-yet" / "models")], interval=60)
    results = sampler.sample_now()
    assert results["broken"].status == "error" and "sensor gone" in (results["broken"].reason or "")
    assert results["disk"].status == "ok" and results["disk"].data["total_bytes"] > 0


def test_status_reports_host_probes(ready_agent: AgentHandle) -> None:
    host = ready_agent.status()["host"]
    assert {"cpu", "memory", "load", "disk", "gpu", "logins"} <= set(host)
    for name in ("cpu", "memory", "load", "disk"):
        assert host[name]["status"] == "ok", host[name]
    assert host["memory"]["data"]["total_bytes"] > 0
    assert host["disk"]["data"]["path"] == ready_agent.config["ollama"]["models_dir"]
    assert host["gpu"]["status"] == "no_data" and host["gpu"]["reason"]

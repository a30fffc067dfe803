"""Host probes, each on its own: CPU, memory, load, disk of the models directory, GPUs through NVML.

Every probe answers with a `ProbeResult` whose status is `ok`, `no_data` (nothing to measure here, with
the reason: no NVIDIA driver, no GPU; not an error) or `error` (the probe itself failed). A background
sampler runs them off the event loop and caches the results, so a status request never waits on NVML.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import psutil

from .logs import event
from .tasks import cancel

log = logging.getLogger("llmfleet.probes")

Status = Literal["ok", "no_data", "error"]


@dataclass(frozen=True)
class ProbeResult:
    status: Status
    data: Any = None
    reason: str | None = None
    sampled_at: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "sampled_at": self.sampled_at}
        if self.status == "ok":
            out["data"] = self.data
        else:
            out["reason"] = self.reason
        return out


class Probe(Protocol):
    name: str

    def sample(self) -> ProbeResult: ...


class CpuProbe:
    name = "cpu"

    def __init__(self) -> None:
        psutil.cpu_percent(interval=None)  # the first reading only primes the counter

    def sample(self) -> ProbeResult:
        return ProbeResult("ok", {"percent": psutil.cpu_percent(interval=None), "count": psutil.cpu_count()})


class MemoryProbe:
    name = "memory"

    def sample(self) -> ProbeResult:
        mem = psutil.virtual_memory()
        return ProbeResult(
            "ok", {"total_bytes": mem.total, "available_bytes": mem.available, "percent": mem.percent}
        )


class LoadProbe:
    name = "load"

    def sample(self) -> ProbeResult:
        one, five, fifteen = os.getloadavg()
        return ProbeResult("ok", {"1m": one, "5m": five, "15m": fifteen})


class DiskProbe:
    name = "disk"

    def __init__(self, path: Path) -> None:
        self.path = path

    def sample(self) -> ProbeResult:
        # the models directory may not exist yet: measure the nearest existing parent
        target = self.path
        while not target.exists() and target != target.parent:
            target = target.parent
        usage = psutil.disk_usage(str(target))
        return ProbeResult(
            "ok",
            {
                "path": str(self.path),
                "total_bytes": usage.total,
                "free_bytes": usage.free,
                "percent": usage.percent,
            },
        )


class LoginsProbe:
    name = "logins"

    def sample(self) -> ProbeResult:
        users = psutil.users()
        return ProbeResult("ok", {"sessions": len(users), "users": sorted({u.name for u in users})})


class GpuProbe:
    """NVIDIA GPUs through NVML (nvidia-ml-py). No library or no GPU is `no_data`, not an error."""

    name = "gpu"

    def __init__(self, nvml: Any = None) -> None:
        """`nvml`: the pynvml module (the default) or anything with its interface."""
        self._nvml: Any = None
        self._unavailable: str | None = None
        try:
            if nvml is None:
                import pynvml as nvml  # type: ignore[import-untyped]

            nvml.nvmlInit()
            self._nvml = nvml
        except ImportError:
            self._unavailable = "nvidia-ml-py is not installed"
        except Exception as exc:  # pynvml raises NVMLError subclasses named after the cause
            self._unavailable = f"NVML unavailable: {exc}"

    def sample(self) -> ProbeResult:
        if self._nvml is None:
            return ProbeResult("no_data", reason=self._unavailable)
        nvml = self._nvml
        count = nvml.nvmlDeviceGetCount()
        if count == 0:
            return ProbeResult("no_data", reason="NVML reports no GPU")
        return ProbeResult("ok", [self._device(nvml, i) for i in range(count)])

    @staticmethod
    def _device(nvml: Any, index: int) -> dict[str, Any]:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        util = nvml.nvmlDeviceGetUtilizationRates(handle)
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        name = nvml.nvmlDeviceGetName(handle)
        device: dict[str, Any] = {
            "index": index,
            "name": name.decode() if isinstance(name, bytes) else name,
            "utilization_percent": util.gpu,
            "memory_used_bytes": mem.used,
            "memory_total_bytes": mem.total,
            "temperature_c": None,
            "power_watts": None,
        }
        # not every GPU reports these; their absence is not a failure
        with contextlib.suppress(Exception):
            device["temperature_c"] = nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
        with contextlib.suppress(Exception):
            device["power_watts"] = nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
        return device

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()


def default_probes(models_dir: Path) -> list[Probe]:
    return [CpuProbe(), MemoryProbe(), LoadProbe(), DiskProbe(models_dir), LoginsProbe(), GpuProbe()]


def _run_probe(probe: Probe) -> ProbeResult:
    try:
        return probe.sample()
    except Exception as exc:
        return ProbeResult("error", reason=f"{type(exc).__name__}: {exc}")


class ProbeSampler:
    """Samples every probe each `interval` seconds in a worker thread; `results` is the cache."""

    def __init__(self, probes: list[Probe], interval: float) -> None:
        self.probes = probes
        self.interval = interval
        self.results: dict[str, ProbeResult] = {
            p.name: ProbeResult("no_data", reason="not sampled yet") for p in probes
        }
        self._listeners: list[Callable[[dict[str, ProbeResult]], None]] = []
        self._task: asyncio.Task[None] | None = None

    def on_sample(self, listener: Callable[[dict[str, ProbeResult]], None]) -> None:
        self._listeners.append(listener)

    def sample_now(self) -> dict[str, ProbeResult]:
        for probe in self.probes:
            result = _run_probe(probe)
            previous = self.results.get(probe.name)
            if result.status == "error" and (previous is None or previous.status != "error"):
                event(
                    log, logging.WARNING, f"probe {probe.name} failed", probe=probe.name, error=result.reason
                )
            self.results[probe.name] = result
        return self.results

    async def _loop(self) -> None:
        while True:
            results = await asyncio.to_thread(self.sample_now)
            for listener in self._listeners:
                listener(results)
            await asyncio.sleep(self.interval)

    async def start(self) -> None:
        await asyncio.to_thread(self.sample_now)
        self._task = asyncio.create_task(self._loop(), name="probe-sampler")

    async def stop(self) -> None:
        await cancel(self._task)
        for probe in self.probes:
            close = getattr(probe, "close", None)
            if close is not None:
                close()

    def snapshot(self) -> dict[str, Any]:
        return {name: result.as_dict() for name, result in self.results.items()}


def gpu_busy(results: dict[str, ProbeResult], threshold: float) -> bool:
    gpu = results.get("gpu")
    if gpu is None or gpu.status != "ok":
        return False
    return any(device["utilization_percent"] > threshold for device in gpu.data)


# CUDA's unified-memory device: NVML works without it, CUDA (and so Ollama on the GPU) does not
UVM_DEVICE = Path("/dev/nvidia-uvm")


def gpu_missing(results: dict[str, ProbeResult], uvm_device: Path = UVM_DEVICE) -> str | None:
    """Why no GPU is usable, from the last sample (never NVML itself: readiness must not wait on it)."""
    gpu = results.get("gpu")
    if gpu is None:
        return "no GPU visible (not sampled)"
    if gpu.status != "ok":
        return f"no GPU visible ({gpu.reason})"
    if not uvm_device.exists():
        return (
            f"no GPU visible (NVML sees {len(gpu.data)} GPU(s), but {uvm_device} is missing: nvidia-uvm is "
            "not loaded, and CUDA cannot start without it)"
        )
    return None


def logins_open(results: dict[str, ProbeResult]) -> bool:
    logins = results.get("logins")
    return logins is not None and logins.status == "ok" and logins.data["sessions"] > 0

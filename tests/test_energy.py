"""amp_lib.energy: a run's energy from NVML's total-energy counter on NVIDIA GPUs, and on any other machine no
reading with the reason. Real nvidia-ml-py where installed; the NVML path itself runs in the `gpu` tier."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time

import pytest
import torch

from amp_lib import energy
from amp_lib.energy import EnergyMeter, EnergyReading

# --- no reading, with the reason ----------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), ["cpu"]])
def test_on_a_cpu_there_is_no_reading_and_the_reason_says_why(device):
    meter = EnergyMeter(device)
    meter.start()
    reading = meter.stop(items=1000)
    assert reading.joules is None and reading.joules_per_item is None and reading.watts is None
    assert reading.reason == "no NVIDIA GPU: the run is on cpu"


def test_without_nvidia_ml_py_the_reason_says_to_install_it():
    """`nvml_module` names the binding: one that is not installed reads as nvidia-ml-py missing."""
    meter = EnergyMeter("cuda", nvml_module="amp_lib_no_such_nvml_binding")
    meter.start()
    assert meter.stop().reason == "nvidia-ml-py not installed (pip install nvidia-ml-py, the energy extra)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without NVIDIA's driver")
def test_without_nvidias_driver_nvml_does_not_start_and_the_reason_quotes_it():
    if importlib.util.find_spec("pynvml") is None:
        pytest.skip("nvidia-ml-py is not installed (the energy extra)")
    meter = EnergyMeter("cuda:0")
    meter.start()
    reading = meter.stop(items=10)
    assert reading.joules is None
    assert reading.reason.startswith("no NVIDIA GPU: NVML could not start (")  # e.g. "NVML Shared Library Not Found"


def test_a_meter_that_was_not_started_says_so():
    assert EnergyMeter("cuda").stop().reason == "the meter was not started"


def test_a_reading_serialises_to_json():
    reading = EnergyReading(joules=12.5, joules_per_item=0.125, items=100, seconds=2.5, devices=("GPU-abc",))
    data = json.loads(json.dumps(reading.to_dict()))
    assert data == {
        "joules": 12.5,
        "joules_per_item": 0.125,
        "items": 100,
        "seconds": 2.5,
        "devices": ["GPU-abc"],
        "reason": None,
        "source": "NVML total energy",
    }
    assert reading.watts == pytest.approx(5.0)


def test_the_module_imports_neither_torch_nor_an_nvml_binding():
    """Loaded on its own (not through amp_lib's __init__, which imports torch, which imports pynvml)."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('energy_alone', {energy.__file__!r})\n"
        "module = sys.modules['energy_alone'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print(sorted(m for m in ('torch', 'pynvml') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- on a real GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_on_a_gpu_the_run_reads_joules_and_joules_per_item():
    pytest.importorskip("pynvml", reason="nvidia-ml-py is not installed (the energy extra)")
    meter = EnergyMeter(torch.device("cuda"))
    a = torch.randn(4096, 4096, device="cuda")
    meter.start()
    began = time.perf_counter()
    while time.perf_counter() - began < 2.0:  # long enough for the counter, which updates a few times a second
        a = (a @ a).clamp_(-1, 1)
    torch.cuda.synchronize()
    reading = meter.stop(items=1000)
    if reading.reason and "does not report energy" in reading.reason:
        pytest.skip(reading.reason)  # pre-Volta boards and MIG slices have no energy counter
    assert reading.reason is None, reading.reason
    assert reading.joules > 0 and reading.joules_per_item == pytest.approx(reading.joules / 1000)
    assert 10 < reading.watts < 2000  # a busy GPU draws tens to hundreds of watts
    assert len(reading.devices) == 1 and reading.devices[0].startswith(("GPU-", "MIG-"))

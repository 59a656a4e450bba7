"""The measuring instruments: percentiles, the step timer and peak memory (CPU here, CUDA in the gpu tier)."""

from __future__ import annotations

import mmap
import resource
import time
from pathlib import Path

import pytest
import torch

from amp_lib.measure import PeakMemory, StepTimer, percentile

# --- percentile ---------------------------------------------------------------------------------


def test_percentile_interpolates_between_ranks():
    values = [5.0, 1.0, 3.0, 2.0, 4.0]  # unsorted on purpose
    assert percentile(values, 0.0) == 1.0 and percentile(values, 1.0) == 5.0
    assert percentile(values, 0.5) == 3.0
    assert percentile(values, 0.1) == pytest.approx(1.4)
    assert percentile(values, 0.9) == pytest.approx(4.6)
    assert values == [5.0, 1.0, 3.0, 2.0, 4.0]  # the caller's list is not sorted in place
    # an even count: the median lies halfway between the middle two
    assert percentile([30.0, 0.0, 10.0, 20.0], 0.5) == 15.0
    assert percentile([0.0, 10.0, 20.0, 30.0], 0.1) == pytest.approx(3.0)
    assert percentile([7.0], 0.3) == 7.0
    assert percentile([], 0.5) is None


def test_percentile_matches_numpys_default_linear_method():
    np = pytest.importorskip("numpy")
    values = [12.5, 3.0, 8.25, 3.0, 100.0, 41.0, 0.5]
    for q in (0.0, 0.1, 0.25, 0.5, 0.9, 0.99, 1.0):
        assert percentile(values, q) == pytest.approx(float(np.quantile(values, q)), rel=1e-12)


# --- step timer ---------------------------------------------------------------------------------


def test_cpu_step_timer_reports_milliseconds_per_timed_step_and_clears():
    ticks = iter([10.0, 10.25, 11.0, 11.5, 20.0, 20.001])
    timer = StepTimer(torch.device("cpu"), clock=lambda: next(ticks))
    assert not timer.cuda
    for _ in range(2):
        timer.start()
        timer.stop()
    assert timer.read_ms() == [250.0, 500.0]
    assert timer.read_ms() == []  # read once: the next interval starts empty
    timer.start()
    timer.stop()
    assert timer.read_ms() == [pytest.approx(1.0)]


def test_cpu_step_timer_times_the_wall_clock_by_default():
    timer = StepTimer(torch.device("cpu"))
    assert timer.clock is time.perf_counter
    timer.start()
    time.sleep(0.02)
    timer.stop()
    (ms,) = timer.read_ms()
    assert 15 < ms < 2000


def test_a_timer_for_a_cuda_device_times_with_events_and_one_for_any_other_with_the_clock():
    # Decided from the device alone (nothing touches CUDA until a step is timed), so this holds on a CPU build.
    assert StepTimer(torch.device("cuda", 0)).cuda and StepTimer(torch.device("cuda")).cuda
    assert not StepTimer(torch.device("meta")).cuda


# --- peak memory --------------------------------------------------------------------------------


def test_cpu_peak_memory_covers_the_timed_region_only():
    """After reset, a big allocation freed earlier no longer counts, and the figure is in MiB."""
    # An anonymous mapping, not a tensor: unmapping returns it to the OS at once, whatever the allocator
    # (and whatever an earlier test in this process left in its heap) would do with a freed tensor.
    block = mmap.mmap(-1, 256 * 2**20)
    for offset in range(0, len(block), mmap.PAGESIZE):  # touch every page: 256 MiB resident
        block[offset] = 1
    block.close()
    meter = PeakMemory(torch.device("cpu"))
    assert meter.kind == "cpu_rss"
    lifetime_peak_mib = meter.peak_mb()
    # the kernel's high-water mark in MiB: ru_maxrss (KiB) is updated at other moments than VmHWM, so
    # the two can differ by a few hundred KiB (seen: 232) but never by a factor of 1024
    assert lifetime_peak_mib * 1024 == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, abs=4096)
    meter.reset()
    assert 0 < meter.peak_mb() < lifetime_peak_mib - 200


def test_cpu_peak_memory_reads_the_high_water_mark_line_of_proc_status_in_mib(tmp_path: Path) -> None:
    (tmp_path / "status").write_text("Name:\tpython\nVmPeak:\t  999999 kB\nVmHWM:\t    3072 kB\nVmRSS:\t 1024 kB\n")
    assert PeakMemory(torch.device("cpu"), proc=tmp_path).peak_mb() == 3.0


@pytest.mark.parametrize(
    "status",
    [None, "Name:\tpython\nVmRSS:\t 1024 kB\n", "Name:\tpython\nxVmHWM:\t 1024 kB\n"],
    ids=["no-status-file", "no-VmHWM-line", "VmHWM-not-at-line-start"],
)
def test_without_a_high_water_mark_cpu_peak_memory_is_the_lifetime_peak_rss(tmp_path: Path, status: str | None) -> None:
    if status is not None:
        (tmp_path / "status").write_text(status)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_mib = PeakMemory(torch.device("cpu"), proc=tmp_path).peak_mb()
    assert peak_mib is not None
    assert before <= peak_mib * 1024 <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def test_cpu_reset_asks_the_kernel_to_reset_the_high_water_mark_and_tolerates_a_proc_it_cannot_write(
    tmp_path: Path,
) -> None:
    PeakMemory(torch.device("cpu"), proc=tmp_path).reset()
    assert (tmp_path / "clear_refs").read_text() == "5"  # 5: reset the peak resident set size
    read_only = tmp_path / "read-only"
    (read_only / "clear_refs").mkdir(parents=True)  # writing to it raises IsADirectoryError, an OSError
    PeakMemory(torch.device("cpu"), proc=read_only).reset()


def test_the_peak_memory_kind_names_what_the_device_measures():
    # The result's `peak_memory_kind`; decided from the device alone, before anything is measured.
    assert PeakMemory(torch.device("cuda", 0)).kind == "cuda_allocated"
    assert PeakMemory(torch.device("cpu")).kind == "cpu_rss"
    assert PeakMemory(torch.device("cuda")).cuda and not PeakMemory(torch.device("meta")).cuda


# --- on a real GPU ------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_step_timer_times_device_work_with_events():
    timer = StepTimer(torch.device("cuda"), clock=lambda: pytest.fail("a CUDA timer must not read the host clock"))
    assert timer.cuda
    torch.cuda.synchronize()
    for cycles in (10_000_000, 40_000_000):
        timer.start()
        torch.cuda._sleep(cycles)  # device time only: the host returns at once
        timer.stop()
    short, long = timer.read_ms()
    assert 0 < short < long
    assert timer.read_ms() == []


@pytest.mark.gpu
def test_cuda_peak_memory_is_the_allocators_peak_since_reset():
    meter = PeakMemory(torch.device("cuda"))
    assert meter.kind == "cuda_allocated"
    big = torch.ones(64 * 2**20, device="cuda")  # 256 MiB
    del big
    assert meter.peak_mb() >= 256
    meter.reset()
    live_mb = torch.cuda.memory_allocated() / 2**20  # whatever other tests left allocated
    small = torch.ones(2**20, device="cuda")  # 4 MiB
    assert 4 <= meter.peak_mb() - live_mb < 100
    del small

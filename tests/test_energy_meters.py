"""Each energy meter against a fake sysfs tree, detection fallbacks, and request windows."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from telemetry.energy import (
    BatteryMeter,
    EnergyMeter,
    EnergyReading,
    EnergyTracker,
    EstimateMeter,
    JetsonMeter,
    MeterUnavailable,
    NvmlMeter,
    RaplMeter,
    detect_meter,
)


def write(root: Path, rel: str, text: str) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text + "\n")
    return p


def fake_rapl(root: Path, pkg_uj: int = 1_000_000, dram_uj: int = 500_000, max_uj: int = 10_000_000) -> Path:
    base = "sys/class/powercap/intel-rapl:0"
    write(root, f"{base}/name", "package-0")
    write(root, f"{base}/max_energy_range_uj", str(max_uj))
    pkg = write(root, f"{base}/energy_uj", str(pkg_uj))
    write(root, f"{base}/intel-rapl:0:0/name", "core")  # inside package: must not be added again
    write(root, f"{base}/intel-rapl:0:0/energy_uj", "999999")
    write(root, f"{base}/intel-rapl:0:1/name", "dram")
    write(root, f"{base}/intel-rapl:0:1/max_energy_range_uj", str(max_uj))
    write(root, f"{base}/intel-rapl:0:1/energy_uj", str(dram_uj))
    write(root, "sys/class/powercap/intel-rapl:0:0/name", "core")  # the flat alias sysfs also has
    write(root, "sys/class/powercap/intel-rapl:0:0/energy_uj", "999999")
    return pkg


def test_rapl_sums_package_and_dram(tmp_path):
    pkg = fake_rapl(tmp_path)
    meter = RaplMeter(str(tmp_path))
    assert meter.source == "rapl" and meter.measured
    assert meter.read_joules() == 0.0
    pkg.write_text("3000000\n")
    (pkg.parent / "intel-rapl:0:1/energy_uj").write_text("1500000\n")
    assert meter.read_joules() == pytest.approx(3.0)  # 2 J package + 1 J dram, core ignored


def test_rapl_handles_counter_wraparound(tmp_path):
    pkg = fake_rapl(tmp_path, pkg_uj=9_500_000, max_uj=10_000_000)
    meter = RaplMeter(str(tmp_path))
    pkg.write_text("9900000\n")
    assert meter.read_joules() == pytest.approx(0.4)
    pkg.write_text("200000\n")  # wrapped: 0.1 J to the top, 0.2 J after
    assert meter.read_joules() == pytest.approx(0.7)
    pkg.write_text("250000\n")
    assert meter.read_joules() == pytest.approx(0.75)


def test_rapl_permission_denied_falls_back_with_logged_reason(tmp_path, monkeypatch, caplog):
    pkg = fake_rapl(tmp_path)
    real_read_text = Path.read_text

    def deny(self, *a, **kw):
        if self == pkg:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", deny)
    with pytest.raises(MeterUnavailable, match="permission denied"):
        RaplMeter(str(tmp_path))
    caplog.set_level(logging.INFO, logger="edgevlm.telemetry.energy")
    found = detect_meter(str(tmp_path), order=("rapl", "estimate"))
    assert found.meter is not None and found.meter.source == "estimate"
    assert "permission denied" in found.skipped["rapl"]
    assert any("rapl skipped" in r.getMessage() and "permission denied" in r.getMessage() for r in caplog.records)


def test_detection_first_that_works_wins_and_records_every_skip(tmp_path):
    write(tmp_path, "sys/class/power_supply/BAT0/status", "Discharging")
    write(tmp_path, "sys/class/power_supply/BAT0/power_now", "12000000")
    found = detect_meter(str(tmp_path))
    try:
        assert found.meter is not None and found.meter.source == "battery"
        assert set(found.skipped) == {"rapl", "nvml", "jetson"}
        assert "no RAPL zones" in found.skipped["rapl"] or "does not exist" in found.skipped["rapl"]
    finally:
        found.meter.close()


def test_battery_integrates_discharge_power(tmp_path):
    write(tmp_path, "sys/class/power_supply/BAT0/status", "Discharging")
    write(tmp_path, "sys/class/power_supply/BAT0/power_now", "10000000")  # 10 W in µW
    meter = BatteryMeter(str(tmp_path), interval_s=0)  # no thread: reads drive the integration
    t0 = time.monotonic()
    j0 = meter.read_joules()
    time.sleep(0.2)
    j1 = meter.read_joules()
    dt = time.monotonic() - t0
    assert j1 - j0 == pytest.approx(10 * dt, rel=0.25)
    assert meter.gaps == 0


def test_battery_uses_current_times_voltage_and_stops_while_charging(tmp_path):
    bat = "sys/class/power_supply/BAT1"
    status = write(tmp_path, f"{bat}/status", "Discharging")
    write(tmp_path, f"{bat}/current_now", "1000000")  # 1 A
    write(tmp_path, f"{bat}/voltage_now", "12000000")  # 12 V
    meter = BatteryMeter(str(tmp_path), interval_s=0)
    tracker = EnergyTracker(meter)
    w = tracker.open()
    time.sleep(0.1)
    fig = tracker.close(w, output_tokens=4)
    assert fig["source"] == "battery" and fig["joules"] == pytest.approx(12 * fig["window_s"], rel=0.3)
    assert "incomplete" not in fig
    w = tracker.open()
    status.write_text("Charging\n")
    time.sleep(0.05)
    fig = tracker.close(w, output_tokens=4)
    assert fig["incomplete"] is True  # the battery cannot see the draw on AC power


def test_battery_on_ac_power_is_skipped(tmp_path):
    write(tmp_path, "sys/class/power_supply/BAT0/status", "Charging")
    write(tmp_path, "sys/class/power_supply/BAT0/power_now", "5000000")
    found = detect_meter(str(tmp_path), order=("battery", "estimate"))
    assert found.meter.source == "estimate"
    assert "not discharging" in found.skipped["battery"]


def test_jetson_hwmon_prefers_the_module_input_rail(tmp_path):
    hw = "sys/class/hwmon/hwmon3"
    write(tmp_path, f"{hw}/name", "ina3221")
    write(tmp_path, f"{hw}/in1_label", "VDD_IN")
    write(tmp_path, f"{hw}/in1_input", "5000")  # mV
    write(tmp_path, f"{hw}/curr1_input", "2000")  # mA -> 10 W
    write(tmp_path, f"{hw}/in2_label", "VDD_CPU_GPU_CV")
    write(tmp_path, f"{hw}/in2_input", "5000")
    write(tmp_path, f"{hw}/curr2_input", "1000")
    meter = JetsonMeter(str(tmp_path), interval_s=0)
    assert meter.describe() == "jetson: VDD_IN"
    j0 = meter.read_joules()
    t0 = time.monotonic()
    time.sleep(0.2)
    assert meter.read_joules() - j0 == pytest.approx(10 * (time.monotonic() - t0), rel=0.25)


def test_jetson_iio_power_files_are_summed(tmp_path):
    d = "sys/bus/i2c/drivers/ina3221x/0-0040/iio:device0"
    write(tmp_path, f"{d}/rail_name_0", "VDD_SYS_GPU")
    write(tmp_path, f"{d}/in_power0_input", "3000")  # mW
    write(tmp_path, f"{d}/rail_name_1", "VDD_SYS_SOC")
    write(tmp_path, f"{d}/in_power1_input", "2000")
    meter = JetsonMeter(str(tmp_path), interval_s=0.02)  # with the sampling thread
    try:
        j0 = meter.read_joules()
        time.sleep(0.2)
        assert meter.read_joules() - j0 == pytest.approx(5 * 0.2, rel=0.35)
    finally:
        meter.close()


def test_jetson_absent_is_unavailable(tmp_path):
    with pytest.raises(MeterUnavailable, match="INA3221"):
        JetsonMeter(str(tmp_path))


class FakeNvml:
    def __init__(self) -> None:
        self.mj = [1_000, 50_000]

    def nvmlInit(self):  # noqa: N802
        pass

    def nvmlShutdown(self):  # noqa: N802
        pass

    def nvmlDeviceGetCount(self):  # noqa: N802
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):  # noqa: N802
        return i

    def nvmlDeviceGetTotalEnergyConsumption(self, h):  # noqa: N802
        return self.mj[h]


def test_nvml_sums_gpu_energy_counters():
    nv = FakeNvml()
    meter = NvmlMeter(nv)
    assert meter.source == "nvml" and meter.scope == "gpu"
    nv.mj = [3_000, 51_500]
    assert meter.read_joules() == pytest.approx(3.5)


def test_estimate_is_labelled_and_grows_with_cpu_time():
    meter = EstimateMeter(watts_per_core=10.0)
    assert meter.source == "estimate" and meter.measured is False
    j0 = meter.read_joules()
    end = time.process_time() + 0.15
    while time.process_time() < end:
        pass
    assert meter.read_joules() - j0 == pytest.approx(1.5, rel=0.5)


def test_estimate_counts_the_cpu_time_of_child_processes_live_and_ended():
    # The model runners are children of the server: their compute is the inference.
    meter = EstimateMeter(watts_per_core=10.0)
    burn = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass\nprint(1, flush=True)\ninput()"
    child = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        j0 = meter.read_joules()
        assert child.stdout.readline().strip() == "1"  # burned its CPU and still lives
        live = meter.read_joules() - j0
        assert live >= 0.3 * 10.0 * 0.5, live  # most of the child's 0.4 s (the parent only waited)
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    assert meter.read_joules() - j0 >= live * 0.95  # reaped: its time stays counted


class ScriptedMeter(EnergyMeter):
    """Returns pre-set (joules, seconds) readings so window arithmetic is exact."""

    source = "rapl"

    def __init__(self, readings):
        self.readings = list(readings)

    def read_joules(self) -> float:
        raise NotImplementedError

    def read(self) -> EnergyReading:
        j, t = self.readings.pop(0)
        return EnergyReading(j, self.source, t)


def test_window_subtracts_idle_and_divides_by_tokens():
    tracker = EnergyTracker(ScriptedMeter([(0.0, 0.0), (10.0, 2.0)]))
    tracker.idle_watts = 2.0
    fig = tracker.close(tracker.open(), output_tokens=5)
    assert fig["joules"] == 10.0 and fig["window_s"] == 2.0
    assert fig["joules_idle_subtracted"] == pytest.approx(6.0)
    assert fig["joules_per_output_token"] == pytest.approx(2.0)
    assert fig["overlap_requests"] == 0 and fig["source"] == "rapl"


def test_window_counts_the_most_requests_that_overlapped_it():
    tracker = EnergyTracker(ScriptedMeter([(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (7, 7), (8, 8), (9, 9)]))
    a = tracker.open()
    b = tracker.open()
    c = tracker.open()
    assert tracker.close(b, 1)["overlap_requests"] == 2
    d = tracker.open()
    assert tracker.close(a, 1)["overlap_requests"] == 2
    assert tracker.close(c, 1)["overlap_requests"] == 2
    assert tracker.close(d, 1)["overlap_requests"] == 2  # a and c were still open when d began
    e = tracker.open()
    assert tracker.close(e, 1)["overlap_requests"] == 0


def test_idle_sample_gives_watts():
    tracker = EnergyTracker(ScriptedMeter([(100.0, 10.0), (103.0, 11.5)]))
    assert tracker.sample_idle(0.0) == pytest.approx(2.0)
    assert tracker.idle_watts == pytest.approx(2.0)


def test_no_meter_means_no_energy_figures():
    tracker = EnergyTracker(None)
    assert tracker.close(tracker.open(), 3) == {}
    assert tracker.sample_idle(0.0) is None

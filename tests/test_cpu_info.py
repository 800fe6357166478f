"""The CPUs a process may really use: affinity and cgroup quota, and the warning they drive."""

from __future__ import annotations

from pathlib import Path

from models import cpu_info


def test_cgroup_v2_quota_limits_the_usable_cpus(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # docker run --cpus 1.5
    budget = cpu_info.cpu_budget(tmp_path)
    assert budget.quota == 1.5 and budget.usable == 1
    assert "cgroup quota 1.5 CPUs" in budget.describe()
    warning = cpu_info.threads_warning(2, budget)
    assert warning is not None and "set --threads 1" in warning


def test_cgroup_v1_quota_and_no_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_info.cpu_budget(tmp_path).quota == 2.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_info.cpu_budget(tmp_path).quota is None
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_info.cpu_budget(tmp_path).quota is None


def test_affinity_counts_and_threads_within_budget_do_not_warn(tmp_path: Path) -> None:
    budget = cpu_info.CpuBudget(machine=16, affinity=4, quota=None)
    assert budget.usable == 4 and "affinity allows 4" in budget.describe()
    assert cpu_info.threads_warning(4, budget) is None
    assert "only 4 CPUs" in (cpu_info.threads_warning(8, budget) or "")


def test_simd_features_keep_the_kernel_relevant_flags() -> None:
    flags = ["fpu", "avx2", "avx512f", "amx_tile", "amx_int8", "fma", "asimddp", "i8mm", "sve", "pse"]
    assert cpu_info.simd_features(flags) == ["avx2", "avx512f", "amx_tile", "amx_int8", "fma", "asimddp", "i8mm", "sve"]

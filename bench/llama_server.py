"""llama.cpp's C++ ``llama-server``: the reference the benchmarks compare edgevlm with.

The binary is built from the llama.cpp sources vendored in the llama-cpp-python
sdist of the version edgevlm links against, so both servers run the same llama.cpp
revision. The sdist is fetched with pip (the only network the build needs), built
with CMake into a cache outside the repository, and the resulting (statically
linked) binary is kept there:

    ~/.cache/edgevlm-bench/bin/llama-server-<llama-cpp-python version>

``EDGEVLM_LLAMA_SERVER=/path/to/llama-server`` overrides all of this, and
``EDGEVLM_BENCH_CACHE`` moves the cache. Build by hand (about 10+ minutes on two
cores) with ``python -m bench.llama_server``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from bench.process import RunningServer, free_port, run_server

ENV_BINARY = "EDGEVLM_LLAMA_SERVER"
ENV_CACHE = "EDGEVLM_BENCH_CACHE"
PINNED_VERSION = "0.3.36"
CMAKE_FLAGS = (
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_CURL=OFF",
    "-DGGML_NATIVE=ON",
    "-DCMAKE_BUILD_TYPE=Release",
    # one self-contained binary that can be copied out of the build tree
    "-DBUILD_SHARED_LIBS=OFF",
    # no web UI: nothing to fetch (no network) and nothing we measure
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
)


class LlamaServerBuildError(RuntimeError):
    """Fetching or compiling llama-server failed."""


def llama_cpp_python_version() -> str:
    """The installed llama-cpp-python version (the llama.cpp revision edgevlm links)."""
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return PINNED_VERSION


def cache_dir() -> Path:
    """Where sdists, sources, build trees and binaries are kept (outside the repo)."""
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "edgevlm-bench")


def cached_binary_path(version: str | None = None) -> Path:
    return cache_dir() / "bin" / f"llama-server-{version or llama_cpp_python_version()}"


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _run(cmd: Sequence[str], log, nice: int) -> None:
    prefix = ["nice", "-n", str(nice)] if nice and shutil.which("nice") else []
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    rc = subprocess.call([*prefix, *cmd], stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
        raise LlamaServerBuildError(f"command failed with status {rc}: {' '.join(cmd)} (log: {log.name})")


def _fetch_sources(version: str, log, nice: int) -> Path:
    """Download and unpack the llama-cpp-python sdist; return its vendored llama.cpp dir."""
    root = cache_dir()
    src = root / "src" / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (src / "CMakeLists.txt").is_file():
        return src
    sdist_dir = root / "sdist"
    sdist = sdist_dir / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        sdist_dir.mkdir(parents=True, exist_ok=True)
        _run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={version}", "-d", str(sdist_dir)],
            log, nice,
        )
    if not sdist.is_file():
        raise LlamaServerBuildError(f"pip download did not produce {sdist}")
    with tarfile.open(sdist) as tar:
        tar.extractall(root / "src", filter="data")
    if not (src / "CMakeLists.txt").is_file():
        raise LlamaServerBuildError(f"no vendored llama.cpp in {sdist}")
    return src


def build_llama_server(version: str | None = None, jobs: int = 2, nice: int = 10) -> Path:
    """Fetch the sdist, build ``llama-server`` with CMake and cache the binary; return its path.

    Serialised with a lock file, so concurrent callers wait for one build.
    The build log is ``<cache>/build-<version>.log``.
    """
    version = version or llama_cpp_python_version()
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    target = cached_binary_path(version)
    with open(root / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_executable(target):
            return target
        for tool in ("cmake", "c++"):
            if shutil.which(tool) is None:
                raise LlamaServerBuildError(f"`{tool}` not found on PATH")
        with open(root / f"build-{version}.log", "a") as log:
            src = _fetch_sources(version, log, nice)
            build = root / f"build-{version}"
            generator = ["-G", "Ninja"] if shutil.which("ninja") else []
            _run(["cmake", "-S", str(src), "-B", str(build), *generator, *CMAKE_FLAGS], log, nice)
            _run(["cmake", "--build", str(build), "--target", "llama-server", f"-j{jobs}"], log, nice)
        built = build / "bin" / "llama-server"
        if not _is_executable(built):
            raise LlamaServerBuildError(f"build finished but {built} is missing")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        shutil.copy2(built, tmp)
        tmp.replace(target)
        return target


def ensure_llama_server(build: bool = True, jobs: int = 2) -> Path | None:
    """Path of a usable ``llama-server``, building it if needed; None (with a printed reason) if none.

    Order: ``$EDGEVLM_LLAMA_SERVER``, the cached binary, then (when ``build``) a fresh build.
    """
    override = os.environ.get(ENV_BINARY)
    if override:
        path = Path(override).expanduser()
        if _is_executable(path):
            return path
        print(f"[bench] {ENV_BINARY}={override} is not an executable file; skipping llama-server comparison")
        return None
    cached = cached_binary_path()
    if _is_executable(cached):
        return cached
    if not build:
        print(f"[bench] llama-server not built ({cached} missing); skipping llama-server comparison")
        return None
    print(f"[bench] building llama-server from the llama-cpp-python {llama_cpp_python_version()} sdist "
          f"(~10+ min; log {cache_dir()}/build-{llama_cpp_python_version()}.log) ...", flush=True)
    started = time.monotonic()
    try:
        path = build_llama_server(jobs=jobs)
    except (LlamaServerBuildError, OSError, tarfile.TarError) as exc:
        print(f"[bench] could not build llama-server: {exc}\n[bench] skipping llama-server comparison "
              f"(set {ENV_BINARY}=/path/to/llama-server to use an existing binary)")
        return None
    print(f"[bench] llama-server ready at {path} ({time.monotonic() - started:.0f}s)")
    return path


def llama_server_command(
    binary: Path,
    model_path: Path,
    port: int,
    threads: int,
    ctx_size: int,
    parallel: int,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The command line; prompt caching / ``--cache-reuse`` stay at the C++ server's defaults."""
    return [
        str(binary),
        "-m", str(model_path),
        "--host", "127.0.0.1",
        "--port", str(port),
        "-t", str(threads),
        "-c", str(ctx_size),
        "-np", str(parallel),
        "--no-webui",
        *extra_args,
    ]


def repack_args(model_path: Path, threads: int, extra_args: Sequence[str] = ()) -> list[str]:
    """``--no-repack`` where edgevlm's self-test turned any fast path off for this model.

    llama-server takes every extra buffer type the CPU advertises and cannot drop one
    (AMX) while keeping another (CPU_REPACK); where one is broken it would crash at the
    first decode, so it runs on the plain path there, and the table says so.
    """
    from models import cpu_paths

    if "--no-repack" in extra_args:
        return []
    verdict = cpu_paths.choose(str(model_path), "auto", threads)
    if verdict.allowed is not None and set(verdict.allowed) != set(verdict.available):
        print(f"[bench] llama-server gets --no-repack: {verdict.describe()}")
        return ["--no-repack"]
    return []


@contextlib.contextmanager
def llama_server(
    model_path: Path,
    threads: int,
    ctx_size: int = 4096,
    parallel: int = 1,
    binary: Path | None = None,
    extra_args: Sequence[str] = (),
    startup_timeout_s: float = 180.0,
) -> Iterator[RunningServer]:
    """Run ``llama-server -m MODEL -t THREADS -c CTX -np PARALLEL`` on 127.0.0.1:<free port>.

    ``ctx_size`` is llama-server's ``-c``: the KV cache shared by all slots (each slot
    gets ``ctx_size / parallel``). Yields once ``/health`` is 200; stops it on exit.
    Raises :class:`FileNotFoundError` when no binary is available.
    """
    binary = binary or ensure_llama_server()
    if binary is None:
        raise FileNotFoundError("llama-server is not available")
    port = free_port()
    cmd = llama_server_command(binary, model_path, port, threads, ctx_size, parallel,
                               [*extra_args, *repack_args(model_path, threads, extra_args)])
    with run_server("llama-server", cmd, port, startup_timeout_s=startup_timeout_s) as server:
        yield server


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build (or find) the reference llama-server binary.")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default: 2)")
    args = parser.parse_args(argv)
    path = ensure_llama_server(build=True, jobs=args.jobs)
    if path is None:
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

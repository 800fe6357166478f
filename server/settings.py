"""Server settings: every CLI flag has an ``EDGEVLM_*`` environment variable."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated


def _split_list(value: object) -> object:
    if isinstance(value, str):
        return [v.strip() for v in value.replace(";", ",").split(",") if v.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGEVLM_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address to bind; keep 127.0.0.1 unless behind auth.")
    port: int = Field(8000, ge=0, le=65535)
    config: str | None = Field(None, description="TOML file declaring [[models]].")
    models_dir: str | None = Field(None, description="Directory of *.gguf models (+ mmproj-*.gguf).")
    model: str | None = Field(None, description="Default model: a configured id or a GGUF path.")
    mmproj: str | None = Field(None, description="Vision projector GGUF for --model.")
    image_min_tokens: int | None = Field(None, ge=1, description="Fewest tokens one image may cost (--model).")
    image_max_tokens: int | None = Field(None, ge=1, description="Most tokens one image may cost (--model).")
    embedded_model: bool | None = Field(None, description="Offer the embedded SmolLM2 beside named models.")
    ctx_size: int | None = Field(None, ge=64, description="Context tokens shared by all slots.")
    threads: int | None = Field(None, ge=1, description="CPU threads (default: physical cores).")
    parallel: int | None = Field(None, ge=1, le=64, description="Parallel sequences per model.")
    batch: int | None = Field(None, ge=32, description="Max tokens per llama_decode call.")
    repack: Literal["auto", "on", "off"] | None = Field(
        None, description="CPU fast paths (AMX, repacked weights): auto = self-tested, on, off.")
    flash_attn: Literal["auto", "on", "off"] | None = Field(
        None, description="Attention kernel: auto = flash attention or the plain path, whichever this "
                          "machine ran faster (timed once, cached), on, off.")
    speculative: Literal["off", "ngram", "draft"] | None = Field(
        None, description="Speculative decoding: ngram (prompt lookup, default), draft (a draft model) or off.")
    draft_model: str | None = Field(
        None, description="Draft model GGUF (same tokenizer, smaller) for speculative draft.")
    kv_layout: Literal["shared", "per-slot"] | None = Field(
        None, description="KV cells: shared = one pool, a request may use the whole context (default); "
                          "per-slot = each slot its own ctx_size / parallel cells (faster concurrent long streams).")
    stream_interval: int | str | None = Field(
        None, description="Decode steps per hand-over of a running request's text: auto (default: every token "
                          "while the model's threads leave a CPU free, every 4th once they take every CPU) "
                          "or 1-64; the first token and the end go out at once.")
    prompt_cache_mb: int | None = Field(
        None, ge=0, description="Host RAM per model for the KV of prompts whose slot another request took, MiB "
                                "(default 256; 0 = off).")
    max_queue: int = Field(8, ge=0, description="Requests waiting per model before 429.")
    max_loaded_models: int = Field(2, ge=1)
    runners: Literal["on", "off"] = Field(
        "on", description="Run each model (and its vision encoder) in its own supervised runner process; "
                          "off loads every model into the server process.")
    runner_max_crashes: int = Field(3, ge=1, description="Runner crashes within the window that mark a model failed.")
    runner_crash_window_s: float = Field(300.0, gt=0, description="The window runner crashes are counted in.")
    max_model_memory_mb: int | None = Field(None, ge=1)
    api_key: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                    description="Accepted API keys.")
    api_key_file: str | None = Field(None, description="File with one API key per line.")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    traces: str | None = Field("traces/edgevlm-traces.jsonl",
                               description="JSONL trace file ('' or 'none' disables).")
    traces_max_bytes: int = Field(50_000_000, ge=1024, description="Rotate the trace file at this size.")
    traces_keep: int = Field(5, ge=1, description="Rotated trace files kept.")
    traces_flush_ms: int = Field(1000, ge=1, description="Trace batch interval (most a crash can lose).")
    otlp_endpoint: str | None = None
    console_traces: bool = False
    capture_content: bool = False
    energy: bool = True
    energy_sysfs_root: str = "/"
    cpu_watts_per_core: float | None = None
    metrics: bool = True
    # images
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_images: int = Field(8, ge=0)
    image_cache_mb: int | None = Field(None, ge=0, description="Image-embedding cache per vision model, MiB.")
    allow_file_dirs: Annotated[list[str], NoDecode] = Field(default_factory=list)
    allow_http_images: bool = False
    allow_image_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Hosts or CIDRs http(s) images may come from although private.")
    http_image_timeout_s: float = 5.0
    # middleware
    profile: Literal["quality", "balanced", "fast"] = Field("quality", description="Default middleware profile.")
    ttft_budget_ms: float | None = Field(None, gt=0)
    truncate_prompts: bool = False
    resolution_mode: Literal["resize", "zoom"] = Field(
        "resize", description="How profiles spend an image budget: resize the whole image, or zoom (CLIP).")
    # CLIP (the clip extra): local files only, nothing is downloaded
    clip_model: str | None = Field(None, description="open_clip model name, e.g. ViT-B-32.")
    clip_checkpoint: str | None = Field(None, description="Local CLIP weights file for --clip-model.")
    clip_config: str | None = Field(None, description="open_clip model-config JSON for a custom CLIP.")
    clip_threads: int | None = Field(None, ge=1, description="torch threads for CLIP (default: torch's).")

    @field_validator("stream_interval", mode="before")
    @classmethod
    def _stream_interval(cls, v: object) -> object:
        from models.engine.types import stream_interval_problem  # the engine's own rule

        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        problem = None if v is None else stream_interval_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return v

    @field_validator("api_key", "allow_file_dirs", "allow_image_hosts", mode="before")
    @classmethod
    def _lists(cls, v: object) -> object:
        return _split_list(v)

    def api_keys(self) -> set[str]:
        keys = set(self.api_key)
        if self.api_key_file:
            keys |= {ln.strip() for ln in Path(self.api_key_file).read_text().splitlines()
                     if ln.strip() and not ln.startswith("#")}
        return keys

    def traces_path(self) -> str | None:
        if not self.traces or self.traces.lower() == "none":
            return None
        return self.traces

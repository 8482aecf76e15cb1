"""Serving settings: one frozen dataclass for the CLI, the pipeline, tests and the environment.

`ServeSettings` (alias `ServeConfig`) is the only configuration in clipsearch that may read environment
variables: `ServeSettings.from_env()` reads `CLIPSEARCH_SERVE_*` variables (and the whole settings as JSON
from `CLIPSEARCH_SERVE_SETTINGS`, which is how `--workers N` hands them to each uvicorn worker).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from clipsearch.errors import ConfigError

DEFAULT_UNSAFE_PROMPTS: tuple[str, ...] = (
    "a photo of a naked person",
    "nudity",
    "pornography",
    "sexual content",
    "a photo of graphic violence",
    "blood and gore",
    "a dead body",
)
DEFAULT_SAFE_PROMPTS: tuple[str, ...] = (
    "a photo",
    "a picture of an object",
    "a photo of a person wearing clothes",
    "a landscape",
    "an animal",
    "a drawing",
)

#: the zero-shot violence detector (`violence` / `use_violence_detector`): a result is violent when its best
#: similarity to these beats its best similarity to the peaceful prompts by more than `violence_threshold`
DEFAULT_VIOLENT_PROMPTS: tuple[str, ...] = (
    "a photo of violence",
    "people fighting",
    "a violent attack",
    "a person pointing a gun",
    "a bloody wound",
    "a war scene with weapons",
    "a riot with fire and police",
)
DEFAULT_PEACEFUL_PROMPTS: tuple[str, ...] = (
    "a peaceful photo",
    "people talking calmly",
    "a photo of an object",
    "a landscape",
    "an animal",
    "a drawing",
)

ENV_PREFIX = "CLIPSEARCH_SERVE_"
ENV_SETTINGS_JSON = "CLIPSEARCH_SERVE_SETTINGS"


#: the longest a text query may wait for others to share its encoder call: beyond it, batching costs more
#: latency than it saves
MAX_BATCH_WAIT_MS = 50.0


@dataclass(frozen=True)
class ServeSettings:
    """Everything `serve` needs. `indices` maps a name to an index folder (local or fsspec URL)."""

    indices: Mapping[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    #: model name or path; None = the `model` recorded in each index.json
    clip_model: str | None = None
    device: str = "cpu"
    #: what runs the model (auto|torch|openvino|onnx) and at which precision (auto|fp32|bf16|int8|fp16)
    backend: str = "auto"
    precision: str = "auto"
    #: memory-map index files: auto (when index.json says mmap, or the file is over 1 GiB), always, never
    mmap: str = "auto"
    # request limits
    default_k: int = 10
    max_k: int = 1000
    max_offset: int = 5_000
    max_body_bytes: int = 16 * 1024 * 1024
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_text_chars: int = 2000
    max_filter_chars: int = 2000
    max_ids: int = 10_000
    # image decoding: at most `decode_slots` at once (0 = one per core) and `decode_memory_mb` of estimated
    # decode memory at once; up to `decode_queue` requests wait, each at most `decode_wait_s`, then 503
    decode_slots: int = 0
    decode_memory_mb: int = 256
    decode_queue: int = 64
    decode_wait_s: float = 10.0
    # image_url fetching
    allow_url_hosts: tuple[str, ...] = ()
    url_timeout_s: float = 5.0
    url_max_redirects: int = 3
    # search planning
    exact_max: int = 50_000  # a filter allowing at most this many ids is searched exactly
    filter_cache_size: int = 64
    #: wall-clock seconds a request may spend evaluating a new (uncached) filter over the metadata; 0 = no limit
    filter_budget_s: float = 5.0
    subset_cache_bytes: int = 128 * 1024 * 1024
    overfetch: float = 2.0  # extra candidates fetched when deduplicate / safety may remove results
    #: candidates deduplicate / safety may examine per request (dedup costs candidates x kept x dim)
    hygiene_max_candidates: int = 16_384
    # result hygiene
    dedup_threshold: float = 0.95
    safety_threshold: float = 0.0  # margin of the best unsafe prompt over the best safe one
    unsafe_prompts: tuple[str, ...] = DEFAULT_UNSAFE_PROMPTS
    safe_prompts: tuple[str, ...] = DEFAULT_SAFE_PROMPTS
    violence_threshold: float = 0.0  # margin of the best violent prompt over the best peaceful one
    violent_prompts: tuple[str, ...] = DEFAULT_VIOLENT_PROMPTS
    peaceful_prompts: tuple[str, ...] = DEFAULT_PEACEFUL_PROMPTS
    #: multilingual text encoders (M-CLIP, multilingual CLIP) in the index's space; the first is the default
    #: of `multilingual=true` / `use_mclip`. Entries are NAME_OR_PATH or ALIAS=NAME_OR_PATH
    multilingual_models: tuple[str, ...] = ()
    #: aesthetic embeddings table (docs/serve.md); default: each index folder's aesthetic_embeddings.npy,
    #: else the model folder's
    aesthetic_embeddings: str | None = None
    # micro-batching of text encoding (batching.py): concurrent text queries are encoded in one call of at
    # most `batch_max_size` texts; a query that finds the encoder idle waits `batch_wait_ms` for others (0:
    # none; batches still form from the queries that arrive while the encoder is busy)
    batch_max_size: int = 64
    batch_wait_ms: float = 0.0
    text_cache_size: int = 4096
    #: threads per encode call and encode calls in flight at once; 0 = by backend (`encoder_plan`): OpenVINO one
    #: call of 2 threads per 2 cores (one call streams the weights once for a larger batch), torch and ONNX
    #: Runtime 2 calls of 1 thread (their 2-thread calls spin or synchronise badly on a busy machine)
    encoder_threads: int = 0
    encoder_workers: int = 0
    #: OpenMP threads per search call (0 = faiss default); concurrency comes from concurrent requests
    search_threads: int = 1
    #: run small searches on the event loop (saves two thread hand-offs per request)
    inline_search: bool = True
    #: serve the web page at /
    web: bool = True
    #: serve the API docs (/docs, /redoc, /openapi.json)
    docs: bool = True
    #: serve /metrics on its own listener at this address (with metrics_port) instead of the API's; "off": no /metrics
    metrics_host: str | None = None
    metrics_port: int = 9464

    def __post_init__(self) -> None:
        object.__setattr__(self, "indices", dict(self.indices))
        object.__setattr__(self, "allow_url_hosts", tuple(h.lower() for h in self.allow_url_hosts))
        object.__setattr__(self, "unsafe_prompts", tuple(self.unsafe_prompts))
        object.__setattr__(self, "safe_prompts", tuple(self.safe_prompts))
        object.__setattr__(self, "violent_prompts", tuple(self.violent_prompts))
        object.__setattr__(self, "peaceful_prompts", tuple(self.peaceful_prompts))
        object.__setattr__(self, "multilingual_models", tuple(m for m in self.multilingual_models if m))
        for name in self.indices:
            if not name or not all(c.isalnum() or c in "-_." for c in name):
                raise ConfigError(
                    f"index name {name!r} is not valid: use letters, digits, '-', '_' or '.'",
                    hint="--index NAME=DIR",
                )
        for name, path in self.indices.items():
            if not path:
                raise ConfigError(f"index {name!r} has an empty path", hint="--index NAME=DIR")
        if not (0 <= self.port <= 65535):
            raise ConfigError(f"port {self.port} is out of range", hint="--port 0..65535")
        from clipsearch.embed.backends.choice import check_pair

        check_pair(self.backend, self.precision)
        if self.mmap not in ("auto", "always", "never"):
            raise ConfigError(f"mmap must be auto, always or never, got {self.mmap!r}")
        if self.workers < 1:
            raise ConfigError("workers must be >= 1", hint="--workers 1")
        if self.metrics_host == "":
            object.__setattr__(self, "metrics_host", None)
        if not (0 <= self.metrics_port <= 65535):
            raise ConfigError(
                f"metrics_port {self.metrics_port} is out of range", hint="--metrics-port 0..65535"
            )
        if self.metrics_listener and self.workers > 1:
            raise ConfigError(
                "a separate metrics listener serves one process's metrics, and --workers starts several",
                hint="--workers 1 with --metrics-host, or --metrics-host off",
            )
        positive = (
            "default_k",
            "max_k",
            "max_body_bytes",
            "max_image_bytes",
            "max_image_pixels",
            "max_text_chars",
            "max_filter_chars",
            "max_ids",
            "batch_max_size",
            "filter_cache_size",
            "text_cache_size",
            "hygiene_max_candidates",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.default_k > self.max_k:
            raise ConfigError(f"default_k {self.default_k} is larger than max_k {self.max_k}")
        if self.decode_slots < 0:
            raise ConfigError(f"decode_slots must be >= 0 (0 = one per core), got {self.decode_slots}")
        if self.decode_memory_mb < 16:
            raise ConfigError(f"decode_memory_mb must be >= 16, got {self.decode_memory_mb}")
        for name in ("encoder_threads", "encoder_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0 = by backend), got {getattr(self, name)}")
        if not (0.0 <= self.batch_wait_ms <= MAX_BATCH_WAIT_MS):
            raise ConfigError(
                f"batch_wait_ms must be between 0 and {MAX_BATCH_WAIT_MS:g}, got {self.batch_wait_ms:g}",
                hint="--text-batch-wait-ms 0..50",
            )
        if self.decode_queue < 0 or self.decode_wait_s <= 0:
            raise ConfigError("decode_queue must be >= 0 and decode_wait_s > 0")
        if self.filter_budget_s < 0:
            raise ConfigError(f"filter_budget_s must be >= 0 (0 = no limit), got {self.filter_budget_s}")
        if self.url_timeout_s <= 0:
            raise ConfigError("url_timeout_s must be > 0")
        if not (0.0 < self.dedup_threshold <= 1.0):
            raise ConfigError(f"dedup_threshold must be in (0, 1], got {self.dedup_threshold}")
        if not (-1.0 <= self.safety_threshold <= 1.0):
            raise ConfigError(f"safety_threshold must be in [-1, 1], got {self.safety_threshold}")
        if self.overfetch < 1.0:
            raise ConfigError(f"overfetch must be >= 1, got {self.overfetch}")
        if not self.unsafe_prompts:
            raise ConfigError("unsafe_prompts must not be empty")
        if not (-1.0 <= self.violence_threshold <= 1.0):
            raise ConfigError(f"violence_threshold must be in [-1, 1], got {self.violence_threshold}")
        if not self.violent_prompts:
            raise ConfigError("violent_prompts must not be empty")
        self.multilingual_aliases()  # checks the names

    def multilingual_aliases(self) -> dict[str, str]:
        """`multilingual_models` as {alias: name_or_path}; a bare entry is its own alias."""
        out: dict[str, str] = {}
        for spec in self.multilingual_models:
            alias, sep, path = spec.partition("=")
            if not sep or "/" in alias or ":" in alias:
                alias, path = spec, spec
            alias, path = alias.strip(), path.strip()
            if not alias or not path:
                raise ConfigError(
                    f"bad multilingual model {spec!r}", hint="--multilingual-model [ALIAS=]NAME_OR_PATH"
                )
            if alias in out:
                raise ConfigError(
                    f"multilingual model {alias!r} is given twice",
                    hint="--multilingual-model ALIAS=NAME_OR_PATH",
                )
            out[alias] = path
        return out

    def encoder_plan(self, backend: str) -> tuple[int, int]:
        """(calls in flight, threads per call) of the text encoder on `backend` (the resolved one)."""
        if backend == "openvino":
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
            workers, threads = max(1, cores // 2), min(2, cores)
        else:
            workers, threads = 2, 1
        return self.encoder_workers or workers, self.encoder_threads or threads

    @property
    def metrics_listener(self) -> bool:
        """Whether /metrics is served on its own address (metrics_host, metrics_port)."""
        return self.metrics_host is not None and self.metrics_host.lower() != "off"

    @property
    def metrics_on_api(self) -> bool:
        """Whether the API's own listener answers /metrics (the default)."""
        return self.metrics_host is None

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ServeSettings:
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown serve setting(s): {', '.join(unknown)}",
                hint="known settings: " + ", ".join(sorted(known)),
            )
        kwargs = dict(data)
        for key in (
            "allow_url_hosts",
            "unsafe_prompts",
            "safe_prompts",
            "violent_prompts",
            "peaceful_prompts",
            "multilingual_models",
        ):
            if key in kwargs and isinstance(kwargs[key], str):
                kwargs[key] = tuple(s.strip() for s in kwargs[key].split(",") if s.strip())
        try:
            return cls(**kwargs)
        except TypeError as e:  # pragma: no cover - defensive
            raise ConfigError(f"bad serve settings: {e}") from e

    @classmethod
    def from_file(cls, path: str, **overrides: Any) -> ServeSettings:
        """Read a JSON or YAML settings file; `overrides` (non-None values) win over the file."""
        from clipsearch import storage

        if not storage.exists(path):
            raise ConfigError(f"config file {path} does not exist", hint="--config FILE.json|yaml")
        fs, p = storage.get_fs(path)
        with fs.open(p, "rb") as f:
            raw = f.read().decode()
        try:
            if path.endswith((".yaml", ".yml")):
                import yaml

                data = yaml.safe_load(raw) or {}
            else:
                data = json.loads(raw)
        except Exception as e:
            raise ConfigError(f"config file {path} is not valid JSON/YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of settings")
        merged = dict(data)
        for k, v in overrides.items():
            if v is None:
                continue
            if k == "indices":
                merged["indices"] = {**dict(merged.get("indices") or {}), **v}
            else:
                merged[k] = v
        return cls.from_dict(merged)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServeSettings:
        """Settings from the environment: CLIPSEARCH_SERVE_SETTINGS (JSON), then CLIPSEARCH_SERVE_<FIELD>.

        `CLIPSEARCH_SERVE_INDICES` is `name=path,name2=path2`.
        """
        env = os.environ if environ is None else environ
        data: dict[str, Any] = {}
        if env.get(ENV_SETTINGS_JSON):
            try:
                data.update(json.loads(env[ENV_SETTINGS_JSON]))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{ENV_SETTINGS_JSON} is not valid JSON: {e}") from e
        for f in dataclasses.fields(cls):
            key = ENV_PREFIX + f.name.upper()
            if key not in env or key == ENV_SETTINGS_JSON:
                continue
            raw = env[key]
            if f.name == "indices":
                data["indices"] = parse_index_specs(raw.split(","))
            elif f.type in ("int",):
                data[f.name] = _num(key, raw, int)
            elif f.type in ("float",):
                data[f.name] = _num(key, raw, float)
            elif f.type == "bool":
                data[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
            else:
                data[f.name] = raw
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    def replace(self, **changes: Any) -> ServeSettings:
        return dataclasses.replace(self, **changes)


#: the name the pipeline and demo use: `serve(ServeConfig(indices={"name": path}, host=..., port=...))`
ServeConfig = ServeSettings


def _num(key: str, raw: str, typ: type) -> Any:
    try:
        return typ(raw)
    except ValueError as e:
        raise ConfigError(f"{key}={raw!r} is not a valid {typ.__name__}") from e


def parse_index_specs(specs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """`["name=dir", "dir2"]` -> `{"name": "dir", "<basename of dir2>": "dir2"}`."""
    out: dict[str, str] = {}
    for spec in specs:
        spec = spec.strip()
        if not spec:
            continue
        name, sep, path = spec.partition("=")
        if not sep or "/" in name or ":" in name:
            path = spec
            name = spec.rstrip("/").rsplit("/", 1)[-1] or "index"
            if name == "index":  # a pipeline's OUT/index: name it after OUT
                parent = spec.rstrip("/").rsplit("/", 2)
                name = parent[-2] if len(parent) >= 2 and parent[-2] else "index"
        name, path = name.strip(), path.strip()
        if name in out:
            raise ConfigError(
                f"index name {name!r} is given twice", hint="--index NAME=DIR with distinct names"
            )
        out[name] = path
    return out

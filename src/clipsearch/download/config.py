"""The download stage's options: one frozen dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from clipsearch.distribute import DistributorConfig
from clipsearch.errors import ConfigError

INPUT_FORMATS = ("txt", "csv", "tsv", "json", "jsonl", "parquet")
OUTPUT_FORMATS = ("webdataset", "parquet", "files", "tfrecord", "dummy")
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
ENCODE_FORMATS = ("jpg", "png", "webp")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "area")
HASHES = ("sha256", "md5", "sha512", "none")
INCREMENTAL_MODES = ("incremental", "overwrite", "extend")
BLUR_STRENGTHS = ("datacomp", "img2dataset-1.47")
DEFAULT_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")
#: default quality per encode format (png: zlib compression level 0-9)
DEFAULT_QUALITY = {"jpg": 95, "webp": 95, "png": 6}


@dataclass(frozen=True)
class DownloadConfig:
    """Everything `download()` needs. Field names are img2dataset's option names."""

    url_list: str
    output_folder: str
    input_format: str | None = None  # None: guess from the file extension
    url_col: str = "url"
    caption_col: str | None = None
    save_additional_columns: tuple[str, ...] = ()
    #: column of relative [x0, y0, x1, y1] boxes to blur (faces); carried into the metadata like img2dataset
    bbox_col: str | None = None
    blur_strength: str = "datacomp"
    output_format: str = "webdataset"
    oom_shard_count: int = 5  # digits of shard names (img2dataset's name)
    image_size: int = 256
    resize_mode: str = "border"
    resize_only_if_bigger: bool = False
    upscale_interpolation: str = "lanczos"
    downscale_interpolation: str = "area"
    min_image_size: int = 0
    max_image_area: float | None = None
    max_aspect_ratio: float | None = None
    encode_format: str = "jpg"
    encode_quality: int | None = None  # None: DEFAULT_QUALITY[encode_format]
    skip_reencode: bool = False
    disable_all_reencoding: bool = False
    number_sample_per_shard: int = 10000
    thread_count: int = 64
    decode_threads: int = 4
    max_connections_per_host: int = 32
    timeout: float = 10.0
    max_bytes: int = 32 * 1024 * 1024
    retries: int = 0
    user_agent_token: str | None = None
    disallowed_header_directives: tuple[str, ...] = DEFAULT_DIRECTIVES
    incremental_mode: str = "incremental"
    retry_failed: bool = False
    compute_hash: str = "sha256"
    verify_hash: tuple[str, str] | None = None  # (input column, algorithm): drop bytes whose hash differs
    dedup: bool = False
    extract_exif: bool = False
    enable_wandb: bool = False
    wandb_project: str = "clipsearch"
    progress: bool = True
    distributor: DistributorConfig = field(default_factory=DistributorConfig)
    #: under Spark, shards are submitted in jobs of this many (img2dataset's subjob_size); 0: one job
    subjob_size: int = 0

    def __post_init__(self) -> None:
        def bad(msg: str, hint: str) -> ConfigError:
            return ConfigError(msg, hint=hint)

        if not self.url_list:
            raise bad("no URL list given", "--url-list PATH")
        if not self.output_folder:
            raise bad("no output folder given", "--output-folder DIR")
        # img2dataset's spellings: input formats with .gz (the extension tells), compute_hash None
        if self.input_format is not None and self.input_format.endswith(".gz"):
            object.__setattr__(self, "input_format", self.input_format[:-3])
        if self.compute_hash is None or str(self.compute_hash).lower() == "none":
            object.__setattr__(self, "compute_hash", "none")
        if self.input_format is not None and self.input_format not in INPUT_FORMATS:
            raise bad(
                f"unknown input format {self.input_format!r}", "--input-format " + "|".join(INPUT_FORMATS)
            )
        if self.output_format not in OUTPUT_FORMATS:
            raise bad(
                f"unknown output format {self.output_format!r}", "--output-format " + "|".join(OUTPUT_FORMATS)
            )
        if self.resize_mode not in RESIZE_MODES:
            raise bad(f"unknown resize mode {self.resize_mode!r}", "--resize-mode " + "|".join(RESIZE_MODES))
        if self.encode_format not in ENCODE_FORMATS:
            raise bad(
                f"unknown encode format {self.encode_format!r}", "--encode-format " + "|".join(ENCODE_FORMATS)
            )
        for name in ("upscale_interpolation", "downscale_interpolation"):
            if getattr(self, name) not in INTERPOLATIONS:
                raise bad(
                    f"unknown {name} {getattr(self, name)!r}",
                    f"--{name.replace('_', '-')} " + "|".join(INTERPOLATIONS),
                )
        if self.compute_hash not in HASHES:
            raise bad(f"unknown hash {self.compute_hash!r}", "--compute-hash " + "|".join(HASHES))
        if self.incremental_mode not in INCREMENTAL_MODES:
            raise bad(
                f"unknown incremental mode {self.incremental_mode!r}",
                "--incremental-mode " + "|".join(INCREMENTAL_MODES),
            )
        if self.blur_strength not in BLUR_STRENGTHS:
            raise bad(
                f"unknown blur strength {self.blur_strength!r}", "--blur-strength " + "|".join(BLUR_STRENGTHS)
            )
        if self.bbox_col is not None and not self.bbox_col:
            raise bad("bbox_col must be a column name", "--bbox-col COL")
        if self.input_format == "txt" and self.bbox_col:
            raise bad(
                "a txt URL list has no columns, so no bbox column", "--input-format csv or no --bbox-col"
            )
        if not 1 <= self.oom_shard_count <= 12:
            raise bad(f"oom_shard_count must be in 1..12, got {self.oom_shard_count}", "--oom-shard-count")
        if self.subjob_size < 0:
            raise bad(f"subjob_size must be >= 0, got {self.subjob_size}", "--subjob-size")
        if not 8 <= self.image_size <= 16384:
            raise bad(f"image_size must be in 8..16384, got {self.image_size}", "--image-size")
        if self.min_image_size < 0:
            raise bad(f"min_image_size must be >= 0, got {self.min_image_size}", "--min-image-size")
        if self.max_image_area is not None and self.max_image_area <= 0:
            raise bad(f"max_image_area must be > 0, got {self.max_image_area}", "--max-image-area")
        if self.max_aspect_ratio is not None and self.max_aspect_ratio < 1:
            raise bad(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}", "--max-aspect-ratio")
        if self.encode_quality is not None:
            lo, hi = (0, 9) if self.encode_format == "png" else (1, 100)
            if not lo <= self.encode_quality <= hi:
                raise bad(
                    f"encode_quality for {self.encode_format} must be in {lo}..{hi}, got {self.encode_quality}",
                    "--encode-quality",
                )
        if not 1 <= self.number_sample_per_shard <= 10_000_000:
            raise bad(
                f"number_sample_per_shard must be in 1..10000000, got {self.number_sample_per_shard}",
                "--number-sample-per-shard",
            )
        if not 1 <= self.thread_count <= 4096:
            raise bad(f"thread_count must be in 1..4096, got {self.thread_count}", "--thread-count")
        if not 1 <= self.decode_threads <= 64:
            raise bad(f"decode_threads must be in 1..64, got {self.decode_threads}", "--decode-threads")
        if self.max_connections_per_host < 1:
            raise bad("max_connections_per_host must be >= 1", "--max-connections-per-host")
        if not 0 < self.timeout <= 3600:
            raise bad(f"timeout must be in (0, 3600] seconds, got {self.timeout}", "--timeout")
        if self.max_bytes < 1:
            raise bad(f"max_bytes must be >= 1, got {self.max_bytes}", "--max-bytes")
        if not 0 <= self.retries <= 20:
            raise bad(f"retries must be in 0..20, got {self.retries}", "--retries")
        if self.user_agent_token is not None and not _is_token(self.user_agent_token):
            raise bad(
                f"user_agent_token must be a plain token (letters, digits, - _ .), got {self.user_agent_token!r}",
                "--user-agent-token",
            )
        if self.input_format == "txt" and self.caption_col:
            raise bad(
                "a txt URL list has no columns, so no caption column",
                "--input-format csv or no --caption-col",
            )
        if self.verify_hash is not None:
            if len(self.verify_hash) != 2 or self.verify_hash[1] not in ("md5", "sha256", "sha512"):
                raise bad(
                    f"verify_hash must be (column, md5|sha256|sha512), got {self.verify_hash!r}",
                    "--verify-hash COL md5|sha256|sha512",
                )
            object.__setattr__(self, "verify_hash", tuple(self.verify_hash))
        if self.dedup and self.compute_hash == "none":
            raise bad("--dedup needs a content hash", "--compute-hash sha256")
        if not isinstance(self.save_additional_columns, tuple):
            object.__setattr__(self, "save_additional_columns", tuple(self.save_additional_columns))
        if not isinstance(self.disallowed_header_directives, tuple):
            object.__setattr__(self, "disallowed_header_directives", tuple(self.disallowed_header_directives))
        object.__setattr__(
            self,
            "disallowed_header_directives",
            tuple(d.strip().lower() for d in self.disallowed_header_directives if d.strip()),
        )
        reserved = set(METADATA_COLUMNS) | {self.encode_format, "md5", "sha512", "jpg", "png", "webp"}
        for c in self.save_additional_columns:
            if c in reserved:
                raise bad(
                    f"additional column {c!r} clashes with an output column", "--save-additional-columns"
                )
        if self.bbox_col in reserved:
            raise bad(f"bbox column {self.bbox_col!r} clashes with an output column", "--bbox-col")

    @property
    def carried_columns(self) -> tuple[str, ...]:
        """Input columns copied into each sample's metadata: the additional ones, then the boxes (as
        img2dataset does, so the stored metadata says what was blurred)."""
        cols = self.save_additional_columns
        if self.bbox_col and self.bbox_col not in cols:
            cols = (*cols, self.bbox_col)
        return cols

    def shard_name(self, shard_id: int) -> str:
        return f"{shard_id:0{self.oom_shard_count}d}"

    @property
    def quality(self) -> int:
        return DEFAULT_QUALITY[self.encode_format] if self.encode_quality is None else self.encode_quality

    @property
    def user_agent(self) -> str:
        from clipsearch import __version__

        token = f"; {self.user_agent_token}" if self.user_agent_token else ""
        return f"clipsearch/{__version__} (compatible{token}; image downloader)"

    @property
    def agent_tokens(self) -> frozenset[str]:
        """The user-agent tokens whose scoped X-Robots-Tag directives apply to us."""
        toks = {"clipsearch"}
        if self.user_agent_token:
            toks.add(self.user_agent_token.lower())
        return frozenset(toks)


#: metadata columns of every `{shard}.parquet`, in contract order (exif only with extract_exif)
METADATA_COLUMNS = (
    "key",
    "url",
    "caption",
    "status",
    "error_message",
    "width",
    "height",
    "original_width",
    "original_height",
    "sha256",
    "url_hash",
    "exif",
)


def _is_token(s: str) -> bool:
    return bool(s) and all(ch.isalnum() or ch in "-_." for ch in s)

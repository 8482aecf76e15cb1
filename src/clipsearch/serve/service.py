"""The serving state (opened indices, encoder, batcher, hygiene filters, metrics) and the /knn logic.

Routes stay thin: they parse the request and call `ServeState.knn` / `.metadata`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as _dt
import decimal
import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from clipsearch.errors import ConfigError, InputError
from clipsearch.keywords.highlight import highlight_spans
from clipsearch.keywords.query import KeywordQuery
from clipsearch.keywords.query import parse as parse_keywords
from clipsearch.search import hybrid
from clipsearch.search.hybrid import RankedResult
from clipsearch.search.live import LiveIndex
from clipsearch.search.searcher import IndexSearcher, SearchParams, require_keywords
from clipsearch.serve.batching import TextBatcher
from clipsearch.serve.decode import (
    MB,
    DecodeGate,
    ImageTooLarge,
    decode,
    default_slots,
    plan_decode,
    preprocessor_of,
)
from clipsearch.serve.dedup import near_duplicates
from clipsearch.serve.fetch_image import fetch_image_bytes
from clipsearch.serve.languages import load_multilingual, pick
from clipsearch.serve.metrics import Metrics
from clipsearch.serve.nudging import apply as apply_aesthetic
from clipsearch.serve.nudging import load_tables
from clipsearch.serve.safety import SafetyFilter
from clipsearch.serve.schemas import KnnRequest
from clipsearch.serve.settings import ServeSettings

logger = logging.getLogger(__name__)

BASE_COLUMNS = ("url", "caption")


class NotFound(InputError):
    """An unknown index name (HTTP 404)."""


def cut_text(text: str, limit: int) -> tuple[str, bool]:
    """`text` cut to at most `limit` characters, at the last space when there is one in its second half (a
    word is not split); whether it was cut."""
    if len(text) <= limit:
        return text, False
    head = text[:limit]
    if not text[limit].isspace():
        space = head.rfind(" ")
        if space > limit // 2:
            head = head[:space]
    return head.rstrip(), True


@dataclass
class Query:
    """A parsed /knn request: the model plus uploaded image bytes, if any."""

    req: KnnRequest
    image_bytes: bytes | None = None
    #: how errors name the multilingual switch (/knn: multilingual, clip back's /knn-service: use_mclip)
    multilingual_field: str = "multilingual"
    #: a score asked of an index without aesthetic embeddings: a 400 (/knn) or ignored (clip back's API)
    aesthetic_strict: bool = True


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, bool | int | str):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, bytes | bytearray):
        return base64.b64encode(bytes(v)).decode("ascii")
    if isinstance(v, _dt.datetime | _dt.date | _dt.time):
        return v.isoformat()
    if isinstance(v, _dt.timedelta):
        return v.total_seconds()
    if isinstance(v, decimal.Decimal):
        return float(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    return str(v)


def load_encoder(settings: ServeSettings, searchers: dict[str, IndexSearcher]) -> Any:
    from clipsearch.embed.backends import choose_backend
    from clipsearch.embed.models import load_clip, resolve_device  # heavy import (torch) only when needed

    name = settings.clip_model
    if name is None:
        models = {s.model for s in searchers.values() if s.model}
        if len(models) > 1:
            raise ConfigError(
                f"the indices were built with different models ({', '.join(sorted(models))})",
                hint="--clip-model NAME_OR_PATH, or serve them separately",
            )
        name = models.pop() if models else "clipsearch-tiny"
    logger.info("loading CLIP model %s on %s", name, settings.device)
    # each encoder worker runs its own call at once (see batching.py), on the threads the backend does best with
    planned = choose_backend(settings.backend, settings.precision, resolve_device(settings.device)).backend
    workers, threads = settings.encoder_plan(planned)
    return load_clip(
        name,
        device=settings.device,
        backend=settings.backend,
        precision=settings.precision,
        threads=threads,
        streams=workers,
        lazy_towers=("image",),  # most queries are text: the image tower loads with the first image query
    )


class ServeState:
    """Everything one app serves. Build with `ServeState.open(settings, encoder)`."""

    def __init__(
        self,
        settings: ServeSettings,
        searchers: dict[str, IndexSearcher],
        encoder: Any,
        multilingual: dict[str, Any] | None = None,
        aesthetic: dict[str, np.ndarray] | None = None,
    ):
        self.settings = settings
        self.searchers = searchers
        self.encoder = encoder
        self.metrics = Metrics()
        self.batcher = self._batcher(encoder)
        #: multilingual text encoders by alias, each with its own batcher (languages.py)
        self.multilingual = dict(multilingual or {})
        self.multilingual_batchers = {a: self._batcher(e) for a, e in self.multilingual.items()}
        #: aesthetic embeddings table per index name (nudging.py)
        self.aesthetic = dict(aesthetic or {})
        self.safety = SafetyFilter(
            encoder, settings.unsafe_prompts, settings.safe_prompts, settings.safety_threshold
        )
        # the violence detector is the same zero-shot margin over its own prompts
        self.violence = SafetyFilter(
            encoder, settings.violent_prompts, settings.peaceful_prompts, settings.violence_threshold
        )
        self.model_name = str(getattr(encoder, "name", "unknown"))
        self.decode_gate = DecodeGate(
            settings.decode_slots or default_slots(),
            settings.decode_memory_mb * MB,
            settings.decode_queue,
            settings.decode_wait_s,
        )
        self._preprocessor = preprocessor_of(encoder)
        tok = getattr(encoder, "tokenize", None)  # tells hybrid search the words the model knows from names
        self.word_pieces = hybrid.WordPieces(tok) if callable(tok) else None
        self.metrics.before_collect = self.refresh_gauges
        self.refresh_gauges()

    def refresh_gauges(self) -> None:
        """Vectors served per index and modality, read from the current generation (appends and deletes
        of a segmented index change them while the server runs)."""
        for name, s in self.searchers.items():
            for m, mi in s.indices.items():
                self.metrics.vectors.labels(name, m).set(mi.ntotal)
        gate = getattr(self, "decode_gate", None)
        if gate is not None:
            self.metrics.decodes.labels("in_flight").set(gate.in_flight)
            self.metrics.decodes.labels("waiting").set(gate.waiting)
            self.metrics.decode_bytes.set(gate.reserved)

    def _batcher(self, encoder: Any) -> TextBatcher:
        def encode(texts: list[str]) -> np.ndarray:
            return np.asarray(encoder.encode_text(texts), dtype=np.float32)

        return TextBatcher(
            encode,
            max_batch=self.settings.batch_max_size,
            max_wait_ms=self.settings.batch_wait_ms,
            cache_size=self.settings.text_cache_size,
            on_batch=self._on_batch,
            workers=self.settings.encoder_plan(getattr(encoder, "backend", "torch"))[0],
        )

    @classmethod
    def open(
        cls, settings: ServeSettings, encoder: Any = None, multilingual: dict[str, Any] | None = None
    ) -> ServeState:
        if not settings.indices:
            raise ConfigError("no index to serve", hint="--index NAME=DIR (repeatable) or --config FILE")
        searchers: dict[str, IndexSearcher] = {}
        try:
            for name, path in settings.indices.items():
                # segment-aware, hot-reloaded when the folder's segments.json changes (clipsearch.segments)
                searchers[name] = LiveIndex(
                    path,
                    name=name,
                    exact_max=settings.exact_max,
                    filter_cache_size=settings.filter_cache_size,
                    subset_cache_bytes=settings.subset_cache_bytes,
                    mmap=settings.mmap,
                    threads=settings.search_threads,
                    filter_budget_s=settings.filter_budget_s or None,
                )
            if encoder is None:
                encoder = load_encoder(settings, searchers)
            dim = int(encoder.dim)
            for name, s in searchers.items():
                if s.dim != dim:
                    raise ConfigError(
                        f"model {getattr(encoder, 'name', '?')} makes {dim}-d vectors but index {name!r} holds "
                        f"{s.dim}-d vectors (built with {s.model})",
                        hint="--clip-model with the model the index was built with",
                    )
            languages = load_multilingual(settings, dim, multilingual)
            tables = load_tables(settings, searchers, encoder)
        except BaseException:
            for s in searchers.values():
                s.close()
            raise
        _set_torch_threads(
            settings.encoder_plan("torch")[1]
        )  # process-wide: any torch model (multilingual too)
        if settings.search_threads == 1:
            _single_threaded_blas()
        return cls(settings, searchers, encoder, languages, tables)

    async def aclose(self) -> None:
        await self.batcher.aclose()
        for b in self.multilingual_batchers.values():
            await b.aclose()
        self.decode_gate.close()
        for s in self.searchers.values():
            s.close()

    # ------------------------------------------------------------------ helpers
    def _on_batch(self, n: int, seconds: float) -> None:
        self.metrics.batch_size.observe(n)

    @property
    def default_index(self) -> str | None:
        return next(iter(self.searchers)) if len(self.searchers) == 1 else None

    def searcher(self, name: str | None) -> IndexSearcher:
        if name is None:
            if len(self.searchers) == 1:
                return _current(next(iter(self.searchers.values())))
            raise InputError(
                "several indices are served: name one in 'index'", hint="index: " + ", ".join(self.searchers)
            )
        s = self.searchers.get(name)
        if s is None:
            raise NotFound(f"no index named {name!r}", hint="index: " + ", ".join(self.searchers))
        return _current(s)  # one generation for the whole request

    def _check_columns(self, s: IndexSearcher, columns: list[str] | None) -> list[str]:
        cols = list(dict.fromkeys(columns or []))
        bad = [c for c in cols if not s.metadata.has_column(c)]
        if bad:
            raise InputError(
                f"unknown column(s) {', '.join(map(repr, bad))}",
                hint="columns: " + ", ".join(s.metadata.columns),
            )
        return cols

    async def _encode_image(self, data: bytes, timings: dict[str, float]) -> np.ndarray:
        if len(data) > self.settings.max_image_bytes:
            raise ImageTooLarge(
                f"the image is {len(data)} bytes, over the {self.settings.max_image_bytes} limit"
            )
        plan = plan_decode(data, self._preprocessor, self.settings.max_image_pixels)  # the header only
        t = time.perf_counter()
        # decodes are admitted by count and by their estimated memory (queue, then 503): see decode.py
        async with self.decode_gate.admit(plan.cost):
            timings["queue"] = time.perf_counter() - t
            t = time.perf_counter()
            loop = asyncio.get_running_loop()
            img = await loop.run_in_executor(self.decode_gate.executor, decode, plan)
            timings["decode"] = time.perf_counter() - t
            t = time.perf_counter()
            # on the gate's threads too, not the text encoder's: image queries never delay text batches
            vec = await loop.run_in_executor(self.decode_gate.executor, self.encoder.encode_images, [img])
            timings["encode"] = time.perf_counter() - t
        return np.asarray(vec, dtype=np.float32)[0]

    def text_batcher(self, multilingual: bool | str | None, field: str = "multilingual") -> TextBatcher:
        """The index model's batcher, or the multilingual encoder's the request names."""
        alias = pick(multilingual, self.multilingual, field)
        return self.batcher if alias is None else self.multilingual_batchers[alias]

    async def query_vector(self, q: Query, s: IndexSearcher, timings: dict[str, float]) -> np.ndarray:
        """The request's query vector, nudged toward its aesthetic score when it asks for one."""
        req = q.req
        pick(req.multilingual, self.multilingual, q.multilingual_field)  # a bad name is a 400 for any query
        vec = await self._raw_query_vector(q, s, timings)
        table = self.aesthetic.get(s.name)
        return apply_aesthetic(
            vec, table, req.aesthetic_score, req.aesthetic_weight, index=s.name, strict=q.aesthetic_strict
        )

    async def _raw_query_vector(self, q: Query, s: IndexSearcher, timings: dict[str, float]) -> np.ndarray:
        req = q.req
        if req.text is not None:
            if len(req.text) > self.settings.max_text_chars:
                raise InputError(
                    f"text is longer than {self.settings.max_text_chars} characters",
                    hint="a shorter text (CLIP reads its first 77 tokens), or mode=keyword|hybrid, which cut it",
                )
            vec, secs = await self.text_batcher(req.multilingual, q.multilingual_field).encode(req.text)
            timings["encode"] = secs
            return vec
        if q.image_bytes is not None:
            return await self._encode_image(q.image_bytes, timings)
        if req.image is not None:
            raw = req.image
            if raw.startswith("data:"):
                raw = raw.partition(",")[2]
            if len(raw) > (self.settings.max_image_bytes * 4) // 3 + 8:
                raise ImageTooLarge(f"the image is over the {self.settings.max_image_bytes} bytes limit")
            try:
                data = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError):
                raise InputError("image is not valid base64 (nor a data: URL holding base64)") from None
            return await self._encode_image(data, timings)
        if req.image_url is not None:
            t = time.perf_counter()
            data = await fetch_image_bytes(
                req.image_url,
                allow_hosts=self.settings.allow_url_hosts,
                timeout_s=self.settings.url_timeout_s,
                max_bytes=self.settings.max_image_bytes,
                max_redirects=self.settings.url_max_redirects,
            )
            timings["fetch"] = time.perf_counter() - t
            return await self._encode_image(data, timings)
        if req.embedding is not None:
            # normalised in float64: a tiny vector (1e-30) is still a direction, its float32 norm is 0
            v = np.asarray(req.embedding, dtype=np.float64)
            if v.shape[0] != s.dim:
                raise InputError(f"embedding has {v.shape[0]} values, index {s.name!r} expects {s.dim}")
            norm = float(np.linalg.norm(v))
            if not math.isfinite(norm) or norm == 0.0:
                raise InputError("embedding must be a non-zero vector of finite numbers")
            return (v / norm).astype(np.float32)
        if req.id is not None:
            if req.id >= s.count:
                raise InputError(f"id {req.id} does not exist in index {s.name!r} ({s.count} rows)")
            source = "image" if "image" in s.indices else req.modality
            return (await run_in_threadpool(s.vectors, [req.id], source))[0]
        raise InputError("no query input")  # pragma: no cover - the model validator forbids it

    # ------------------------------------------------------------------ /knn
    async def knn(self, q: Query) -> dict[str, Any]:
        req = q.req
        t_all = time.perf_counter()
        s = self.searcher(req.index)
        mi = s.modality(req.modality)
        cols = self._check_columns(s, req.columns)
        if req.k > self.settings.max_k:
            raise InputError(f"k is larger than {self.settings.max_k}")
        if req.offset > self.settings.max_offset:
            raise InputError(f"offset is larger than {self.settings.max_offset}")
        if req.filter is not None and len(req.filter) > self.settings.max_filter_chars:
            raise InputError(f"filter is longer than {self.settings.max_filter_chars} characters")
        timings: dict[str, float] = {}
        kq = None
        if req.mode != "semantic":
            if req.text is None:
                raise InputError(
                    f"mode={req.mode} searches caption keywords: it needs a text query",
                    hint="text, or mode=semantic for image, image_url, embedding and id queries",
                )
            require_keywords(s)
            text, cut = cut_text(req.text, self.settings.max_text_chars)
            if cut:  # a pasted paragraph: searched by its beginning, as the users expect
                req = req.model_copy(update={"text": text})
                q = replace(q, req=req)
            kq = parse_keywords(text)
            if cut:
                kq.notes.insert(0, f"the text was cut to its first {len(text)} characters (max_text_chars)")
        # keyword mode needs no query vector: the text encoder is skipped
        vec = await self.query_vector(q, s, timings) if req.mode != "keyword" else None
        params = SearchParams(nprobe=req.nprobe, efSearch=req.efSearch)
        if req.mode != "semantic":
            out = await run_in_threadpool(
                self._search_page, s, mi.modality, vec, req, params, cols, timings, kq
            )
        elif self._inline(s, mi, req):
            # a small search costs less than two thread hand-offs: run it on the event loop's thread, which
            # leaves the other core to the encoder thread
            out = self._search_page(s, mi.modality, vec, req, params, cols, timings)
        else:
            out = await run_in_threadpool(self._search_page, s, mi.modality, vec, req, params, cols, timings)
        self.metrics.observe_steps(timings)
        self.metrics.plans.labels(out["plan"]).inc()
        out["timings_ms"] = {k: round(v * 1000.0, 3) for k, v in timings.items()}
        out["timings_ms"]["total"] = round((time.perf_counter() - t_all) * 1000.0, 3)
        return out

    def _inline(self, s: IndexSearcher, mi: Any, req: KnnRequest) -> bool:
        """Whether a search is cheap enough (sub-millisecond) to run on the event loop."""
        if not self.settings.inline_search or req.offset + req.k > 100 or mi.is_flat and mi.ntotal > 100_000:
            return False
        if req.filter:  # only with its bitmap cached; a new filter scans metadata columns
            return s.filters.cached(req.filter) and (
                s.filters.get(req.filter).count <= 10_000 or not mi.is_flat
            )
        return True

    def _ranked(
        self,
        s: IndexSearcher,
        modality: str,
        vec: np.ndarray | None,
        req: KnnRequest,
        params: SearchParams,
        n: int,
        kq: KeywordQuery | None,
    ) -> RankedResult:
        """The best n rows of the request's mode, best first."""
        if req.mode == "keyword":
            assert kq is not None
            return hybrid.keyword_search(s, kq, n, vec=None, modality=modality, filter=req.filter)
        assert vec is not None
        if req.mode == "hybrid":
            assert kq is not None
            return hybrid.hybrid_search(
                s, vec, kq, n, modality=modality, filter=req.filter, params=params, fusion=req.fusion,
                pieces=self.word_pieces,
            )  # fmt: skip
        res = s.search(vec.reshape(1, -1), n, modality=modality, filter=req.filter, params=params)
        ok = res.ids[0] >= 0
        d = res.distances[0][ok]
        return RankedResult(res.ids[0][ok], d, d, np.full(len(d), np.nan, np.float32), res.plan, res.allowed,
                            res.timings)  # fmt: skip

    def _search_page(
        self,
        s: IndexSearcher,
        modality: str,
        vec: np.ndarray | None,
        req: KnnRequest,
        params: SearchParams,
        cols: list[str],
        timings: dict[str, float],
        kq: KeywordQuery | None = None,
    ) -> dict[str, Any]:
        want = req.offset + req.k
        hygiene = req.deduplicate or req.safety or req.violence is True
        n_fetch = want if not hygiene else int(math.ceil(want * self.settings.overfetch)) + 8
        cap = min(s.count, max(want, int(math.ceil(want * self.settings.overfetch * 8)) + 64))
        limit = self.settings.hygiene_max_candidates
        if hygiene:  # dedup compares candidates with the kept ones: rows x kept x dim, bounded per request
            if want > limit:
                raise InputError(_hygiene_limit_message(req, limit))
            n_fetch, cap = min(n_fetch, limit), min(cap, max(limit, want))
        while True:
            n_fetch = min(n_fetch, s.count) if s.count else n_fetch
            res = self._ranked(s, modality, vec, req, params, max(1, n_fetch), kq)
            for key in ("search", "filter", "keywords"):
                if key in res.timings:
                    timings[key] = timings.get(key, 0.0) + res.timings[key]
            ids, sims = res.ids, res.score
            exhausted = len(ids) < n_fetch or n_fetch >= s.count
            keep = np.ones(len(ids), dtype=bool)
            unsafe_mask = np.zeros(len(ids), dtype=bool)
            violent_mask = np.zeros(len(ids), dtype=bool)
            dup_mask = np.zeros(len(ids), dtype=bool)
            if hygiene and len(ids):
                t = time.perf_counter()
                source = "image" if "image" in s.indices else modality
                vecs = s.vectors(ids, source)
                if req.safety:
                    unsafe_mask = self.safety.unsafe(vecs, req.safety_threshold)
                    keep &= ~unsafe_mask
                if req.violence is True:
                    violent_mask = self.violence.unsafe(vecs, req.violence_threshold) & keep
                    keep &= ~violent_mask
                if req.deduplicate:
                    thr = req.dedup_threshold or self.settings.dedup_threshold
                    idx_keep = np.flatnonzero(keep)
                    # the page needs its `want` rows and one more (to know whether a next page exists)
                    dup_mask[idx_keep[near_duplicates(vecs[idx_keep], thr, max_kept=want + 1)]] = True
                    keep &= ~dup_mask
                timings["hygiene"] = timings.get("hygiene", 0.0) + time.perf_counter() - t
            kept_ids, kept_sims = ids[keep], sims[keep]
            kept_cos, kept_kw = res.similarity[keep], res.keyword[keep]
            if len(kept_ids) >= want or exhausted:
                break
            if n_fetch >= cap:
                if hygiene and n_fetch >= limit:  # the page cannot be filled within the per-request limit
                    raise InputError(_hygiene_limit_message(req, limit))
                break
            n_fetch = min(cap, n_fetch * 2)
        page_ids = kept_ids[req.offset : want]
        page_sims = kept_sims[req.offset : want]
        page_cos, page_kw = kept_cos[req.offset : want], kept_kw[req.offset : want]
        more = len(kept_ids) > want or (not exhausted and len(kept_ids) >= want)
        # what was removed between the previous page's last result and this page's last result
        kept_pos = np.flatnonzero(keep)
        lo = (
            int(kept_pos[req.offset - 1]) + 1
            if 0 < req.offset <= len(kept_pos)
            else (0 if req.offset == 0 else len(ids))
        )
        hi = int(kept_pos[want - 1]) + 1 if len(kept_pos) >= want else len(ids)
        removed = {"duplicates": int(dup_mask[lo:hi].sum()), "unsafe": int(unsafe_mask[lo:hi].sum())}
        if req.violence is True:
            removed["violent"] = int(violent_mask[lo:hi].sum())
        for reason, n in (
            ("duplicate", removed["duplicates"]),
            ("unsafe", removed["unsafe"]),
            ("violent", removed.get("violent", 0)),
        ):
            if n:
                self.metrics.removed.labels(reason).inc(n)
        t = time.perf_counter()
        rows = s.rows(
            page_ids, list(dict.fromkeys([c for c in BASE_COLUMNS if s.metadata.has_column(c)] + cols))
        )
        timings["metadata"] = time.perf_counter() - t
        violent = self._violence_flags(s, modality, page_ids, req)
        results = []
        marks = kq.highlight_terms() if kq is not None else None
        for j, (i, sim, row) in enumerate(zip(page_ids.tolist(), page_sims.tolist(), rows, strict=True)):
            item: dict[str, Any] = {"id": int(i)}
            if req.mode == "semantic":
                item["similarity"] = float(sim) if math.isfinite(sim) else 0.0
            else:
                cos, kw = float(page_cos[j]), float(page_kw[j])
                item["similarity"] = cos if math.isfinite(cos) else None
                item["score"] = float(sim) if math.isfinite(sim) else 0.0
                item["keyword_score"] = kw if math.isfinite(kw) else None
            item["url"] = _str_or_none(row.get("url"))
            item["caption"] = _str_or_none(row.get("caption"))
            if marks is not None:
                item["highlights"] = highlight_spans(item["caption"], marks)
            for c in cols:
                if c not in ("id", "similarity", "url", "caption", "score", "keyword_score", "highlights"):
                    item[c] = _jsonable(row.get(c))
            if violent is not None:
                item["violent"] = bool(violent[len(results)])
            results.append(item)
        extra: dict[str, Any] = {"mode": req.mode}
        if kq is not None:
            extra["keyword_query"] = kq.canonical()
            extra["notes"] = list(kq.notes)
            if req.mode == "hybrid":
                extra["fusion"] = req.fusion
                extra["keyword_weight"] = None if res.weight is None else round(float(res.weight), 4)
        return {
            **extra,
            "results": results,
            "index": s.name,
            "modality": modality,
            "k": req.k,
            "offset": req.offset,
            "next_offset": want if more else None,
            "removed": removed,
            "plan": res.plan,
            "filter_matches": res.allowed,
        }

    def _violence_flags(
        self, s: IndexSearcher, modality: str, ids: np.ndarray, req: KnnRequest
    ) -> np.ndarray | None:
        """violence='flag': the detector's verdict on each row of the page (nothing removed)."""
        if req.violence != "flag" or not len(ids):
            return None if req.violence != "flag" else np.zeros(0, dtype=bool)
        source = "image" if "image" in s.indices else modality
        return self.violence.unsafe(s.vectors(ids, source), req.violence_threshold)

    # ------------------------------------------------------------------ /metadata
    def metadata(self, index: str | None, ids: list[int], columns: list[str] | None) -> dict[str, Any]:
        s = self.searcher(index)
        if len(ids) > self.settings.max_ids:
            raise InputError(f"at most {self.settings.max_ids} ids per request")
        cols = self._check_columns(s, columns) if columns else list(s.metadata.columns)
        ok, bad = s.metadata.valid_ids(ids)
        t = time.perf_counter()
        rows = s.rows(ok, cols)
        self.metrics.step.labels("metadata").observe(time.perf_counter() - t)
        out = []
        for i, row in zip(ok, rows, strict=True):
            item = {c: _jsonable(v) for c, v in row.items()}
            item["id"] = i
            out.append(item)
        return {"rows": out, "missing": bad}


def _hygiene_limit_message(req: KnnRequest, limit: int) -> str:
    what = " and ".join(
        w
        for w, on in (
            ("deduplicate", req.deduplicate),
            ("safety", req.safety),
            ("violence", req.violence is True),
        )
        if on
    )
    return (
        f"{what} would have to examine more than {limit:,} candidates to fill results {req.offset:,} to "
        f"{req.offset + req.k:,} (the hygiene_max_candidates limit): ask for an earlier page or fewer "
        f"results, or set {' and '.join(f'{w}=false' for w in what.split(' and '))}"
    )


def _current(s: Any) -> Any:
    """The generation of a hot-reloaded index (LiveIndex) a request uses from start to end."""
    current = getattr(s, "current", None)
    return current() if current is not None else s


def _str_or_none(v: Any) -> str | None:
    if v is None:
        return None
    return v if isinstance(v, str) else str(_jsonable(v))


def _single_threaded_blas() -> None:
    """numpy's BLAS (dedup, safety, re-ranking matmuls) on one thread: concurrency comes from requests, and
    a multi-threaded BLAS call stalls for tens of ms when the cores are busy (measured 43 ms vs 1 ms)."""
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1, user_api="blas")
    except Exception:  # pragma: no cover - best effort
        logger.debug("could not limit BLAS threads")


def _set_torch_threads(n: int) -> None:
    try:
        import sys

        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(int(n))
    except Exception:  # pragma: no cover - best effort
        logger.debug("could not set torch threads")

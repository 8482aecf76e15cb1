"""`import_index(cfg)`: a foreign index (clip-retrieval folder, autofaiss output) -> a clipsearch index folder.

Everything is checked before anything is written: the layout, the faiss headers (read through fsspec, so a
remote index is not downloaded to be checked), the model's dimension against the index, and the metadata's
row count / id coverage. Then the faiss files are copied (or linked) as they are, the metadata is streamed
into `metadata.arrow` in faiss id order, and `index.json` is written last. A failure removes whatever this
run wrote, so the output folder is either complete or left as it was.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import uuid
from typing import Any

from clipsearch import storage
from clipsearch.errors import ConfigError, InputError, OutputExistsError
from clipsearch.interop import autofaiss as af
from clipsearch.interop import clip_retrieval as cr
from clipsearch.interop.common import Plan, kind_of, list_entries, read_json_or_none
from clipsearch.interop.config import ImportConfig
from clipsearch.interop.faissio import (
    LARGE_INDEX_BYTES,
    FaissHeader,
    copy_with_progress,
    describe,
    open_index,
    parse_param_string,
    read_header,
    transfer,
)
from clipsearch.interop.metadata import write_arrow

logger = logging.getLogger(__name__)

#: files a clipsearch index folder may hold; --overwrite removes only these
OWN_FILES = (
    "index.json",
    "metadata.arrow",
    "image.index",
    "text.index",
    "image.ivfdata",
    "text.ivfdata",
    "image.vectors.npy",
    "text.vectors.npy",
    "keywords",  # the keyword index folder
)
#: the parameters clipsearch's searcher applies per request (formats.md, index.json search_params)
SEARCH_PARAM_KEYS = ("nprobe", "efSearch", "k_factor")


# ------------------------------------------------------------------------------------------- detection
def detect(cfg: ImportConfig) -> Plan:
    """Recognise the source layout (or check the one given by --from) and plan the conversion."""
    src = cfg.source.rstrip("/") if not cfg.source.endswith("://") else cfg.source
    kind = kind_of(src)
    if kind == "missing":
        raise InputError(f"source {src} does not exist", hint="--source PATH (local, s3://, hf://...)")
    layout = cfg.from_layout
    entries = list_entries(src) if kind == "directory" else {}
    if kind == "directory" and entries.get("index.json") == "file":
        info = read_json_or_none(storage.join(src, "index.json")) or {}
        if info.get("format") == "clipsearch.index":
            raise InputError(
                f"{src} is already a clipsearch index folder",
                hint=f"serve it directly: clipsearch serve --index {src}",
            )
    if layout == "auto":
        layout = _guess_layout(src, kind, entries)
        logger.info("%s looks like a %s index", src, layout)
    if layout == cr.LAYOUT:
        modalities = cr.MODALITIES
        return cr.plan(
            src,
            indice_name=cfg.indice_name,
            modalities=modalities,
            url_column=cfg.url_column,
            caption_column=cfg.caption_column,
        )
    return af.plan(
        src,
        id_mapping=cfg.id_mapping,
        modality=cfg.modality,
        url_column=cfg.url_column,
        caption_column=cfg.caption_column,
    )


def _guess_layout(src: str, kind: str, entries: dict[str, str]) -> str:
    if kind == "file":
        return cr.LAYOUT if src.endswith(".json") else af.LAYOUT
    has_cr_index = any(f"{m}.index" in entries for m in cr.MODALITIES)
    if has_cr_index and (entries.get("metadata") == "directory" or not af.looks_like(src, entries)):
        return cr.LAYOUT  # (a missing metadata/ folder is then reported by name)
    if af._index_candidates(entries):
        return af.LAYOUT
    found = ", ".join(f"{n}{'/' if k == 'directory' else ''}" for n, k in sorted(entries.items()))
    raise InputError(
        f"{src} is not a recognised index layout (found: {found or 'nothing'}). "
        "A clip-retrieval folder has image.index and/or text.index plus a metadata/ folder of parquet files; "
        "autofaiss output is a faiss index file (*.index, or Fondant's 'faiss') plus its ids parquet "
        "(id_mapping/ or --id-mapping)",
        hint="--from clip-retrieval|autofaiss --source PATH",
    )


# ------------------------------------------------------------------------------------------- checks
def _check_headers(plan: Plan) -> tuple[dict[str, FaissHeader], int, int]:
    headers = {m: read_header(fi.path) for m, fi in plan.indices.items()}
    for m, h in headers.items():
        if h.metric != "inner_product":
            raise InputError(
                f"{h.path} uses the {h.metric} metric; clipsearch serves inner-product (cosine) indices of "
                "normalised CLIP embeddings",
                hint="rebuild it with autofaiss metric_type='ip' (clip-retrieval's default)",
            )
        logger.info(
            "%s index %s: %s, dim %d, %d vectors, %.1f MB",
            m,
            h.path,
            h.fourcc,
            h.dim,
            h.ntotal,
            h.size_bytes / 1e6,
        )
    dims = {h.dim for h in headers.values()}
    counts = {h.ntotal for h in headers.values()}
    if len(dims) > 1 or len(counts) > 1:
        desc = "; ".join(f"{m}: dim {h.dim}, {h.ntotal} vectors" for m, h in headers.items())
        raise InputError(f"the image and text indices of {plan.source} disagree ({desc})")
    dim, ntotal = dims.pop(), counts.pop()
    if ntotal == 0:
        raise InputError(f"the index at {plan.source} holds no vectors")
    return headers, dim, ntotal


def _resolve_model(cfg: ImportConfig, plan: Plan) -> str:
    if cfg.clip_model:
        if plan.model and plan.model != cfg.clip_model:
            logger.warning(
                "--clip-model %s differs from the model the source records (%s); using --clip-model",
                cfg.clip_model,
                plan.model_origin or plan.model,
            )
        return cfg.clip_model
    if plan.model:
        logger.info("model %s (from %s)", plan.model, plan.model_origin)
        return plan.model
    hint = "--clip-model NAME_OR_PATH (the model the index was built with"
    if plan.layout == af.LAYOUT:
        hint += ", e.g. laion/CLIP-ViT-B-32-laion2B-s34B-b79K for Fondant's datacomp-small-clip"
    raise ConfigError(
        f"the {plan.layout} index at {plan.source} does not record which CLIP model built it", hint=hint + ")"
    )


def check_model(model: str, dim: int, source: str, device: str = "cpu") -> Any:
    """Load `model` and refuse it when its embedding dimension differs from the index's."""
    from clipsearch.embed.models import load_clip

    enc = load_clip(model, device=device)
    if int(enc.dim) != int(dim):
        raise ConfigError(
            f"model {model} makes {enc.dim}-dimensional embeddings but the index at {source} holds {dim}-dimensional "
            "vectors: queries would be meaningless",
            hint="--clip-model with the model the index was built with",
        )
    return enc


def _check_output(cfg: ImportConfig) -> str:
    state = storage.folder_state(cfg.index_folder)
    if state == "nonempty":
        fs, p = storage.get_fs(cfg.index_folder)
        if not fs.isdir(p):
            raise OutputExistsError(f"{cfg.index_folder} exists and is a file", hint="--index-folder DIR")
        names = set(list_entries(cfg.index_folder))
        foreign = sorted(n for n in names if n not in OWN_FILES)
        if not cfg.overwrite:
            raise OutputExistsError(
                f"index folder {cfg.index_folder} is not empty ({', '.join(sorted(names)[:5])})",
                hint="--index-folder NEW_DIR, or --overwrite to replace a clipsearch index there",
            )
        if foreign:
            raise OutputExistsError(
                f"index folder {cfg.index_folder} holds files that are not a clipsearch index ({', '.join(foreign[:5])}); "
                "--overwrite only replaces a clipsearch index",
                hint="--index-folder NEW_DIR",
            )
    return state


# ------------------------------------------------------------------------------------------- output
class _Output:
    """Writes an index folder: each file goes to a temporary name, then its final name; `rollback` undoes it.

    A remote folder (s3://...) is staged in a local temporary folder (faiss needs local files) and uploaded
    by `finish`, index.json last.
    """

    def __init__(self, folder: str, *, created: bool, progress: bool):
        self.folder = folder.rstrip("/")
        self.remote = not storage.is_local(folder)
        self.created = created
        self.progress = progress
        if self.remote:
            self.dir = tempfile.mkdtemp(prefix="clipsearch-import-")
        else:
            self.dir = self.folder.split("://", 1)[1] if self.folder.startswith("file://") else self.folder
            os.makedirs(self.dir, exist_ok=True)
        self.pending: list[str] = []
        self.done: list[str] = []  # names committed (locally) in order
        self.done_dirs: list[str] = []  # folders written in place (keywords/)
        self.uploaded: list[str] = []

    def tmp(self, name: str) -> str:
        p = os.path.join(self.dir, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
        self.pending.append(p)
        return p

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def commit(self, tmp: str, name: str) -> None:
        os.replace(tmp, self.path(name))
        self.pending.remove(tmp)
        self.done.append(name)

    def finish(self) -> None:
        if not self.remote:
            return
        fs, root = storage.get_fs(self.folder)
        for name in self.done_dirs:
            fs.put(self.path(name), f"{root.rstrip('/')}/{name}", recursive=True)
            self.uploaded.append(name)
        order = [n for n in self.done if n != "index.json"] + [n for n in self.done if n == "index.json"]
        for name in order:
            with (
                storage.atomic_open(storage.join(self.folder, name), "wb") as out,
                open(self.path(name), "rb") as f,
            ):
                shutil.copyfileobj(f, out, length=8 << 20)
            self.uploaded.append(name)
            logger.info("uploaded %s/%s", self.folder, name)
        shutil.rmtree(self.dir, ignore_errors=True)

    def rollback(self) -> None:
        for p in self.pending:
            _rm_local(p)
        for name in self.done:
            _rm_local(self.path(name))
        for name in self.done_dirs:
            shutil.rmtree(self.path(name), ignore_errors=True)
        if self.remote:
            fs, p = storage.get_fs(self.folder)
            for name in self.uploaded:
                try:
                    fs.rm(f"{p}/{name}", recursive=name in self.done_dirs)
                except Exception:  # pragma: no cover - best effort
                    logger.debug("could not remove %s/%s", self.folder, name)
            shutil.rmtree(self.dir, ignore_errors=True)
        elif self.created:
            try:
                os.rmdir(self.dir)
            except OSError:
                pass


def _rm_local(p: str) -> None:
    try:
        if os.path.lexists(p):
            os.remove(p)
    except OSError:  # pragma: no cover - best effort
        logger.debug("could not remove %s", p)


def _clear_own_files(cfg: ImportConfig) -> None:
    """--overwrite: remove the previous clipsearch index (index.json first, so it is never half valid)."""
    fs, p = storage.get_fs(cfg.index_folder)
    for name in OWN_FILES:
        f = f"{p.rstrip('/')}/{name}"
        if fs.exists(f):
            fs.rm(f, recursive=name == "keywords")
    logger.info("removed the previous index in %s (--overwrite)", cfg.index_folder)


# ------------------------------------------------------------------------------------------- one index
def _ivfdata_beside(path: str) -> list[str]:
    folder = path.rsplit("/", 1)[0] if "/" in path else "."
    return [n for n, k in list_entries(folder).items() if k == "file" and n.endswith(".ivfdata")]


def _install_index(
    modality: str, src: str, header: FaissHeader, out: _Output, cfg: ImportConfig
) -> tuple[Any, dict[str, Any]]:
    """Copy (or link) one faiss index into the folder; returns (opened index, facts for index.json)."""
    import faiss

    name = f"{modality}.index"
    tmp = out.tmp(name)
    ivfdata = _ivfdata_beside(src)
    facts: dict[str, Any] = {"file": name, "size_bytes": header.size_bytes}
    ondisk = None
    if ivfdata:  # maybe on-disk inverted lists: the index file is small, the lists live in a .ivfdata file
        copy_with_progress(src, tmp, progress=cfg.progress)
        try:
            probe = faiss.read_index(tmp, faiss.IO_FLAG_SKIP_IVF_DATA)
            il = faiss.downcast_InvertedLists(faiss.extract_index_ivf(probe).invlists)
            ondisk = probe if isinstance(il, faiss.OnDiskInvertedLists) else None
        except RuntimeError:
            ondisk = None
        if ondisk is None:
            os.remove(tmp)
    if ondisk is not None:
        il = faiss.downcast_InvertedLists(faiss.extract_index_ivf(ondisk).invlists)
        stored = str(il.filename).rsplit("/", 1)[-1]
        folder = src.rsplit("/", 1)[0]
        if stored not in ivfdata:
            raise InputError(
                f"{src} keeps its inverted lists in {il.filename}, which is not next to it "
                f"(found: {', '.join(ivfdata)})",
                hint="copy the .ivfdata file the index was merged into next to the index file",
            )
        data_name = f"{modality}.ivfdata"
        data_tmp = out.tmp(data_name)
        used = transfer(storage.join(folder, stored), data_tmp, cfg.transfer, progress=cfg.progress)
        out.commit(data_tmp, data_name)
        il.filename = data_name  # resolved next to the index file (IO_FLAG_ONDISK_SAME_DIR)
        faiss.write_index(ondisk, tmp)
        index = faiss.read_index(tmp, faiss.IO_FLAG_ONDISK_SAME_DIR)
        facts.update(ivfdata=data_name, transfer=used, mmap=False, ondisk=True)
        facts["size_bytes"] = header.size_bytes + os.path.getsize(out.path(data_name))
        logger.info("%s: on-disk inverted lists %s -> %s", modality, stored, data_name)
    else:
        used = transfer(src, tmp, cfg.transfer, progress=cfg.progress)
        mmap = cfg.mmap if cfg.mmap is not None else header.size_bytes > LARGE_INDEX_BYTES
        index = open_index(tmp, mmap=mmap, header=header)
        facts.update(transfer=used, mmap=bool(mmap))
    if int(index.ntotal) != header.ntotal or int(index.d) != header.dim:  # pragma: no cover - corrupt copy
        raise InputError(
            f"{src}: the copied index reads as {index.ntotal}x{index.d}, expected {header.ntotal}x{header.dim}"
        )
    out.commit(tmp, name)
    return index, facts


# ------------------------------------------------------------------------------------------- main
def import_index(cfg: ImportConfig) -> dict[str, Any]:
    """Convert `cfg.source` into a clipsearch index folder at `cfg.index_folder`; returns its index.json."""
    t0 = time.perf_counter()
    state = _check_output(cfg)
    plan = detect(cfg)
    headers, dim, ntotal = _check_headers(plan)
    model = _resolve_model(cfg, plan)
    plan.metadata.validate(ntotal)  # before the model: loading one can take a while
    encoder = check_model(model, dim, plan.source, cfg.device)
    logger.info(
        "importing %s (%s): %s, %d vectors of dim %d, model %s",
        plan.source,
        plan.layout,
        "+".join(plan.indices),
        ntotal,
        dim,
        model,
    )
    if state == "nonempty":
        _clear_own_files(cfg)
    out = _Output(cfg.index_folder, created=state == "missing", progress=cfg.progress)
    try:
        entries: dict[str, Any] = {}
        opened: dict[str, Any] = {}
        for m, fi in plan.indices.items():
            index, facts = _install_index(m, fi.path, headers[m], out, cfg)
            opened[m] = index
            entries[m] = _entry(m, index, facts, fi.infos)
        meta_tmp = out.tmp("metadata.arrow")
        write_arrow(plan.metadata, meta_tmp, ntotal, progress=cfg.progress)
        out.commit(meta_tmp, "metadata.arrow")
        keywords = None
        if cfg.text_index:
            from clipsearch.keywords.writer import DIR, build_keyword_index

            keywords = build_keyword_index(out.dir)
            if keywords is not None:
                out.done_dirs.append(DIR)
        if cfg.queries:
            from clipsearch.interop.tune import tune_imported

            for m, index in opened.items():
                tune_imported(entries[m], index, m, cfg, encoder)
        source = plan.describe()
        source["imported_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        info = {
            "format": "clipsearch.index",
            "version": 1,
            "model": model,
            "dim": dim,
            "metric": "inner_product",
            "count": ntotal,
            "indices": entries,
            "keywords": keywords,
            "source": source,
        }
        opened.clear()
        tmp = out.tmp("index.json")
        storage.write_json_atomic(tmp, info)
        out.commit(tmp, "index.json")
        out.finish()
    except BaseException:
        out.rollback()
        raise
    logger.info(
        "imported %s into %s in %.1fs: %s", plan.source, cfg.index_folder, time.perf_counter() - t0,
        ", ".join(f"{m}={e['factory']} {e['search_params']}" for m, e in entries.items()),
    )  # fmt: skip
    return info


def _entry(modality: str, index: Any, facts: dict[str, Any], infos: dict[str, Any] | None) -> dict[str, Any]:
    factory, stored = describe(index)
    params = {k: v for k, v in stored.items() if k in SEARCH_PARAM_KEYS}
    origin = "imported index"
    if infos and infos.get("index_key"):
        origin += f" (autofaiss index_key {infos['index_key']})"
    reason = (
        f"{origin}, kept as built; search parameters are the ones stored in the file"
        + (f" ({', '.join(f'{k}={v}' for k, v in stored.items())})" if stored else "")
        + "; no held-out queries were given to tune them"
    )
    entry: dict[str, Any] = {
        "file": facts["file"],
        "factory": factory,
        "reason": reason,
        "search_params": params,
        "mmap": bool(facts.get("mmap", False)),
        "memory_bytes": int(facts["size_bytes"]),
        "curve": [],
        "stored_params": stored,
        "transfer": facts.get("transfer", "copy"),
    }
    if facts.get("ivfdata"):
        entry["ivfdata"] = facts["ivfdata"]
    if infos:
        entry["autofaiss"] = {
            k: infos[k] for k in ("index_key", "index_param", "nb_vectors", "size in bytes", "avg_search_speed_ms",
                                  "99p_search_speed_ms", "reconstruction error %", "nb vectors", "vectors dimension",
                                  "compression ratio") if k in infos
        }  # fmt: skip
        if infos.get("index_param"):
            declared = parse_param_string(infos["index_param"])
            diff = {k: v for k, v in declared.items() if k in stored and stored[k] != v}
            if diff:
                logger.warning(
                    "%s: index_infos says %s but the file stores %s; using the file's",
                    modality,
                    infos["index_param"],
                    stored,
                )
    return entry

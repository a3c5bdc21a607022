"""The one settings object, read from environment variables (names as in docs/design.md)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import BeforeValidator, Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.redis_keys import DEFAULT_HISTORY_CAP, DEFAULT_PREFIX, check_prefix

IndexType = Literal["flat", "hnsw", "ivf"]
ScreenMode = Literal["auto", "on", "off"]
BlasMode = Literal["auto", "torch", "numpy"]
PruneMode = Literal["auto", "on", "off"]
# The largest MAX_HISTORY and MAX_BATCH may be: the request schemas refuse a longer list while
# parsing, before validating its items (a 1 MiB body holds ~500,000 ids).
MAX_HISTORY_CEILING = 10_000
MAX_BATCH_CEILING = 4_096
LogLevel = Annotated[
    Literal["critical", "error", "warning", "info", "debug"],
    BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v),
]


class Settings(BaseSettings):
    """Service configuration; each field is read from the upper-case env var of its name."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, frozen=True)

    # -- model bundle and index -----------------------------------------------------------
    model_dir: Path = Path("artifacts")
    index_type: IndexType = "flat"
    hnsw_m: Annotated[int, Field(ge=4, le=256)] = 32
    hnsw_ef_search: Annotated[int, Field(ge=1)] = 128
    hnsw_ef_construction: Annotated[int, Field(ge=1)] = 200
    ivf_nlist: Annotated[int, Field(ge=1)] = 1024
    ivf_nprobe: Annotated[int, Field(ge=1)] = 32
    # OpenMP threads for building an HNSW/IVF index when it is not in the bundle's index cache
    # (a one-off: start-up or reload); 0 = every core.
    index_build_threads: Annotated[int, Field(ge=0)] = 0
    # Where built HNSW/IVF indexes are cached (one subdirectory per version); unset: in the
    # bundle's own `index-cache/`. Set it when MODEL_DIR is read-only, or every start builds.
    index_cache_dir: Annotated[Path | None, BeforeValidator(lambda v: v or None)] = None
    # Flat index: screen batched scans with a bfloat16 copy of the matrix, still exact
    # (`app.search.flat`); auto: when that measures faster on this CPU at load.
    exact_screen: ScreenMode = "auto"
    # Flat index: the library whose matrix product scans it, torch's BLAS (MKL on x86) or
    # numpy's (OpenBLAS); auto: the faster at each batch size, timed at load (the better one
    # depends on the CPU and the batch size).
    exact_blas: BlasMode = "auto"
    # Flat index: read only the k-means clusters of items whose bound can reach a query's top
    # k (`app.search.cluster_pruning`; still exact); auto: for catalogues of 20,000 items or more.
    # The clusters are an IVF index of IVF_NLIST lists, cached beside the bundle.
    exact_prune: PruneMode = "auto"
    # HNSW/IVF: a filter allowing 2-20 % of the catalogue gets an index of its own rows once
    # one worker has searched it this many times, built in the background and searched exactly
    # (`app.search.filter_index`); 0: never.
    filter_index_after: Annotated[int, Field(ge=0)] = 20
    # ... and all of a worker's filter indexes together hold at most this share of the
    # catalogue's rows (their vectors again and ~25 %: at 1M items of 66 floats, 0.25 is ~86 MB).
    filter_index_rows: Annotated[float, Field(ge=0, le=1)] = 0.25

    # -- online store ---------------------------------------------------------------------
    redis_url: str = ""
    # True: REDIS_URL names any node of a Redis Cluster (redis-py's cluster client finds the
    # others and follows failovers); the key layout is the same as on a standalone Redis.
    redis_cluster: bool = False
    redis_prefix: Annotated[str, Field(min_length=1)] = DEFAULT_PREFIX
    redis_timeout_ms: Annotated[int, Field(ge=1)] = 50
    redis_retry_after_ms: Annotated[int, Field(ge=0)] = 500  # fail fast this long after an error
    redis_max_connections: Annotated[int, Field(ge=1)] = 64
    cache_ttl_s: Annotated[float, Field(ge=0)] = 2.0  # 0 (or CACHE_SIZE 0): no cache
    cache_size: Annotated[int, Field(ge=0)] = 10_000
    feature_ttl_s: Annotated[int, Field(ge=0)] = 0  # TTL of written keys; 0 = none
    # Newest history items stored per user (LTRIM); a recall reads them all and excludes them
    # as seen, its user tower reads the newest it needs (`app.retrieval.Query`).
    history_cap: Annotated[int, Field(ge=1)] = DEFAULT_HISTORY_CAP

    # -- request limits ---------------------------------------------------------------------
    max_k: Annotated[int, Field(ge=1)] = 500
    max_history: Annotated[int, Field(ge=1, le=MAX_HISTORY_CEILING)] = 200  # ids in a history
    max_batch: Annotated[int, Field(ge=1, le=MAX_BATCH_CEILING)] = 256
    max_body_bytes: Annotated[int, Field(ge=1024)] = 1 << 20
    # A request's body must all arrive within this many seconds of its start (408 and the
    # connection closed beyond): a client trickling bytes cannot hold the connection for ever.
    body_timeout_s: Annotated[float, Field(gt=0)] = 10.0

    # -- serving ----------------------------------------------------------------------------
    # Concurrent /v1/recall requests in one worker are served together (one Redis round trip,
    # one tower call, one index search): at most this many per batch.
    recall_batch_size: Annotated[int, Field(ge=1)] = 64
    # True: exact scans of a big flat index in one dedicated thread per worker, so the event
    # loop keeps reading requests meanwhile (ANN searches stay on the loop). Off by default:
    # the hop and the GIL hand-overs cost more than the overlap gains (100k flat, 1 worker:
    # 962-1042 rps with the thread, 1154-1206 without); a catalogue whose scans take tens of
    # milliseconds (1M flat) may still want it, so that health checks answer meanwhile.
    recall_thread: bool = False
    # Encoded user vectors kept per worker (one per user, reused while the model version and
    # the user's features and history are unchanged); ~0.5 kB each; 0 turns the cache off.
    vector_cache_size: Annotated[int, Field(ge=0)] = 20_000

    # -- model rollout ----------------------------------------------------------------------
    # Each worker checks LATEST and the fleet's pinned version this often (seconds) and loads
    # the one it should serve; 0 turns the watcher off (reloads only via POST /admin/reload).
    reload_poll_s: Annotated[float, Field(ge=0)] = 2.0

    # -- admin and process ------------------------------------------------------------------
    # Empty (or blank: spaces around a token are dropped, as a client's are): the admin API
    # answers 403.
    admin_token: Annotated[
        SecretStr, BeforeValidator(lambda v: v.strip() if isinstance(v, str) else v)
    ] = SecretStr("")
    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    workers: Annotated[int, Field(ge=1)] = 1
    # On SIGTERM each worker stops accepting, finishes the requests in flight, then exits; a
    # client that never finishes its request may hold it this long at most (uvicorn: forever).
    shutdown_timeout_s: Annotated[int, Field(ge=1)] = 10
    torch_threads: Annotated[int, Field(ge=1)] = 1  # per worker (see app/__main__.py)
    log_level: LogLevel = "info"
    # Every log line as one JSON object (`json`), or uvicorn's text lines (`text`); lines
    # written during a request carry its id either way.
    log_format: Annotated[
        Literal["json", "text"], BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v)
    ] = "json"
    # One line per HTTP request at `info` (request id, method, route template, status,
    # latency, model version).
    access_log: bool = True

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: str) -> str:
        if url and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("REDIS_URL must be empty or a redis://, rediss:// or unix:// URL")
        return url

    @field_validator("redis_cluster")
    @classmethod
    def _cluster_url(cls, cluster: bool, info: ValidationInfo) -> bool:
        # redis-py's cluster client refuses these only when the service starts (a traceback).
        # A field validator, so the error names REDIS_CLUSTER: it sees `redis_url` because
        # that field is declared (so validated) first.
        url = urlsplit(info.data.get("redis_url") or "")
        db = url.path.strip("/") or parse_qs(url.query).get("db", ["0"])[0]
        if cluster and (url.scheme == "unix" or db != "0"):
            raise ValueError(
                "a Redis Cluster is reached over TCP (redis:// or rediss://) and has only "
                "database 0: REDIS_URL names a unix socket or another database"
            )
        return cluster

    @field_validator("redis_prefix")
    @classmethod
    def _redis_prefix_braces(cls, prefix: str) -> str:
        return check_prefix(prefix)  # a key's first `{` must open the user id's hash tag


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()

"""Declaring cached operations (OCurrent's `Current_cache.BUILDER` and `PUBLISHER`).

A **builder** maps a key to a value by running a job: `build(job, key) -> value`. Its outcome is
stored under the key's digest and reused until the user asks to rebuild or `valid_for` expires.
Errors are sticky: a failed key is not retried until rebuild, expiry or a different key.

A **publisher** makes the world hold a value under a key: `publish(job, key, value)`. It runs when
the digest of the value differs from the one last published under the key; the value is not part
of the key.

An operation declared with `config=SomeType` is applied with a configuration value as well
(`op(key, config=...)`, OCurrent's `OPERATION.t`): its function receives it after the key (and
value) and it is not part of the key's digest unless the operation's `key_digest` puts it there.
The declaration's `pool` and `level` are the defaults of each run's `job.start(pool=, level=)`;
an operation declared with `starts_job=True` calls `await job.start(...)` itself, choosing them
per run (say, from its config), where others are started by the cache before their function runs.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import PurePath
from typing import Any, Generic, TypeVar

from pipeline.jobs import Job
from pipeline.level import Level
from pipeline.pool import Pool
from pipeline.term import Primitive, Term, as_term

K = TypeVar("K")
V = TypeVar("V")


def _canonical(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return {"__type__": type(value).__qualname__, **fields}
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    if isinstance(value, enum.Enum):
        return value.value
    raise TypeError(f"cannot compute a digest of a {type(value).__name__}; "
                    "give the operation a key_digest function")


_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, default=_canonical, separators=(",", ":"))


def digest(value: Any) -> str:
    """SHA-256 (hex) of a canonical JSON form of `value`: equal values have equal digests.

    Handles JSON types, tuples, dataclasses, paths, bytes, sets and enums.
    """
    return hashlib.sha256(_CANONICAL_JSON.encode(value).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Options:
    """How a cached operation runs: see `builder` for the meaning of each field."""

    auto_cancel: bool = False
    latched: bool = False
    valid_for: timedelta | None = None
    pool: Pool | None = None
    level: Level = Level.AVERAGE


class Operation(Generic[K, V]):
    """What builders and publishers share: an id, options, the type of their configuration (if
    they take one), and how keys are shown and hashed."""

    kind = "operation"

    def __init__(
        self,
        id: str,
        options: Options,
        *,
        config: type | None = None,
        starts_job: bool = False,
        pp: Callable[[K], str] | None = None,
        key_digest: Callable[..., str] | None = None,
    ) -> None:
        self.id = id
        self.options = options
        self.config_type = config
        self.starts_job = starts_job
        self._pp = pp
        self._key_digest = key_digest

    def key_digest(self, key: K, config: Any = None) -> str:
        """The digest under which outcomes for `key` are stored: the declaration's `key_digest`
        (given the config too, for an operation that takes one), else `digest(key)`."""
        if self._key_digest is None:
            return digest(key)
        return self._key_digest(key, *self._arguments(config))

    def pp(self, key: K) -> str:
        """A short description of `key` for people."""
        return self._pp(key) if self._pp is not None else repr(key)

    def check_config(self, config: Any) -> None:
        """Raise TypeError unless `config` is what the declaration asks for (None if nothing)."""
        if self.config_type is None:
            if config is not None:
                raise TypeError(f"operation {self.id} takes no config")
        elif not isinstance(config, self.config_type):
            raise TypeError(f"operation {self.id} needs a {self.config_type.__name__} config, "
                            f"not {type(config).__name__}")

    def _arguments(self, config: Any) -> tuple[Any, ...]:
        """What the function receives after the job, key (and value): the config, if any."""
        return () if self.config_type is None else (config,)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id}>"


class BuilderOp(Operation[K, V]):
    """A cached builder. Call it with a key (a term or a plain value) to get a term of the value."""

    kind = "builder"

    def __init__(
        self, id: str, build: Callable[..., Awaitable[V]], options: Options, *,
        encode: Callable[[V], str] = json.dumps, decode: Callable[[str], V] = json.loads,
        **kw: Any,
    ) -> None:
        super().__init__(id, options, **kw)
        self.build = build
        self.encode = encode
        self.decode = decode

    def __call__(self, key: Term[K] | K, *, config: Any = None,
                 label: str | None = None) -> Term[V]:
        """The value built for `key`; `config` is handed to each run (see the module's doc)."""
        self.check_config(config)
        return Primitive(self, as_term(key), None, label=label or self.id, config=config)

    def run(self, job: Job, key: K, config: Any) -> Awaitable[V]:
        """Build `key` in `job`."""
        return self.build(job, key, *self._arguments(config))


class PublisherOp(Operation[K, Any]):
    """A cached publisher. Call it with a key and a value: the term is ok once published."""

    kind = "publisher"

    def __init__(
        self, id: str, publish: Callable[..., Awaitable[None]], options: Options, *,
        value_digest: Callable[[Any], str] = digest, **kw: Any,
    ) -> None:
        super().__init__(id, options, **kw)
        self.publish = publish
        self.value_digest = value_digest

    def __call__(
        self, key: Term[K] | K, value: Term[Any] | Any, *, config: Any = None,
        label: str | None = None,
    ) -> Term[None]:
        """Publish `value` under `key`; `config` is handed to each run (see the module's doc)."""
        self.check_config(config)
        return Primitive(self, as_term(key), as_term(value), label=label or self.id,
                         config=config)

    def run(self, job: Job, key: K, value: Any, config: Any) -> Awaitable[None]:
        """Publish `value` under `key` in `job`."""
        return self.publish(job, key, value, *self._arguments(config))


def builder(
    id: str | None = None,
    *,
    auto_cancel: bool = False,
    latched: bool = False,
    valid_for: timedelta | None = None,
    pool: Pool | None = None,
    level: Level = Level.AVERAGE,
    config: type | None = None,
    starts_job: bool = False,
    pp: Callable[[Any], str] | None = None,
    key_digest: Callable[..., str] | None = None,
    encode: Callable[[Any], str] = json.dumps,
    decode: Callable[[str], Any] = json.loads,
) -> Callable[[Callable[..., Awaitable[V]]], BuilderOp[Any, V]]:
    """Declare a cached builder: `async def f(job, key) -> value`, or `f(job, key, config)`.

    - `id`: the operation's name (default: the function's), the cache namespace and job label;
    - `auto_cancel`: cancel the running job when no node wants its key any more;
    - `latched`: while re-running, keep showing the previous value;
    - `valid_for`: re-run once an outcome is older than this;
    - `pool`: limits how many jobs run at once; `level`: the job's risk level (both the defaults
      of `job.start`);
    - `config`: the type of the configuration each application gives (`op(key, config=...)`),
      passed to `f` after the key; `starts_job`: `f` calls `await job.start(pool=, level=)`
      itself rather than being called once the cache has started the job;
    - `pp`, `key_digest`, `encode`/`decode`: how keys are shown and hashed (`key_digest(key)`,
      or `key_digest(key, config)` with a `config`), and values stored (JSON by default).
    """
    options = Options(auto_cancel, latched, valid_for, pool, level)

    def declare(f: Callable[..., Awaitable[V]]) -> BuilderOp[Any, V]:
        return BuilderOp(id or f.__name__, f, options, config=config, starts_job=starts_job,
                         pp=pp, key_digest=key_digest, encode=encode, decode=decode)

    return declare


def publisher(
    id: str | None = None,
    *,
    auto_cancel: bool = False,
    latched: bool = False,
    valid_for: timedelta | None = None,
    pool: Pool | None = None,
    level: Level = Level.AVERAGE,
    config: type | None = None,
    starts_job: bool = False,
    pp: Callable[[Any], str] | None = None,
    key_digest: Callable[..., str] | None = None,
    value_digest: Callable[[Any], str] = digest,
) -> Callable[[Callable[..., Awaitable[None]]], PublisherOp[Any]]:
    """Declare a cached publisher: `async def f(job, key, value) -> None`, or
    `f(job, key, value, config)`.

    Options as for `builder`; `auto_cancel` here also cancels a running job whose value is no
    longer the wanted one. `value_digest` compares values (default: `digest`).
    """
    options = Options(auto_cancel, latched, valid_for, pool, level)

    def declare(f: Callable[..., Awaitable[None]]) -> PublisherOp[Any]:
        return PublisherOp(id or f.__name__, f, options, config=config, starts_job=starts_job,
                           pp=pp, key_digest=key_digest, value_digest=value_digest)

    return declare

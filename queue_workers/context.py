"""Process-wide handles the jobs use: config, etcd store, Redis, SSH connections.

RQ calls job functions with only their arguments; the worker process sets
the config once (`configure`) and jobs fetch the handles here, created on
first use so that nothing connects at import time.
"""

from __future__ import annotations

import functools

from redis import Redis

from pink import config as pink_config
from pink import redisconn
from pink import sftp as pink_sftp
from pink import wire
from pink.blob_store import BlobStore
from pink.store import Store

_config_path: str | None = None


def configure(path: str) -> None:
    global _config_path
    _config_path = path
    config.cache_clear()
    store.cache_clear()
    redis.cache_clear()
    sftp.cache_clear()
    blobs.cache_clear()


@functools.cache
def config() -> pink_config.Config:
    return pink_config.load(_config_path)


@functools.cache
def store() -> Store:
    return Store.from_config(config())


@functools.cache
def redis() -> Redis:
    return redisconn.connect(config())


@functools.cache
def blobs() -> BlobStore:
    web = config().web
    return BlobStore(web.blob_root, web.blob_budget_bytes)


@functools.cache
def sftp() -> pink_sftp.Pool:
    return pink_sftp.Pool(config().ssh)


@functools.cache
def link_rates() -> wire.LinkRates:
    return wire.LinkRates()

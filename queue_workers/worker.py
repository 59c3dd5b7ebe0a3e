"""`pink-worker`: an RQ worker serving this web node's queues.

It listens to the shared finalize and run queues and to this host's own
transfer queue (uploads live on this host). Jobs run in the worker process
itself (RQ's SimpleWorker): no fork per job keeps a trivial task's latency
low, and the etcd client is opened once, after start, never across a fork.
"""

from __future__ import annotations

import logging

import click
from rq import Queue, SimpleWorker

from queue_workers import context
from queue_workers.queues import queues_for


@click.command()
@click.option("--config", "config_path", envvar="PINK_CONFIG", required=True,
              type=click.Path(exists=True, dir_okay=False), help="PINK config file.")
@click.option("--burst", is_flag=True, help="Stop when the queues are empty.")
@click.option("--name", default=None, help="Worker name shown in rq-dashboard.")
def main(config_path: str, burst: bool, name: str | None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    context.configure(config_path)
    config = context.config()
    redis = context.redis()
    queues = [Queue(q, connection=redis) for q in queues_for(config.host)]
    worker = SimpleWorker(queues, connection=redis, name=name)
    worker.work(burst=burst, with_scheduler=False, logging_level="INFO")


if __name__ == "__main__":
    main()

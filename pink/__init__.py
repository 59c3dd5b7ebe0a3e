"""PINK is not Kubernetes: the shared core.

Config, the task model and its state machine, etcd access (`store`), the
MariaDB archive, users, image archive inspection, placement and errors. It
imports no Flask, RQ or Docker: `web`, `queue_workers` and `gpu_runner` do.
"""

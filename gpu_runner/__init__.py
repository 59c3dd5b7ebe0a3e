"""The processing-server agent: registers its node in etcd under a lease,
watches for assignments carrying its epoch, runs each task's container with
the Docker SDK, exports its filesystem and reports back through etcd."""

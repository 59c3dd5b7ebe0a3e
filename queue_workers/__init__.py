"""Queue workers: the RQ jobs that move tasks (transfer, run, finalize,
spool cleanup), the worker process that runs them, and the queue leader
that keeps RQ in step with etcd."""

"""Queue workers: the RQ jobs that move tasks (transfer, finalize) and sweep
each web node's files, the worker process that runs them, and the queue leader
that keeps RQ in step with etcd."""

"""Clusters for developing and testing PINK, beside the code they run.

`devcluster.cluster`: the one-machine cluster (`make demo`, `make test`,
`make bench`): etcd, Redis, MariaDB, sshd and the PINK processes as local
processes on free ports, one module a concern (see its docstring); its
command line is `python -m devcluster.local`. `devcluster.lab`: the
multi-host lab (`make cluster`). Not deployed: the Ansible roles install
PINK on real machines.
"""

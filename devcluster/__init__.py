"""Clusters for developing and testing PINK, beside the code they run.

`devcluster.local`: the one-machine cluster (`make demo`, `make test`,
`make bench`): etcd, Redis, MariaDB, sshd and the PINK processes as local
processes on free ports. Not deployed: the Ansible roles install PINK on
real machines.
"""

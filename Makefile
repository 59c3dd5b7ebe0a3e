# PINK's entry points for people and CI: install what a fresh Debian 12 machine
# lacks, build the venv, make dev certificates, run the demo, tests and bench.
# The one-machine cluster itself is managed by devcluster/local.py.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_BASE ?= /var/lib/pink-demo
PYTEST_ARGS ?=
BENCH_ARGS ?=
CERT_SANS ?=
INVENTORY ?= ansible/inventory.ini
ANSIBLE_ARGS ?=

# Debian packages of the services PINK runs, and a binary that proves each.
DEB_PACKAGES := docker.io etcd-server etcd-client redis-server mariadb-server \
	openssh-server nginx busybox-static zstd openssl iproute2 iptables python3-venv chromium
DEB_BINARIES := docker dockerd etcd etcdctl redis-server mariadbd mariadb-install-db sshd \
	ssh-keygen nginx busybox zstd openssl ip iptables useradd chromium

.PHONY: all deps venv certs up demo down status test bench deploy cluster cluster-down \
	test-cluster etcd-remove clean backup restore wheelhouse

all: test

deps:
	@missing=""; \
	for bin in $(DEB_BINARIES); do \
		PATH="$$PATH:/usr/sbin:/sbin" command -v $$bin >/dev/null || missing="$$missing $$bin"; \
	done; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
		echo "deps: missing$$missing; installing Debian packages"; \
		apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(DEB_PACKAGES); \
	fi

# Rebuilt only when the package metadata changes.
venv: $(VENV)/.installed
$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

certs:
	ssl/make-certs.sh $(if $(RENEW),--renew) $(CERT_SANS)

# Services and PINK's processes, left running (stop with `make down`).
up: deps venv certs
	$(PY) -m devcluster.local up --base $(DEMO_BASE) --with-pink

demo: deps venv certs
	$(PY) -m devcluster.local demo --base $(DEMO_BASE)

down:
	@if [ -x $(PY) ]; then $(PY) -m devcluster.local down --base $(DEMO_BASE); fi

status:
	$(PY) -m devcluster.local status --base $(DEMO_BASE)

test: deps venv
	$(PY) -m devcluster.local dockerd
	$(PY) -m pytest $(PYTEST_ARGS)

bench: deps venv
	$(PY) -m devcluster.local dockerd
	$(PY) bench/run.py $(BENCH_ARGS)

# The multi-host lab (devcluster/lab.py): six systemd containers deployed by
# the Ansible roles below; `make cluster-down` removes them (KEEP_IMAGE=1
# keeps their image for the next `make cluster`).
cluster: deps venv
	@command -v mmdebstrap >/dev/null || { apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q mmdebstrap; }
	$(PY) -m devcluster.local dockerd
	$(PY) -m devcluster.lab up

cluster-down:
	@if [ -x $(PY) ]; then $(PY) -m devcluster.lab down $(if $(KEEP_IMAGE),--keep-image); fi

# The fault matrix against the lab (tests/cluster), after `make cluster`.
test-cluster: cluster
	PINK_LAB=1 $(PY) -m pytest tests/cluster $(PYTEST_ARGS)

# Ansible deployment (see ansible/README.md): INVENTORY=path/to/hosts make deploy
deploy: venv certs
	$(VENV)/bin/pip install -q -e '.[deploy]'
	ANSIBLE_CONFIG=ansible/ansible.cfg $(VENV)/bin/ansible-playbook -i $(INVENTORY) \
		ansible/site.yml $(ANSIBLE_ARGS)

# Offline installs (docs/operations.md): PINK's dependencies as binary wheels
# for the hosts' Pythons, $(WHEELHOUSE)/cpXY/ and cpXY.tar, which the common
# role ships when common_wheelhouse names the directory. Run it where an index
# is reachable. WHEELHOUSE_PYTHONS="3.11 3.12" picks targets (default: each
# system's Python PINK supports); WHEELHOUSE_EXTRA adds requirements (those of
# common_extra_python_packages).
WHEELHOUSE ?= build/wheelhouse
WHEELHOUSE_PYTHONS ?=
WHEELHOUSE_EXTRA ?=
wheelhouse: venv
	$(VENV)/bin/pip install -q -e '.[deploy]'
	$(PY) ansible/roles/common/files/wheelhouse.py $(WHEELHOUSE) \
		$(foreach p,$(WHEELHOUSE_PYTHONS),--python $(p)) $(foreach r,$(WHEELHOUSE_EXTRA),--extra '$(r)')

# Remove an etcd member for good (docs/operations.md, "etcd members"):
# INVENTORY=... make etcd-remove MEMBER=<inventory name>
etcd-remove: venv
	$(VENV)/bin/pip install -q -e '.[deploy]'
	ANSIBLE_CONFIG=ansible/ansible.cfg $(VENV)/bin/ansible-playbook -i $(INVENTORY) \
		ansible/etcd-remove.yml -e member=$(MEMBER) $(ANSIBLE_ARGS)

# Backups (ansible/roles/backup/README.md): every backup host's backups now,
# the newest fetched to backups/<timestamp>/; `make restore
# BACKUP=backups/<timestamp>` loads the dump and recovers the tasks finalized
# since (RESTORE_ETCD=1 also restores etcd, which live etcd is newer than).
backup: venv
	$(VENV)/bin/pip install -q -e '.[deploy]'
	ANSIBLE_CONFIG=ansible/ansible.cfg $(VENV)/bin/ansible-playbook -i $(INVENTORY) \
		ansible/backup.yml $(ANSIBLE_ARGS)

restore: venv
	@test -n "$(BACKUP)" || { echo "usage: make restore BACKUP=backups/<timestamp> [RESTORE_ETCD=1]" >&2; exit 2; }
	$(VENV)/bin/pip install -q -e '.[deploy]'
	ANSIBLE_CONFIG=ansible/ansible.cfg $(VENV)/bin/ansible-playbook -i $(INVENTORY) \
		ansible/restore.yml -e 'backup_from=$(abspath $(BACKUP))' \
		-e backup_restore_etcd=$(if $(filter 1 yes true,$(RESTORE_ETCD)),true,false) $(ANSIBLE_ARGS)

# Build outputs only: certificates and $(DEMO_BASE) stay (`make down` first).
clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache bench/out
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

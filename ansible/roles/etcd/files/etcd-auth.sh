#!/bin/sh
# Turns etcd's authentication on with one user per PINK role, idempotently.
# Users have no password: etcd takes the user from the client certificate's
# CN (--client-cert-auth), and each user's role of the same name may read
# and write PINK's prefix only.
#
# usage: etcd-auth.sh ENDPOINT CA DIR PROBE PREFIX USER...
#   ENDPOINT  a member's client URL (https://127.0.0.1:2379)
#   CA        etcd's CA certificate
#   DIR       holds root.pem/root.key (the CN "root") and PROBE.pem/.key
#   PROBE     a certificate whose CN is no user (the member's own): if it can
#             still read, authentication is off
#   PREFIX    the key prefix of PINK (e.g. /pink/)
#   USER      the users, each with a role of its own name
# Prints "changed" when it changed anything.
set -eu
endpoint=$1 ca=$2 dir=$3 probe=$4 prefix=$5
shift 5
changed=""
ctl() { ETCDCTL_API=3 etcdctl --endpoints="$endpoint" --cacert="$ca" "$@"; }
root() { ctl --cert="$dir/root.pem" --key="$dir/root.key" "$@"; }

if ! root user get root >/dev/null 2>&1; then
    root user add root --no-password >/dev/null
    root user grant-role root root >/dev/null
    changed=1
fi
for user in "$@"; do
    if ! root role get "$user" 2>/dev/null | grep -qF "(prefix $prefix)"; then
        root role get "$user" >/dev/null 2>&1 || root role add "$user" >/dev/null
        root role grant-permission --prefix=true "$user" readwrite "$prefix" >/dev/null
        changed=1
    fi
    if ! root user get "$user" >/dev/null 2>&1; then
        root user add "$user" --no-password >/dev/null
        changed=1
    fi
    if ! root user get "$user" | grep -q "^Roles:.* $user\b"; then
        root user grant-role "$user" "$user" >/dev/null
        changed=1
    fi
done
if ctl --cert="$dir/$probe.pem" --key="$dir/$probe.key" get --keys-only --limit=1 "$prefix" >/dev/null 2>&1; then
    root auth enable >/dev/null
    changed=1
fi
[ -z "$changed" ] || echo changed

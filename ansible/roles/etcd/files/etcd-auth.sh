#!/bin/sh
# Turns etcd's authentication on with one user per PINK role, idempotently.
# Users have no password: etcd takes the user from the client certificate's
# CN (--client-cert-auth); each user has a role of its own name holding
# exactly the permissions given (others it held are revoked).
#
# usage: etcd-auth.sh ENDPOINT CA DIR PROBE USER=PERM:PREFIX[,PERM:PREFIX...]...
#   ENDPOINT  a member's client URL (https://127.0.0.1:2379)
#   CA        etcd's CA certificate
#   DIR       holds root.pem/root.key (the CN "root") and PROBE.pem/.key
#   PROBE     a certificate whose CN is no user (the member's own): if it can
#             still read, authentication is off
#   PERM      read, write or readwrite, on every key under PREFIX
# Prints "changed" when it changed anything.
set -eu
endpoint=$1 ca=$2 dir=$3 probe=$4
shift 4
changed=""
ctl() { ETCDCTL_API=3 etcdctl --endpoints="$endpoint" --cacert="$ca" "$@"; }
root() { ctl --cert="$dir/root.pem" --key="$dir/root.key" "$@"; }

if ! root user get root >/dev/null 2>&1; then
    root user add root --no-password >/dev/null
    root user grant-role root root >/dev/null
    changed=1
fi
first=""
for spec in "$@"; do
    user=${spec%%=*}
    perms=$(echo "${spec#*=}" | tr ',' ' ')
    root role get "$user" >/dev/null 2>&1 || { root role add "$user" >/dev/null; changed=1; }
    held=$(root role get "$user")
    for perm in $perms; do
        kind=${perm%%:*} prefix=${perm#*:}
        want=1; [ "$kind" = readwrite ] && want=2
        if [ "$(echo "$held" | grep -cF "(prefix $prefix)")" -ne "$want" ]; then
            root role grant-permission --prefix=true "$user" "$kind" "$prefix" >/dev/null
            changed=1
        fi
    done
    for prefix in $(echo "$held" | sed -n 's/.*(prefix \(.*\))$/\1/p' | sort -u); do
        case " $perms " in *":$prefix "*) ;; *)
            root role revoke-permission --prefix=true "$user" "$prefix" >/dev/null
            changed=1 ;;
        esac
    done
    if ! root user get "$user" >/dev/null 2>&1; then
        root user add "$user" --no-password >/dev/null
        changed=1
    fi
    if ! root user get "$user" | grep -q "^Roles:.* $user\b"; then
        root user grant-role "$user" "$user" >/dev/null
        changed=1
    fi
    first=${first:-${perms%% *}}
done
probe_prefix=${first#*:}
if ctl --cert="$dir/$probe.pem" --key="$dir/$probe.key" get --keys-only --limit=1 "$probe_prefix" >/dev/null 2>&1; then
    root auth enable >/dev/null
    changed=1
fi
[ -z "$changed" ] || echo changed

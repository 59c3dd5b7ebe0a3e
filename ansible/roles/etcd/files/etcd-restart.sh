#!/bin/sh
# One member's turn in the etcd role's rolling restart (tasks/restart.yml
# runs it on one member at a time: throttle 1). The member goes only while
# every other member is healthy, so that they keep the quorum while it is
# down, and its turn ends once every member, itself included, is healthy
# again: the next turn starts from a whole cluster. A member listed but not
# started yet (one joining in this deploy) counts as not healthy.
#
# usage: etcd-restart.sh NAME CLIENT_URL ENDPOINTS PKI_DIR TIMEOUT
#   NAME, CLIENT_URL: this member's name and advertised client URL
#   ENDPOINTS: client URLs to ask, comma-separated (this member may be down)
#   PKI_DIR: ca.pem, member.pem, member.key (enough for `member list` and
#            `endpoint health`, authentication on or off)
#   TIMEOUT: seconds to wait for health, before the restart and after it
set -eu
prog=etcd-restart.sh
[ $# -eq 5 ] || { echo "usage: $prog NAME CLIENT_URL ENDPOINTS PKI_DIR TIMEOUT" >&2; exit 2; }
name=$1 own_url=$2 endpoints=$3 pki=$4 timeout=$5

ctl() {
    ETCDCTL_API=3 etcdctl --endpoints="$endpoints" --cacert="$pki/ca.pem" \
        --cert="$pki/member.pem" --key="$pki/member.key" \
        --dial-timeout=3s --command-timeout=5s "$@"
}

# True when every member listed is healthy, leaving out the member named $1
# and the client URL $2 (both empty: no member left out). `member list`
# lines: ID, status, name, peer URLs, client URLs, learner; etcdctl 3.4
# writes `endpoint health` to stderr, "URL is healthy: ..." a member.
healthy_but() {
    list=$(ctl member list) || return 1
    listed=$(printf '%s\n' "$list" | awk -F', ' -v skip="$1" 'NF && (skip == "" || $3 != skip)' | grep -c .) || true
    healthy=$(ctl endpoint health --cluster 2>&1 \
        | awk -v skip="$2" '/ is healthy/ && (skip == "" || $1 != skip)' | grep -c .) || true
    [ "$listed" -eq "$healthy" ]
}

# wait_for SECONDS COMMAND...: until COMMAND succeeds, or fail after SECONDS.
wait_for() {
    deadline=$(( $(date +%s) + $1 )); shift
    until "$@"; do
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 2
    done
}

if ! wait_for "$timeout" healthy_but "$name" "$own_url"; then
    echo "$prog: not every other etcd member is healthy after ${timeout}s: restarting $name now" \
         "could cost the quorum, so it keeps running as it is (the next deploy tries again)" >&2
    exit 1
fi
systemctl restart etcd.service
if ! wait_for "$timeout" healthy_but "" ""; then
    echo "$prog: $name restarted, but not every member is healthy after ${timeout}s" >&2
    exit 1
fi
echo "$prog: restarted $name; every member is healthy"

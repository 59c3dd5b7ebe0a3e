#!/usr/bin/env bash
# One Redis host's turn in the redis role's rolling restart (tasks/restart.yml,
# one host at a time). Redis keeps no data on disk (RQ's queues are a mirror
# of etcd), so a master restarted in place comes back empty and its replicas
# would copy the emptiness: a replicated master is first failed over by
# Sentinel and restarted as a replica. Each turn ends once this host is
# serving again (a replica: its link to the master is up; Sentinel: the
# quorum is reachable), so the next host never goes while this one is away.
#
#
# PINK's settings live in CONF_DIR/pink.conf, included at the end of
# redis.conf. A failover's CONFIG REWRITE copies what Redis runs with below
# that include, where the copies would win over a changed pink.conf: they are
# dropped just before Redis restarts (Redis's own lines, such as `replicaof`,
# stay).
#
# usage: redis-restart.sh UNIT PORT SENTINEL_PORT MASTER_NAME TIMEOUT CONF_DIR [RESTART_COMMAND...]
#   UNIT: redis-server or redis-sentinel; SENTINEL_PORT 0: Redis is not
#   replicated. The password is pink.conf's `requirepass` (read here, never
#   passed on a command line), or REDISCLI_AUTH when set. RESTART_COMMAND
#   defaults to `systemctl restart UNIT`.
set -euo pipefail
unit=$1 port=$2 sentinel_port=$3 master=$4 timeout=$5 conf_dir=$6
shift 6
restart=("$@")
[[ ${#restart[@]} -gt 0 ]] || restart=(systemctl restart "$unit")
deadline=$((SECONDS + timeout))
if [[ -z ${REDISCLI_AUTH:-} ]]; then
    REDISCLI_AUTH=$(awk '$1 == "requirepass" { print $2; exit }' "$conf_dir/pink.conf")
fi
export REDISCLI_AUTH

say() { echo "redis-restart: $*" >&2; }

wait_for() {  # wait_for WHAT COMMAND...: until COMMAND succeeds, or fail after the timeout
    local what=$1
    shift
    until "$@" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            say "gave up after ${timeout}s waiting until $what"
            exit 1
        fi
        sleep 1
    done
}

cli() { redis-cli --no-auth-warning -h 127.0.0.1 "$@"; }
replication() { cli -p "$port" INFO replication | tr -d '\r'; }
is_replica_in_sync() { replication | grep -qx 'master_link_status:up'; }
is_replica() { replication | grep -qx 'role:slave'; }
answers() { [[ $(cli -p "$1" PING) == PONG ]]; }
watched() { cli -p "$sentinel_port" SENTINEL MASTER "$master" 2>/dev/null | grep -qx 'name'; }
quorum() { cli -p "$sentinel_port" SENTINEL CKQUORUM "$master" | grep -q '^OK'; }

drop_copies() {
    local conf=$conf_dir/redis.conf own=$conf_dir/pink.conf new
    [[ -s $conf && -s $own ]] || return 0
    new=$(mktemp "$conf.pink-XXXXXX")  # 0600: it holds what redis.conf holds
    if ! awk -v line="include $own" '
        FILENAME == ARGV[1] { if (NF && $1 !~ /^#/) owned[$1] = 1; next }
        $1 == "include" && $0 == line { below = 1; print; next }
        below && ($1 in owned) { next }
        { print }' "$own" "$conf" >"$new"; then
        rm -f "$new"
        say "could not drop the copies of pink.conf from $conf"
        exit 1
    fi
    chown --reference="$conf" "$new" && chmod --reference="$conf" "$new" && mv "$new" "$conf"
}

restart_redis() {
    drop_copies
    "${restart[@]}"
}

run_id() { cli -p "$port" INFO server | tr -d '\r' | sed -n 's/^run_id://p'; }
sentinels_master_id() {
    cli -p "$sentinel_port" SENTINEL MASTER "$master" | tr -d '\r' | sed -n '/^runid$/{n;p;}'
}

# Asks again while Sentinel still names this Redis the master: a failover
# Sentinel accepted may still abort (no replica it could promote in time).
# Once Sentinel names another, it only remains to reconfigure this one.
demoted() {
    is_replica_in_sync && return 0
    if [[ $(sentinels_master_id) == "$(run_id)" ]]; then
        cli -p "$sentinel_port" SENTINEL FAILOVER "$master" >/dev/null  # -INPROG while one runs
    fi
    return 1
}

# Down, or refusing the password (a rotation: every host restarts with the
# new one and the queues start empty; the leader rebuilds them from etcd).
in_place() {
    if [[ $unit == redis-server ]]; then restart_redis; else "${restart[@]}"; fi
    wait_for "$unit answers to the current password" answers "$1"
    say "$unit restarted in place"
    exit 0
}

if [[ $unit == redis-sentinel ]]; then
    answers "$sentinel_port" || in_place "$sentinel_port"
    "${restart[@]}"
    wait_for "Sentinel answers" answers "$sentinel_port"
    wait_for "Sentinel's quorum for $master is reachable" quorum
    say "Sentinel restarted"
    exit 0
fi

# A single Redis, or one Sentinel does not watch yet (a first deploy cut
# short before its restart): nothing can stand in for it.
if [[ $sentinel_port == 0 ]] || ! answers "$port" || ! watched; then
    in_place "$port"
fi

if ! is_replica; then
    say "this Redis is the master: Sentinel fails it over first"
    wait_for "Sentinel's quorum for $master is reachable" quorum
    wait_for "Sentinel fails this Redis over and it follows the new master" demoted
fi
restart_redis
wait_for "Redis answers" answers "$port"
wait_for "this Redis follows the master again" is_replica_in_sync
say "Redis restarted as a replica, in sync"

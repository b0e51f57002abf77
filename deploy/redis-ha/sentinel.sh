#!/bin/sh
# A Sentinel of the HA profile (deploy/compose.ha.yaml). Its configuration file is written once, on
# its volume: Sentinel rewrites it with what it learns (the current master, the replicas, the other
# Sentinels), so a Sentinel that restarts after a failover still watches the right master.
#
#   sh sentinel.sh [docker-entrypoint.sh] redis-server
#
# Environment: CONFIG (the file, on a volume), SENTINEL_PORT, ANNOUNCE_NAME (how the others reach
# this Sentinel), MASTER_NAME, INITIAL_MASTER_HOST, INITIAL_MASTER_PORT, QUORUM (Sentinels that must
# agree the master is down), DOWN_AFTER_MS, FAILOVER_TIMEOUT_MS, REDIS_PASSWORD (the nodes' and the
# Sentinels' own: clients and the other Sentinels authenticate with it), BIND (optional: the
# addresses to listen on; all by default, as a container needs).
set -eu

if [ ! -s "$CONFIG" ]; then
  mkdir -p "$(dirname "$CONFIG")"
  cat > "$CONFIG" <<CONF
port $SENTINEL_PORT
dir $(dirname "$CONFIG")
${BIND:+bind $BIND}
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip $ANNOUNCE_NAME
requirepass "$REDIS_PASSWORD"
sentinel sentinel-pass "$REDIS_PASSWORD"
sentinel monitor $MASTER_NAME $INITIAL_MASTER_HOST $INITIAL_MASTER_PORT $QUORUM
sentinel auth-pass $MASTER_NAME "$REDIS_PASSWORD"
sentinel down-after-milliseconds $MASTER_NAME $DOWN_AFTER_MS
sentinel failover-timeout $MASTER_NAME $FAILOVER_TIMEOUT_MS
sentinel parallel-syncs $MASTER_NAME 1
CONF
fi
exec "$@" "$CONFIG" --sentinel

#!/bin/sh
# A Redis node of the HA profile (deploy/compose.ha.yaml): started as the replica of whatever node
# the Sentinels name as the master now, or, when no Sentinel answers (the very first start), as the
# master if it is INITIAL_MASTER_HOST:INITIAL_MASTER_PORT and as its replica otherwise. So a node
# that died and comes back after a failover rejoins as a replica instead of a second master.
#
#   sh node.sh [docker-entrypoint.sh] redis-server [its flags...]
#
# Environment: NODE_NAME and NODE_PORT (how the others reach this node), INITIAL_MASTER_HOST,
# INITIAL_MASTER_PORT, SENTINELS ("host:port host:port ..."), MASTER_NAME, REDIS_PASSWORD (the
# replicas' masterauth), REDISCLI_AUTH (the Sentinels' password, for redis-cli), MIN_REPLICAS
# (min-replicas-to-write: writes refused without that many replicas, as STROKES_REDIS_MIN_REPLICAS
# waits for them).
set -eu

master=""
for sentinel in $SENTINELS; do
  reply=$(redis-cli -h "${sentinel%:*}" -p "${sentinel##*:}" SENTINEL get-master-addr-by-name "$MASTER_NAME" 2>/dev/null || true)
  host=$(printf '%s\n' "$reply" | sed -n 1p)
  port=$(printf '%s\n' "$reply" | sed -n 2p)
  case "$port" in
    '' | *[!0-9]*) continue ;;  # no answer, or an error instead of an address
  esac
  master="$host $port"
  break
done
[ -n "$master" ] || master="$INITIAL_MASTER_HOST $INITIAL_MASTER_PORT"

if [ "$master" = "$NODE_NAME $NODE_PORT" ]; then
  echo "node.sh: $NODE_NAME:$NODE_PORT starts as the master" >&2
  set -- "$@" --port "$NODE_PORT"
else
  echo "node.sh: $NODE_NAME:$NODE_PORT starts as the replica of ${master% *}:${master#* }" >&2
  # shellcheck disable=SC2086 # "host port": two words
  set -- "$@" --port "$NODE_PORT" --replicaof $master
fi
exec "$@" \
  --masterauth "$REDIS_PASSWORD" \
  --replica-announce-ip "$NODE_NAME" \
  --min-replicas-to-write "$MIN_REPLICAS" \
  --min-replicas-max-lag 10

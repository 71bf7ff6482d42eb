#!/usr/bin/env bash
# Starts (idempotently) the real Redis and MariaDB the auth-key store tests
# use, on loopback ports of their own, with state under $MTPROTO_SERVICES.
#
#   scripts/services.sh up      start both if not running
#   scripts/services.sh down    stop both
#   scripts/services.sh env     print the URLs the tests read
set -euo pipefail

STATE="${MTPROTO_SERVICES:-/tmp/mtproto-services}"
REDIS_PORT="${MTPROTO_REDIS_PORT:-16379}"
MYSQL_PORT="${MTPROTO_MYSQL_PORT:-13306}"
SOCK="$STATE/mysqld.sock"

log() { printf '[services] %s\n' "$*" >&2; }

redis_up() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; }
mysql_up() { mariadb-admin --socket="$SOCK" -uroot ping >/dev/null 2>&1; }

up() {
    mkdir -p "$STATE/redis" "$STATE/mysql-data"
    if ! redis_up; then
        log "starting redis on 127.0.0.1:$REDIS_PORT"
        redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize yes \
            --dir "$STATE/redis" --pidfile "$STATE/redis.pid" --logfile "$STATE/redis.log" \
            --save "" --appendonly no
        for _ in $(seq 1 100); do redis_up && break; sleep 0.1; done
        redis_up || { log "redis did not start; see $STATE/redis.log"; exit 1; }
    fi
    if ! mysql_up; then
        if [[ ! -d "$STATE/mysql-data/mysql" ]]; then
            log "initialising mariadb in $STATE/mysql-data"
            mariadb-install-db --user=root --datadir="$STATE/mysql-data" \
                --auth-root-authentication-method=socket --skip-test-db >"$STATE/mysql-init.log" 2>&1 \
                || { log "mariadb-install-db failed; see $STATE/mysql-init.log"; exit 1; }
        fi
        log "starting mariadb on 127.0.0.1:$MYSQL_PORT"
        setsid mariadbd --user=root --datadir="$STATE/mysql-data" --socket="$SOCK" \
            --port="$MYSQL_PORT" --bind-address=127.0.0.1 --pid-file="$STATE/mysqld.pid" \
            --log-error="$STATE/mysqld.log" --skip-name-resolve --innodb-buffer-pool-size=64M \
            </dev/null >/dev/null 2>&1 &
        for _ in $(seq 1 300); do mysql_up && break; sleep 0.1; done
        mysql_up || { log "mariadb did not start; see $STATE/mysqld.log"; exit 1; }
        mariadb --socket="$SOCK" -uroot -e "
            CREATE USER IF NOT EXISTS 'mtproto'@'127.0.0.1' IDENTIFIED BY 'mtproto';
            GRANT ALL PRIVILEGES ON *.* TO 'mtproto'@'127.0.0.1';"
    fi
}

down() {
    if redis_up; then redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true; fi
    if mysql_up; then mariadb-admin --socket="$SOCK" -uroot shutdown || true; fi
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    env)
        echo "export MTPROTO_TEST_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/"
        echo "export MTPROTO_TEST_MYSQL_URL=mysql://mtproto:mtproto@127.0.0.1:$MYSQL_PORT"
        ;;
    *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac

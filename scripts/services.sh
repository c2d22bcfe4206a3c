#!/usr/bin/env bash
# Runs the services Tollgate's production seams talk to — PostgreSQL, Redis, Apache Kafka (KRaft)
# and ClickHouse — on loopback, on their standard ports, without Docker or systemd: for
# development and CI on a Debian 12 machine (run as root).
#
#   scripts/services.sh up     [SERVICE...]   install what is missing, start, wait, create
#                                             databases and topics, print the env for tests
#   scripts/services.sh down   [SERVICE...]   stop what this script started
#   scripts/services.sh status [SERVICE...]   one line per service; exit 0 only if all are up
#   scripts/services.sh env    [SERVICE...]   print the env lines (export X=...) only
#   scripts/services.sh reset  [SERVICE...]   stop, then delete their data (keeps packages, jars)
#
# SERVICE is any of: postgres redis kafka clickhouse (default: all four).
# Progress goes to stderr and the env lines to stdout, so `eval "$(scripts/services.sh up)"` works.
#
#   PostgreSQL 127.0.0.1:5432  DATABASE_URL=postgres://tollgate:tollgate@127.0.0.1:5432/tollgate
#   Redis      127.0.0.1:6379  REDIS_URL=redis://127.0.0.1:6379
#   Kafka      127.0.0.1:9092  KAFKA_BOOTSTRAP=127.0.0.1:9092 (controller 127.0.0.1:9093)
#   ClickHouse 127.0.0.1:8123  CLICKHOUSE_URL=http://127.0.0.1:8123 (native protocol on 9000)
#
# Packages come from Debian (postgresql, redis-server, clickhouse-server/-client, a Java 17
# runtime, maven); Kafka's jars come from Maven Central through scripts/services/kafka/pom.xml
# and are kept in the state directory. Data, logs, pid files and jars live in
#   TOLLGATE_SERVICES_DIR (default ${XDG_CACHE_HOME:-$HOME/.cache}/tollgate/services)
# except PostgreSQL's cluster, which must be reachable by the `postgres` user: it goes there when
# it can, else to <postgres home>/tollgate-services-<id> (override: TOLLGATE_PG_DIR).
#
# Other settings (environment):
#   TOLLGATE_KAFKA_TOPICS      topics to create (comma-separated; default
#                              llm.requests,llm.chunks,llm.completions,llm.audit)
#   TOLLGATE_KAFKA_PARTITIONS  partitions of each created topic (default 6)
#   TOLLGATE_KAFKA_HEAP        broker heap options (default "-Xms256m -Xmx512m")
#   TOLLGATE_SERVICES_TIMEOUT  seconds to wait for each service to answer (default 120)
#
# A server already listening on one of these ports that this script did not start is reused if
# it answers as expected (for PostgreSQL: with the tollgate credentials, or it gets them through
# the local `postgres` superuser); otherwise `up` stops with an explanation. `down` never stops
# a process it did not start.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TEMPLATES=$SCRIPT_DIR/services
STATE=${TOLLGATE_SERVICES_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tollgate/services}
RUN=$STATE/run
TIMEOUT=${TOLLGATE_SERVICES_TIMEOUT:-120}
KAFKA_TOPICS=${TOLLGATE_KAFKA_TOPICS:-llm.requests,llm.chunks,llm.completions,llm.audit}
KAFKA_PARTITIONS=${TOLLGATE_KAFKA_PARTITIONS:-6}
KAFKA_HEAP=${TOLLGATE_KAFKA_HEAP:--Xms256m -Xmx512m}

HOST=127.0.0.1
PG_PORT=5432
REDIS_PORT=6379
KAFKA_PORT=9092
KAFKA_CONTROLLER_PORT=9093
CH_HTTP_PORT=8123
CH_TCP_PORT=9000
PG_USER=tollgate
PG_PASSWORD=tollgate
PG_DB=tollgate
CH_DB=tollgate

ALL_SERVICES=(postgres redis kafka clickhouse)

log() { printf '[services] %s\n' "$*" >&2; }
die() {
  printf '[services] error: %s\n' "$*" >&2
  exit 1
}

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
}

# ---------------------------------------------------------------------------------------------
# small helpers

need_root() {
  [ "$(id -u)" -eq 0 ] || die "$1 needs root (it installs Debian packages and runs PostgreSQL as the postgres user)"
}

# true if something accepts TCP connections on 127.0.0.1:$1
port_open() {
  timeout 3 bash -c "exec 3<>/dev/tcp/$HOST/$1" 2>/dev/null
}

# prints the pid stored in file $1 if that process is alive and its command line contains $2
live_pid() {
  local file=$1 pattern=$2 pid
  [ -s "$file" ] || return 1
  pid=$(head -n1 "$file" | tr -dc '0-9')
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$pattern" || return 1
  printf '%s\n' "$pid"
}

# stops pid $1 (named $2): SIGTERM, then SIGKILL after $3 seconds
stop_pid() {
  local pid=$1 name=$2 grace=$3 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < grace * 5; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.2
  done
  log "$name (pid $pid) did not stop within ${grace}s; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
}

# marks the start of service $1: logs older than this are from an earlier run
mark_start() { touch -d '1 second ago' "$RUN/$1.starting"; }

LOG_SINCE= # when set to a file, show_log_tail skips logs not written since that file was
show_log_tail() {
  local f
  for f in "$@"; do
    [ -s "$f" ] || continue
    if [ -n "$LOG_SINCE" ] && [ -e "$LOG_SINCE" ] && ! [ "$f" -nt "$LOG_SINCE" ]; then continue; fi
    printf -- '--- last lines of %s ---\n' "$f" >&2
    tail -n 25 "$f" >&2
  done
}

# waits until command "$3..." succeeds; $1 = service name, $2 = pid file (or "") whose process
# must stay alive meanwhile; the log files to show on failure are in LOGS (array)
wait_for() {
  local name=$1 pidfile=$2 pattern=$3
  shift 3
  local deadline=$((SECONDS + TIMEOUT)) grace=$((SECONDS + 10))
  LOG_SINCE=$RUN/$name.starting
  until "$@" >/dev/null 2>&1; do
    # (a daemon writes its pid file a moment after it was launched)
    if [ -n "$pidfile" ] && ! live_pid "$pidfile" "$pattern" >/dev/null &&
      { [ -s "$pidfile" ] || ((SECONDS >= grace)); }; then
      show_log_tail "${LOGS[@]}"
      die "$name exited while starting (logs above)"
    fi
    if ((SECONDS >= deadline)); then
      show_log_tail "${LOGS[@]}"
      die "$name did not answer within ${TIMEOUT}s (logs above)"
    fi
    sleep 0.5
  done
}

# renders template $1 to $2, replacing @KEY@ by value for each KEY=value argument
render() {
  local src=$1 dst=$2 kv
  shift 2
  local args=()
  for kv in "$@"; do
    args+=(-e "s|@${kv%%=*}@|${kv#*=}|g")
  done
  sed "${args[@]}" "$src" >"$dst.tmp"
  mv "$dst.tmp" "$dst"
}

# ---------------------------------------------------------------------------------------------
# installation

POLICY_RC=/usr/sbin/policy-rc.d
POLICY_RC_CREATED=0
cleanup() {
  if [ "$POLICY_RC_CREATED" = 1 ]; then rm -f "$POLICY_RC"; fi
}
trap cleanup EXIT

apt_install() {
  [ $# -gt 0 ] || return 0
  need_root "installing $*"
  log "installing Debian packages: $*"
  # Keep the packages' own init scripts from starting system-wide copies of these servers
  # (which would take the ports): the standard policy-rc.d switch, only while installing.
  if [ ! -e "$POLICY_RC" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$POLICY_RC"
    chmod 755 "$POLICY_RC"
    POLICY_RC_CREATED=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  mkdir -p "$STATE"
  local aptlog=$STATE/apt.log
  if ! { apt-get update -q && apt-get install -y -q --no-install-recommends "$@"; } >"$aptlog" 2>&1; then
    show_log_tail "$aptlog"
    die "apt-get could not install $* (full output in $aptlog)"
  fi
  cleanup
  POLICY_RC_CREATED=0
}

java_major() { # prints the major version of $1 (a java binary), or 0
  local v
  v=$("$1" -version 2>&1 | awk -F'"' '/version/ {print $2; exit}') || true
  v=${v#1.}
  v=${v%%[.+-]*}
  printf '%s\n' "${v:-0}"
}

JAVA=
find_java() {
  local j
  for j in ${JAVA_HOME:+"$JAVA_HOME/bin/java"} "$(command -v java || true)" /usr/lib/jvm/java-17-openjdk-*/bin/java; do
    if [ -n "$j" ] && [ -x "$j" ] && [ "$(java_major "$j")" -ge 17 ]; then
      JAVA=$j
      return 0
    fi
  done
  return 1
}

KAFKA_DIR=$STATE/kafka
KAFKA_LIBS=$KAFKA_DIR/libs
POM=$TEMPLATES/kafka/pom.xml

kafka_libs_current() {
  [ -f "$KAFKA_LIBS/.pom.sha256" ] && [ "$(cat "$KAFKA_LIBS/.pom.sha256")" = "$(sha256sum <"$POM" | cut -d' ' -f1)" ]
}

ensure_installed() {
  local pkgs=() s
  for s in "${SERVICES[@]}"; do
    case $s in
      postgres) pg_bindir >/dev/null || pkgs+=(postgresql) ;;
      redis) command -v redis-server >/dev/null && command -v redis-cli >/dev/null || pkgs+=(redis-server redis-tools) ;;
      clickhouse)
        ch_server_bin >/dev/null || pkgs+=(clickhouse-server)
        command -v clickhouse-client >/dev/null || pkgs+=(clickhouse-client)
        command -v curl >/dev/null || pkgs+=(curl)
        ;;
      kafka)
        find_java || pkgs+=(openjdk-17-jre-headless)
        kafka_libs_current || command -v mvn >/dev/null || pkgs+=(maven)
        ;;
    esac
  done
  if [ ${#pkgs[@]} -gt 0 ]; then
    # shellcheck disable=SC2207 # package names have no spaces
    pkgs=($(printf '%s\n' "${pkgs[@]}" | sort -u))
    apt_install "${pkgs[@]}"
  fi
  if has kafka; then
    find_java || die "no Java 17 or newer found after installing openjdk-17-jre-headless"
    fetch_kafka_libs
  fi
}

fetch_kafka_libs() {
  kafka_libs_current && return 0
  command -v mvn >/dev/null || die "mvn not found"
  log "fetching the Kafka jars from Maven Central (scripts/services/kafka/pom.xml) into $KAFKA_LIBS"
  local tmp=$KAFKA_DIR/libs.new
  rm -rf "$tmp"
  mkdir -p "$tmp"
  local mvnlog=$KAFKA_DIR/mvn.log
  if ! JAVA_HOME=${JAVA_HOME:-$(dirname "$(dirname "$(readlink -f "$JAVA")")")} \
    mvn -B -Dstyle.color=never -f "$POM" dependency:copy-dependencies -DincludeScope=runtime \
    -DoutputDirectory="$tmp" >"$mvnlog" 2>&1; then
    show_log_tail "$mvnlog"
    die "mvn could not fetch the Kafka jars (full output in $mvnlog)"
  fi
  ls "$tmp"/kafka_2.13-*.jar >/dev/null 2>&1 || die "mvn ran but no kafka_2.13 jar was copied into $tmp"
  sha256sum <"$POM" | cut -d' ' -f1 >"$tmp/.pom.sha256"
  rm -rf "$KAFKA_LIBS"
  mv "$tmp" "$KAFKA_LIBS"
}

# ---------------------------------------------------------------------------------------------
# PostgreSQL

pg_bindir() {
  local d
  d=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n1)
  [ -n "$d" ] && [ -x "$d/initdb" ] || return 1
  printf '%s\n' "$d"
}

# the cluster's directory (data/, run/ for the socket, postgres.log); remembered in $RUN
pg_dir() {
  if [ -n "${TOLLGATE_PG_DIR:-}" ]; then
    printf '%s\n' "$TOLLGATE_PG_DIR"
  elif [ -s "$RUN/postgres.dir" ]; then
    cat "$RUN/postgres.dir"
  elif [ -d "$STATE" ] && runuser -u postgres -- test -x "$STATE" 2>/dev/null; then
    # the postgres user can reach the state directory: the cluster lives there (its own
    # subdirectory is handed to postgres)
    printf '%s\n' "$STATE/postgres"
  else
    # the state directory is not reachable by the postgres user (e.g. under /root)
    local home id
    home=$(getent passwd postgres | cut -d: -f6)
    id=$(printf '%s' "$STATE" | cksum | cut -d' ' -f1)
    printf '%s\n' "${home:-/var/lib/postgresql}/tollgate-services-$id"
  fi
}

as_postgres() { (cd / && runuser -u postgres -- "$@"); }

pg_ours_pid() { # pid of the postmaster of our cluster, if running
  local dir
  dir=$(pg_dir 2>/dev/null) || return 1
  live_pid "$dir/data/postmaster.pid" postgres
}

pg_psql() { # psql from PATH (Debian's wrapper), else the server's own
  if command -v psql >/dev/null; then psql "$@"; else "$(pg_bindir)/psql" "$@"; fi
}

pg_answers() {
  PGPASSWORD=$PG_PASSWORD PGCONNECT_TIMEOUT=5 pg_psql -h "$HOST" -p "$PG_PORT" -U "$PG_USER" -d "$PG_DB" \
    -qAtX -c 'select 1' >/dev/null 2>&1
}

pg_provision() { # $1 = socket directory of a cluster where the postgres user is superuser
  local sock=$1
  local psql=("$(pg_bindir)/psql" -h "$sock" -p "$PG_PORT" -U postgres -d postgres -qAtX -v ON_ERROR_STOP=1)
  as_postgres "${psql[@]}" -c "DO \$\$ BEGIN
      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER') THEN
        CREATE ROLE $PG_USER LOGIN CREATEDB PASSWORD '$PG_PASSWORD';
      ELSE
        ALTER ROLE $PG_USER LOGIN CREATEDB PASSWORD '$PG_PASSWORD';
      END IF;
    END \$\$;" >&2 || return 1
  if [ -z "$(as_postgres "${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")" ]; then
    as_postgres "${psql[@]}" -c "CREATE DATABASE $PG_DB OWNER $PG_USER" >&2 || return 1
  fi
}

PG_MODE=
start_postgres() {
  local bin dir
  bin=$(pg_bindir) || die "PostgreSQL's server binaries are not installed"
  dir=$(pg_dir)
  mkdir -p "$RUN"
  printf '%s\n' "$dir" >"$RUN/postgres.dir"
  if pg_ours_pid >/dev/null; then
    PG_MODE=ours
    return 0
  fi
  if port_open "$PG_PORT"; then
    PG_MODE=foreign
    return 0
  fi
  PG_MODE=ours
  if [ ! -s "$dir/data/PG_VERSION" ]; then
    log "postgres: creating a cluster in $dir/data"
    mkdir -p "$dir/data" "$dir/run"
    chown -R postgres:postgres "$dir"
    chmod 700 "$dir/data"
    as_postgres "$bin/initdb" -D "$dir/data" -U postgres --encoding=UTF8 --no-locale \
      --auth-local=peer --auth-host=scram-sha-256 >"$dir/initdb.log" 2>&1 ||
      {
        show_log_tail "$dir/initdb.log"
        die "postgres: initdb failed"
      }
    cat >>"$dir/data/postgresql.conf" <<EOF

# --- scripts/services.sh: a loopback-only development/test server ---
listen_addresses = '$HOST'
port = $PG_PORT
unix_socket_directories = '$dir/run'
max_connections = 200
# test data only: trade durability for speed on a shared 2-core machine
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
  fi
  local have want
  have=$(cat "$dir/data/PG_VERSION")
  want=$(basename "$(dirname "$bin")")
  [ "$have" = "$want" ] || die "postgres: the cluster in $dir/data is version $have but the installed server is $want; remove that directory (its data is lost) and run up again"
  # no live postmaster owns this cluster (checked above): a leftover pid file is stale
  rm -f "$dir/data/postmaster.pid"
  mkdir -p "$dir/run"
  chown postgres:postgres "$dir" "$dir/run"
  touch "$dir/postgres.log"
  chown postgres:postgres "$dir/postgres.log"
  log "postgres: starting on $HOST:$PG_PORT"
  mark_start postgres
  as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -W -s start 9>&- >&2 ||
    {
      show_log_tail "$dir/postgres.log"
      die "postgres: pg_ctl start failed"
    }
}

ready_postgres() {
  local bin dir
  bin=$(pg_bindir)
  dir=$(pg_dir)
  if [ "$PG_MODE" = foreign ]; then
    if pg_answers; then
      log "postgres: reusing the server already on $HOST:$PG_PORT (not started by this script)"
      return 0
    fi
    # a system cluster (e.g. started by the machine image): add our role and database through
    # its local superuser if we can
    if as_postgres "$bin/pg_isready" -q -h /var/run/postgresql -p "$PG_PORT" 2>/dev/null &&
      pg_provision /var/run/postgresql 2>/dev/null && pg_answers; then
      log "postgres: reusing the server already on $HOST:$PG_PORT (not started by this script); created role/database $PG_DB in it"
      return 0
    fi
    die "postgres: something else listens on $HOST:$PG_PORT and does not accept $PG_USER/$PG_PASSWORD on database $PG_DB, and its local postgres superuser was not reachable to create them. Stop it, or create that role and database in it, then run up again."
  fi
  LOGS=("$dir/postgres.log")
  wait_for postgres "$dir/data/postmaster.pid" postgres "$bin/pg_isready" -q -h "$HOST" -p "$PG_PORT"
  pg_provision "$dir/run" || die "postgres: could not create role/database $PG_DB"
  pg_answers || die "postgres: $PG_USER cannot log in to $PG_DB over TCP"
  log "postgres: ready ($HOST:$PG_PORT, data in $dir/data)"
}

stop_postgres() {
  local pid bin dir
  dir=$(pg_dir 2>/dev/null) || return 0
  pid=$(pg_ours_pid) || {
    log "postgres: not running (as started by this script)"
    return 0
  }
  log "postgres: stopping (pid $pid)"
  if bin=$(pg_bindir) && as_postgres "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null 2>&1; then
    return 0
  fi
  stop_pid "$pid" postgres 30
}

status_postgres() {
  local pid
  if pid=$(pg_ours_pid); then
    if port_open "$PG_PORT" && pg_answers; then
      status_line postgres up "$PG_PORT" "started by this script (pid $pid), data in $(pg_dir)/data"
    else
      status_line postgres down "$PG_PORT" "pid $pid is running but does not answer yet; log $(pg_dir)/postgres.log"
    fi
  elif port_open "$PG_PORT"; then
    if pg_answers; then
      status_line postgres up "$PG_PORT" "not started by this script; accepts $PG_USER on $PG_DB"
    else
      status_line postgres down "$PG_PORT" "port taken by a server not started by this script that does not accept $PG_USER on $PG_DB"
    fi
  else
    status_line postgres down "$PG_PORT" ""
  fi
}

# ---------------------------------------------------------------------------------------------
# Redis

REDIS_DIR=$STATE/redis

redis_ping() { # PONG over a raw socket: works before redis-cli is installed
  local reply
  reply=$(timeout 3 bash -c "exec 3<>/dev/tcp/$HOST/$REDIS_PORT && printf 'PING\r\n' >&3 && IFS= read -r line <&3 && printf '%s' \"\$line\"" 2>/dev/null) || return 1
  [ "${reply%$'\r'}" = "+PONG" ]
}

REDIS_MODE=
start_redis() {
  mkdir -p "$REDIS_DIR" "$RUN"
  if live_pid "$RUN/redis.pid" redis-server >/dev/null; then
    REDIS_MODE=ours
    return 0
  fi
  if port_open "$REDIS_PORT"; then
    REDIS_MODE=foreign
    return 0
  fi
  REDIS_MODE=ours
  rm -f "$RUN/redis.pid"
  log "redis: starting on $HOST:$REDIS_PORT"
  mark_start redis
  redis-server --bind "$HOST" --port "$REDIS_PORT" --daemonize yes \
    --dir "$REDIS_DIR" --pidfile "$RUN/redis.pid" --logfile "$REDIS_DIR/redis.log" \
    --save "" --appendonly no </dev/null 9>&- >&2 ||
    {
      show_log_tail "$REDIS_DIR/redis.log"
      die "redis: redis-server failed to start"
    }
}

ready_redis() {
  if [ "$REDIS_MODE" = foreign ]; then
    redis_ping || die "redis: something else listens on $HOST:$REDIS_PORT and does not answer PING (not started by this script; stop it and run up again)"
    log "redis: reusing the server already on $HOST:$REDIS_PORT (not started by this script)"
    return 0
  fi
  LOGS=("$REDIS_DIR/redis.log")
  wait_for redis "$RUN/redis.pid" redis-server redis_ping
  [ "$(redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] || die "redis: redis-cli ping failed"
  log "redis: ready ($HOST:$REDIS_PORT)"
}

stop_redis() {
  local pid
  pid=$(live_pid "$RUN/redis.pid" redis-server) || {
    log "redis: not running (as started by this script)"
    return 0
  }
  log "redis: stopping (pid $pid)"
  stop_pid "$pid" redis 30
  rm -f "$RUN/redis.pid"
}

status_redis() {
  local pid
  if pid=$(live_pid "$RUN/redis.pid" redis-server); then
    if redis_ping; then
      status_line redis up "$REDIS_PORT" "started by this script (pid $pid)"
    else
      status_line redis down "$REDIS_PORT" "pid $pid is running but does not answer PING; log $REDIS_DIR/redis.log"
    fi
  elif port_open "$REDIS_PORT"; then
    if redis_ping; then
      status_line redis up "$REDIS_PORT" "not started by this script"
    else
      status_line redis down "$REDIS_PORT" "port taken by something not started by this script that does not answer PING"
    fi
  else
    status_line redis down "$REDIS_PORT" ""
  fi
}

# ---------------------------------------------------------------------------------------------
# ClickHouse

CH_DIR=$STATE/clickhouse

ch_server_bin() {
  local b
  for b in "$(command -v clickhouse-server || true)" /usr/sbin/clickhouse-server /usr/bin/clickhouse-server; do
    [ -n "$b" ] && [ -x "$b" ] && {
      printf '%s\n' "$b"
      return 0
    }
  done
  return 1
}

ch_ping() { [ "$(curl -fsS --max-time 3 "http://$HOST:$CH_HTTP_PORT/ping" 2>/dev/null)" = "Ok." ]; }

ch_query() { # $1 = SQL; prints the result
  curl -fsS --max-time 30 --data-binary "$1" "http://$HOST:$CH_HTTP_PORT/"
}

CH_MODE=
start_clickhouse() {
  local bin
  bin=$(ch_server_bin) || die "clickhouse-server is not installed"
  mkdir -p "$CH_DIR"/{etc,data,tmp,user_files,format_schemas,log} "$RUN"
  if live_pid "$RUN/clickhouse.pid" clickhouse >/dev/null; then
    CH_MODE=ours
    return 0
  fi
  if port_open "$CH_HTTP_PORT" || port_open "$CH_TCP_PORT"; then
    CH_MODE=foreign
    return 0
  fi
  CH_MODE=ours
  render "$TEMPLATES/clickhouse/config.xml" "$CH_DIR/etc/config.xml" "DIR=$CH_DIR"
  render "$TEMPLATES/clickhouse/users.xml" "$CH_DIR/etc/users.xml" "DIR=$CH_DIR"
  log "clickhouse: starting on $HOST:$CH_HTTP_PORT (native $CH_TCP_PORT)"
  mark_start clickhouse
  (
    cd "$CH_DIR"
    exec setsid "$bin" --config-file="$CH_DIR/etc/config.xml" \
      </dev/null >"$CH_DIR/log/stdout.log" 2>&1 9>&-
  ) &
  printf '%s\n' "$!" >"$RUN/clickhouse.pid"
}

ready_clickhouse() {
  if [ "$CH_MODE" = foreign ]; then
    ch_ping || die "clickhouse: something else listens on $HOST:$CH_HTTP_PORT or $CH_TCP_PORT and does not answer http://$HOST:$CH_HTTP_PORT/ping (not started by this script; stop it and run up again)"
    log "clickhouse: reusing the server already on $HOST:$CH_HTTP_PORT (not started by this script)"
  else
    LOGS=("$CH_DIR/log/clickhouse-server.err.log" "$CH_DIR/log/stdout.log")
    wait_for clickhouse "$RUN/clickhouse.pid" clickhouse ch_ping
  fi
  ch_query "CREATE DATABASE IF NOT EXISTS $CH_DB" >/dev/null || die "clickhouse: could not create database $CH_DB"
  log "clickhouse: ready ($HOST:$CH_HTTP_PORT, version $(ch_query 'SELECT version()' 2>/dev/null || echo '?'))"
}

stop_clickhouse() {
  local pid
  pid=$(live_pid "$RUN/clickhouse.pid" clickhouse) || {
    log "clickhouse: not running (as started by this script)"
    return 0
  }
  log "clickhouse: stopping (pid $pid)"
  stop_pid "$pid" clickhouse 60
  rm -f "$RUN/clickhouse.pid"
}

status_clickhouse() {
  local pid
  if pid=$(live_pid "$RUN/clickhouse.pid" clickhouse); then
    if ch_ping; then
      status_line clickhouse up "$CH_HTTP_PORT" "started by this script (pid $pid)"
    else
      status_line clickhouse down "$CH_HTTP_PORT" "pid $pid is running but does not answer /ping; log $CH_DIR/log"
    fi
  elif port_open "$CH_HTTP_PORT"; then
    if ch_ping; then
      status_line clickhouse up "$CH_HTTP_PORT" "not started by this script"
    else
      status_line clickhouse down "$CH_HTTP_PORT" "port taken by something not started by this script that does not answer /ping"
    fi
  else
    status_line clickhouse down "$CH_HTTP_PORT" ""
  fi
}

# ---------------------------------------------------------------------------------------------
# Kafka

# runs a Kafka command-line tool class from the jars in a small client JVM, bounded in time
kafka_tool() {
  local cls=$1
  shift
  timeout "${KAFKA_TOOL_TIMEOUT:-120}" "$JAVA" -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -Djava.awt.headless=true -Dlog4j2.configurationFile="$KAFKA_DIR/etc/tools-log4j2.xml" \
    -cp "$KAFKA_LIBS/*" "$cls" "$@"
}

KAFKA_TOPIC_LIST=
kafka_answers() { # lists the topics (into KAFKA_TOPIC_LIST); fails if the broker does not answer
  [ -n "$JAVA" ] && [ -d "$KAFKA_LIBS" ] || return 1
  port_open "$KAFKA_PORT" || return 1
  KAFKA_TOPIC_LIST=$(KAFKA_TOOL_TIMEOUT=30 kafka_tool org.apache.kafka.tools.TopicCommand \
    --bootstrap-server "$HOST:$KAFKA_PORT" --list 2>/dev/null)
}

kafka_render_configs() {
  mkdir -p "$KAFKA_DIR"/{etc,data,log} "$RUN"
  render "$TEMPLATES/kafka/server.properties" "$KAFKA_DIR/etc/server.properties" "DATA_DIR=$KAFKA_DIR/data"
  cp "$TEMPLATES/kafka/log4j2.xml" "$KAFKA_DIR/etc/log4j2.xml"
  cp "$TEMPLATES/kafka/tools-log4j2.xml" "$KAFKA_DIR/etc/tools-log4j2.xml"
}

KAFKA_MODE=
start_kafka() {
  kafka_render_configs
  if live_pid "$RUN/kafka.pid" kafka.Kafka >/dev/null; then
    KAFKA_MODE=ours
    return 0
  fi
  if port_open "$KAFKA_PORT" || port_open "$KAFKA_CONTROLLER_PORT"; then
    KAFKA_MODE=foreign
    return 0
  fi
  KAFKA_MODE=ours
  if [ ! -s "$KAFKA_DIR/data/meta.properties" ]; then
    local id
    [ -s "$KAFKA_DIR/cluster.id" ] ||
      kafka_tool kafka.tools.StorageTool random-uuid >"$KAFKA_DIR/cluster.id" 2>>"$KAFKA_DIR/log/format.log"
    id=$(tr -d '[:space:]' <"$KAFKA_DIR/cluster.id")
    [ -n "$id" ] || die "kafka: could not generate a cluster id (see $KAFKA_DIR/log/format.log)"
    log "kafka: formatting storage in $KAFKA_DIR/data (cluster id $id, single combined broker/controller)"
    kafka_tool kafka.tools.StorageTool format --cluster-id "$id" \
      --config "$KAFKA_DIR/etc/server.properties" --standalone --ignore-formatted \
      >>"$KAFKA_DIR/log/format.log" 2>&1 ||
      {
        show_log_tail "$KAFKA_DIR/log/format.log"
        die "kafka: formatting the storage failed"
      }
  fi
  log "kafka: starting on $HOST:$KAFKA_PORT (controller $HOST:$KAFKA_CONTROLLER_PORT)"
  mark_start kafka
  # shellcheck disable=SC2086 # KAFKA_HEAP holds several JVM options
  (
    cd "$KAFKA_DIR"
    exec setsid "$JAVA" $KAFKA_HEAP -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
      -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
      -Djava.awt.headless=true \
      -Dlog4j2.configurationFile="$KAFKA_DIR/etc/log4j2.xml" -Dkafka.logs.dir="$KAFKA_DIR/log" \
      -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_DIR/etc/server.properties" \
      </dev/null >"$KAFKA_DIR/log/stdout.log" 2>&1 9>&-
  ) &
  printf '%s\n' "$!" >"$RUN/kafka.pid"
}

ready_kafka() {
  if [ "$KAFKA_MODE" = foreign ]; then
    kafka_answers || die "kafka: something else listens on $HOST:$KAFKA_PORT or $KAFKA_CONTROLLER_PORT and does not answer as a Kafka broker (not started by this script; stop it and run up again)"
    log "kafka: reusing the broker already on $HOST:$KAFKA_PORT (not started by this script)"
  else
    LOGS=("$KAFKA_DIR/log/server.log" "$KAFKA_DIR/log/stdout.log")
    wait_for kafka "$RUN/kafka.pid" kafka.Kafka kafka_answers
  fi
  local t
  IFS=',' read -r -a topics <<<"$KAFKA_TOPICS"
  for t in "${topics[@]}"; do
    t=$(printf '%s' "$t" | tr -d '[:space:]')
    [ -n "$t" ] || continue
    if printf '%s\n' "$KAFKA_TOPIC_LIST" | grep -qxF -- "$t"; then continue; fi
    log "kafka: creating topic $t ($KAFKA_PARTITIONS partitions)"
    kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$HOST:$KAFKA_PORT" \
      --create --if-not-exists --topic "$t" --partitions "$KAFKA_PARTITIONS" \
      --replication-factor 1 >/dev/null || die "kafka: could not create topic $t"
  done
  log "kafka: ready ($HOST:$KAFKA_PORT, topics ${KAFKA_TOPICS})"
}

stop_kafka() {
  local pid
  pid=$(live_pid "$RUN/kafka.pid" kafka.Kafka) || {
    log "kafka: not running (as started by this script)"
    return 0
  }
  log "kafka: stopping (pid $pid)"
  stop_pid "$pid" kafka 60
  rm -f "$RUN/kafka.pid"
}

status_kafka() {
  local pid
  find_java || true
  if pid=$(live_pid "$RUN/kafka.pid" kafka.Kafka); then
    if kafka_answers; then
      status_line kafka up "$KAFKA_PORT" "started by this script (pid $pid)"
    else
      status_line kafka down "$KAFKA_PORT" "pid $pid is running but does not answer yet; log $KAFKA_DIR/log/server.log"
    fi
  elif port_open "$KAFKA_PORT"; then
    if kafka_answers; then
      status_line kafka up "$KAFKA_PORT" "not started by this script"
    elif [ -z "$JAVA" ] || [ ! -d "$KAFKA_LIBS" ]; then
      status_line kafka up "$KAFKA_PORT" "port open, not started by this script (not checked further: Kafka jars not fetched yet)"
    else
      status_line kafka down "$KAFKA_PORT" "port taken by something not started by this script that does not answer as Kafka"
    fi
  else
    status_line kafka down "$KAFKA_PORT" ""
  fi
}

# ---------------------------------------------------------------------------------------------
# commands

STATUS_ALL_UP=1
status_line() { # service, up|down, port, note
  [ "$2" = up ] || STATUS_ALL_UP=0
  printf '%-11s %-5s %s:%-5s %s\n' "$1" "$2" "$HOST" "$3" "$4"
}

has() {
  local s
  for s in "${SERVICES[@]}"; do [ "$s" = "$1" ] && return 0; done
  return 1
}

print_env() {
  has postgres && printf 'export DATABASE_URL=postgres://%s:%s@%s:%s/%s\n' "$PG_USER" "$PG_PASSWORD" "$HOST" "$PG_PORT" "$PG_DB"
  has redis && printf 'export REDIS_URL=redis://%s:%s\n' "$HOST" "$REDIS_PORT"
  has kafka && printf 'export KAFKA_BOOTSTRAP=%s:%s\n' "$HOST" "$KAFKA_PORT"
  has clickhouse && printf 'export CLICKHOUSE_URL=http://%s:%s\n' "$HOST" "$CH_HTTP_PORT"
  return 0
}

# serialises up/down; fd 9 is closed in every server this script starts (9>&-) so that the lock
# ends with the script
lock_state() {
  mkdir -p "$STATE"
  exec 9>"$STATE/.lock"
  flock -w 600 9 || die "another scripts/services.sh is still running (lock $STATE/.lock)"
}

cmd_up() {
  need_root up
  lock_state
  local started=$SECONDS s
  ensure_installed
  # start everything first (Kafka takes longest), then wait for each in turn
  for s in kafka postgres redis clickhouse; do
    if has "$s"; then "start_$s"; fi
  done
  for s in postgres redis clickhouse kafka; do
    if has "$s"; then "ready_$s"; fi
  done
  log "up in $((SECONDS - started))s: ${SERVICES[*]} (state in $STATE)"
  print_env
}

cmd_down() {
  lock_state
  local s pids=() rc=0 p
  # the servers do not depend on each other: stop them in parallel
  for s in kafka clickhouse redis postgres; do
    if has "$s"; then
      "stop_$s" &
      pids+=("$!")
    fi
  done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  return "$rc"
}

# stops the selected services and deletes their data (the Kafka jars and packages stay)
cmd_reset() {
  need_root reset
  cmd_down
  local s dir
  for s in "${SERVICES[@]}"; do
    case $s in
      postgres)
        dir=$(pg_dir)
        case $dir in */tollgate-services-* | "$STATE"/*) rm -rf "$dir" ;; *) log "postgres: not deleting $dir (not a directory this script made)" ;; esac
        rm -f "$RUN/postgres.dir"
        ;;
      redis) rm -rf "${REDIS_DIR:?}" ;;
      clickhouse) rm -rf "${CH_DIR:?}" ;;
      kafka) rm -rf "${KAFKA_DIR:?}"/{data,cluster.id,log,etc} ;;
    esac
    log "$s: data deleted"
  done
}

cmd_status() {
  local s
  for s in postgres redis kafka clickhouse; do
    if has "$s"; then "status_$s"; fi
  done
  [ "$STATUS_ALL_UP" = 1 ]
}

main() {
  local cmd=${1:-}
  [ $# -gt 0 ] && shift
  SERVICES=()
  local s
  for s in "$@"; do
    case $s in
      postgres | postgresql | pg) SERVICES+=(postgres) ;;
      redis) SERVICES+=(redis) ;;
      kafka) SERVICES+=(kafka) ;;
      clickhouse | ch) SERVICES+=(clickhouse) ;;
      *) die "unknown service '$s' (known: ${ALL_SERVICES[*]})" ;;
    esac
  done
  [ ${#SERVICES[@]} -gt 0 ] || SERVICES=("${ALL_SERVICES[@]}")
  case $cmd in
    up) cmd_up ;;
    down) cmd_down ;;
    reset) cmd_reset ;;
    status) cmd_status ;;
    env) print_env ;;
    -h | --help | help) usage ;;
    *)
      usage
      exit 2
      ;;
  esac
}

main "$@"

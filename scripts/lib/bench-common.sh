# Helpers shared by the benchmark scripts (sourced, not run). The sourcing script defines
# `log` and `die` first.
# shellcheck shell=bash

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() {
    local port tries=0
    while ((tries < 100)); do
        port=$((20000 + RANDOM % 40000))
        if ! port_in_use "$port"; then
            echo "$port"
            return 0
        fi
        tries=$((tries + 1))
    done
    die "no free port found"
}

# Status code of GET http://127.0.0.1:PORT/PATH, or nothing (plain bash, no HTTP client needed).
http_status() {
    local port=$1 path=$2 line=""
    {
        exec 3<>"/dev/tcp/127.0.0.1/$port" &&
            printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1:%s\r\nConnection: close\r\n\r\n' "$path" "$port" >&3 &&
            IFS= read -r -t 2 line <&3
        exec 3<&- 3>&-
    } 2>/dev/null || true
    line=${line%$'\r'}
    [[ $line == HTTP/* ]] && echo "${line#* }" | cut -d' ' -f1
    return 0
}

# wait_for DESCRIPTION PID LOGFILE COMMAND...: polls COMMAND for up to 60 s while PID lives.
wait_for() {
    local what=$1 pid=$2 logfile=$3
    shift 3
    local i
    for ((i = 0; i < 600; i++)); do
        if "$@"; then
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$logfile" >&2 || true
            die "$what exited before it was ready"
        fi
        sleep 0.1
    done
    tail -n 30 "$logfile" >&2 || true
    die "$what not ready after 60 s"
}

# Number NAME (top level) or PARENT.NAME (one level down) from a one-line JSON report.
json_num() {
    local file=$1 key=$2
    if [[ $key == *.* ]]; then
        sed -n "s/.*\"${key%%.*}\":{[^}]*\"${key#*.}\":\\([-0-9.eE+]*\\).*/\\1/p" "$file"
    else
        sed -n "s/.*\"$key\":\\([-0-9.eE+]*\\).*/\\1/p" "$file"
    fi
}

calc() { awk "BEGIN { printf \"$1\", $2 }"; }

# A key for tenant `default` in DATA_DIR (the tenant is created if missing), from GATEWAY_BIN.
default_tenant_key() {
    local data_dir=$1 out key
    if ! out=$("$GATEWAY_BIN" tenants create default --data-dir "$data_dir" 2>&1); then
        [[ $out == *"exist"* ]] || die "tenants create failed: $out"
    fi
    key=$("$GATEWAY_BIN" keys create --tenant default --data-dir "$data_dir" | awk 'NF { k = $0 } END { print k }')
    key=${key//[[:space:]]/}
    [[ -n $key ]] || die "keys create printed no key"
    echo "$key"
}

# serve_gateway NAME CONFIG DATA_DIR PORT LOG: starts GATEWAY_BIN on 127.0.0.1:PORT, adds it
# to PIDS and waits until it is ready; its pid is left in SERVED_PID.
serve_gateway() {
    local name=$1 config=$2 data_dir=$3 port=$4 logfile=$5
    "$GATEWAY_BIN" serve --config "$config" --data-dir "$data_dir" --listen "127.0.0.1:$port" \
        >"$logfile" 2>&1 &
    SERVED_PID=$!
    PIDS+=("$SERVED_PID")
    # shellcheck disable=SC2317 # called by wait_for
    gateway_ready() { [[ $(http_status "$port" /readyz) == 200 ]]; }
    wait_for "$name" "$SERVED_PID" "$logfile" gateway_ready
}

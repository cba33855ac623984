#!/usr/bin/env bash
# Portcullis benchmark: every contender on loopback, every scenario, contenders alternated within
# each round, medians over rounds, a Markdown table with ratios on stdout (and in
# bench/results/latest.md).
#
#   bash bench/run.sh            # full run (ROUNDS=3, DURATION=4 s per measurement)
#   ROUNDS=1 DURATION=2 bash bench/run.sh   # quick look
#
# Installs what it needs on Debian (nginx, squid-openssl, tinyproxy, openssl, python3; oha via
# cargo install), builds Portcullis in release mode, and stops every process it started, also
# on failure or Ctrl-C. Traffic stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-4}
CONNECTIONS=${CONNECTIONS:-50}
TUNNELS=${TUNNELS:-10000}
BIG_MIB=${BIG_MIB:-512}
# PIN=1: the load generator on CPU 0, every server on the other CPUs, so a proxy's figure is not
# also a measure of how much CPU the load generator took from it.
PIN=${PIN:-0}
# SCENARIOS=12: run only these scenarios (digits 1-6).
SCENARIOS=${SCENARIOS:-123456}
# BASELINE=/path/to/portcullis: another build (e.g. of an older commit) measured in the same run
# as "portcullis (baseline)" in scenarios 1, 3 and 4, on ports 3129/9091.
BASELINE=${BASELINE:-}
want() { [[ "$SCENARIOS" == *"$1"* ]]; }
if [ "$PIN" = 1 ] && [ "$(nproc)" -ge 2 ]; then
  CLIENT_CPUS="taskset -c 0"
  SERVER_CPUS="taskset -c 1-$(($(nproc) - 1))"
else
  CLIENT_CPUS=""
  SERVER_CPUS=""
fi
WORK=$(mktemp -d /tmp/portcullis-bench.XXXXXX)
chmod 755 "$WORK"
PIDS=()

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

cleanup() {
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
  sleep 0.5
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
  done
  pkill -f "$WORK" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# --- install -------------------------------------------------------------------------------
need=()
for pair in nginx:nginx squid:squid-openssl tinyproxy:tinyproxy openssl:openssl python3:python3 curl:curl; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need+=("${pair#*:}")
done
if [ "${#need[@]}" -gt 0 ]; then
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" ca-certificates >/dev/null
fi
# Debian starts the packaged daemons; the benchmark runs its own.
for svc in nginx squid tinyproxy; do
  (systemctl stop "$svc" || service "$svc" stop) >/dev/null 2>&1 || true
done
export PATH="$HOME/.cargo/bin:/usr/sbin:$PATH"
if ! command -v oha >/dev/null 2>&1; then
  log "installing oha (cargo install, a few minutes the first time)"
  cargo install oha --locked --quiet
fi
log "building portcullis (release)"
cargo build --release --quiet
PORTCULLIS=$ROOT/target/release/portcullis
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# --- pki -----------------------------------------------------------------------------------
cd "$WORK"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj "/CN=bench origin CA" -keyout origin-ca.key -out origin-ca.pem \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=127.0.0.1" \
  -keyout origin.key -out origin.csr 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > origin.ext
openssl x509 -req -in origin.csr -CA origin-ca.pem -CAkey origin-ca.key -CAcreateserial \
  -days 2 -extfile origin.ext -out origin.pem 2>/dev/null
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj "/CN=bench squid CA" -keyout squid-ca.key -out squid-ca.pem \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
cat squid-ca.pem squid-ca.key > squid-ca-bundle.pem
mkdir -p www && head -c 100 /dev/zero | tr '\0' 'x' > www/small && truncate -s "${BIG_MIB}M" www/big
chmod -R a+rX "$WORK"

# --- origin and nginx reverse proxy --------------------------------------------------------
mkdir -p nginx/logs
cat > nginx/nginx.conf <<EOF
daemon off;
worker_processes auto;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/logs/error.log crit;
worker_rlimit_nofile 65536;
events { worker_connections 30000; }
http {
  access_log off;
  sendfile on;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  server { listen 127.0.0.1:18080; root $WORK/www; }
  server {
    # "listen … http2" works on every nginx (the "http2 on" directive needs 1.25.1+).
    listen 127.0.0.1:18443 ssl http2;
    ssl_certificate $WORK/origin.pem;
    ssl_certificate_key $WORK/origin.key;
    root $WORK/www;
  }
  upstream origin { server 127.0.0.1:18080; keepalive 64; }
  server {
    listen 127.0.0.1:18081;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
$SERVER_CPUS nginx -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" &
PIDS+=($!)

# --- squid (forward on 13128, ssl-bump on 13129) -------------------------------------------
mkdir -p squid
/usr/lib/squid/security_file_certgen -c -s "$WORK/squid/ssl_db" -M 16MB >/dev/null
chown -R proxy:proxy "$WORK/squid" 2>/dev/null || true
cat > squid/squid.conf <<EOF
http_port 127.0.0.1:13128
http_port 127.0.0.1:13129 ssl-bump generate-host-certificates=on dynamic_cert_mem_cache_size=16MB tls-cert=$WORK/squid-ca-bundle.pem
sslcrtd_program /usr/lib/squid/security_file_certgen -s $WORK/squid/ssl_db -M 16MB
sslcrtd_children 8 startup=2 idle=1
acl step1 at_step SslBump1
ssl_bump peek step1
ssl_bump bump all
tls_outgoing_options cafile=$WORK/origin-ca.pem
request_header_add Authorization "Bearer bench-token" all
acl SSL_ports port 18443
acl Safe_ports port 18080 18443
http_access allow localhost
http_access deny all
cache deny all
access_log none
cache_log $WORK/squid/cache.log
pid_filename $WORK/squid/squid.pid
coredump_dir $WORK/squid
max_filedescriptors 65536
shutdown_lifetime 1 seconds
EOF
$SERVER_CPUS squid -N -f "$WORK/squid/squid.conf" 2>>"$WORK/squid/cache.log" &
PIDS+=($!)

# --- tinyproxy -----------------------------------------------------------------------------
cat > tinyproxy.conf <<EOF
User nobody
Group nogroup
Port 18888
Listen 127.0.0.1
Timeout 600
MaxClients 20000
LogLevel Critical
ConnectPort 18443
EOF
$SERVER_CPUS tinyproxy -d -c "$WORK/tinyproxy.conf" >/dev/null 2>&1 &
PIDS+=($!)

# --- portcullis ----------------------------------------------------------------------------
portcullis_config() { # $1 = audit output
  cat <<EOF
[listen]
proxy = "127.0.0.1:3128"
admin = "127.0.0.1:9090"
[limits]
max_connections = 30000
[tls]
ca_cert = "$WORK/portcullis-ca.pem"
ca_key = "$WORK/portcullis-ca-key.pem"
extra_upstream_ca = ["$WORK/origin-ca.pem"]
[network]
allow_cidrs = ["127.0.0.0/8"]
[audit]
output = "$1"
[credentials.bench]
bearer = { value = "bench-token" }
[[hosts]]
host = "127.0.0.1"
ports = [18080, 18081]
[[hosts]]
host = "127.0.0.1"
ports = [18443]
credential = "bench"
intercept = "always"
EOF
}
portcullis_config stdout > portcullis.toml
portcullis_config "$WORK/audit.log" > portcullis-audit.toml
# A separate tunnel-only config for the CONNECT scenarios (no interception of 18443).
portcullis_config stdout | sed 's/^intercept = "always"/intercept = "never"/; /^credential = "bench"/d' > portcullis-tunnel.toml

BASELINE_PID=
if [ -n "$BASELINE" ]; then
  sed 's/^proxy = "127.0.0.1:3128"/proxy = "127.0.0.1:3129"/; s/^admin = "127.0.0.1:9090"/admin = "127.0.0.1:9091"/' \
    portcullis.toml > portcullis-baseline.toml
  $SERVER_CPUS "$BASELINE" run -c "$WORK/portcullis-baseline.toml" >/dev/null 2>"$WORK/baseline.log" &
  BASELINE_PID=$!
  PIDS+=($BASELINE_PID)
fi

PORTCULLIS_PID=
start_portcullis() { # $1 = config
  stop_portcullis
  $SERVER_CPUS "$PORTCULLIS" run -c "$1" >/dev/null 2>"$WORK/portcullis.log" &
  PORTCULLIS_PID=$!
  PIDS+=($PORTCULLIS_PID)
  wait_port 3128
}
stop_portcullis() {
  if [ -n "$PORTCULLIS_PID" ]; then
    kill "$PORTCULLIS_PID" 2>/dev/null || true
    wait "$PORTCULLIS_PID" 2>/dev/null || true
    PORTCULLIS_PID=
  fi
}
wait_port() {
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  log "port $1 did not open"; return 1
}
for port in 18080 18443 18081 13128 13129 18888; do wait_port "$port"; done
[ -z "$BASELINE" ] || wait_port 3129
start_portcullis "$WORK/portcullis.toml"

# --- measurement helpers -------------------------------------------------------------------
RESULTS=$WORK/results.tsv
: > "$RESULTS"
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$RESULTS"; } # scenario contender metric value

# CPU time (user + system, in clock ticks) a process has used so far.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

oha_run() { # scenario contender url [oha args...]; CPU_PID=pid also records its CPU time per request
  local scenario=$1 contender=$2 url=$3; shift 3
  local pid=${CPU_PID:-} before=0 ticks=
  [ -n "$pid" ] && before=$(cpu_ticks "$pid")
  if $CLIENT_CPUS oha --no-tui --output-format json -z "${DURATION}s" -c "$CONNECTIONS" "$@" "$url" > "$WORK/oha.json" 2>"$WORK/oha.err"; then
    [ -n "$pid" ] && ticks=$(($(cpu_ticks "$pid") - before))
    CPU_TICKS=$ticks CLK_TCK=$(getconf CLK_TCK) \
      python3 "$ROOT/bench/report.py" oha "$WORK/oha.json" "$scenario" "$contender" "$RESULTS"
  else
    log "oha failed for $scenario / $contender: $(head -c 300 "$WORK/oha.err")"
  fi
}

download() { # contender proxy-or-empty
  # HTTP/1.1 for every contender: h2's flow-control windows would measure nginx's h2 settings.
  local args=(-s -o /dev/null --http1.1 --cacert "$WORK/origin-ca.pem" -w '%{speed_download}' --max-time 120)
  [ -n "$2" ] && args+=(-x "$2")
  local bps
  bps=$($CLIENT_CPUS curl "${args[@]}" "https://127.0.0.1:18443/big") || { log "download failed: $1"; return 0; }
  record "2 tunnel 512 MiB" "$1" "MB/s" "$(python3 -c "print(f'{$bps / 1e6:.1f}')")"
}

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

# --- scenarios -----------------------------------------------------------------------------
SMALL=http://127.0.0.1:18080/small
for round in $(seq 1 "$ROUNDS"); do
  if want 1; then
  log "round $round/$ROUNDS: scenario 1 (plain HTTP keep-alive, $CONNECTIONS connections)"
  oha_run "1 plain HTTP" direct "$SMALL"
  oha_run "1 plain HTTP" "nginx reverse proxy" http://127.0.0.1:18081/small
  oha_run "1 plain HTTP" squid "$SMALL" -x http://127.0.0.1:13128
  oha_run "1 plain HTTP" tinyproxy "$SMALL" -x http://127.0.0.1:18888
  CPU_PID=$PORTCULLIS_PID oha_run "1 plain HTTP" portcullis "$SMALL" -x http://127.0.0.1:3128
  [ -z "$BASELINE" ] || CPU_PID=$BASELINE_PID oha_run "1 plain HTTP" "portcullis (baseline)" "$SMALL" -x http://127.0.0.1:3129
  fi

  if want 6; then
  log "round $round: scenario 6 (scenario 1 with audit to a file)"
  start_portcullis "$WORK/portcullis-audit.toml"
  oha_run "6 plain HTTP, audit file" portcullis "$SMALL" -x http://127.0.0.1:3128
  start_portcullis "$WORK/portcullis.toml"
  oha_run "6 plain HTTP, audit file" "portcullis (audit to stdout→/dev/null)" "$SMALL" -x http://127.0.0.1:3128
  fi

  if want 3; then
  log "round $round: scenario 3 (intercepted HTTPS, keep-alive)"
  oha_run "3 intercepted keep-alive" squid https://127.0.0.1:18443/small -x http://127.0.0.1:13129 --insecure
  CPU_PID=$PORTCULLIS_PID oha_run "3 intercepted keep-alive" portcullis https://127.0.0.1:18443/small -x http://127.0.0.1:3128 --insecure
  [ -z "$BASELINE" ] || CPU_PID=$BASELINE_PID oha_run "3 intercepted keep-alive" "portcullis (baseline)" https://127.0.0.1:18443/small -x http://127.0.0.1:3129 --insecure
  fi
  if want 4; then
  log "round $round: scenario 4 (intercepted HTTPS, a new connection per request)"
  oha_run "4 intercepted new connection" squid https://127.0.0.1:18443/small -x http://127.0.0.1:13129 --insecure --disable-keepalive
  CPU_PID=$PORTCULLIS_PID oha_run "4 intercepted new connection" portcullis https://127.0.0.1:18443/small -x http://127.0.0.1:3128 --insecure --disable-keepalive
  [ -z "$BASELINE" ] || CPU_PID=$BASELINE_PID oha_run "4 intercepted new connection" "portcullis (baseline)" https://127.0.0.1:18443/small -x http://127.0.0.1:3129 --insecure --disable-keepalive
  fi

  if want 2; then
  log "round $round: scenario 2 (CONNECT tunnel, ${BIG_MIB} MiB HTTPS download)"
  start_portcullis "$WORK/portcullis-tunnel.toml"
  download direct ""
  download squid http://127.0.0.1:13128
  download tinyproxy http://127.0.0.1:18888
  download portcullis http://127.0.0.1:3128
  start_portcullis "$WORK/portcullis.toml"
  fi
done

if want 5; then
log "scenario 5 (memory: idle, and $TUNNELS idle tunnels)"
start_portcullis "$WORK/portcullis-tunnel.toml"
sleep 1
idle=$(rss_kib "$PORTCULLIS_PID")
record "5 memory" portcullis "idle RSS MiB" "$(python3 -c "print(f'{$idle / 1024:.1f}')")"
python3 "$ROOT/bench/tunnels.py" 127.0.0.1 3128 127.0.0.1:18443 "$TUNNELS" "$WORK/tunnels.ready" &
HOLDER=$!
PIDS+=($HOLDER)
for _ in $(seq 1 600); do [ -f "$WORK/tunnels.ready" ] && break; sleep 0.1; done
opened=$(cat "$WORK/tunnels.ready" 2>/dev/null || echo 0)
sleep 1
loaded=$(rss_kib "$PORTCULLIS_PID")
kill "$HOLDER" 2>/dev/null || true
record "5 memory" portcullis "tunnels open" "$opened"
record "5 memory" portcullis "RSS with tunnels MiB" "$(python3 -c "print(f'{$loaded / 1024:.1f}')")"
if [ "$opened" -gt 0 ]; then
  record "5 memory" portcullis "KiB per tunnel" "$(python3 -c "print(f'{($loaded - $idle) / $opened:.1f}')")"
fi
for name in squid tinyproxy; do
  pid=$(pgrep -o -x "$name" || true)
  [ -n "$pid" ] && record "5 memory" "$name" "idle RSS MiB" "$(python3 -c "print(f'{$(rss_kib "$pid") / 1024:.1f}')")"
done
stop_portcullis
fi

# --- report --------------------------------------------------------------------------------
mkdir -p "$ROOT/bench/results"
python3 "$ROOT/bench/report.py" table "$RESULTS" "$ROUNDS" "$DURATION" "$CONNECTIONS" | tee "$ROOT/bench/results/latest.md"

#!/usr/bin/env bash
# Portcullis benchmark: every contender on loopback, every scenario, contenders alternated within
# each round, medians over rounds, a Markdown table with ratios on stdout (and in
# bench/results/latest.md).
#
#   bash bench/run.sh            # full run (ROUNDS=3, DURATION=4 s per measurement)
#   ROUNDS=1 DURATION=2 bash bench/run.sh   # quick look
#
# Installs what it needs on Debian (nginx, squid-openssl, tinyproxy, trafficserver, openssl,
# python3; oha via cargo install), builds Portcullis in release mode (or takes PORTCULLIS_BIN),
# and stops every process it started, also on failure or Ctrl-C. Traffic stays on 127.0.0.1.
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
# SCENARIOS=12: run only these scenarios (digits 1-7).
SCENARIOS=${SCENARIOS:-1234567}
# BASELINE=/path/to/portcullis: another build (e.g. of an older commit) measured in the same run
# as "portcullis (baseline)" in scenarios 1, 3, 4 and 7, on ports 3129/9091.
BASELINE=${BASELINE:-}
# Seconds of quiet before each load measurement.
SETTLE=${SETTLE:-2}
[ -z "$BASELINE" ] || BASELINE=$(realpath "$BASELINE")
# PORTCULLIS_BIN=/path/to/portcullis: measure this binary instead of building with cargo.
PORTCULLIS_BIN=${PORTCULLIS_BIN:-}
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

# Drop a stopped (and waited-for) process from PIDS, so that cleanup never signals its pid once
# the kernel has given it to another process.
forget_pid() {
  local p kept=()
  for p in "${PIDS[@]}"; do
    if [ "$p" != "$1" ]; then kept+=("$p"); fi
  done
  PIDS=("${kept[@]}")
}

cleanup() {
  local _ pid alive
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
  # Up to 3 s for a clean exit (squid's shutdown_lifetime is 1 s), then SIGKILL.
  for _ in $(seq 1 30); do
    alive=
    for pid in "${PIDS[@]:-}"; do
      if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then alive=1; fi
    done
    if [ -z "$alive" ]; then break; fi
    sleep 0.1
  done
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
  done
  pkill -f "$WORK" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# --- install -------------------------------------------------------------------------------
need=()
for pair in nginx:nginx squid:squid-openssl tinyproxy:tinyproxy traffic_server:trafficserver \
  openssl:openssl python3:python3 curl:curl; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need+=("${pair#*:}")
done
if [ "${#need[@]}" -gt 0 ]; then
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" ca-certificates >/dev/null
fi
# Debian starts the packaged daemons; the benchmark runs its own.
for svc in nginx squid tinyproxy trafficserver; do
  (systemctl stop "$svc" || service "$svc" stop) >/dev/null 2>&1 || true
done
export PATH="$HOME/.cargo/bin:/usr/sbin:$PATH"
if ! command -v oha >/dev/null 2>&1; then
  log "installing oha (cargo install, a few minutes the first time)"
  cargo install oha --locked --quiet
fi
if [ -n "$PORTCULLIS_BIN" ]; then
  PORTCULLIS=$(realpath "$PORTCULLIS_BIN")
  log "using $PORTCULLIS (PORTCULLIS_BIN; no build)"
else
  log "building portcullis (release)"
  cargo build --release --quiet
  PORTCULLIS=$ROOT/target/release/portcullis
fi
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

# --- origin (nginx) ------------------------------------------------------------------------
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
}
EOF
$SERVER_CPUS nginx -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" &
PIDS+=("$!")

# --- nginx reverse proxy (its own instance, so its CPU time is not mixed with the origin's) --
mkdir -p nginx-rp/logs
cat > nginx-rp/nginx.conf <<EOF
daemon off;
worker_processes auto;
pid $WORK/nginx-rp/nginx.pid;
error_log $WORK/nginx-rp/logs/error.log crit;
worker_rlimit_nofile 65536;
events { worker_connections 30000; }
http {
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
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
$SERVER_CPUS nginx -c "$WORK/nginx-rp/nginx.conf" -p "$WORK/nginx-rp" &
NGINX_RP_PID=$!
PIDS+=("$NGINX_RP_PID")

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
SQUID_PID=$!
PIDS+=("$SQUID_PID")

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
TINYPROXY_PID=$!
PIDS+=("$TINYPROXY_PID")

# --- Apache Traffic Server (forward proxy on 18090) ----------------------------------------
# A runroot (runroot.yaml, found through --run-root) points ATS 9.2's layout at $WORK/ats: its
# config (sysconfdir), runtime (lock, records.snap), log and cache folders; binaries, libraries
# and plugins stay in /usr. traffic_server runs in the foreground (there is no traffic_manager),
# as a child of this script. No cache storage (empty storage.config; "Cache Disabled" in
# diags.log is expected), caching off, no remap rule required, 2 ET_NET worker threads.
mkdir -p ats/etc ats/run ats/log ats/cache
cat > ats/runroot.yaml <<EOF
prefix: /usr
exec_prefix: /usr
bindir: /usr/bin
sbindir: /usr/sbin
sysconfdir: $WORK/ats/etc
datadir: $WORK/ats/cache
includedir: /usr/include
libdir: /usr/lib/trafficserver
libexecdir: /usr/lib/trafficserver/modules
localstatedir: $WORK/ats
runtimedir: $WORK/ats/run
logdir: $WORK/ats/log
cachedir: $WORK/ats/cache
EOF
# user_id: the unprivileged account the package creates; "#-1" keeps the current user.
ATS_USER='#-1'
id trafficserver >/dev/null 2>&1 && ATS_USER=trafficserver
cat > ats/etc/records.config <<EOF
CONFIG proxy.config.http.server_ports STRING 18090:ipv4:ip-in=127.0.0.1
CONFIG proxy.config.exec_thread.autoconfig INT 0
CONFIG proxy.config.exec_thread.limit INT 2
CONFIG proxy.config.exec_thread.affinity INT 0
CONFIG proxy.config.accept_threads INT 0
CONFIG proxy.config.task_threads INT 1
CONFIG proxy.config.admin.user_id STRING $ATS_USER
CONFIG proxy.config.crash_log_helper STRING NULL
CONFIG proxy.config.http.cache.http INT 0
CONFIG proxy.config.url_remap.remap_required INT 0
CONFIG proxy.config.reverse_proxy.enabled INT 0
CONFIG proxy.config.http.keep_alive_enabled_in INT 1
CONFIG proxy.config.http.keep_alive_enabled_out INT 1
CONFIG proxy.config.http.keep_alive_no_activity_timeout_in INT 300
CONFIG proxy.config.http.keep_alive_no_activity_timeout_out INT 300
CONFIG proxy.config.net.connections_throttle INT 10000
CONFIG proxy.config.net.max_connections_in INT 10000
CONFIG proxy.config.log.logging_enabled INT 0
CONFIG proxy.config.diags.debug.enabled INT 0
CONFIG proxy.config.body_factory.template_sets_dir STRING /etc/trafficserver/body_factory
EOF
cat > ats/etc/ip_allow.yaml <<EOF
ip_allow:
  - apply: in
    ip_addrs: 127.0.0.1
    action: allow
    methods: ALL
  - apply: out
    ip_addrs: 127.0.0.1
    action: allow
    methods: ALL
EOF
for f in remap.config storage.config plugin.config cache.config hosting.config parent.config \
  volume.config ssl_multicert.config splitdns.config socks.config; do
  : > "ats/etc/$f"
done
printf 'logging: {}\n' > ats/etc/logging.yaml
printf 'sni: []\n' > ats/etc/sni.yaml
printf 'strategies: []\n' > ats/etc/strategies.yaml
[ "$ATS_USER" = '#-1' ] || chown -R trafficserver: "$WORK/ats"
$SERVER_CPUS traffic_server --run-root="$WORK/ats/runroot.yaml" >"$WORK/ats/log/traffic_server.out" 2>&1 &
ATS_PID=$!
PIDS+=("$ATS_PID")

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
# Scenario 7, "realistic": audit to a file and the bearer credential injected into the plain-HTTP
# requests to 127.0.0.1:18080 (plaintext_credentials allows that over http://).
portcullis_realistic() { # $1 = audit output
  portcullis_config "$1" | sed 's/^ports = \[18080, 18081\]$/&\ncredential = "bench"\nplaintext_credentials = true/'
}
portcullis_realistic "$WORK/audit-realistic.log" > portcullis-realistic.toml

# The baseline build listens on 3129/9091. In scenario 7 it is restarted with the realistic
# configuration (its own audit file), and with the plain one again afterwards.
to_baseline_ports() {
  sed 's/^proxy = "127.0.0.1:3128"/proxy = "127.0.0.1:3129"/; s/^admin = "127.0.0.1:9090"/admin = "127.0.0.1:9091"/'
}
to_baseline_ports < portcullis.toml > portcullis-baseline.toml
portcullis_realistic "$WORK/audit-realistic-baseline.log" | to_baseline_ports > portcullis-baseline-realistic.toml

# The build under test (PORTCULLIS, on 3128) and the baseline build (BASELINE, on 3129), each
# restarted with another configuration between scenarios.
start_instance() { # $1 = pid variable, $2 = binary, $3 = config, $4 = port, $5 = log
  stop_instance "$1"
  $SERVER_CPUS "$2" run -c "$3" >/dev/null 2>>"$5" &
  printf -v "$1" '%s' "$!"
  PIDS+=("$!")
  wait_port "$4"
}
stop_instance() { # $1 = pid variable
  local pid=${!1}
  if [ -n "$pid" ]; then
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    forget_pid "$pid"
    printf -v "$1" '%s' ""
  fi
}
PORTCULLIS_PID=
BASELINE_PID=
start_portcullis() { start_instance PORTCULLIS_PID "$PORTCULLIS" "$1" 3128 "$WORK/portcullis.log"; }
stop_portcullis() { stop_instance PORTCULLIS_PID; }
start_baseline() { start_instance BASELINE_PID "$BASELINE" "$1" 3129 "$WORK/baseline.log"; }
stop_baseline() { stop_instance BASELINE_PID; }
wait_port() {
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  log "port $1 did not open"; return 1
}
for port in 18080 18443 18081 13128 13129 18888 18090; do wait_port "$port"; done
# ATS binds its threads itself (exec_thread.affinity 0 means "the whole machine"), which undoes
# taskset's mask for the ET_NET threads: pin them again, every thread of the process.
[ -z "$SERVER_CPUS" ] || taskset -apc "1-$(($(nproc) - 1))" "$ATS_PID" >/dev/null
[ -z "$BASELINE" ] || start_baseline "$WORK/portcullis-baseline.toml"
start_portcullis "$WORK/portcullis.toml"

# --- measurement helpers -------------------------------------------------------------------
RESULTS=$WORK/results.tsv
: > "$RESULTS"
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$RESULTS"; } # scenario contender metric value

# CPU time (user + system of every thread, dead ones included, in clock ticks) a process has
# used so far. The fields are counted after the ")" that ends the command name.
cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null; }

# A process and all its descendants (nginx master and workers, squid and its helpers, …).
proc_tree() {
  local pid child
  for pid in "$@"; do
    echo "$pid"
    for child in $(pgrep -P "$pid"); do proc_tree "$child"; done
  done
}

# "PID TICKS" for every process of the trees rooted at the given PIDs.
cpu_snapshot() {
  local pid ticks
  for pid in $(proc_tree "$@"); do
    ticks=$(cpu_ticks "$pid") && [ -n "$ticks" ] && echo "$pid $ticks"
  done
  return 0
}

# CPU ticks between two snapshots, summed over the processes alive at the end (a process started
# in between counts in full). A process that existed at the start and exited before the end is
# not counted at all (its ticks end up in its parent's cutime/cstime, which this does not read):
# this matters only for servers that fork per connection; every contender here keeps its
# processes for the whole run (tinyproxy 1.11 serves connections on threads).
cpu_delta() { # before-file after-file
  awk 'NR == FNR { b[$1] = $2; next } { d += $2 - (($1 in b) ? b[$1] : 0) } END { print d + 0 }' "$1" "$2"
}

oha_run() { # scenario contender url [oha args...]
  # CPU_PIDS="pid …": also record the CPU time of these processes (and their descendants) per
  # request; unset or empty (the "direct" row): no CPU figure.
  local scenario=$1 contender=$2 url=$3; shift 3
  local pids=${CPU_PIDS:-} ticks=
  # Let the previous measurement's connections close and its servers go quiet first, so no
  # contender is measured in the wake of another (tinyproxy and ATS were still busy closing
  # hundreds of connections a second after oha stopped).
  sleep "$SETTLE"
  # shellcheck disable=SC2086 # a list of pids
  [ -z "$pids" ] || cpu_snapshot $pids > "$WORK/cpu.before"
  if $CLIENT_CPUS oha --no-tui --output-format json -z "${DURATION}s" -c "$CONNECTIONS" "$@" "$url" > "$WORK/oha.json" 2>"$WORK/oha.err"; then
    if [ -n "$pids" ]; then
      # shellcheck disable=SC2086
      cpu_snapshot $pids > "$WORK/cpu.after"
      ticks=$(cpu_delta "$WORK/cpu.before" "$WORK/cpu.after")
    fi
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
  CPU_PIDS='' oha_run "1 plain HTTP" direct "$SMALL"
  CPU_PIDS=$NGINX_RP_PID oha_run "1 plain HTTP" "nginx reverse proxy" http://127.0.0.1:18081/small
  CPU_PIDS=$SQUID_PID oha_run "1 plain HTTP" squid "$SMALL" -x http://127.0.0.1:13128
  CPU_PIDS=$TINYPROXY_PID oha_run "1 plain HTTP" tinyproxy "$SMALL" -x http://127.0.0.1:18888
  CPU_PIDS=$ATS_PID oha_run "1 plain HTTP" ats "$SMALL" -x http://127.0.0.1:18090
  CPU_PIDS=$PORTCULLIS_PID oha_run "1 plain HTTP" portcullis "$SMALL" -x http://127.0.0.1:3128
  [ -z "$BASELINE" ] || CPU_PIDS=$BASELINE_PID oha_run "1 plain HTTP" "portcullis (baseline)" "$SMALL" -x http://127.0.0.1:3129
  fi

  # ATS is not in scenario 6: the scenario compares Portcullis' audit file with its stdout, and
  # the ATS counterpart (an access log to a file) would need a second ATS configuration.
  if want 6; then
  log "round $round: scenario 6 (scenario 1 with audit to a file)"
  start_portcullis "$WORK/portcullis-audit.toml"
  CPU_PIDS=$PORTCULLIS_PID oha_run "6 plain HTTP, audit file" portcullis "$SMALL" -x http://127.0.0.1:3128
  start_portcullis "$WORK/portcullis.toml"
  CPU_PIDS=$PORTCULLIS_PID oha_run "6 plain HTTP, audit file" "portcullis (audit to stdout→/dev/null)" "$SMALL" -x http://127.0.0.1:3128
  fi

  if want 7; then
  log "round $round: scenario 7 (realistic: plain HTTP, audit file, credential injected, metrics)"
  : > "$WORK/audit-realistic.log"
  start_portcullis "$WORK/portcullis-realistic.toml"
  CPU_PIDS=$PORTCULLIS_PID oha_run "7 realistic" portcullis "$SMALL" -x http://127.0.0.1:3128
  if [ -n "$BASELINE" ]; then
    : > "$WORK/audit-realistic-baseline.log"
    start_baseline "$WORK/portcullis-baseline-realistic.toml"
    CPU_PIDS=$BASELINE_PID oha_run "7 realistic" "portcullis (baseline)" "$SMALL" -x http://127.0.0.1:3129
    start_baseline "$WORK/portcullis-baseline.toml"
  fi
  start_portcullis "$WORK/portcullis.toml"
  fi

  if want 3; then
  log "round $round: scenario 3 (intercepted HTTPS, keep-alive)"
  CPU_PIDS=$SQUID_PID oha_run "3 intercepted keep-alive" squid https://127.0.0.1:18443/small -x http://127.0.0.1:13129 --insecure
  CPU_PIDS=$PORTCULLIS_PID oha_run "3 intercepted keep-alive" portcullis https://127.0.0.1:18443/small -x http://127.0.0.1:3128 --insecure
  [ -z "$BASELINE" ] || CPU_PIDS=$BASELINE_PID oha_run "3 intercepted keep-alive" "portcullis (baseline)" https://127.0.0.1:18443/small -x http://127.0.0.1:3129 --insecure
  fi
  if want 4; then
  log "round $round: scenario 4 (intercepted HTTPS, a new connection per request)"
  CPU_PIDS=$SQUID_PID oha_run "4 intercepted new connection" squid https://127.0.0.1:18443/small -x http://127.0.0.1:13129 --insecure --disable-keepalive
  CPU_PIDS=$PORTCULLIS_PID oha_run "4 intercepted new connection" portcullis https://127.0.0.1:18443/small -x http://127.0.0.1:3128 --insecure --disable-keepalive
  [ -z "$BASELINE" ] || CPU_PIDS=$BASELINE_PID oha_run "4 intercepted new connection" "portcullis (baseline)" https://127.0.0.1:18443/small -x http://127.0.0.1:3129 --insecure --disable-keepalive
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
PIDS+=("$HOLDER")
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
# This run's own processes (not pgrep by name: another instance may run on the machine).
for entry in "squid:$SQUID_PID" "tinyproxy:$TINYPROXY_PID" "ats:$ATS_PID"; do
  pid=${entry#*:}
  kib=$(rss_kib "$pid" 2>/dev/null || true)
  [ -n "$kib" ] && record "5 memory" "${entry%%:*}" "idle RSS MiB" "$(python3 -c "print(f'{$kib / 1024:.1f}')")"
done
stop_portcullis
fi

# --- report --------------------------------------------------------------------------------
mkdir -p "$ROOT/bench/results"
python3 "$ROOT/bench/report.py" table "$RESULTS" "$ROUNDS" "$DURATION" "$CONNECTIONS" | tee "$ROOT/bench/results/latest.md"

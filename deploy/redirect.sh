#!/bin/sh
# Redirects every outgoing TCP connection of this network namespace (a Kubernetes pod) to
# Portcullis' transparent listener, except the proxy's own (matched by its UID), so a build step
# that ignores or unsets HTTP_PROXY is still held to the allow-list (spec §11).
#
# Run once, as root with CAP_NET_ADMIN, before the pod's other containers start: the
# `portcullis-redirect` init container of deploy/kubernetes/sidecar.yaml (image target
# `redirect` of deploy/Dockerfile). Idempotent: the table is replaced on every run.
#
#   PORTCULLIS_UID               the proxy's UID: its connections go out untouched (default 65532)
#   PORTCULLIS_TRANSPARENT_PORT  the transparent listener's port (default 3129)
#   PORTCULLIS_IPV6              "redirect" (default) or "drop": IPv6 egress redirected like IPv4,
#                                or refused outright (for kernels without IPv6 NAT)
#
# Left alone: loopback destinations (the proxy's own 127.0.0.1:3128 for cooperative clients, and
# other containers of the pod), DNS (UDP is never touched; TCP port 53 is exempt too), and the
# proxy's traffic. Everything else on TCP — any port — reaches the transparent listener, which
# judges it like any request and audits it with "transparent": true.
set -eu

uid="${PORTCULLIS_UID:-65532}"
port="${PORTCULLIS_TRANSPARENT_PORT:-3129}"
ipv6="${PORTCULLIS_IPV6:-redirect}"

case "$uid" in *[!0-9]*|'') echo "PORTCULLIS_UID must be a number" >&2; exit 2 ;; esac
case "$port" in *[!0-9]*|'') echo "PORTCULLIS_TRANSPARENT_PORT must be a number" >&2; exit 2 ;; esac

case "$ipv6" in
  redirect)
    v6_nat="meta nfproto ipv6 meta l4proto tcp redirect to :$port"
    v6_guard="" ;;
  drop)
    v6_nat=""
    v6_guard="chain egress_filter {
    type filter hook output priority 0; policy accept;
    meta skuid $uid return
    ip6 daddr != ::1 meta l4proto tcp reject with tcp reset
  }" ;;
  *) echo "PORTCULLIS_IPV6 must be redirect or drop" >&2; exit 2 ;;
esac

# One atomic transaction: the old table (if any) goes, the new one comes, or nothing changes.
nft -f - <<EOF
table inet portcullis
delete table inet portcullis
table inet portcullis {
  chain egress_nat {
    type nat hook output priority -100; policy accept;
    meta skuid $uid return
    ip daddr 127.0.0.0/8 return
    ip6 daddr ::1 return
    tcp dport 53 return
    meta nfproto ipv4 meta l4proto tcp redirect to :$port
    $v6_nat
  }
  $v6_guard
}
EOF
echo "portcullis: TCP egress redirected to :$port (except uid $uid, loopback and DNS; IPv6: $ipv6)"

#!/usr/bin/env bash
# The overlay benchmark: how fast do VMs at two sites talk over each L2 path?
#
# Two "sites" are network namespaces joined by a veth "WAN" (198.18.0.1 and
# 198.18.0.2, MTU 1500); each has a bridge with one "VM" namespace on it
# (198.19.0.1 and 198.19.0.2, MTU 1500). For each path between the two
# bridges the script measures, between the VMs, iperf3 TCP throughput with 1
# and 4 streams, the ping RTT idle and under a transfer, and the tunnel
# processes' peak memory, all in one run:
#
#   plain    a veth straight between the bridges: the limit of this machine
#   vxlan    kernel VXLAN over the WAN, unencrypted (WAN MTU 1600 so that
#            VMs keep 1500; VXLAN does not fragment)
#   vcfed    `vcfed gateway` (WireGuard via boringtun, GRE-TEB, fragmenting)
#   tinc     tinc 1.0 in switch mode (AES-256-CBC, HMAC-SHA256)
#   openvpn  OpenVPN tap with a static key (AES-256-CBC, HMAC-SHA256)
#   wggo     wireguard-go with kernel VXLAN on top (VM MTU 1370)
#
# It prints one table, with the ratio of vcfed to each path. Run as root:
#
#   bench/overlay/run.sh                  # all paths, 5 s per iperf3 run
#   DURATION=10 ONLY="vcfed tinc" bench/overlay/run.sh
#   BUSY_POLL=100ms bench/overlay/run.sh   # vcfed with a busy-poll window
#   NICE=-20 bench/overlay/run.sh          # every tunnel at niceness -20
#   TRACE=1 ONLY=vcfed bench/overlay/run.sh  # also times each leg of vcfed's
#                                            # pings (tcpdump of ICMP at the VM
#                                            # and at both TAPs)
#   PERF=1 ONLY=vcfed bench/overlay/run.sh   # also profiles the gateways
#                                            # (perf; top in /tmp/vcfed-perf.txt)
#
# It installs its Debian packages (iperf3 tinc openvpn wireguard-go
# wireguard-tools) unless NO_INSTALL=1, and builds vcfed in release mode
# (or takes the binary VCFED_BIN names, e.g. an older build to compare).
# Only addresses in 198.18.0.0/15, inside namespaces it creates, are used;
# everything it creates is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-5}
ONLY=${ONLY:-"plain vxlan vcfed tinc openvpn wggo"}
P="ob$$"                      # unique prefix of namespaces and shared names
WORK=$(mktemp -d /tmp/vcfed-bench.XXXXXX)

if [ "$(id -u)" -ne 0 ]; then
  echo "error: run as root (network namespaces, TAP devices)" >&2
  exit 1
fi

if [ "${NO_INSTALL:-}" != "1" ]; then
  echo "::: installing packages" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends iproute2 iputils-ping python3 iperf3 \
    tinc openvpn wireguard-go wireguard-tools ${TRACE:+tcpdump} >/dev/null
fi

if [ -n "${VCFED_BIN:-}" ]; then
  VCFED=$(realpath "$VCFED_BIN")
else
  echo "::: building vcfed (release)" >&2
  cargo build --release -q -p vcfed --bin vcfed
  VCFED=$(realpath "${CARGO_TARGET_DIR:-target}/release/vcfed")
fi

cleanup() {
  if [ -f "$WORK/pids" ]; then
    while read -r pid; do kill "$pid" 2>/dev/null || true; done <"$WORK/pids"
  fi
  for ns in sa sb va vb; do ip netns del "$P-$ns" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

in_ns() { local ns=$1; shift; ip netns exec "$P-$ns" "$@"; }
# Starts "$@" in namespace $1 in the background, remembering its pid for the
# cleanup (`ip netns exec` execs the command, so the pid is the command's).
bg_ns() { local ns=$1; shift; ip netns exec "$P-$ns" "$@" & echo $! >>"$WORK/pids"; }
# An anchor tunnel's process: like bg_ns, at the niceness NICE gives, as
# vcfed's data plane gets it from its `nice` setting (`nice` execs the
# command, so the pid is still the tunnel's).
bg_tunnel() {
  local ns=$1; shift
  if [ -n "${NICE:-}" ]; then bg_ns "$ns" nice -n "$NICE" "$@"; else bg_ns "$ns" "$@"; fi
}

# Two sites with a WAN of MTU $1, bridges br0, and VMs with MTU $2.
lab_up() {
  local wan_mtu=$1 vm_mtu=$2
  for ns in sa sb va vb; do
    ip netns add "$P-$ns"
    ip -n "$P-$ns" link set lo up
  done
  ip -n "$P-sa" link add wan type veth peer name wan netns "$P-sb"
  local i=1
  for s in a b; do
    ip -n "$P-s$s" link set wan mtu "$wan_mtu"
    ip -n "$P-s$s" addr add "198.18.0.$i/24" dev wan
    ip -n "$P-s$s" link set wan up
    ip -n "$P-s$s" link add br0 type bridge
    ip -n "$P-s$s" link set br0 up
    ip -n "$P-s$s" link add vm type veth peer name eth0 netns "$P-v$s"
    ip -n "$P-s$s" link set vm master br0 up
    ip -n "$P-v$s" link set eth0 mtu "$vm_mtu"
    ip -n "$P-v$s" addr add "198.19.0.$i/16" dev eth0
    ip -n "$P-v$s" link set eth0 up
    i=$((i + 1))
  done
}

lab_down() {
  if [ -f "$WORK/pids" ]; then
    while read -r pid; do kill "$pid" 2>/dev/null || true; done <"$WORK/pids"
    while read -r pid; do
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    done <"$WORK/pids"
    rm -f "$WORK/pids"
  fi
  for ns in sa sb va vb; do ip netns del "$P-$ns" 2>/dev/null || true; done
}

# Waits (at most $2 s) until link $1 exists in site namespace $3.
wait_link() {
  for _ in $(seq $(($2 * 10))); do
    ip -n "$P-$3" link show "$1" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "link $1 did not appear in $3" >&2
  return 1
}

path_plain() {
  lab_up 1500 1500
  ip -n "$P-sa" link add x type veth peer name x netns "$P-sb"
  ip -n "$P-sa" link set x master br0 up
  ip -n "$P-sb" link set x master br0 up
}

path_vxlan() {
  lab_up 1600 1500
  local i=1 peer
  for s in a b; do
    peer=$((3 - i))
    ip -n "$P-s$s" link add vx type vxlan id 42 local "198.18.0.$i" remote "198.18.0.$peer" \
      dstport 4789 dev wan
    ip -n "$P-s$s" link set vx mtu 1500 master br0 up
    i=$((i + 1))
  done
}

path_vcfed() {
  lab_up 1500 1500
  local a_pub b_pub
  a_pub=$("$VCFED" gateway genkey --out "$WORK/a.key")
  b_pub=$("$VCFED" gateway genkey --out "$WORK/b.key")
  local s=a i=1 peer=2 pub=$b_pub tuning=""
  if [ -n "${BUSY_POLL:-}" ]; then tuning="busy_poll = \"$BUSY_POLL\""; fi
  # vcfed's own knob: the data plane's thread alone.
  if [ -n "${NICE:-}" ]; then tuning="$tuning"$'\n'"nice = $NICE"; fi
  for s in a b; do
    if [ "$s" = b ]; then i=2; peer=1; pub=$a_pub; fi
    cat >"$WORK/$s.toml" <<EOF
private_key_file = "$s.key"
listen = "198.18.0.$i:7782"
$tuning
[[peers]]
index = $peer
public_key = "$pub"
endpoint = "198.18.0.$peer:7782"
[[segments]]
id = 1
peers = [$peer]
bridge = "br0"
EOF
    bg_ns "s$s" env RUST_LOG=warn "$VCFED" gateway --config "$WORK/$s.toml" 2>"$WORK/vcfed-$s.log"
  done
  wait_link vcft1 10 sa
  wait_link vcft1 10 sb
}

path_tinc() {
  lab_up 1500 1500
  local i=1
  for s in a b; do
    mkdir -p "$WORK/tinc-$s/hosts"
    {
      echo "Name = $s"
      echo "Mode = switch"
      echo "Interface = tinc0"
      echo "AddressFamily = ipv4"
      # Named explicitly: 1.0's default, Blowfish, lives in OpenSSL 3's
      # legacy provider.
      echo "Cipher = aes-256-cbc"
      echo "Digest = sha256"
      [ "$s" = b ] && echo "ConnectTo = a"
    } >"$WORK/tinc-$s/tinc.conf"
    printf 'Address = 198.18.0.%s\nPort = 655\n' "$i" >"$WORK/tinc-$s/hosts/$s"
    printf '#!/bin/sh\nip link set "$INTERFACE" master br0 up\n' >"$WORK/tinc-$s/tinc-up"
    chmod +x "$WORK/tinc-$s/tinc-up"
    tincd -c "$WORK/tinc-$s" -K2048 </dev/null >/dev/null 2>&1
    i=$((i + 1))
  done
  cp "$WORK/tinc-a/hosts/a" "$WORK/tinc-b/hosts/a"
  cp "$WORK/tinc-b/hosts/b" "$WORK/tinc-a/hosts/b"
  for s in a b; do
    bg_tunnel "s$s" tincd -c "$WORK/tinc-$s" -D --pidfile="$WORK/tinc-$s.pid" \
      --logfile="$WORK/tinc-$s.log"
  done
  wait_link tinc0 10 sa
  wait_link tinc0 10 sb
}

path_openvpn() {
  lab_up 1500 1500
  openvpn --genkey secret "$WORK/ovpn.key" >/dev/null 2>&1
  local i=1 peer direction
  for s in a b; do
    peer=$((3 - i))
    direction=$((i - 1))
    bg_tunnel "s$s" openvpn --dev tap0 --dev-type tap --proto udp \
      --local "198.18.0.$i" --lport 1194 --remote "198.18.0.$peer" --rport 1194 \
      --secret "$WORK/ovpn.key" "$direction" --cipher AES-256-CBC --auth SHA256 \
      --verb 1 --log "$WORK/ovpn-$s.log"
    i=$((i + 1))
  done
  wait_link tap0 10 sa
  wait_link tap0 10 sb
  for s in a b; do ip -n "$P-s$s" link set tap0 master br0 up; done
}

path_wggo() {
  lab_up 1500 1370
  local i=1 peer dev
  for s in a b; do wg genkey >"$WORK/wg-$s.key"; done
  for s in a b; do
    # wireguard-go's control socket lives in /var/run/wireguard, shared by
    # every namespace: the device name must be unique on the machine.
    dev="$P$s"
    bg_tunnel "s$s" env WG_PROCESS_FOREGROUND=1 wireguard-go "$dev" >"$WORK/wg-$s.log" 2>&1
  done
  for s in a b; do
    peer=$((3 - i))
    local other=b
    [ "$s" = b ] && other=a
    dev="$P$s"
    wait_link "$dev" 10 "s$s"
    in_ns "s$s" wg set "$dev" private-key "$WORK/wg-$s.key" listen-port 51820 \
      peer "$(wg pubkey <"$WORK/wg-$other.key")" endpoint "198.18.0.$peer:51820" \
      allowed-ips "198.18.1.$peer/32"
    ip -n "$P-s$s" addr add "198.18.1.$i/24" dev "$dev"
    ip -n "$P-s$s" link set "$dev" up
    ip -n "$P-s$s" link add vx type vxlan id 42 local "198.18.1.$i" remote "198.18.1.$peer" \
      dstport 4789 dev "$dev"
    ip -n "$P-s$s" link set vx mtu 1370 master br0 up
    i=$((i + 1))
  done
}

# Measures the current lab; prints "gbps1 gbps4 rtt_ms loaded_rtt_ms rss_mib":
# throughput with 1 and 4 streams, the ping RTT idle and during the
# 1-stream transfer, and the largest peak RSS of the tunnel's processes.
measure() {
  local path=$1
  for _ in $(seq 30); do
    in_ns va ping -c 1 -W 1 -q 198.19.0.2 >/dev/null 2>&1 && break
  done
  in_ns va ping -c 1 -W 1 -q 198.19.0.2 >/dev/null
  local rtt loaded tracers=""
  if [ -n "${TRACE:-}" ] && [ "$path" = vcfed ]; then
    for at in va:eth0 sa:vcft1 sb:vcft1; do
      in_ns "${at%%:*}" tcpdump -i "${at#*:}" -n -B 4096 -w "$WORK/trace-${at%%:*}.pcap" icmp \
        >/dev/null 2>&1 &
      tracers="$tracers $!"
    done
    # The pings' encrypted datagrams on the WAN, by their size: a 98-byte
    # frame + 28 (GRE, inner IPv4) + 32 (WireGuard) + 8 (UDP).
    in_ns sa tcpdump -i wan -n -B 4096 -w "$WORK/trace-wan.pcap" 'udp and udp[4:2] = 166' \
      >/dev/null 2>&1 &
    tracers="$tracers $!"
    sleep 1
  fi
  rtt=$(in_ns va ping -c 20 -i 0.05 -q 198.19.0.2 | avg_rtt)
  # The tunnel's own processes: everything started so far.
  local tunnel_pids
  tunnel_pids=$(cat "$WORK/pids" 2>/dev/null || true)
  bg_ns vb iperf3 -s -B 198.19.0.2 >/dev/null 2>&1
  sleep 0.3
  # Pings during the 1-stream transfer, from its second second on.
  (sleep 1; in_ns va ping -c $((DURATION * 10 - 20)) -i 0.1 -q 198.19.0.2 | avg_rtt >"$WORK/loaded") &
  local pinger=$!
  if [ -n "${PERF:-}" ] && [ "$path" = vcfed ]; then
    (sleep 1; perf record -F 499 -g -o "$WORK/perf.data" \
      -p "$(echo "$tunnel_pids" | paste -sd,)" -- sleep $((DURATION - 2)) >/dev/null 2>&1) &
  fi
  local one four rss
  one=$(gbps 1)
  wait "$pinger" || true
  loaded=$(cat "$WORK/loaded" 2>/dev/null || echo -)
  if [ -n "$tracers" ]; then
    sleep 0.5
    # shellcheck disable=SC2086 # a list of pids
    kill -TERM $tracers 2>/dev/null || true
    # shellcheck disable=SC2086
    wait $tracers 2>/dev/null || true
    legs >&2
  fi
  four=$(gbps 4)
  rss=0
  for pid in $tunnel_pids; do
    local hwm
    hwm=$(awk '/^VmHWM:/ {print int($2 / 1024)}' "/proc/$pid/status" 2>/dev/null || echo 0)
    [ "${hwm:-0}" -gt "$rss" ] && rss=$hwm
  done
  if [ -n "${PERF:-}" ] && [ "$path" = vcfed ] && [ -f "$WORK/perf.data" ]; then
    perf report -i "$WORK/perf.data" --stdio --no-children --percent-limit 1.5 \
      --sort symbol 2>/dev/null | grep -v '^#' | grep -v '^$' | grep '%' | head -25 >"${PERF_OUT:-/tmp/vcfed-perf.txt}"
    echo "    profile of the gateways (1 stream): ${PERF_OUT:-/tmp/vcfed-perf.txt}" >&2
  fi
  echo "$one $four $rtt $loaded $rss"
}

# The legs of the traced pings (TRACE=1): each echo request and reply is
# matched by ICMP id and sequence at the VM (va), at A's TAP (sa: when the
# frame is queued for the gateway, and when the gateway writes the reply)
# and at B's TAP (sb); prints the mean of each leg for the idle pings and
# for those during the transfer.
legs() {
  python3 - "$WORK" <<'PY'
import collections, statistics, subprocess, sys
work = sys.argv[1]
def times(ns):
    out = subprocess.run(["tcpdump", "-n", "-tt", "-r", f"{work}/trace-{ns}.pcap"],
                         capture_output=True, text=True).stdout
    seen = {}
    for line in out.splitlines():
        if "echo" not in line or " id " not in line:
            continue
        kind = "request" if "request" in line else "reply"
        ident = line.split(" id ")[1].split(",")[0]
        seq = int(line.split(" seq ")[1].split(",")[0])
        seen[(ident, kind, seq)] = float(line.split()[0])
    return seen
va, sa, sb = times("va"), times("sa"), times("sb")
# Datagrams on the WAN, A to B (requests) and B to A (replies), in order.
wan = {"request": [], "reply": []}
out = subprocess.run(["tcpdump", "-n", "-tt", "-r", f"{work}/trace-wan.pcap"],
                     capture_output=True, text=True).stdout
for line in out.splitlines():
    fields = line.split()
    if len(fields) > 4:
        wan["request" if fields[2].startswith("198.18.0.1.") else "reply"].append(float(fields[0]))
def on_wan(kind, after, before):
    # The first of the pings' datagrams between the two TAP sightings.
    return next((t for t in wan[kind] if after <= t <= before), None)
runs = collections.defaultdict(list)
wan_legs = collections.defaultdict(list)
for (ident, kind, seq), t0 in va.items():
    if kind != "request":
        continue
    try:
        t = [t0, sa[(ident, "request", seq)], sb[(ident, "request", seq)],
             sb[(ident, "reply", seq)], sa[(ident, "reply", seq)], va[(ident, "reply", seq)]]
    except KeyError:
        continue
    runs[ident].append((t0, [(b - a) * 1e3 for a, b in zip(t, t[1:])] + [(t[5] - t[0]) * 1e3]))
    w_req, w_rep = on_wan("request", t[1], t[2]), on_wan("reply", t[3], t[4])
    if w_req is not None and w_rep is not None:
        wan_legs[ident].append([(w_req - t[1]) * 1e3, (t[2] - w_req) * 1e3,
                                (w_rep - t[3]) * 1e3, (t[4] - w_rep) * 1e3])
groups = sorted((rows for rows in runs.values() if len(rows) >= 3), key=lambda rows: min(rows)[0])
print("    vcfed ping legs, ms (means): VM->TAP A | A+B forward | VM B replies | B+A back | TAP A->VM | total")
for name, rows in zip(("idle", "loaded"), groups):
    legs = [statistics.mean(leg) for leg in zip(*(r for _, r in rows))]
    print(f"    {name:7} " + " ".join(f"{leg:7.3f}" for leg in legs) + f"   ({len(rows)} pings)")
print("    the tunnel legs split at the WAN, ms (means): TAP A->WAN | WAN->TAP B | TAP B->WAN | WAN->TAP A")
for name, rows in zip(("idle", "loaded"), groups):
    split = wan_legs.get(next(iter(ident for ident, r in runs.items() if r is rows)), [])
    if split:
        legs = [statistics.mean(leg) for leg in zip(*split)]
        print(f"    {name:7} " + " ".join(f"{leg:7.3f}" for leg in legs) + f"   ({len(split)} pings)")
PY
}

# iperf3 with $1 streams, in Gbit/s (received).
gbps() {
  in_ns va timeout $((DURATION + 20)) iperf3 -c 198.19.0.2 -t "$DURATION" -P "$1" -J \
    | python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 1e9))'
}

# The average of a ping summary on stdin, ms.
avg_rtt() {
  sed -n 's|.* = [0-9.]*/\([0-9.]*\)/.*|\1|p'
}

declare -A RESULT LABEL
LABEL[plain]="plain veth, no tunnel"
LABEL[vxlan]="kernel VXLAN, unencrypted"
LABEL[vcfed]="vcfed gateway${BUSY_POLL:+, busy_poll $BUSY_POLL}"
LABEL[tinc]="tinc 1.0 switch mode"
LABEL[openvpn]="OpenVPN tap, static key"
LABEL[wggo]="wireguard-go + VXLAN (MTU 1370)"

for path in $ONLY; do
  echo "::: $path" >&2
  set +e
  (
    set -e
    "path_$path"
    measure "$path" >"$WORK/result"
  )
  rc=$?
  set -e
  if [ $rc -eq 0 ] && [ -s "$WORK/result" ]; then
    RESULT[$path]=$(cat "$WORK/result")
  else
    RESULT[$path]="failed"
    echo "    $path failed (exit $rc)" >&2
  fi
  rm -f "$WORK/result"
  lab_down
done

# One table: throughput, RTT, memory, and vcfed's throughput divided by
# each path's.
read -r v1 v4 vrtt _ <<<"${RESULT[vcfed]:-failed - - - -}"
printf '\n%-34s %9s %9s %7s %7s %6s %8s %8s %8s\n' "L2 path between the sites' bridges" "1 stream" "4 streams" "RTT" "loaded" "RSS" "vcfed/1" "vcfed/4" "RTT/vcfed"
printf '%-34s %9s %9s %7s %7s %6s %8s %8s %8s\n' "" "Gbit/s" "Gbit/s" "ms" "RTT ms" "MiB" "" "" ""
ratio() {
  python3 -c "import sys; a,b=sys.argv[1:]; print('-' if '-' in (a,b) or 'failed' in (a,b) or float(b)==0 else '%.2f' % (float(a)/float(b)))" "$1" "$2"
}
for path in $ONLY; do
  if [ "${RESULT[$path]}" = failed ]; then
    printf '%-34s %9s\n' "${LABEL[$path]}" "failed"
    continue
  fi
  read -r g1 g4 rtt loaded rss <<<"${RESULT[$path]}"
  printf '%-34s %9s %9s %7s %7s %6s %8s %8s %8s\n' "${LABEL[$path]}" "$g1" "$g4" "$rtt" "$loaded" "$rss" \
    "$(ratio "$v1" "$g1")" "$(ratio "$v4" "$g4")" "$(ratio "$rtt" "$vrtt")"
done
echo
echo "iperf3 ${DURATION}s per run; $(nproc) cores; VM MTU 1500 unless noted. loaded RTT: ping"
echo "during the 1-stream run. RSS: the tunnel processes' largest peak. RTT/vcfed: that path's"
echo "idle RTT over vcfed's (above 1: vcfed is faster)."
if [ -n "${NICE:-}" ]; then echo "every tunnel's processes ran at niceness $NICE."; fi

# Sourced by scripts and benchmarks that start daemons on loopback ports.
# `port` prints a free loopback port never handed out before in this run: the ports handed out
# are recorded in the file PORTS_FILE (each `$(port)` runs in a subshell). The kernel may give a
# port it just released to the next bind too, before the daemon it was chosen for has bound it.
port() {
  local p
  while :; do
    p=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    grep -qx "$p" "${PORTS_FILE:?}" 2>/dev/null || { echo "$p" >> "$PORTS_FILE"; echo "$p"; return; }
  done
}

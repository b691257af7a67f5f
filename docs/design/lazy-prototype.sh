#!/bin/bash
# Runs on the SOURCE host (lab a). Lazy migration of container $NAME to $TGT, driven from here the way
# migrate would drive it: the target is reached only through ssh.
#   src.sh NAME RUN P P2 MODE   MODE: wrapper (only criu in a private mount ns) | unshare (whole podman)
set -u
NAME=$1 RUN=$2 P=$3 P2=$4 MODE=${5:-wrapper}
TGT=${TGT:-10.77.0.12}
SSH=(ssh -o BatchMode=yes root@$TGT)
T=$RUN/times
log() { echo "$(date +%s.%N) $*" >>"$T"; }
mkdir -p "$RUN/etc-criu" "$RUN/extra"
: >"$T"
# --- source's CRIU config (RPC config file, wins over RPC options)
printf 'lazy-pages\naddress 127.0.0.1\nport %s\ntcp-close\nskip-in-flight\n' "$P" >"$RUN/etc-criu/runc.conf"
cat >"$RUN/criu-wrap" <<W
#!/bin/sh
exec unshare -m --propagation private /bin/sh -c 'mount --bind "\$0" /etc/criu && exec criu "\$@"' $RUN/etc-criu "\$@"
W
chmod 700 "$RUN/criu-wrap"
# --- what the lazy path needs from inspect, read BEFORE the checkpoint takes the container lock
podman container inspect "$NAME" --format '{{.Id}} {{.StaticDir}} {{.GraphDriver.Data.MergedDir}}' >"$RUN/inspect.txt"
podman container inspect "$NAME" --format '{{json .NetworkSettings.Networks}}' >"$RUN/networks.json"
read -r ID UD MERGED <"$RUN/inspect.txt"
# network.status as podman writes it (only the fields podman's restore reads)
python3 - "$RUN/networks.json" "$RUN/extra/network.status" <<'PY'
import json, sys
nets = json.load(open(sys.argv[1]))
out = {}
for name, n in nets.items():
    out[name] = {"interfaces": {"eth0": {"subnets": [{"ipnet": "%s/%d" % (n["IPAddress"], n["IPPrefixLen"]), "gateway": n["Gateway"]}], "mac_address": n["MacAddress"]}}}
json.dump(out, open(sys.argv[2], "w"))
PY
# --- target preparation (one ssh round trip)
"${SSH[@]}" "set -e; mkdir -p $RUN/etc-criu $RUN/wd $RUN/x
printf 'lazy-pages\nwork-dir %s\ntcp-close\n' $RUN/wd >$RUN/etc-criu/runc.conf
cat >$RUN/criu-wrap <<'W'
#!/bin/sh
exec unshare -m --propagation private /bin/sh -c 'mount --bind \"\$0\" /etc/criu && exec criu \"\$@\"' $RUN/etc-criu \"\$@\"
W
chmod 700 $RUN/criu-wrap"
# --- page-server traffic through ssh: target's 127.0.0.1:P2 -> source's 127.0.0.1:P
ssh -o BatchMode=yes -o ExitOnForwardFailure=yes -N -R "127.0.0.1:$P2:127.0.0.1:$P" root@$TGT &
echo $! >"$RUN/fwd.pid"
sleep 0.7
log ckpt-start
if [ "$MODE" = wrapper ]; then
  podman --runtime-flag "criu=$RUN/criu-wrap" container checkpoint --keep --export "$RUN/full.tar" --compress none --print-stats "$NAME" >"$RUN/ckpt.out" 2>&1 &
else
  unshare -m --propagation private /bin/sh -c "mount --bind $RUN/etc-criu /etc/criu && exec podman container checkpoint --keep --export $RUN/full.tar --compress none --print-stats $NAME" >"$RUN/ckpt.out" 2>&1 &
fi
CK=$!
echo $CK >"$RUN/ckpt.pid"
until grep -q 'Starting lazy pages server' "$UD/dump.log" 2>/dev/null; do
  kill -0 $CK 2>/dev/null || { log ckpt-died-before-page-server; wait $CK; echo "ckpt rc=$?" >>"$T"; exit 1; }
  sleep 0.005
done
log page-server-ready
# --- rootfs diff and /dev/shm while frozen (podman diff takes no container lock)
podman diff --format json "$NAME" >"$RUN/diff.json" 2>"$RUN/diff.err"; log "diff rc=$?"
python3 - "$RUN/diff.json" "$RUN/extra" "$MERGED" <<'PY'
import json, sys, os
d = json.load(open(sys.argv[1]))
ex, merged = sys.argv[2], sys.argv[3]
add = [p.lstrip("/") for p in (d.get("added") or [])]
chg = [p.lstrip("/") for p in (d.get("changed") or [])]
# as podman: added paths, and changed paths that are not directories
chg = [p for p in chg if os.path.islink(os.path.join(merged, p)) or not os.path.isdir(os.path.join(merged, p))]
open(ex + "/files.lst", "w").write("".join(p + "\n" for p in add + chg))
dele = d.get("deleted") or []
if dele:
    json.dump(dele, open(ex + "/deleted.files", "w"))
PY
if [ -s "$RUN/extra/files.lst" ]; then
  tar -C "$MERGED" --no-recursion -cf "$RUN/extra/rootfs-diff.tar" -T "$RUN/extra/files.lst"
fi
if [ -d "$UD/shm" ] && [ -n "$(ls -A "$UD/shm")" ]; then tar -C "$UD/shm" -cf "$RUN/extra/devshm-checkpoint.tar" .; fi
log extras-built
EXTRA=$(cd "$RUN/extra" && ls | grep -v -x files.lst)
# --- ship + lazy-pages daemon + restore (one ssh session)
tar -C "$UD" -cf - config.dump spec.dump checkpoint -C "$RUN/extra" $EXTRA | "${SSH[@]}" "set -e; cd $RUN
tee part.tar | tar -xf - -C x
echo \"\$(date +%s.%N) shipped\" >>times
setsid criu lazy-pages --page-server --address 127.0.0.1 --port $P2 -D x/checkpoint -W wd -o lazy-pages.log -v4 </dev/null >daemon.out 2>&1 &
echo \$! >daemon.pid
while [ ! -S wd/lazy-pages.socket ]; do sleep 0.005; done
echo \"\$(date +%s.%N) daemon-ready\" >>times
podman --runtime-flag criu=$RUN/criu-wrap container restore --import part.tar >restore.out 2>&1; rc=\$?
echo \"\$(date +%s.%N) restore-done rc=\$rc\" >>times
exit \$rc"
log "restore-returned rc=$?"
if [ -n "${KILL_AFTER:-}" ]; then sleep "$KILL_AFTER"; kill "$(cat "$RUN/fwd.pid")"; log forward-killed; fi
wait $CK; log "ckpt-returned rc=$?"
kill "$(cat "$RUN/fwd.pid")" 2>/dev/null

# PID 1 of the `web` container: busybox httpd serving the bind-mounted /srv/www, and
# in-memory state that a migration must carry: a shell variable incremented every
# ~100 ms and published to /tmp/counter (the container's own rootfs, not the bind
# mount). /srv/www/cgi-bin/counter serves it over HTTP.
httpd -f -p 80 -h /srv/www &
httpd_pid=$!
trap 'kill $httpd_pid; exit 0' TERM INT
n=0
while :; do
  n=$((n + 1))
  echo "$n" >/tmp/counter.new && mv /tmp/counter.new /tmp/counter
  sleep 0.1
done

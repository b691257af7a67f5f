# PID 1 of the `hog` container: one process that holds HOG_MB MiB of touched, random
# (incompressible) memory, for the benchmark's downtime-against-memory series.
# Perl 5.36 from perl-base of localhost/migrate-mariadb; no module outside perl-base.
#
#   GET /health   200 "ok"
#   GET /state    200 "mb=N sum=S ticks=T pid=P": S a checksum of the whole buffer
#                 (computed once at start and again on every /state), T the 100 ms
#                 ticks the process has lived through (it keeps counting across a move)
use strict;
use warnings;
use IO::Socket::INET;
use IO::Select;
use Time::HiRes qw(time);

my $mb   = $ENV{HOG_MB}   || 64;
my $port = $ENV{HOG_PORT} || 8083;
$SIG{PIPE} = 'IGNORE';
$SIG{TERM} = $SIG{INT} = sub { exit 0 };
$| = 1;

my $buf = '';
open(my $rnd, '<:raw', '/dev/urandom') or die "urandom: $!";
while (length($buf) < $mb * 1048576) {
    my $want = $mb * 1048576 - length($buf);
    $want = 1048576 if $want > 1048576;
    read($rnd, $buf, $want, length($buf)) == $want or die "urandom: short read";
}
close($rnd);
my $sum = unpack('%32N*', $buf);
my $ticks = 0;
my $next_tick = time + 0.1;

my $listen = IO::Socket::INET->new(
    LocalAddr => '0.0.0.0', LocalPort => $port, Proto => 'tcp',
    Listen => 64, ReuseAddr => 1,
) or die "listen $port: $!";
print "hog: $mb MiB held, sum $sum, listening on $port\n";
my $sel = IO::Select->new($listen);
while (1) {
    my $wait = $next_tick - time;
    $wait = 0 if $wait < 0;
    for my $fh ($sel->can_read($wait)) {
        my $c = $listen->accept or next;
        $c->autoflush(1);
        my $req = '';
        my $got = IO::Select->new($c);
        while ($req !~ /\r?\n\r?\n/ && $got->can_read(2)) {
            my $n = sysread($c, $req, 4096, length($req));
            last unless $n;
        }
        my ($path) = $req =~ m{^GET (\S+)};
        $path //= '';
        my ($code, $body) = (404, "not found\n");
        if ($path eq '/health') {
            ($code, $body) = (200, "ok\n");
        } elsif ($path eq '/state') {
            ($code, $body) = (200, sprintf("mb=%d sum=%d ticks=%d pid=%d\n",
                $mb, unpack('%32N*', $buf), $ticks, $$));
        }
        print $c "HTTP/1.0 $code X\r\nContent-Type: text/plain\r\nContent-Length: "
            . length($body) . "\r\nConnection: close\r\n\r\n$body";
        close($c);
    }
    while (time >= $next_tick) { $ticks++; $next_tick += 0.1; }
}

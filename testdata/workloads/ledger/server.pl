# PID 1 of the `ledger` container: a write service that acknowledges a write only once it
# is durable. Perl 5.36 from perl-base of localhost/migrate-mariadb; no module outside it.
#
# TCP port 8084, a line protocol; a client may send one line per connection or many:
#   W ID       append "ID\n" to /data/ledger.log, fsync it, then answer "OK ID"
#   PING       answer "PONG"
# /data is a bind mount of the host's /srv/ledger (moved with `migrate send --data`).
# The log is opened, appended, fsync'd and closed for every write, so no descriptor of it
# is open while the process waits for clients.
#
# One process, one IO::Select loop, non-blocking sockets: a slow or idle client cannot
# stall the others.
use strict;
use warnings;
use IO::Socket::INET;
use IO::Select;
use IO::Handle;
use Fcntl qw(O_WRONLY O_APPEND O_CREAT);

my $port = $ENV{LEDGER_PORT} || 8084;
my $log  = $ENV{LEDGER_LOG}  || '/data/ledger.log';
$SIG{PIPE} = 'IGNORE';
$SIG{TERM} = $SIG{INT} = sub { exit 0 };
$| = 1;

my $listen = IO::Socket::INET->new(LocalAddr => '0.0.0.0', LocalPort => $port, Listen => 512,
    ReuseAddr => 1, Proto => 'tcp') or die "listen $port: $!\n";
$listen->blocking(0);
my $sel = IO::Select->new($listen);
my %inbuf;    # fileno => bytes read, not yet a whole line

sub durable_append {
    my $line = shift;
    sysopen(my $fh, $log, O_WRONLY | O_APPEND | O_CREAT, 0644) or die "open $log: $!\n";
    my $n = syswrite($fh, $line);
    defined $n && $n == length $line or die "write $log: $!\n";
    $fh->sync or die "fsync $log: $!\n";
    close $fh or die "close $log: $!\n";
}

sub drop_client {
    my $c = shift;
    delete $inbuf{fileno $c};
    $sel->remove($c);
    close $c;
}

print STDERR "ledger: listening on $port, log $log\n";
while (1) {
    for my $s ($sel->can_read(1)) {
        if ($s == $listen) {
            while (my $c = $listen->accept) {
                $c->blocking(0);
                $sel->add($c);
                $inbuf{fileno $c} = '';
            }
            next;
        }
        my $n = sysread($s, my $chunk, 4096);
        if (!defined $n) { next if $!{EAGAIN} || $!{EWOULDBLOCK}; drop_client($s); next }
        if ($n == 0) { drop_client($s); next }
        my $buf = $inbuf{fileno $s} .= $chunk;
        my $out = '';
        while ($buf =~ s/^([^\n]*)\n//) {
            my $req = $1;
            $req =~ s/\r$//;
            if ($req =~ /^W ([\w.:-]{1,100})$/) {
                durable_append("$1\n");
                $out .= "OK $1\n";
            } elsif ($req eq 'PING') {
                $out .= "PONG\n";
            } else {
                $out .= "ERR bad request\n";
            }
        }
        $inbuf{fileno $s} = $buf;
        # Answers are a few bytes; a client that does not read them loses its connection.
        if ($out ne '' && (syswrite($s, $out) // -1) != length $out) { drop_client($s) }
    }
}

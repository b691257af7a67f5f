# PID 1 of the `shop` container: a tiny web shop front with login sessions kept IN MEMORY
# (a Perl hash in this one process), so a session survives only if the process does.
# Perl 5.36 from perl-base of localhost/migrate-mariadb; no module outside perl-base.
#
#   GET  /health              200 "ok"
#   GET  /login?user=NAME     200, Set-Cookie: sid=<random 128-bit id>; "logged in as NAME"
#   POST /login  (user=NAME)  same, the name from the form body
#   GET  /logout              drops the session
#   GET  /                    "logged in as NAME" for a known sid cookie, else "not logged in"
#   GET  /stats               sessions, requests served, process start time, pid
# TCP port 8082 (echo): every line a client sends comes back as "N LINE" (N counts lines
# on that connection); used to keep one established connection open through a move.
#
# One process, one IO::Select loop, non-blocking sockets: a slow or idle client cannot
# stall the others. HTTP/1.0-style: one request per connection, then close.
use strict;
use warnings;
use IO::Socket::INET;
use IO::Select;
use POSIX qw(strftime);

my $http_port = $ENV{SHOP_PORT} || 8081;
my $echo_port = $ENV{SHOP_ECHO_PORT} || 8082;
$SIG{PIPE} = 'IGNORE';
$SIG{TERM} = $SIG{INT} = sub { exit 0 };
$| = 1;

my %sessions;          # sid => { user => NAME, since => epoch }
my $served  = 0;
my $started = time;

sub listener {
    my $port = shift;
    my $s = IO::Socket::INET->new(LocalAddr => '0.0.0.0', LocalPort => $port, Listen => 128,
        ReuseAddr => 1, Proto => 'tcp') or die "listen $port: $!\n";
    $s->blocking(0);
    return $s;
}
my $http = listener($http_port);
my $echo = listener($echo_port);
my $sel  = IO::Select->new($http, $echo);
my %conn;              # fileno => { sock, kind (http|echo), in, out, seen, close_after, lines }

open(my $rnd, '<:raw', '/dev/urandom') or die "urandom: $!\n";
sub new_sid { read($rnd, my $b, 16) == 16 or die "urandom short read\n"; unpack('H*', $b) }

sub unesc { my $s = shift // ''; $s =~ tr/+/ /; $s =~ s/%([0-9A-Fa-f]{2})/chr hex $1/ge; $s }
sub html { my $s = shift; $s =~ s/&/&amp;/g; $s =~ s/</&lt;/g; $s =~ s/>/&gt;/g; $s }
sub form {
    my %f;
    for (split /[&;]/, shift // '') { my ($k, $v) = split /=/, $_, 2; $f{unesc($k)} = unesc($v) }
    %f;
}

sub response {
    my ($code, $body, @headers) = @_;
    my %reason = (200 => 'OK', 400 => 'Bad Request', 404 => 'Not Found', 405 => 'Method Not Allowed');
    join("\r\n", "HTTP/1.1 $code $reason{$code}", 'Content-Type: text/plain; charset=utf-8',
        'Content-Length: ' . length($body), 'Cache-Control: no-store', 'Connection: close',
        @headers, '', $body);
}

sub handle {
    my ($method, $target, $headers, $body) = @_;
    $served++;
    my ($path, $query) = split /\?/, $target, 2;
    my %cookie;
    for (split /;\s*/, $headers->{cookie} // '') { my ($k, $v) = split /=/, $_, 2; $cookie{$k} = $v if defined $v }
    my $sid = $cookie{sid};
    my $s = defined $sid ? $sessions{$sid} : undef;
    if ($path eq '/health') {
        return response(200, "ok\n");
    } elsif ($path eq '/login') {
        my %f = $method eq 'POST' ? form($body) : form($query);
        my $user = $f{user} // '';
        return response(400, "login needs user=NAME (letters, digits, . _ -)\n")
            unless $user =~ /^[A-Za-z0-9._-]{1,64}$/;
        my $new = new_sid();
        $sessions{$new} = { user => $user, since => time };
        return response(200, "logged in as $user\n", "Set-Cookie: sid=$new; Path=/; HttpOnly");
    } elsif ($path eq '/logout') {
        delete $sessions{$sid} if defined $sid;
        return response(200, "not logged in\n", 'Set-Cookie: sid=; Path=/; Max-Age=0');
    } elsif ($path eq '/stats') {
        return response(200, sprintf("sessions %d\nserved %d\npid %d\nstarted %s\n", scalar(keys %sessions),
            $served, $$, strftime('%Y-%m-%dT%H:%M:%SZ', gmtime $started)));
    } elsif ($path eq '/') {
        return response(200, $s ? "logged in as " . html($s->{user}) . "\n" : "not logged in\n");
    }
    return response(404, "not found\n");
}

sub drop {
    my $fd = shift;
    my $c = delete $conn{$fd} or return;
    $sel->remove($c->{sock});
    close $c->{sock};
}

sub on_readable {
    my $c = shift;
    my $n = sysread($c->{sock}, my $buf, 65536);
    if (!defined $n) { return if $!{EAGAIN} || $!{EWOULDBLOCK} || $!{EINTR}; return drop(fileno $c->{sock}) }
    return drop(fileno $c->{sock}) if $n == 0 && !length $c->{out};
    $c->{seen} = time;
    $c->{in} .= $buf;
    if ($c->{kind} eq 'echo') {
        while ($c->{in} =~ s/^([^\n]*)\n//) { $c->{lines}++; $c->{out} .= "$c->{lines} $1\n" }
        return;
    }
    return if $c->{close_after};
    my $end = index($c->{in}, "\r\n\r\n");
    return if $end < 0 && length $c->{in} < 16384;
    my ($head, $rest) = $end < 0 ? ($c->{in}, '') : (substr($c->{in}, 0, $end), substr($c->{in}, $end + 4));
    my ($reqline, @lines) = split /\r\n/, $head;
    my ($method, $target) = split / /, $reqline // '';
    my %h;
    for (@lines) { my ($k, $v) = split /:\s*/, $_, 2; $h{lc $k} = $v if defined $v }
    my $len = $h{'content-length'} // 0;
    return if $len =~ /^\d+$/ && length($rest) < $len && length($rest) < 65536;   # wait for the body
    $c->{out} = !defined $target ? response(400, "bad request\n")
              : $method eq 'GET' || $method eq 'HEAD' || $method eq 'POST' ? handle($method, $target, \%h, $rest)
              : response(405, "method not allowed\n");
    $c->{close_after} = 1;
}

while (1) {
    my $wsel = IO::Select->new(map { $_->{sock} } grep { length $_->{out} } values %conn);
    my ($readable) = IO::Select->select($sel, $wsel->count ? $wsel : undef, undef, 0.5);
    for my $s (@{ $readable || [] }) {
        if ($s == $http || $s == $echo) {
            while (my $cl = $s->accept) {
                $cl->blocking(0);
                $conn{fileno $cl} = { sock => $cl, kind => ($s == $http ? 'http' : 'echo'),
                                      in => '', out => '', seen => time, lines => 0 };
                $sel->add($cl);
            }
            next;
        }
        my $c = $conn{fileno $s} or next;
        on_readable($c);
    }
    # Write what is pending (responses are small: one non-blocking write almost always
    # does it; what is left waits until the socket is writable).
    for my $fd (keys %conn) {
        my $c = $conn{$fd};
        if (length $c->{out}) {
            my $n = syswrite($c->{sock}, $c->{out});
            if (defined $n) { substr($c->{out}, 0, $n) = '' }
            elsif (!$!{EAGAIN} && !$!{EWOULDBLOCK}) { drop($fd); next }
        }
        if ($c->{close_after} && !length $c->{out}) { drop($fd); next }
        # Idle HTTP clients are dropped after 10 s; echo connections stay as long as the client.
        drop($fd) if $c->{kind} eq 'http' && time - $c->{seen} > 10;
    }
}

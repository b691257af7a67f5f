//! A container's TCP connections now, from the kernel's tables of its network namespace
//! (`/proc/PID/net/tcp` and `tcp6` of any process inside it).

use std::path::Path;

/// How many TCP sockets of a network namespace are in the states CRIU treats apart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Connections {
    pub listening: usize,
    pub established: usize,
    /// Half-open: a handshake not yet complete (CRIU's "in-flight").
    pub handshake: usize,
}

impl Connections {
    /// Reads the tables of the network namespace `pid` lives in.
    pub fn of_pid(pid: i64) -> std::io::Result<Connections> {
        let dir = Path::new("/proc").join(pid.to_string()).join("net");
        let mut n = Connections::default();
        for table in ["tcp", "tcp6"] {
            match std::fs::read_to_string(dir.join(table)) {
                Ok(text) => n.add(&text),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && table == "tcp6" => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    /// Counts one table (its header line and every socket line, `st` in hex).
    fn add(&mut self, table: &str) {
        for line in table.lines().skip(1) {
            match line.split_whitespace().nth(3) {
                Some("0A") => self.listening += 1,
                Some("01") => self.established += 1,
                Some("02") | Some("03") => self.handshake += 1,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_states_criu_cares_about() {
        // Lines of a real /proc/net/tcp (trimmed after the state).
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n\
   1: 0100007F:1F90 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 2 1\n\
   2: 0100007F:D2F0 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 3 1\n\
   3: 0100007F:1F90 0100007F:D2F2 03 00000000:00000000 00:00000000 00000000     0        0 4 1\n\
   4: 0100007F:1F90 0100007F:D2F4 06 00000000:00000000 00:00000000 00000000     0        0 0 1\n";
        let mut n = Connections::default();
        n.add(table);
        assert_eq!(
            n,
            Connections {
                listening: 1,
                established: 2,
                handshake: 1
            }
        );
        // This very process: at least readable.
        Connections::of_pid(std::process::id() as i64).unwrap();
    }
}

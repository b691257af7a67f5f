//! How a command ended. The process exit status is the discriminant, with one meaning
//! for every command, so a script can treat `send`, `receive`, `check` and `recover` alike.

use crate::timing::Outcome;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// It did what was asked: `send` migrated, `receive` restored, `check` found no blocker.
    Ok = 0,
    /// It failed after something was frozen or half-done, and was undone: the service
    /// runs where it ran before (`send` rolled back; `receive` did not restore and the
    /// source keeps the service).
    RolledBack = 1,
    /// Refused before anything changed: bad input, a host not ready, a blocker found.
    Refused = 2,
    /// It failed and could not be undone completely: a human must look (the message and
    /// the record say where).
    Failed = 3,
    /// Stopped by a signal while nothing was in progress.
    Interrupted = 130,
}

impl Exit {
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The record's outcome for a `send` that ended so.
    pub fn outcome(self) -> Outcome {
        match self {
            Exit::Ok => Outcome::Ok,
            Exit::RolledBack => Outcome::RolledBack,
            Exit::Refused => Outcome::Refused,
            Exit::Failed | Exit::Interrupted => Outcome::Failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_the_documented_ones() {
        let all = [
            (Exit::Ok, 0),
            (Exit::RolledBack, 1),
            (Exit::Refused, 2),
            (Exit::Failed, 3),
            (Exit::Interrupted, 130),
        ];
        for (exit, code) in all {
            assert_eq!(exit.code(), code, "{exit:?}");
        }
        assert_eq!(Exit::Failed.outcome(), Outcome::Failed);
        assert_eq!(Exit::Ok.outcome(), Outcome::Ok);
    }
}

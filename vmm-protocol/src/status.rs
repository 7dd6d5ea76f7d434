//! A VM's status as typed data: what `read(2)` of `vmm/NAME` shows (after
//! the daemon's own `name=` line) and what a VM's worker process reports to
//! the daemon. The daemon never copies a worker's text through: it parses it
//! into [`Status`] (rejecting anything malformed) and prints its own.

use crate::{ParseError, Result};
use std::fmt;

/// Longest `cause=` text kept; a longer one is cut (a cause is for people).
pub const MAX_CAUSE: usize = 512;

/// Why a guest stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    Reboot,
    PowerOff,
    Halt,
    TripleFault,
    /// An error, with its cause (one line).
    Error(String),
    Suspend,
}

impl Exit {
    /// bhyve's exit status for this reason.
    pub fn status(&self) -> i32 {
        match self {
            Exit::Reboot => 0,
            Exit::PowerOff => 1,
            Exit::Halt => 2,
            Exit::TripleFault => 3,
            Exit::Error(_) => 4,
            Exit::Suspend => 5,
        }
    }

    /// The word used in status text.
    pub fn name(&self) -> &'static str {
        match self {
            Exit::Reboot => "reboot",
            Exit::PowerOff => "poweroff",
            Exit::Halt => "halt",
            Exit::TripleFault => "triple-fault",
            Exit::Error(_) => "error",
            Exit::Suspend => "suspend",
        }
    }

    /// An error exit with `cause` made fit for a status line: one line, at
    /// most [`MAX_CAUSE`] bytes.
    pub fn error(cause: &str) -> Exit {
        let mut c: String = cause.replace(['\n', '\r'], " ");
        if c.len() > MAX_CAUSE {
            let mut end = MAX_CAUSE;
            while !c.is_char_boundary(end) {
                end -= 1;
            }
            c.truncate(end);
        }
        Exit::Error(c)
    }
}

/// Life cycle of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Configuring,
    Running,
    Exited(Exit),
    Destroyed,
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Configuring => "configuring",
            State::Running => "running",
            State::Exited(_) => "exited",
            State::Destroyed => "destroyed",
        }
    }
}

/// Everything `vmm/NAME` reports besides the name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub state: State,
    pub cpus: u16,
    pub memory: u64,
    /// vCPU exits to user space over the VM's life.
    pub exits: u64,
    /// Of those, port and MMIO exits.
    pub io_exits: u64,
    /// Microseconds from `run` to the guest's first boot-timer write.
    pub boot_time_us: Option<u64>,
    /// Port and MMIO exits until that write.
    pub boot_io_exits: Option<u64>,
    /// Bytes of guest memory the host has actually allocated (bhyvectl's
    /// "Resident memory"); absent where the engine cannot tell.
    pub resident: Option<u64>,
}

impl fmt::Display for Status {
    /// `key=value` lines in the order vmm(4) documents.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "state={}", self.state.name())?;
        writeln!(f, "cpus={}", self.cpus)?;
        writeln!(f, "memory={}", self.memory)?;
        if let State::Exited(e) = &self.state {
            writeln!(f, "exit={}", e.name())?;
            writeln!(f, "status={}", e.status())?;
            if let Exit::Error(cause) = e {
                // One line of at most MAX_CAUSE bytes, whoever made the cause.
                match Exit::error(cause) {
                    Exit::Error(c) => writeln!(f, "cause={c}")?,
                    _ => unreachable!("Exit::error makes an error"),
                }
            }
        }
        writeln!(f, "exits={}", self.exits)?;
        writeln!(f, "io_exits={}", self.io_exits)?;
        if let Some(us) = self.boot_time_us {
            writeln!(f, "boot_time_us={us}")?;
        }
        if let Some(n) = self.boot_io_exits {
            writeln!(f, "boot_io_exits={n}")?;
        }
        if let Some(n) = self.resident {
            writeln!(f, "resident={n}")?;
        }
        Ok(())
    }
}

impl Status {
    /// Parse what [`Status`]'s Display prints: exactly those keys, in that
    /// order, each once, with values in range (`status=` must match `exit=`).
    pub fn parse(text: &str) -> Result<Status> {
        let bad = |what: &str| ParseError(format!("status: {what}"));
        let mut lines = text.strip_suffix('\n').unwrap_or(text).split('\n');
        let mut field = |key: &str| -> Result<&str> {
            let line = lines
                .next()
                .ok_or_else(|| bad(&format!("{key}= missing")))?;
            line.strip_prefix(key)
                .and_then(|l| l.strip_prefix('='))
                .ok_or_else(|| bad(&format!("expected {key}=, got '{line}'")))
        };
        let number = |v: &str| -> Result<u64> {
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad(&format!("'{v}' is not a number")));
            }
            v.parse()
                .map_err(|_| bad(&format!("'{v}' is out of range")))
        };
        let state = field("state")?;
        let cpus = u16::try_from(number(field("cpus")?)?).map_err(|_| bad("cpus out of range"))?;
        let memory = number(field("memory")?)?;
        let state = match state {
            "configuring" => State::Configuring,
            "running" => State::Running,
            "destroyed" => State::Destroyed,
            "exited" => {
                let name = field("exit")?;
                let status = number(field("status")?)?;
                let exit = match name {
                    "reboot" => Exit::Reboot,
                    "poweroff" => Exit::PowerOff,
                    "halt" => Exit::Halt,
                    "triple-fault" => Exit::TripleFault,
                    "suspend" => Exit::Suspend,
                    "error" => {
                        let cause = field("cause")?;
                        if cause.len() > MAX_CAUSE {
                            return Err(bad("cause too long"));
                        }
                        Exit::Error(cause.to_string())
                    }
                    other => return Err(bad(&format!("unknown exit '{other}'"))),
                };
                if u64::try_from(exit.status()).ok() != Some(status) {
                    return Err(bad("status does not match exit"));
                }
                State::Exited(exit)
            }
            other => return Err(bad(&format!("unknown state '{other}'"))),
        };
        let exits = number(field("exits")?)?;
        let io_exits = number(field("io_exits")?)?;
        // The optional keys, each at most once, in order.
        let mut rest = lines.peekable();
        let mut optional = |key: &str| -> Result<Option<u64>> {
            match rest
                .peek()
                .and_then(|l| l.strip_prefix(key))
                .and_then(|l| l.strip_prefix('='))
            {
                Some(v) => {
                    let n = number(v)?;
                    rest.next();
                    Ok(Some(n))
                }
                None => Ok(None),
            }
        };
        let boot_time_us = optional("boot_time_us")?;
        let boot_io_exits = optional("boot_io_exits")?;
        let resident = optional("resident")?;
        if let Some(l) = rest.next() {
            return Err(bad(&format!("unexpected '{l}'")));
        }
        Ok(Status {
            state,
            cpus,
            memory,
            exits,
            io_exits,
            boot_time_us,
            boot_io_exits,
            resident,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn exit() -> impl Strategy<Value = Exit> {
        prop_oneof![
            Just(Exit::Reboot),
            Just(Exit::PowerOff),
            Just(Exit::Halt),
            Just(Exit::TripleFault),
            Just(Exit::Suspend),
            "[ -~]{0,80}".prop_map(|c| Exit::error(&c)),
        ]
    }

    fn state() -> impl Strategy<Value = State> {
        prop_oneof![
            Just(State::Configuring),
            Just(State::Running),
            Just(State::Destroyed),
            exit().prop_map(State::Exited),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn display_parse_round_trip(
            state in state(),
            cpus: u16,
            memory: u64,
            exits: u64,
            io_exits: u64,
            boot_time_us: Option<u64>,
            boot_io_exits: Option<u64>,
            resident: Option<u64>,
        ) {
            let s = Status { state, cpus, memory, exits, io_exits, boot_time_us, boot_io_exits, resident };
            prop_assert_eq!(Status::parse(&s.to_string()), Ok(s));
        }

        #[test]
        fn parse_never_panics(text in "[a-z_=0-9\\n-]{0,200}") {
            let _ = Status::parse(&text);
        }
    }

    #[test]
    fn engine_text_parses() {
        let s = Status::parse(
            "state=exited\ncpus=2\nmemory=33554432\nexit=error\nstatus=4\ncause=vCPU 0: bad\nexits=7\nio_exits=3\n",
        )
        .unwrap();
        assert_eq!(s.state, State::Exited(Exit::Error("vCPU 0: bad".into())));
        assert_eq!(s.boot_time_us, None);
    }

    #[test]
    fn refusals() {
        for text in [
            "",
            "name=x\nstate=running\ncpus=1\nmemory=1\nexits=0\nio_exits=0\n",
            "state=running\ncpus=1\nmemory=1\nexits=0\nio_exits=0\nname=other\n",
            "state=exited\ncpus=1\nmemory=1\nexit=halt\nstatus=4\nexits=0\nio_exits=0\n",
            "state=exited\ncpus=1\nmemory=1\nexit=error\nstatus=4\nexits=0\nio_exits=0\n",
            "state=running\ncpus=70000\nmemory=1\nexits=0\nio_exits=0\n",
            "state=running\ncpus=+1\nmemory=1\nexits=0\nio_exits=0\n",
            "state=running\ncpus=1\nmemory=1\nexits=0\n",
            "state=running\ncpus=1\nmemory=1\nexits=0\nio_exits=0\nboot_time_us=1\nexits=0\n",
            "state=running\ncpus=1\nmemory=1\nexits=0\nio_exits=0\nboot_io_exits=1\nboot_time_us=1\n",
        ] {
            assert!(Status::parse(text).is_err(), "{text:?}");
        }
        let long = format!(
            "state=exited\ncpus=1\nmemory=1\nexit=error\nstatus=4\ncause={}\nexits=0\nio_exits=0\n",
            "x".repeat(MAX_CAUSE + 1)
        );
        assert!(Status::parse(&long).is_err());
        assert_eq!(
            Exit::error(&"é".repeat(MAX_CAUSE)),
            Exit::Error("é".repeat(MAX_CAUSE / 2))
        );
        assert_eq!(Exit::error("a\nb"), Exit::Error("a b".into()));
        // Display makes any cause fit, so that a status always parses.
        let s = Status {
            state: State::Exited(Exit::Error(format!("two\nlines{}", "x".repeat(MAX_CAUSE)))),
            cpus: 1,
            memory: 1,
            exits: 0,
            io_exits: 0,
            boot_time_us: None,
            boot_io_exits: None,
            resident: Some(4096),
        };
        let back = Status::parse(&s.to_string()).unwrap();
        assert!(
            matches!(back.state, State::Exited(Exit::Error(c)) if c.starts_with("two lines") && c.len() == MAX_CAUSE)
        );
    }
}

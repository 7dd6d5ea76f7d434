//! Jails: PID namespaces other than the daemon's own.
//!
//! A PID namespace is named by the inode number of its nsfs file, and the
//! kernel hands that number to a new namespace once the old one is freed.
//! Keying grants or VMs by the bare number would let any user loop
//! `unshare -Urp` until a fresh namespace inherits a dead jail's allow.vmm.
//! So every [`Jail`] value other than the host holds an open descriptor on
//! its namespace: while anything here refers to a jail (a handle, a VM, a
//! grant), its namespace cannot be freed and its number cannot be reused, so
//! comparing numbers is sound. When the last reference goes, so does the hold.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Weak};

/// A PID namespace, held open while this value (or a clone) lives.
#[derive(Clone)]
pub struct Jail(Arc<Inner>);

struct Inner {
    ns: u64,
    host: bool,
    /// The nsfs descriptor that pins the namespace (None for the host, which
    /// lives as long as the daemon, and for test jails).
    _hold: Option<OwnedFd>,
    /// A jail that ended while no daemon held it (a VM adopted after a
    /// restart): its number may name a new namespace by now, so it equals
    /// no other jail.
    orphan: bool,
}

impl Jail {
    /// The namespace's inode number (what `ls -l /proc/PID/ns/pid` shows).
    pub fn ns(&self) -> u64 {
        self.0.ns
    }

    /// Whether this is the daemon's own namespace: prison0.
    pub fn is_host(&self) -> bool {
        self.0.host
    }

    /// A jail that holds nothing, for unit tests of the policy.
    #[cfg(test)]
    pub fn fake(ns: u64, host: bool) -> Jail {
        Jail(Arc::new(Inner {
            ns,
            host,
            _hold: None,
            orphan: false,
        }))
    }

    /// The jail `ns` that ended while no daemon held it: no process is in
    /// it, and it is equal to no other jail.
    pub fn orphan(ns: u64) -> Jail {
        Jail(Arc::new(Inner {
            ns,
            host: false,
            _hold: None,
            orphan: true,
        }))
    }
}

impl PartialEq for Jail {
    /// Sound because every live `Jail` pins its namespace (see the module doc).
    fn eq(&self, other: &Jail) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
            || (self.0.ns == other.0.ns && !self.0.orphan && !other.0.orphan)
    }
}

impl Eq for Jail {}

impl std::fmt::Debug for Jail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.host {
            write!(f, "host")
        } else if self.0.orphan {
            write!(f, "ended jail {}", self.0.ns)
        } else {
            write!(f, "jail {}", self.0.ns)
        }
    }
}

/// The jails the daemon currently refers to.
pub struct Jails {
    host: Jail,
    live: Mutex<HashMap<u64, Weak<Inner>>>,
}

fn ns_path(pid: u32) -> String {
    format!("/proc/{pid}/ns/pid")
}

impl Jails {
    /// The daemon's own namespace is the host.
    pub fn new() -> std::io::Result<Jails> {
        let ns = fs::metadata("/proc/self/ns/pid")?.ino();
        Ok(Jails {
            host: Jail(Arc::new(Inner {
                ns,
                host: true,
                _hold: None,
                orphan: false,
            })),
            live: Mutex::new(HashMap::new()),
        })
    }

    /// For unit tests: a host with namespace number `ns`.
    #[cfg(test)]
    pub fn fake(host: Jail) -> Jails {
        Jails {
            host,
            live: Mutex::new(HashMap::new()),
        }
    }

    /// The host: prison0.
    pub fn host(&self) -> Jail {
        self.host.clone()
    }

    /// The jail of thread or process `pid` (in the daemon's PID namespace).
    pub fn of_pid(&self, pid: u32) -> std::io::Result<Jail> {
        let ino = fs::metadata(ns_path(pid))?.ino();
        if ino == self.host.ns() {
            return Ok(self.host.clone());
        }
        let mut live = self.live.lock();
        if let Some(inner) = live.get(&ino).and_then(Weak::upgrade) {
            // Still pinned by us, so it is the same namespace.
            return Ok(Jail(inner));
        }
        // Open, then read the number from the descriptor itself: if the
        // process moved or died in between, we hold what we name.
        let file = fs::File::open(ns_path(pid))?;
        let ns = file.metadata()?.ino();
        if ns == self.host.ns() {
            return Ok(self.host.clone());
        }
        if live.len() >= 64 {
            live.retain(|_, w| w.strong_count() > 0);
        }
        let inner = Arc::new(Inner {
            ns,
            host: false,
            _hold: Some(OwnedFd::from(file)),
            orphan: false,
        });
        live.insert(ns, Arc::downgrade(&inner));
        Ok(Jail(inner))
    }
}

/// A process identity that survives PID reuse: its PID and start time (clock
/// ticks since boot, field 22 of /proc/PID/stat).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: u32,
    pub start: u64,
}

impl ProcessId {
    /// Identity of process `pid` (a thread group id).
    pub fn of(pid: u32) -> std::io::Result<ProcessId> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let (pid, start) =
            parse_stat(&stat).ok_or_else(|| std::io::Error::from_raw_os_error(libc::ESRCH))?;
        Ok(ProcessId { pid, start })
    }

    /// Whether this very process still exists (not a zombie, not reused).
    pub fn alive(&self) -> bool {
        match fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            Ok(stat) => {
                parse_stat(&stat).is_some_and(|(_, start)| start == self.start)
                    && stat_state(&stat).is_some_and(|s| s != 'Z' && s != 'X')
            }
            Err(_) => false,
        }
    }

    /// The wait status of this process if it has ended and is not yet
    /// reaped (a zombie): field 52 of /proc/PID/stat.
    pub fn zombie_status(&self) -> Option<i32> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        if parse_stat(&stat)?.1 != self.start || stat_state(&stat)? != 'Z' {
            return None;
        }
        stat_field(&stat, 52)?.parse().ok()
    }
}

/// (pid, start time) from the text of /proc/PID/stat. The command name may
/// contain spaces and parentheses, so fields are counted after the last ')'.
fn parse_stat(stat: &str) -> Option<(u32, u64)> {
    let pid = stat.split(' ').next()?.parse().ok()?;
    // starttime is field 22.
    let start = stat_field(stat, 22)?.parse().ok()?;
    Some((pid, start))
}

fn stat_state(stat: &str) -> Option<char> {
    stat_field(stat, 3)?.chars().next()
}

/// The text of a /proc file, in two reads. The kernel reports a size of 0
/// for these files, so `fs::read_to_string` starts with a 32-byte read and
/// doubles: ten system calls for a /proc/PID/status, which the daemon reads
/// at every request whose caller it checks (a bhyve launch makes a dozen).
pub fn read_proc(path: &str) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::with_capacity(4096);
    fs::File::open(path)?.read_to_string(&mut text)?;
    Ok(text)
}

/// Field `n` (numbered from 1, as proc(5) does; 3 or higher) of the text
/// of /proc/PID/stat.
fn stat_field(stat: &str, n: usize) -> Option<&str> {
    // The fields after the command name start at field 3 (state); the
    // last one ends the line.
    stat[stat.rfind(')')? + 2..]
        .split(' ')
        .nth(n.checked_sub(3)?)
        .map(str::trim_end)
}

/// The init process (PID 1 inside) of the PID namespace `jail`, found by
/// scanning /proc: the grant lives as long as it does.
pub fn init_of(jail: &Jail) -> std::io::Result<ProcessId> {
    for ent in fs::read_dir("/proc")?.flatten() {
        let Some(pid) = ent.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if fs::metadata(ns_path(pid)).map(|m| m.ino()).ok() != Some(jail.ns()) {
            continue;
        }
        let Ok(status) = read_proc(&format!("/proc/{pid}/status")) else {
            continue;
        };
        let inner_pid = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .and_then(|v| v.split_whitespace().last().map(str::to_string));
        if inner_pid.as_deref() == Some("1") {
            return ProcessId::of(pid);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        "the jail has no init process (PID 1) visible from the host",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields() {
        let s =
            "1234 (a (b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(parse_stat(s), Some((1234, 98765)));
        assert_eq!(stat_state(s), Some('S'));
        assert_eq!(parse_stat("garbage"), None);
        // The last field (52, exit_code) ends the line.
        let zombie = format!("7 (w) Z{}\n", " 0".repeat(48) + " 9");
        assert_eq!(stat_field(&zombie, 52), Some("9"));
        assert_eq!(stat_field(&zombie, 3), Some("Z"));
    }

    #[test]
    fn own_process() {
        let me = ProcessId::of(std::process::id()).unwrap();
        assert!(me.alive());
        assert!(!ProcessId {
            pid: me.pid,
            start: me.start + 1
        }
        .alive());
    }

    #[test]
    fn host_is_own_namespace() {
        let jails = Jails::new().unwrap();
        let j = jails.of_pid(std::process::id()).unwrap();
        assert!(j.is_host());
        assert_eq!(j, jails.host);
    }
}

//! Credentials of client processes.
//!
//! A handle records its opener's credentials at open(2); every later write or
//! ioctl on it speaks with that authority, and only if the writing thread has
//! exactly the same credentials (SPEC.md "Authority"). Linux write handlers
//! must not trust the writer: set-id programs write attacker-chosen text to
//! descriptors they inherited. The comparison covers everything that can make
//! two processes of one user differ in power: all four uids and gids,
//! supplementary groups, capability sets (file capabilities gained at exec)
//! and the PID namespace.

use crate::jails::{read_proc, Jail, Jails};
use std::sync::Arc;

/// Everything that decides what a process may do.
#[derive(Clone)]
pub struct Creds {
    /// real, effective, saved, filesystem
    pub uid: [u32; 4],
    /// real, effective, saved, filesystem
    pub gid: [u32; 4],
    /// Supplementary groups, as the kernel lists them (sorted).
    pub groups: Arc<[u32]>,
    /// inheritable, permitted, effective, ambient
    pub caps: [u64; 4],
    pub jail: Jail,
}

const UID_NAMES: [&str; 4] = ["real uid", "effective uid", "saved uid", "fs uid"];
const GID_NAMES: [&str; 4] = ["real gid", "effective gid", "saved gid", "fs gid"];
const CAP_NAMES: [&str; 4] = [
    "inheritable capabilities",
    "permitted capabilities",
    "effective capabilities",
    "ambient capabilities",
];

impl Creds {
    pub fn ruid(&self) -> u32 {
        self.uid[0]
    }

    pub fn euid(&self) -> u32 {
        self.uid[1]
    }

    /// Read the credentials of thread `tid` (FUSE reports thread ids; Linux
    /// credentials are per thread).
    pub fn of_thread(tid: u32, jails: &Jails) -> std::io::Result<Creds> {
        let status = read_proc(&format!("/proc/{tid}/status"))?;
        Creds::from_status(&status, tid, jails)
    }

    fn from_status(status: &str, tid: u32, jails: &Jails) -> std::io::Result<Creds> {
        let (uid, gid, groups, caps) =
            parse_status(status).ok_or_else(|| std::io::Error::from_raw_os_error(libc::ESRCH))?;
        Ok(Creds {
            uid,
            gid,
            groups: groups.into(),
            caps,
            jail: jails.of_pid(tid)?,
        })
    }

    /// How `other` differs from these credentials, or None if it does not:
    /// for the log line that explains a refusal.
    pub fn difference(&self, other: &Creds) -> Option<String> {
        for i in 0..4 {
            if self.uid[i] != other.uid[i] {
                return Some(format!(
                    "{} {} vs {}",
                    UID_NAMES[i], self.uid[i], other.uid[i]
                ));
            }
            if self.gid[i] != other.gid[i] {
                return Some(format!(
                    "{} {} vs {}",
                    GID_NAMES[i], self.gid[i], other.gid[i]
                ));
            }
            if self.caps[i] != other.caps[i] {
                return Some(format!(
                    "{} {:#x} vs {:#x}",
                    CAP_NAMES[i], self.caps[i], other.caps[i]
                ));
            }
        }
        if self.groups != other.groups {
            return Some(format!("groups {:?} vs {:?}", self.groups, other.groups));
        }
        if self.jail != other.jail {
            return Some(format!("{:?} vs {:?}", self.jail, other.jail));
        }
        None
    }

    /// Credentials for unit tests: one uid and gid everywhere, no groups or capabilities.
    #[cfg(test)]
    pub fn fake(uid: u32, gid: u32, jail: Jail) -> Creds {
        let caps = if uid == 0 { u64::MAX >> 23 } else { 0 };
        Creds {
            uid: [uid; 4],
            gid: [gid; 4],
            groups: Arc::from(Vec::new()),
            caps: [0, caps, caps, 0],
            jail,
        }
    }
}

impl std::fmt::Debug for Creds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "uid {}/{} gid {}/{} {:?}",
            self.uid[0], self.uid[1], self.gid[0], self.gid[1], self.jail
        )
    }
}

type StatusIds = ([u32; 4], [u32; 4], Vec<u32>, [u64; 4]);

/// Parse the Uid, Gid, Groups and Cap* lines of /proc/PID/status.
pub fn parse_status(status: &str) -> Option<StatusIds> {
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
    };
    let four = |key: &str| -> Option<[u32; 4]> {
        let v: Vec<u32> = field(key)?
            .split_whitespace()
            .map(|s| s.parse().ok())
            .collect::<Option<_>>()?;
        v.try_into().ok()
    };
    let cap = |key: &str| u64::from_str_radix(field(key)?, 16).ok();
    let groups = field("Groups:")?
        .split_whitespace()
        .map(|s| s.parse().ok())
        .collect::<Option<Vec<u32>>>()?;
    Some((
        four("Uid:")?,
        four("Gid:")?,
        groups,
        [
            cap("CapInh:")?,
            cap("CapPrm:")?,
            cap("CapEff:")?,
            // Kernels before 4.3 have no ambient set: none can be raised there.
            cap("CapAmb:").unwrap_or(0),
        ],
    ))
}

/// A request's thread and its credentials now.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Thread id, in the daemon's PID namespace (for log lines).
    pub pid: u32,
    /// Its process (thread group) id.
    pub tgid: u32,
    pub creds: Creds,
}

impl Caller {
    /// The thread `tid` that made a request, as it is now.
    pub fn of_thread(tid: u32, jails: &Jails) -> std::io::Result<Caller> {
        let status = read_proc(&format!("/proc/{tid}/status"))?;
        let creds = Creds::from_status(&status, tid, jails)?;
        let tgid = status
            .lines()
            .find_map(|l| l.strip_prefix("Tgid:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ESRCH))?;
        Ok(Caller {
            pid: tid,
            tgid,
            creds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tsu\nUmask:\t0022\nUid:\t1000\t0\t0\t0\nGid:\t5\t5\t5\t5\n\
        Groups:\t5 27 100 \nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
        CapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n";

    #[test]
    fn status_lines() {
        let (uid, gid, groups, caps) = parse_status(STATUS).unwrap();
        assert_eq!(uid, [1000, 0, 0, 0]);
        assert_eq!(gid, [5; 4]);
        assert_eq!(groups, vec![5, 27, 100]);
        assert_eq!(caps, [0, 0x1ff_ffff_ffff, 0x1ff_ffff_ffff, 0]);
        let no_groups = STATUS.replace("Groups:\t5 27 100 ", "Groups:\t");
        assert_eq!(parse_status(&no_groups).unwrap().2, Vec::<u32>::new());
        assert!(parse_status("Name: x\n").is_none());
        assert!(parse_status(&STATUS.replace("\t0\t0\t0\nGid", "\t0\nGid")).is_none());
    }

    #[test]
    fn own_credentials() {
        let jails = Jails::new().unwrap();
        let c = Creds::of_thread(std::process::id(), &jails).unwrap();
        // SAFETY: trivial getters.
        let (ruid, euid) = unsafe { (libc::getuid(), libc::geteuid()) };
        assert_eq!((c.ruid(), c.euid()), (ruid, euid));
        assert!(c.jail.is_host());
        assert_eq!(c.difference(&c.clone()), None);
    }

    #[test]
    fn any_difference_counts() {
        let host = Jail::fake(1, true);
        let a = Creds::fake(1000, 5, host.clone());
        let mut b = a.clone();
        b.uid[2] = 0;
        assert!(a.difference(&b).unwrap().contains("saved uid"));
        let mut b = a.clone();
        b.caps[2] = 1 << 21;
        assert!(a.difference(&b).unwrap().contains("effective capabilities"));
        let mut b = a.clone();
        b.groups = Arc::from(vec![27]);
        assert!(a.difference(&b).unwrap().contains("groups"));
        let mut b = a.clone();
        b.jail = Jail::fake(2, false);
        assert!(a.difference(&b).unwrap().contains("jail 2"));
    }
}

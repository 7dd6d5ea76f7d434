//! Credentials of a client process, as recorded when it opens a node.
//!
//! FUSE tells us the fsuid/fsgid and the thread id of each request; the real
//! uid (for the per-user limit) and the PID namespace (the "jail") come from
//! /proc, read while the client is blocked in its open(2).

use std::fs;
use std::os::unix::fs::MetadataExt;

/// Identity of a PID namespace: the inode of `/proc/PID/ns/pid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JailId(pub u64);

/// Who is asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Creds {
    /// Requesting thread id, in the daemon's PID namespace.
    pub pid: u32,
    /// Real uid: what the per-user limit counts.
    pub ruid: u32,
    /// Effective uid: owner of VMs it creates.
    pub euid: u32,
    /// PID namespace of the process.
    pub jail: JailId,
}

/// The PID namespace of a process.
pub fn pid_namespace(pid: u32) -> std::io::Result<JailId> {
    Ok(JailId(fs::metadata(format!("/proc/{pid}/ns/pid"))?.ino()))
}

/// The daemon's own PID namespace: the host (prison0).
pub fn host_namespace() -> std::io::Result<JailId> {
    Ok(JailId(fs::metadata("/proc/self/ns/pid")?.ino()))
}

/// Parse the `Uid:` line of /proc/PID/status into (real, effective).
pub fn parse_status_uids(status: &str) -> Option<(u32, u32)> {
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    let mut ids = line["Uid:".len()..]
        .split_whitespace()
        .map(|s| s.parse::<u32>());
    let ruid = ids.next()?.ok()?;
    let euid = ids.next()?.ok()?;
    Some((ruid, euid))
}

impl Creds {
    /// Read the credentials of request thread `pid`; `fsuid` is what FUSE reported.
    pub fn of_request(pid: u32, fsuid: u32) -> std::io::Result<Creds> {
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        let (ruid, euid) = parse_status_uids(&status)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ESRCH))?;
        // The kernel checked permissions with fsuid; normally it equals euid.
        let euid = if fsuid != euid { fsuid } else { euid };
        Ok(Creds {
            pid,
            ruid,
            euid,
            jail: pid_namespace(pid)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_line() {
        let s = "Name:\tcat\nUid:\t1000\t0\t0\t0\nGid:\t5\t5\t5\t5\n";
        assert_eq!(parse_status_uids(s), Some((1000, 0)));
        assert_eq!(parse_status_uids("Name: x\n"), None);
        assert_eq!(parse_status_uids("Uid:\tx\t1\n"), None);
    }

    #[test]
    fn own_credentials() {
        let me = std::process::id();
        // SAFETY: trivial getters.
        let (ruid, euid) = unsafe { (libc::getuid(), libc::geteuid()) };
        let c = Creds::of_request(me, euid).unwrap();
        assert_eq!((c.ruid, c.euid), (ruid, euid));
        assert_eq!(c.jail, host_namespace().unwrap());
    }
}

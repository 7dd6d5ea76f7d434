//! A cgroup v2 leaf per VM worker (vmmfs(8) ISOLATION): `memory.max` = the
//! VM's guest RAM and boot images plus [`OVERHEAD`], `pids.max` = the
//! worker's thread budget. The leaf is made beside the creator's own cgroup
//! (in its parent: with systemd, the user's slice), so whatever accounts for
//! the creator's processes also sees their VMs.
//!
//! Needs the memory and pids controllers on the cgroup v2 hierarchy. On a
//! v1 or hybrid host they are bound to v1 hierarchies: then there are no
//! leaves, and workers stay in the daemon's cgroup (said once at start-up).

use std::io::Write;
use std::path::{Path, PathBuf};

/// Memory a worker uses besides guest RAM and boot images: its own code,
/// heap, thread stacks, and the kernel's KVM structures charged to it.
pub const OVERHEAD: u64 = 64 << 20;

/// The cgroup v2 hierarchy with the controllers a leaf needs.
#[derive(Debug)]
pub struct Cgroups {
    mount: PathBuf,
    pids: u64,
}

/// One worker's cgroup.
#[derive(Debug)]
pub struct Leaf {
    path: PathBuf,
    /// The memory.max this daemon last wrote, so that an unchanged limit is
    /// not written again: the kernel drains every CPU's charge cache on each
    /// write, and a bhyve launch asks about 18 times (before and after each
    /// configuration command) for two or three changes.
    memory_max: parking_lot::Mutex<Option<u64>>,
}

fn write(path: &Path, value: &str) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .write_all(value.as_bytes())
}

impl Cgroups {
    /// The cgroup v2 mount, if it has the memory and pids controllers.
    /// `pids`: the pids.max of a leaf.
    pub fn detect(pids: u64) -> Result<Cgroups, String> {
        let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
        let mount = info
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                let sep = f.iter().position(|x| *x == "-")?;
                (f.get(sep + 1) == Some(&"cgroup2")).then(|| PathBuf::from(f[4]))
            })
            .ok_or("no cgroup v2 hierarchy is mounted")?;
        let controllers = std::fs::read_to_string(mount.join("cgroup.controllers"))
            .map_err(|e| format!("{}: {e}", mount.display()))?;
        for want in ["memory", "pids"] {
            if !controllers.split_whitespace().any(|c| c == want) {
                return Err(format!(
                    "the cgroup v2 hierarchy at {} lacks the {want} controller (a v1 or hybrid host)",
                    mount.display()
                ));
            }
        }
        Ok(Cgroups { mount, pids })
    }

    /// The directory the leaf of a VM created by process `creator` goes in.
    fn parent_for(&self, creator: u32) -> Option<PathBuf> {
        let text = std::fs::read_to_string(format!("/proc/{creator}/cgroup")).ok()?;
        parent_of(&self.mount, &text)
    }

    /// Make the leaf of worker `pid` (uid `uid`) created by process
    /// `creator`, and move the worker into it. None (with a log line) where
    /// that cannot be done: the worker then runs without a leaf.
    pub fn place(&self, pid: i32, uid: u32, creator: u32) -> Option<Leaf> {
        let parent = self
            .parent_for(creator)
            .map_or_else(|| self.mount.clone(), |p| root_owned(&self.mount, p));
        // Controllers must be enabled for the parent's children; already
        // enabled is fine, and a failure shows when the limits are written.
        let _ = write(&parent.join("cgroup.subtree_control"), "+memory +pids");
        let leaf = Leaf::at(parent.join(format!("vmm-worker-{uid}")));
        let made = make_leaf_dir(&leaf.path)
            .and_then(|()| write(&leaf.path.join("pids.max"), &self.pids.to_string()))
            .and_then(|()| write(&leaf.path.join("cgroup.procs"), &pid.to_string()));
        match made {
            Ok(()) => {
                leaf.set_memory(crate::engine::DEFAULT_MEMORY);
                Some(leaf)
            }
            Err(e) => {
                log::warn!(
                    "cgroup {}: {e}; the worker runs without one",
                    leaf.path.display()
                );
                leaf.remove();
                None
            }
        }
    }
}

impl Cgroups {
    /// The leaf an earlier daemon made for worker `pid` (uid `uid`), found
    /// from the worker's own /proc/PID/cgroup: only a group named as this
    /// daemon names leaves counts.
    pub fn adopt(&self, pid: u32, uid: u32) -> Option<Leaf> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        leaf_of(&self.mount, &text, uid)
    }
}

/// Make the leaf directory at `path`. One left by a daemon that ended
/// before cleaning up goes first: no process is in it, since the uid of a
/// worker left running is reserved until adopted and not given out. It
/// would otherwise start this worker without a cgroup, unlimited.
fn make_leaf_dir(path: &Path) -> std::io::Result<()> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            log::info!("{}: removing a stale leaf", path.display());
            std::fs::remove_dir(path)?;
            std::fs::create_dir(path)
        }
        r => r,
    }
}

/// `dir` or its nearest ancestor under `mount` that root owns: where a
/// leaf may go. A cgroup directory its user owns is delegated to them
/// (systemd's user@UID.service and the slices and scopes below it): there
/// they could make `vmm-worker-UID` first and keep a process in it, so that
/// it can be neither removed nor made again, or take the controllers away
/// from it, and their worker would run without limits. Above a delegated
/// subtree is the user's own slice, so the accounting stays theirs.
fn root_owned(mount: &Path, mut dir: PathBuf) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    while dir != mount && dir.starts_with(mount) {
        if std::fs::metadata(&dir).is_ok_and(|m| m.uid() == 0) {
            return dir;
        }
        if !dir.pop() {
            break;
        }
    }
    mount.to_path_buf()
}

fn leaf_of(mount: &Path, text: &str, uid: u32) -> Option<Leaf> {
    let own = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let own = Path::new(own.trim_start_matches('/'));
    if own.file_name()?.to_str()? != format!("vmm-worker-{uid}")
        || own
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return None;
    }
    Some(Leaf::at(mount.join(own)))
}

/// Where a leaf goes for a process whose /proc/PID/cgroup reads `text`:
/// beside the process's own cgroup v2 group, in its parent, since a cgroup
/// with processes cannot have children with controllers.
fn parent_of(mount: &Path, text: &str) -> Option<PathBuf> {
    let own = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let own = Path::new(own.trim_start_matches('/'));
    Some(mount.join(own.parent().unwrap_or(Path::new(""))))
}

impl Leaf {
    fn at(path: PathBuf) -> Leaf {
        Leaf {
            path,
            memory_max: parking_lot::Mutex::new(None),
        }
    }

    /// Set memory.max for `bytes` of guest memory and images.
    pub fn set_memory(&self, bytes: u64) {
        let max = bytes.saturating_add(OVERHEAD);
        // Held across the write, so that the value kept is the file's.
        let mut last = self.memory_max.lock();
        if *last == Some(max) {
            return;
        }
        match write(&self.path.join("memory.max"), &max.to_string()) {
            Ok(()) => *last = Some(max),
            Err(e) => {
                *last = None;
                log::warn!("{}/memory.max: {e}", self.path.display());
            }
        }
    }

    /// Guest memory and images the leaf's memory.max allows (see
    /// [`Leaf::set_memory`]).
    pub fn memory(&self) -> Option<u64> {
        let max = std::fs::read_to_string(self.path.join("memory.max")).ok()?;
        Some(max.trim().parse::<u64>().ok()?.saturating_sub(OVERHEAD))
    }

    /// Whether the kernel's OOM killer ended a process of this leaf.
    pub fn oom_killed(&self) -> bool {
        std::fs::read_to_string(self.path.join("memory.events"))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|n| n.trim().parse::<u64>().ok())
            })
            .is_some_and(|n| n > 0)
    }

    /// Remove the (empty) leaf.
    pub fn remove(&self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unchanged_memory_limit_is_not_written_again() {
        let dir = std::env::temp_dir().join(format!("vmmfs-leaf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("memory.max");
        std::fs::write(&file, "").unwrap();
        let leaf = Leaf::at(dir.clone());
        leaf.set_memory(1 << 20);
        let first = std::fs::read_to_string(&file).unwrap();
        assert_eq!(first, ((1u64 << 20) + OVERHEAD).to_string());
        // Marked, to see whether the same limit writes again.
        std::fs::write(&file, "marked").unwrap();
        leaf.set_memory(1 << 20);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "marked");
        leaf.set_memory(2 << 20);
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            ((2u64 << 20) + OVERHEAD).to_string()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn leaves_go_beside_the_creators_cgroup() {
        let m = Path::new("/sys/fs/cgroup");
        let session = "0::/user.slice/user-1000.slice/session-3.scope\n";
        assert_eq!(
            parent_of(m, session),
            Some(PathBuf::from("/sys/fs/cgroup/user.slice/user-1000.slice"))
        );
        // A hybrid host lists the v1 hierarchies too; only "0::" counts.
        let hybrid = "4:memory:/x\n1:name=systemd:/y\n0::/app.slice/a.service\n";
        assert_eq!(
            parent_of(m, hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/app.slice"))
        );
        assert_eq!(
            parent_of(m, "0::/\n"),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(parent_of(m, "4:memory:/x\n"), None, "no cgroup v2 line");
    }

    /// A delegated subtree (its directories owned by the user) is passed
    /// over for the nearest root-owned ancestor; the mount bounds the walk.
    #[test]
    fn leaves_go_only_where_root_owns_the_directory() {
        let m = std::env::temp_dir().join(format!("vmmfs-cg-{}", std::process::id()));
        let slice = m.join("user.slice/user-1002.slice");
        let delegated = slice.join("user@1002.service/app.slice");
        std::fs::create_dir_all(&delegated).unwrap();
        let root = nix::unistd::geteuid().is_root();
        if root {
            for d in [slice.join("user@1002.service"), delegated.clone()] {
                std::os::unix::fs::chown(&d, Some(1002), Some(1002)).unwrap();
            }
            assert_eq!(root_owned(&m, delegated.clone()), slice);
            assert_eq!(root_owned(&m, slice.clone()), slice);
        } else {
            // Nothing here is root's: the walk ends at the mount.
            assert_eq!(root_owned(&m, delegated.clone()), m);
        }
        assert_eq!(root_owned(&m, m.clone()), m);
        assert_eq!(root_owned(&m, PathBuf::from("/elsewhere")), m);
        std::fs::remove_dir_all(&m).unwrap();
    }

    #[test]
    fn adopted_leaves_are_only_ours() {
        let m = Path::new("/sys/fs/cgroup");
        let ours = "0::/user.slice/vmm-worker-7\n";
        assert_eq!(
            leaf_of(m, ours, 7).map(|l| l.path),
            Some(PathBuf::from("/sys/fs/cgroup/user.slice/vmm-worker-7"))
        );
        assert!(leaf_of(m, ours, 8).is_none(), "another uid's leaf");
        assert!(leaf_of(m, "0::/system.slice/vmmfs.service\n", 7).is_none());
        assert!(leaf_of(m, "0::/a/../vmm-worker-7\n", 7).is_none());
        assert!(leaf_of(m, "0::/\n", 7).is_none());
    }
}

//! Inode numbers: fixed ones for the static nodes, derived ones for VMs and
//! their segments. VM ids are never reused, so a stale inode never names a
//! newer VM.

use crate::policy::VmId;
use vmm_engine::cast::usize_from;

pub const ROOT: u64 = 1;
pub const VMMCTL: u64 = 2;
pub const VMM_DIR: u64 = 3;
pub const VMMIO_DIR: u64 = 4;
/// The descriptor hand-over socket (`vmm.sock`).
pub const SOCKET: u64 = 5;

const VM_BASE: u64 = 1 << 32;
/// Inode numbers reserved per VM: the node itself and its segments.
const PER_VM: u64 = 256;
/// Most segments a VM can show.
pub const MAX_SEGMENTS: usize = usize_from(PER_VM - 1);

/// What an inode number stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    Root,
    Vmmctl,
    VmmDir,
    VmmIoDir,
    /// `vmm.sock`, bound by the daemon itself.
    Socket,
    /// `vmm/NAME`
    Vm(VmId),
    /// `vmm.io/NAME.SEG`: VM and segment index.
    Segment(VmId, usize),
}

impl Node {
    pub fn from_ino(ino: u64) -> Option<Node> {
        Some(match ino {
            ROOT => Node::Root,
            VMMCTL => Node::Vmmctl,
            VMM_DIR => Node::VmmDir,
            VMMIO_DIR => Node::VmmIoDir,
            SOCKET => Node::Socket,
            i if i >= VM_BASE => {
                let rel = i - VM_BASE;
                match rel % PER_VM {
                    0 => Node::Vm(rel / PER_VM),
                    s => Node::Segment(rel / PER_VM, usize_from(s - 1)),
                }
            }
            _ => return None,
        })
    }

    pub fn ino(self) -> u64 {
        match self {
            Node::Root => ROOT,
            Node::Vmmctl => VMMCTL,
            Node::VmmDir => VMM_DIR,
            Node::VmmIoDir => VMMIO_DIR,
            Node::Socket => SOCKET,
            Node::Vm(id) => VM_BASE + id * PER_VM,
            Node::Segment(id, s) => VM_BASE + id * PER_VM + 1 + s as u64,
        }
    }

    pub fn is_dir(self) -> bool {
        matches!(self, Node::Root | Node::VmmDir | Node::VmmIoDir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for n in [
            Node::Root,
            Node::Vmmctl,
            Node::VmmDir,
            Node::VmmIoDir,
            Node::Socket,
            Node::Vm(1),
            Node::Vm(12345),
            Node::Segment(1, 0),
            Node::Segment(7, MAX_SEGMENTS - 1),
        ] {
            assert_eq!(Node::from_ino(n.ino()), Some(n));
        }
        assert_eq!(Node::from_ino(0), None);
        assert_eq!(Node::from_ino(99), None);
    }
}

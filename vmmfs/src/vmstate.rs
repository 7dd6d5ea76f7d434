//! VMs that outlive the daemon (vmmfs(8) RESTART): one small record per VM
//! in `STATE/vms/`, named after its worker's pid, replaced atomically
//! (temporary file, rename; 0600, root's), removed when the VM is destroyed.
//! A restarted daemon reads them and adopts the workers they name. Only
//! root can write there, but a record is parsed strictly all the same: a
//! malformed one is reported and ignored, never guessed at.
//!
//! No fsync: a record only matters while its worker lives, and no worker
//! survives the host's crash.

use crate::engine::WorkerId;
use crate::jails::ProcessId;
use crate::state::NodeAttrs;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

const HEADER: &str = "# vmmfs vm v1";
/// Longest record accepted.
const MAX_RECORD: u64 = 4096;

/// Where a VM was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JailRef {
    Host,
    /// A PID namespace, recognised again by its init process.
    Jail {
        ns: u64,
        init: ProcessId,
    },
}

/// One VM as a restarted daemon needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmFile {
    pub name: String,
    pub jail: JailRef,
    pub owner_euid: u32,
    pub owner_ruid: u32,
    /// Owner, group and mode of `vmm/NAME`.
    pub node: NodeAttrs,
    /// Destroy-on-close: such a VM is destroyed at adoption (its vmmctl
    /// descriptor died with the old mount).
    pub transient: bool,
    pub worker: WorkerId,
    /// Memory charged to the owner, by kind (registry order).
    pub charges: [u64; 5],
    /// Owner, group and mode of each `vmm.io/NAME.SEG` node looked up or
    /// changed so far.
    pub segments: Vec<(String, NodeAttrs)>,
}

/// Most segment nodes a record keeps (a VM has a few segments).
const MAX_SEGMENTS: usize = 16;

fn render_attrs(a: &NodeAttrs) -> String {
    format!("{}:{}:{:04o}", a.uid, a.gid, a.mode)
}

/// Canonical digits only: no sign, no spaces, no leading '+'.
fn num<T: TryFrom<u64>>(k: &str, v: &str, radix8: bool) -> Result<T, String> {
    let ok = !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit());
    let n = if radix8 {
        u64::from_str_radix(v, 8).ok()
    } else {
        v.parse::<u64>().ok()
    };
    match (ok, n.and_then(|n| T::try_from(n).ok())) {
        (true, Some(t)) => Ok(t),
        _ => Err(format!("bad value for '{k}'")),
    }
}

/// `V` split at `sep` into exactly `n` parts.
fn parts<'a>(k: &str, v: &'a str, n: usize, sep: char) -> Result<Vec<&'a str>, String> {
    let p: Vec<&str> = v.split(sep).collect();
    if p.len() != n {
        return Err(format!("'{k}' needs {n} parts"));
    }
    Ok(p)
}

/// UID:GID:MODE, the mode in octal and at most 07777.
fn parse_attrs(k: &str, v: &str) -> Result<NodeAttrs, String> {
    let n = parts(k, v, 3, ':')?;
    let mode: u16 = num(k, n[2], true)?;
    if mode > 0o7777 {
        return Err(format!("bad value for '{k}'"));
    }
    Ok(NodeAttrs {
        uid: num(k, n[0], false)?,
        gid: num(k, n[1], false)?,
        mode,
    })
}

fn parse_jail(v: &str) -> Result<JailRef, String> {
    if v == "host" {
        return Ok(JailRef::Host);
    }
    let p = parts("jail", v, 3, ':')?;
    let init = ProcessId {
        pid: num("jail", p[1], false)?,
        start: num("jail", p[2], false)?,
    };
    if init.pid == 0 {
        return Err("bad value for 'jail'".into());
    }
    Ok(JailRef::Jail {
        ns: num("jail", p[0], false)?,
        init,
    })
}

fn parse_worker(v: &str) -> Result<WorkerId, String> {
    let w = parts("worker", v, 3, ':')?;
    let worker = WorkerId {
        pid: num("worker", w[0], false)?,
        start: num("worker", w[1], false)?,
        uid: num("worker", w[2], false)?,
    };
    if worker.pid <= 1 || worker.uid == 0 {
        return Err("bad value for 'worker'".into());
    }
    Ok(worker)
}

/// NAME=UID:GID:MODE entries separated by ',' (empty: none); names as the
/// worker protocol has them, each once.
fn parse_segments(v: &str) -> Result<Vec<(String, NodeAttrs)>, String> {
    let mut out: Vec<(String, NodeAttrs)> = Vec::new();
    if v.is_empty() {
        return Ok(out);
    }
    for entry in v.split(',') {
        let (name, attrs) = entry
            .split_once('=')
            .ok_or_else(|| "'segments' entries are NAME=UID:GID:MODE".to_string())?;
        if !vmm_protocol::worker::valid_segment_name(name) || out.iter().any(|(n, _)| n == name) {
            return Err(format!("bad segment name '{name}'"));
        }
        out.push((name.to_string(), parse_attrs("segments", attrs)?));
    }
    if out.len() > MAX_SEGMENTS {
        return Err(format!("more than {MAX_SEGMENTS} segments"));
    }
    Ok(out)
}

impl VmFile {
    pub fn render(&self) -> String {
        let jail = match self.jail {
            JailRef::Host => "host".to_string(),
            JailRef::Jail { ns, init } => format!("{ns}:{}:{}", init.pid, init.start),
        };
        let c: Vec<String> = self.charges.iter().map(u64::to_string).collect();
        let segs: Vec<String> = self
            .segments
            .iter()
            .map(|(n, a)| format!("{n}={}", render_attrs(a)))
            .collect();
        format!(
            "{HEADER}\nname={}\njail={jail}\nowner={}:{}\nnode={}\ntransient={}\n\
             worker={}:{}:{}\ncharges={}\nsegments={}\n",
            self.name,
            self.owner_euid,
            self.owner_ruid,
            render_attrs(&self.node),
            u8::from(self.transient),
            self.worker.pid,
            self.worker.start,
            self.worker.uid,
            c.join(","),
            segs.join(","),
        )
    }

    /// Parse a record: the header, then every key exactly once.
    pub fn parse(text: &str) -> Result<VmFile, String> {
        if text.contains('\r') {
            return Err("carriage return in the record".into());
        }
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            return Err(format!("first line must be '{HEADER}'"));
        }
        let mut fields = BTreeMap::new();
        for line in lines {
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| format!("bad line '{line}'"))?;
            if fields.insert(k, v).is_some() {
                return Err(format!("'{k}' given twice"));
            }
        }
        // `segments` came later: a record written before it has none.
        const KEYS: [&str; 7] = [
            "name",
            "jail",
            "owner",
            "node",
            "transient",
            "worker",
            "charges",
        ];
        let optional = usize::from(fields.contains_key("segments"));
        if fields.len() != KEYS.len() + optional || !KEYS.iter().all(|k| fields.contains_key(k)) {
            return Err(format!("expected exactly the keys {KEYS:?} and 'segments'"));
        }
        let name = fields["name"].to_string();
        vmm_protocol::vmmctl::validate_name(&name).map_err(|e| e.0)?;
        let o = parts("owner", fields["owner"], 2, ':')?;
        let transient = match fields["transient"] {
            "0" => false,
            "1" => true,
            _ => return Err("'transient' must be 0 or 1".into()),
        };
        let c = parts("charges", fields["charges"], 5, ',')?;
        let mut charges = [0u64; 5];
        for (slot, v) in charges.iter_mut().zip(c) {
            *slot = num("charges", v, false)?;
        }
        Ok(VmFile {
            name,
            jail: parse_jail(fields["jail"])?,
            owner_euid: num("owner", o[0], false)?,
            owner_ruid: num("owner", o[1], false)?,
            node: parse_attrs("node", fields["node"])?,
            transient,
            worker: parse_worker(fields["worker"])?,
            charges,
            segments: parse_segments(fields.get("segments").copied().unwrap_or(""))?,
        })
    }
}

/// The directory of VM records (and of the workers' adoption sockets).
#[derive(Debug, Clone)]
pub struct VmStore {
    dir: PathBuf,
}

impl VmStore {
    /// `STATE/vms`, made root's and 0700 if it is not.
    pub fn open(state_dir: &Path) -> std::io::Result<VmStore> {
        let dir = state_dir.join("vms");
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let m = fs::symlink_metadata(&dir)?;
        if !m.is_dir() {
            return Err(std::io::Error::other(format!(
                "{} is not a directory",
                dir.display()
            )));
        }
        // SAFETY: trivial getter.
        if m.uid() != unsafe { libc::geteuid() } {
            std::os::unix::fs::chown(&dir, Some(0), Some(0))?;
        }
        if m.mode() & 0o777 != 0o700 {
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        }
        Ok(VmStore { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, pid: u32) -> PathBuf {
        self.dir.join(format!("{pid}.vm"))
    }

    pub fn save(&self, rec: &VmFile) -> std::io::Result<()> {
        // Not durable: no worker survives a host crash, so neither need its record.
        crate::state::replace_private(&self.path(rec.worker.pid), rec.render().as_bytes(), false)
    }

    pub fn remove(&self, pid: u32) {
        let _ = fs::remove_file(self.path(pid));
    }

    /// Every record: its worker pid (from the file name) and what it says.
    pub fn load_all(&self) -> Vec<(PathBuf, Result<VmFile, String>)> {
        let Ok(dir) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for ent in dir.flatten() {
            let path = ent.path();
            let Some(stem) = ent
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".vm"))
                .map(str::to_string)
            else {
                continue;
            };
            let read = fs::symlink_metadata(&path)
                .map_err(|e| e.to_string())
                .and_then(|m| {
                    if !m.is_file() || m.len() > MAX_RECORD {
                        return Err("not a small regular file".to_string());
                    }
                    fs::read_to_string(&path).map_err(|e| e.to_string())
                })
                .and_then(|t| VmFile::parse(&t))
                .and_then(|r| {
                    if stem == r.worker.pid.to_string() {
                        Ok(r)
                    } else {
                        Err("the file name is not its worker's pid".into())
                    }
                });
            out.push((path, read));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmFile {
        VmFile {
            name: "vm-1.test".into(),
            jail: JailRef::Jail {
                ns: 4026532001,
                init: ProcessId {
                    pid: 4242,
                    start: 987654,
                },
            },
            owner_euid: 1000,
            owner_ruid: 1001,
            node: NodeAttrs {
                uid: 1000,
                gid: 123,
                mode: 0o660,
            },
            transient: true,
            worker: WorkerId {
                pid: 31337,
                start: 123456789,
                uid: 2147483650,
            },
            charges: [256 << 20, 65536, 0, 0, 131072],
            segments: vec![
                (
                    "sysmem".into(),
                    NodeAttrs {
                        uid: 1000,
                        gid: 123,
                        mode: 0o640,
                    },
                ),
                (
                    "bootrom".into(),
                    NodeAttrs {
                        uid: 0,
                        gid: 0,
                        mode: 0o600,
                    },
                ),
            ],
        }
    }

    #[test]
    fn round_trip() {
        let r = sample();
        assert_eq!(VmFile::parse(&r.render()), Ok(r.clone()));
        let host = VmFile {
            jail: JailRef::Host,
            transient: false,
            segments: Vec::new(),
            ..r
        };
        assert!(host.render().contains("\nsegments=\n"));
        assert_eq!(VmFile::parse(&host.render()), Ok(host.clone()));
        // A record from before segment nodes were kept: none.
        let old: String = host
            .render()
            .lines()
            .filter(|l| !l.starts_with("segments="))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(VmFile::parse(&old), Ok(host));
    }

    #[test]
    fn malformed_records_are_refused() {
        let good = sample().render();
        let bad = [
            String::new(),
            "garbage".into(),
            good.replace(HEADER, "# vmmfs vm v2"),
            good.replace("name=vm-1.test", "name=a/b"),
            good.replace("name=vm-1.test", "name="),
            good.replace("name=vm-1.test", "name=.."),
            good.replace("transient=1", "transient=2"),
            good.replace("node=1000:123:0660", "node=1000:123:17777"),
            good.replace("node=1000:123:0660", "node=1000:123:0690"),
            good.replace("node=1000:123:0660", "node=1000:123"),
            good.replace("owner=1000:1001", "owner=-1:1001"),
            good.replace("owner=1000:1001", "owner=+1000:1001"),
            good.replace("owner=1000:1001", "owner=4294967296:1"),
            good.replace("worker=31337:", "worker=1:"),
            good.replace(":2147483650\n", ":0\n"),
            good.replace(
                "worker=31337:123456789:2147483650",
                "worker=31337::2147483650",
            ),
            good.replace("jail=4026532001:4242:987654", "jail=4026532001:0:987654"),
            good.replace("jail=4026532001:4242:987654", "jail=jail"),
            good.replace("charges=268435456,65536,0,0,131072", "charges=1,2,3"),
            good.replace("charges=268435456,65536,0,0,131072", "charges=1,2,3,4,x"),
            good.clone() + "name=again\n",
            good.clone() + "extra=1\n",
            good.clone() + "no equals sign\n",
            good.lines()
                .filter(|l| !l.starts_with("jail="))
                .collect::<Vec<_>>()
                .join("\n"),
            good.replace('\n', "\r\n"),
            good.replace("sysmem=", "SysMem="),
            good.replace("sysmem=", "bootrom="),
            good.replace("sysmem=1000:123:0640", "sysmem=1000:123"),
            good.replace("sysmem=1000:123:0640", "sysmem=1000:123:10000"),
            good.replace(",bootrom=", ",,bootrom="),
            good.replace("segments=", "segments=,"),
            good.replace("sysmem=1000", "sysmem"),
            good.clone() + "segments=\n",
            good.replace(
                "segments=sysmem",
                &format!(
                    "segments={}sysmem",
                    (0..17)
                        .map(|i| format!("s{i}=0:0:0600,"))
                        .collect::<String>()
                ),
            ),
        ];
        for b in bad {
            assert!(VmFile::parse(&b).is_err(), "accepted: {b:?}");
        }
    }

    #[test]
    fn store_round_trip_and_strict_loading() {
        let dir = std::env::temp_dir().join(format!("vmmfs-vmstate-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let store = VmStore::open(&dir).unwrap();
        let m = fs::metadata(store.dir()).unwrap();
        assert_eq!(m.mode() & 0o777, 0o700);
        let r = sample();
        store.save(&r).unwrap();
        assert_eq!(
            fs::metadata(store.dir().join("31337.vm")).unwrap().mode() & 0o777,
            0o600
        );
        // A record under another worker's name, and garbage: both reported.
        fs::write(store.dir().join("5.vm"), r.render()).unwrap();
        fs::write(store.dir().join("6.vm"), "junk").unwrap();
        fs::write(store.dir().join("7.sock"), "").unwrap();
        let all = store.load_all();
        assert_eq!(all.len(), 3);
        assert!(all.iter().any(|(_, x)| x.as_ref() == Ok(&r)));
        assert_eq!(all.iter().filter(|(_, x)| x.is_err()).count(), 2);
        store.remove(31337);
        assert!(!store.dir().join("31337.vm").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}

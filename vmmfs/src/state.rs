//! Persistent state: ownership and modes of vmmctl and the directories, and
//! the jails' grants. One small text file, replaced atomically.
//!
//! A grant names its jail by the namespace number *and* the jail's init
//! process (PID and start time): after a restart the number alone could name
//! a new namespace that reused it; a grant whose init is gone is dropped.

use crate::jails::ProcessId;
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

const HEADER: &str = "# vmmfs state v1";

/// Owner, group and permission bits of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeAttrs {
    pub uid: u32,
    pub gid: u32,
    /// Permission bits only (07777).
    pub mode: u16,
}

/// What root on the host granted a jail.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Grants {
    /// allow.vmm
    pub vmm: bool,
    /// allow.vmm_ppt
    pub ppt: bool,
}

/// A jail's grants and how to recognise the jail again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JailGrant {
    /// The PID namespace's inode number.
    pub ns: u64,
    /// Its init process, as seen from the host. PID 0: a grant written by an
    /// older vmmfs, which cannot be verified.
    pub init: ProcessId,
    pub grants: Grants,
}

/// Everything that survives a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub vmmctl: NodeAttrs,
    pub vmm_dir: NodeAttrs,
    pub vmmio_dir: NodeAttrs,
    /// By namespace number.
    pub jails: BTreeMap<u64, JailGrant>,
}

/// A state file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: corrupt state file: {why} (fix or remove it; vmmfs will not guess)")]
    Corrupt {
        path: PathBuf,
        line: usize,
        why: String,
    },
}

impl State {
    /// FreeBSD's defaults: vmmctl root:GROUP 0660, directories root:root 0755.
    pub fn defaults(group: u32) -> State {
        State {
            vmmctl: NodeAttrs {
                uid: 0,
                gid: group,
                mode: 0o660,
            },
            vmm_dir: NodeAttrs {
                uid: 0,
                gid: 0,
                mode: 0o755,
            },
            vmmio_dir: NodeAttrs {
                uid: 0,
                gid: 0,
                mode: 0o755,
            },
            jails: BTreeMap::new(),
        }
    }

    /// Text form.
    pub fn render(&self) -> String {
        let mut s = format!("{HEADER}\n");
        for (key, a) in [
            ("vmmctl", &self.vmmctl),
            ("vmm", &self.vmm_dir),
            ("vmm.io", &self.vmmio_dir),
        ] {
            s += &format!("{key} uid={} gid={} mode={:04o}\n", a.uid, a.gid, a.mode);
        }
        for j in self.jails.values() {
            s += &format!(
                "jail ns={} init={} start={} vmm={} ppt={}\n",
                j.ns, j.init.pid, j.init.start, j.grants.vmm as u8, j.grants.ppt as u8
            );
        }
        s
    }

    /// Parse the text form; every line must be understood.
    pub fn parse(text: &str) -> Result<State, (usize, String)> {
        let mut lines = text.lines().enumerate();
        match lines.next() {
            Some((_, HEADER)) => {}
            _ => return Err((1, format!("first line must be '{HEADER}'"))),
        }
        let (mut vmmctl, mut vmm, mut vmmio) = (None, None, None);
        let mut jails = BTreeMap::new();
        for (i, line) in lines {
            let n = i + 1;
            let mut words = line.split(' ');
            let kind = words.next().unwrap_or("");
            let mut fields = BTreeMap::new();
            for w in words {
                let (k, v) = w.split_once('=').ok_or((n, format!("bad field '{w}'")))?;
                if fields.insert(k, v).is_some() {
                    return Err((n, format!("field '{k}' repeated")));
                }
            }
            let num = |k: &str, radix: u32| -> Result<u64, (usize, String)> {
                let v = fields.get(k).ok_or((n, format!("missing '{k}'")))?;
                u64::from_str_radix(v, radix).map_err(|_| (n, format!("bad value for '{k}'")))
            };
            let expect = |keys: &[&str]| -> Result<(), (usize, String)> {
                if fields.len() != keys.len() || !keys.iter().all(|k| fields.contains_key(k)) {
                    return Err((n, format!("expected fields {keys:?}")));
                }
                Ok(())
            };
            match kind {
                "vmmctl" | "vmm" | "vmm.io" => {
                    expect(&["uid", "gid", "mode"])?;
                    let (uid, gid, mode) = (num("uid", 10)?, num("gid", 10)?, num("mode", 8)?);
                    let (Ok(uid), Ok(gid), Ok(mode @ 0..=0o7777)) =
                        (u32::try_from(uid), u32::try_from(gid), u16::try_from(mode))
                    else {
                        return Err((n, "value out of range".into()));
                    };
                    let a = NodeAttrs { uid, gid, mode };
                    let slot = match kind {
                        "vmmctl" => &mut vmmctl,
                        "vmm" => &mut vmm,
                        _ => &mut vmmio,
                    };
                    if slot.replace(a).is_some() {
                        return Err((n, format!("'{kind}' given twice")));
                    }
                }
                "jail" => {
                    // Without init/start: written by an older vmmfs.
                    let legacy = fields.len() == 3;
                    if legacy {
                        expect(&["ns", "vmm", "ppt"])?;
                    } else {
                        expect(&["ns", "init", "start", "vmm", "ppt"])?;
                    }
                    let flag = |k| match num(k, 10)? {
                        0 => Ok(false),
                        1 => Ok(true),
                        _ => Err((n, format!("'{k}' must be 0 or 1"))),
                    };
                    let g = Grants {
                        vmm: flag("vmm")?,
                        ppt: flag("ppt")?,
                    };
                    let ns = num("ns", 10)?;
                    let init = if legacy {
                        ProcessId { pid: 0, start: 0 }
                    } else {
                        let pid = u32::try_from(num("init", 10)?)
                            .ok()
                            .filter(|&pid| pid != 0)
                            .ok_or_else(|| (n, "bad value for 'init'".to_string()))?;
                        ProcessId {
                            pid,
                            start: num("start", 10)?,
                        }
                    };
                    if jails
                        .insert(
                            ns,
                            JailGrant {
                                ns,
                                init,
                                grants: g,
                            },
                        )
                        .is_some()
                    {
                        return Err((n, format!("jail ns={ns} given twice")));
                    }
                }
                _ => return Err((n, format!("unknown entry '{kind}'"))),
            }
        }
        let missing = |what: &str| (0, format!("missing '{what}' entry"));
        Ok(State {
            vmmctl: vmmctl.ok_or_else(|| missing("vmmctl"))?,
            vmm_dir: vmm.ok_or_else(|| missing("vmm"))?,
            vmmio_dir: vmmio.ok_or_else(|| missing("vmm.io"))?,
            jails,
        })
    }
}

/// Where the state lives.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    pub fn new(dir: &Path) -> StateStore {
        StateStore {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Load the state; a missing file means a first start (defaults are
    /// written), a corrupt one is an error.
    pub fn load(&self, group: u32) -> Result<State, StateError> {
        let path = self.path();
        let io = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        match fs::read_to_string(&path) {
            Ok(text) => State::parse(&text).map_err(|(line, why)| StateError::Corrupt {
                path: path.clone(),
                line,
                why,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let state = State::defaults(group);
                self.save(&state).map_err(io)?;
                Ok(state)
            }
            Err(e) => Err(io(e)),
        }
    }

    /// Replace the state file atomically and durably.
    pub fn save(&self, state: &State) -> std::io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        replace_private(&self.path(), state.render().as_bytes(), true)
    }
}

/// Replace `path` atomically with a root-only (0600) file holding `bytes`:
/// write `.NAME.tmp` beside it, then rename. `durable`: fsync the file
/// before the rename and the directory after it.
pub fn replace_private(path: &Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    if durable {
        f.sync_all()?;
    }
    drop(f);
    fs::rename(&tmp, path)?;
    if durable {
        // Make the rename itself durable.
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut s = State::defaults(123);
        s.vmmctl.mode = 0o666;
        s.jails.insert(
            4026532000,
            JailGrant {
                ns: 4026532000,
                init: ProcessId {
                    pid: 77,
                    start: 123456,
                },
                grants: Grants {
                    vmm: true,
                    ppt: false,
                },
            },
        );
        assert_eq!(State::parse(&s.render()).unwrap(), s);
        // An older vmmfs's grant parses, marked unverifiable (init 0).
        let old = State::defaults(5).render() + "jail ns=9 vmm=1 ppt=0\n";
        assert_eq!(State::parse(&old).unwrap().jails[&9].init.pid, 0);
    }

    #[test]
    fn corrupt_is_rejected() {
        let good = State::defaults(5).render();
        for bad in [
            String::new(),
            good.replace("mode=0660", "mode=0999"),
            good.replace("vmmctl", "vmmctll"),
            good.replace("uid=0 gid=5", "uid=0"),
            good.lines().take(2).collect::<Vec<_>>().join("\n"),
            good.clone() + "jail ns=1 vmm=2 ppt=0\n",
            good.clone() + "jail ns=1 init=0 start=5 vmm=1 ppt=0\n",
            good.clone() + "jail ns=1 init=3 vmm=1 ppt=0\n",
            good.clone() + "jail ns=1 vmm=1 ppt=0\njail ns=1 vmm=1 ppt=0\n",
            good.clone() + "vmm uid=0 gid=0 mode=0755\n",
        ] {
            assert!(State::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn store_creates_and_persists() {
        let dir = std::env::temp_dir().join(format!("vmmfs-state-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let store = StateStore::new(&dir);
        let mut s = store.load(42).unwrap();
        assert_eq!(s, State::defaults(42));
        s.vmmctl.gid = 7;
        store.save(&s).unwrap();
        assert_eq!(store.load(42).unwrap().vmmctl.gid, 7);
        fs::write(dir.join("state"), "garbage").unwrap();
        assert!(matches!(store.load(42), Err(StateError::Corrupt { .. })));
        fs::remove_dir_all(&dir).unwrap();
    }
}

//! `--dev-links`: /dev/vmmctl, /dev/vmm, /dev/vmm.io and /dev/vmm.sock as symbolic links
//! into the mount. Only our own links are ever replaced or removed.

use std::io;
use std::path::{Path, PathBuf};

const NAMES: [&str; 4] = ["vmmctl", "vmm", "vmm.io", "vmm.sock"];

/// Links made at start, removed at exit.
pub struct DevLinks {
    links: Vec<(PathBuf, PathBuf)>,
}

fn is_link_to(link: &Path, target: &Path) -> bool {
    std::fs::read_link(link).is_ok_and(|t| t == target)
}

impl DevLinks {
    /// Make the links in `dev_dir` pointing into `mount`. A path that exists
    /// and is not already our link is an error, and nothing is left behind.
    pub fn create(dev_dir: &Path, mount: &Path) -> io::Result<DevLinks> {
        let mut made = DevLinks { links: Vec::new() };
        for name in NAMES {
            let link = dev_dir.join(name);
            let target = mount.join(name);
            if is_link_to(&link, &target) {
                made.links.push((link, target));
                continue;
            }
            if std::fs::symlink_metadata(&link).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{} exists and is not a link to {}; not replacing it",
                        link.display(),
                        target.display()
                    ),
                ));
            }
            std::os::unix::fs::symlink(&target, &link)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", link.display())))?;
            made.links.push((link, target));
        }
        Ok(made)
    }
}

impl Drop for DevLinks {
    fn drop(&mut self) {
        for (link, target) in &self.links {
            if is_link_to(link, target) {
                let _ = std::fs::remove_file(link);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_and_removes_only_its_links() {
        let dir = std::env::temp_dir().join(format!("vmmfs-devlinks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mount = Path::new("/run/vmmfs-test-mount");
        {
            let _links = DevLinks::create(&dir, mount).unwrap();
            assert!(is_link_to(&dir.join("vmm"), &mount.join("vmm")));
            // A second instance may adopt its own links.
            drop(DevLinks::create(&dir, mount).unwrap());
        }
        assert!(std::fs::symlink_metadata(dir.join("vmmctl")).is_err());
        std::fs::write(dir.join("vmm.io"), "someone else's").unwrap();
        assert!(DevLinks::create(&dir, mount).is_err());
        assert_eq!(
            std::fs::read_to_string(dir.join("vmm.io")).unwrap(),
            "someone else's"
        );
        assert!(
            std::fs::symlink_metadata(dir.join("vmmctl")).is_err(),
            "nothing left behind"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

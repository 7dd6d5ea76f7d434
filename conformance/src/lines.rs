//! The result lines of the two file-system reads that both the probes
//! (`conformance probe stat|readdir`, as another user) and the runner (as
//! root, harness.rs) make: a leaf, so that neither imports the other.

use crate::errno;
use std::path::Path;

/// `stat` summary line.
pub fn stat_line(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(m) => {
            let kind = if m.is_file() {
                "file"
            } else if m.is_dir() {
                "dir"
            } else {
                "other"
            };
            format!("OK uid={} gid={} mode={:04o} type={kind}", m.uid(), m.gid(), m.mode() & 0o7777)
        }
        Err(e) => format!("ERR {}", errno::of_io(&e)),
    }
}

/// Sorted directory listing.
pub fn readdir_line(path: &Path) -> String {
    match std::fs::read_dir(path) {
        Ok(rd) => {
            let mut names = Vec::new();
            for e in rd {
                match e {
                    Ok(e) => names.push(e.file_name().to_string_lossy().into_owned()),
                    Err(e) => return format!("ERR {}", errno::of_io(&e)),
                }
            }
            names.sort();
            format!("OK {}", names.join(","))
        }
        Err(e) => format!("ERR {}", errno::of_io(&e)),
    }
}

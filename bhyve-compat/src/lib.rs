//! bhyve, bhyvectl and bhyveload for vmmfs.
//!
//! The tools speak FreeBSD's command lines and reach VMs only through the
//! vmmfs files in `$VMM_DEV_DIR` (default `/dev`): `vmmctl`, `vmm/NAME` and
//! `vmm.io/NAME.SEG`. Every host resource a guest uses (boot ROM, kernel, disk
//! images, consoles, network back ends) is opened here, as the invoking user,
//! and handed to the daemon by descriptor number in a `vmm/NAME` command.

pub mod cli;
pub mod config;
pub mod ctl;
pub mod error;
pub mod getopt;
pub mod load;
pub mod memsize;
pub mod plan;
pub mod proctitle;
pub mod resources;
pub mod run;
pub mod term;
pub mod vmmdev;

pub use error::{Error, Result};
pub use vmmdev::VmmDev;

/// The program name for messages: basename of argv\[0\], or `default`.
pub fn progname(default: &str) -> String {
    std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// The arguments after argv\[0\], lossily as UTF-8.
pub fn args() -> Vec<String> {
    std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
}

/// `--version` as the only argument (a long option added to FreeBSD's
/// command lines, whose short options stay as they are): prints
/// "PROG (vmmfs) VERSION" and returns true.
pub fn print_version(prog: &str, args: &[String]) -> bool {
    if args.len() != 1 || args[0] != "--version" {
        return false;
    }
    println!("{}", version_text(prog));
    true
}

/// The `--version` line.
pub fn version_text(prog: &str) -> String {
    format!("{prog} (vmmfs) {}", env!("CARGO_PKG_VERSION"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_only_alone() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(!print_version("bhyve", &a(&["--version", "vm1"])));
        assert!(!print_version("bhyve", &a(&["-v"])));
        assert!(!print_version("bhyve", &a(&[])));
        assert_eq!(
            version_text("bhyve"),
            format!("bhyve (vmmfs) {}", env!("CARGO_PKG_VERSION"))
        );
    }
}

//! Builds the test guests (guests/Makefile) into OUT_DIR/guests and tells
//! tests and examples where they are (env VMM_GUESTS_DIR). A machine
//! without gcc/binutils still builds the library: only the guests are
//! missing then, and the tests that need them say so.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("guests");
    // Start clean so a failed build never leaves stale guests behind.
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::create_dir_all(&out);
    println!("cargo:rerun-if-changed=guests");
    println!("cargo:rustc-env=VMM_GUESTS_DIR={}", out.display());
    let status = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg("guests")
        .arg(format!("OUT={}", out.display()))
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => println!("cargo:warning=building test guests failed ({s})"),
        Err(e) => println!("cargo:warning=cannot run make for test guests: {e}"),
    }
}

//! Running bhyve in the suite, for every group that does (bhyve.rs,
//! attack.rs, isolation.rs): the test guests, bhyve's command line, a run,
//! what it printed and what it left in vmm/, and the seeded randomness that
//! picks when to kill it. A helper under the groups: it imports only the
//! harness and the suite.

use crate::harness::{Tool, ToolEnd, Who};
use crate::suite::Suite;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Longest a bhyve run may take.
pub(crate) const RUN: Duration = Duration::from_secs(30);
/// Longest until a guest prints its prompt.
pub(crate) const READY: Duration = Duration::from_secs(20);
/// SPEC.md: a VM whose last vmmctl descriptor closed is gone within 1 s.
pub(crate) const GONE: Duration = Duration::from_secs(1);

/// The test guests: `--guests DIR`, or hello.rom and multi.rom built once
/// into the (world-searchable) temporary directory.
pub(crate) fn guests(s: &mut Suite) -> Option<PathBuf> {
    let ok = |d: &Path| d.join("hello.rom").is_file() && d.join("multi.rom").is_file();
    if let Some(g) = s.env.guests.clone() {
        if ok(&g) {
            return Some(g);
        }
        s.check("bhyve: test guests in --guests DIR", "hello.rom, multi.rom", format!("missing in {}", g.display()));
        return None;
    }
    use std::os::unix::fs::PermissionsExt;
    let out = s.env.base.join("guests");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../vmm-engine/guests");
    let built = std::fs::create_dir_all(&out)
        .and_then(|()| std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755)))
        .map_err(|e| e.to_string())
        .and_then(|()| {
            let st = Command::new("make")
                .arg("-s")
                .arg("-C")
                .arg(&src)
                .arg(format!("OUT={}", out.display()))
                .arg(out.join("hello.rom"))
                .arg(out.join("multi.rom"))
                .stdin(Stdio::null())
                .status()
                .map_err(|e| format!("make: {e}"))?;
            if st.success() {
                Ok(())
            } else {
                Err(format!("make -C {} failed ({st})", src.display()))
            }
        });
    for rom in ["hello.rom", "multi.rom"] {
        let _ = std::fs::set_permissions(out.join(rom), std::fs::Permissions::from_mode(0o644));
    }
    match built {
        Ok(()) if ok(&out) => {
            s.env.guests = Some(out.clone());
            Some(out)
        }
        Ok(()) => {
            s.check("bhyve: build the test guests", "OK", "make succeeded but the ROMs are missing");
            None
        }
        Err(e) => {
            s.check("bhyve: build the test guests (or pass --guests DIR)", "OK", e);
            None
        }
    }
}

/// `bhyve [-M] [EXTRA...] -m 32M -l com1,stdio -l bootrom,ROM NAME`.
pub(crate) fn bhyve_args(extra: &[&str], rom: &Path, name: &str) -> Vec<String> {
    let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    v.extend(["-m", "32M", "-l", "com1,stdio", "-l"].map(String::from));
    v.push(format!("bootrom,{}", rom.display()));
    v.push(name.to_string());
    v
}

pub(crate) fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

pub(crate) fn run_bhyve(s: &Suite, who: Who, extra: &[&str], rom: &Path, name: &str) -> ToolEnd {
    s.env.run_tool(who, "bhyve", &strs(&bhyve_args(extra, rom, name)), RUN)
}

/// bhyve -M with multi.rom, started and at its `ready` prompt.
pub(crate) fn multi(s: &Suite, who: Who, rom: &Path, name: &str) -> Result<Tool, String> {
    let mut t = s.env.tool(who, "bhyve", &strs(&bhyve_args(&["-M"], rom, name)))?;
    if t.wait_output("ready", 1, READY) {
        Ok(t)
    } else {
        let st = t.wait(Duration::from_secs(1));
        Err(format!("no 'ready' on the console ({st}); stderr: {}", message(&t.stderr())))
    }
}

/// A tool's stderr on one line: `no message`, or its lines joined by ` / `.
pub(crate) fn message(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    if lines.is_empty() {
        "no message".into()
    } else {
        lines.join(" / ")
    }
}

/// A readdir probe line as `ls` shows it: `vmm/ empty`, `vmm/ a,b` or the errno.
pub(crate) fn ls_text(dir: &str, readdir: &str) -> String {
    match readdir.strip_prefix("OK") {
        Some(rest) if rest.trim().is_empty() => format!("{dir} empty"),
        Some(rest) => format!("{dir} {}", rest.trim()),
        None => format!("{dir} {readdir}"),
    }
}

/// What root's `ls vmm/` shows on the host.
pub(crate) fn ls(s: &Suite) -> String {
    ls_text("vmm/", &s.env.readdir(&s.env.vm_dir()))
}

/// Whether VM `name` left anything in vmm/ or vmm.io/ (as root on the host).
pub(crate) fn trace(s: &Suite, name: &str) -> Option<String> {
    let mut left = Vec::new();
    if let Some(list) = s.env.readdir(&s.env.vm_dir()).strip_prefix("OK ") {
        left.extend(list.split(',').filter(|n| *n == name).map(|n| format!("vmm/{n}")));
    }
    if let Some(list) = s.env.readdir(&s.env.io_dir()).strip_prefix("OK ") {
        let prefix = format!("{name}.");
        left.extend(list.split(',').filter(|n| n.starts_with(&prefix)).map(|n| format!("vmm.io/{n}")));
    }
    if left.is_empty() {
        None
    } else {
        Some(left.join(","))
    }
}

/// Wait up to `limit` for VM `name` to leave no trace; `no trace` or what is left.
pub(crate) fn no_trace_within(s: &Suite, name: &str, limit: Duration) -> String {
    let end = Instant::now() + limit;
    loop {
        match trace(s, name) {
            None => return format!("no trace within {}ms", limit.as_millis()),
            Some(left) if Instant::now() >= end => return format!("{left} left after {}ms", limit.as_millis()),
            Some(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Root's `ls vmm/` once VM `name` is gone (waiting up to 1 s for it to go).
pub(crate) fn ls_after(s: &Suite, name: &str) -> String {
    let _ = no_trace_within(s, name, GONE);
    ls(s)
}

/// `status N; MESSAGE; vmm/ ...` for a finished bhyve that ran VM `name`.
pub(crate) fn outcome(s: &Suite, end: &ToolEnd, name: &str) -> String {
    format!("{}; {}; {}", end.status, message(&end.stderr), ls_after(s, name))
}

/// Destroy what a failed row left, so that later rows start clean.
pub(crate) fn cleanup(s: &Suite, name: &str) {
    if trace(s, name).is_some() {
        s.root_destroy(name);
    }
}

/// The console text as the table shows it: `console "ready\n"`.
pub(crate) fn console(out: &str) -> String {
    format!("console {out:?}")
}

/// splitmix64: small, seedable, good enough to pick moments.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// An index below `len` (not 0).
    pub(crate) fn index(&mut self, len: usize) -> usize {
        let n = u64::try_from(len).unwrap_or(u64::MAX);
        // Below `len`, so it fits.
        usize::try_from(self.below(n)).unwrap_or(0)
    }
}

/// `CONFORMANCE_SEED` (hex, `0x` optional) or one from the clock.
pub(crate) fn seed() -> u64 {
    if let Some(v) = std::env::var("CONFORMANCE_SEED").ok().filter(|v| !v.is_empty()) {
        if let Ok(n) = u64::from_str_radix(v.trim_start_matches("0x"), 16) {
            return n;
        }
    }
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    // The clock's low 64 bits of nanoseconds.
    let nanos = u64::try_from(t.as_nanos() % (1 << 64)).unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(message(""), "no message");
        assert_eq!(message("bhyve: a\n\nb\n"), "bhyve: a / b");
        assert_eq!(ls_text("vmm/", "OK "), "vmm/ empty");
        assert_eq!(ls_text("vmm/", "OK"), "vmm/ empty");
        assert_eq!(ls_text("vmm/", "OK a,b"), "vmm/ a,b");
        assert_eq!(ls_text("vmm/", "EPERM"), "vmm/ EPERM");
        assert_eq!(console("a\n"), "console \"a\\n\"");
        let args = bhyve_args(&["-M"], Path::new("/g/x.rom"), "vm");
        assert_eq!(args, ["-M", "-m", "32M", "-l", "com1,stdio", "-l", "bootrom,/g/x.rom", "vm"]);
    }

    #[test]
    fn rng_is_seeded() {
        let (mut a, mut b) = (Rng(42), Rng(42));
        let xs: Vec<u64> = (0..8).map(|_| a.below(400)).collect();
        let ys: Vec<u64> = (0..8).map(|_| b.below(400)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|x| *x < 400));
        assert_ne!(Rng(1).next(), Rng(2).next());
    }
}

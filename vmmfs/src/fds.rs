//! The daemon's own descriptors: how many it may hold, how many it holds.

/// Descriptors the daemon has open now (the length of /proc/self/fd):
/// counted only for unprivileged requests that would take more.
pub fn in_use() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(u64::MAX, |d| d.count() as u64)
}

/// Raise RLIMIT_NOFILE as far as the kernel allows: every VM costs the
/// daemon descriptors. Returns the limit now in force.
pub fn raise_nofile() -> u64 {
    let want = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20)
        .min(1 << 20);
    let (soft, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .unwrap_or((1024, 1024));
    let new = want.max(soft);
    if nix::sys::resource::setrlimit(
        nix::sys::resource::Resource::RLIMIT_NOFILE,
        new,
        new.max(hard),
    )
    .is_ok()
    {
        return new;
    }
    // Without CAP_SYS_RESOURCE: up to the hard limit.
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(s, _)| s)
        .unwrap_or(soft)
}

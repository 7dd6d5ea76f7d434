//! The running suite: the rows recorded so far, and the probes every group
//! runs through it (a hung vmmfs stops them). The groups (cases.rs, attack.rs,
//! bhyve.rs, isolation.rs) and the registry that runs them (cases.rs) import
//! it; it imports only the harness and the table, never a group.

use crate::harness::{progress, Env, Who};
use crate::table::Row;
use std::time::{Duration, Instant};

/// The running suite.
pub struct Suite<'e> {
    pub env: &'e mut Env,
    pub rows: Vec<Row>,
    only: Vec<String>,
    /// Consecutive rows that observed a timeout: the daemon may be hung.
    timeouts: usize,
}

/// After this many timeouts in a row the suite stops.
pub const MAX_TIMEOUTS: usize = 3;

impl<'e> Suite<'e> {
    pub fn new(env: &'e mut Env, only: Vec<String>) -> Suite<'e> {
        Suite { env, rows: Vec::new(), only, timeouts: 0 }
    }

    /// Whether `--only` selected the group `name` (no `--only`: every group).
    pub fn selected(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| name.contains(o.as_str()))
    }

    /// Whether the last [`MAX_TIMEOUTS`] rows timed out: vmmfs may be hung.
    pub fn hung(&self) -> bool {
        self.timeouts >= MAX_TIMEOUTS
    }

    /// Record one row.
    pub fn check(&mut self, case: &str, expected: impl Into<String>, observed: impl Into<String>) {
        let row = Row { case: case.into(), expected: expected.into(), observed: observed.into() };
        let verdict = if row.passed() { "PASS" } else { "FAIL" };
        if row.passed() {
            progress(&format!("  {verdict} {}", row.case));
        } else {
            progress(&format!("  {verdict} {}: expected '{}', observed '{}'", row.case, row.expected, row.observed));
        }
        if row.observed.contains("TIMEOUT") {
            self.timeouts += 1;
        } else {
            self.timeouts = 0;
        }
        self.rows.push(row);
    }

    pub(crate) fn probe(&self, who: Who, args: &[&str]) -> String {
        if self.hung() {
            return "TIMEOUT(not run: vmmfs hung)".into();
        }
        self.env.probe(who, args)
    }

    /// VMs visible to root on the host: names in vmm/.
    pub(crate) fn leftovers(&self) -> Vec<String> {
        let dir = self.env.readdir(&self.env.vm_dir());
        match dir.strip_prefix("OK ") {
            Some(list) => list.split(',').filter(|n| !n.is_empty()).map(String::from).collect(),
            None => Vec::new(),
        }
    }

    /// Wait (<= 3 s) until no VM is left; destroy leftovers as root and record them.
    pub(crate) fn settle(&mut self, group: &str) {
        let end = Instant::now() + Duration::from_secs(3);
        let mut left = self.leftovers();
        while !left.is_empty() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
            left = self.leftovers();
        }
        if !left.is_empty() {
            self.check(&format!("no VM left over before group {group}"), "none", left.join(","));
            for name in left {
                self.root_destroy(&name);
            }
        }
    }

    /// Retry a probe for up to `limit` while it reports EEXIST.
    pub(crate) fn retry_eexist(&self, who: Who, args: &[&str], limit: Duration) -> String {
        let end = Instant::now() + limit;
        loop {
            let r = self.probe(who, args);
            if r != "EEXIST" || Instant::now() >= end {
                return r;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn ctl(&self) -> String {
        self.env.ctl()
    }

    pub(crate) fn node_line(&self, uid: u32, mode: u32) -> String {
        format!("OK uid={uid} gid={} mode={mode:04o} type=file", self.env.users.vmm_gid)
    }

    /// Root creates a non-transient VM (write protocol); "OK" or errno.
    pub(crate) fn root_create(&self, name: &str) -> String {
        self.probe(Who::root(), &["write", &self.ctl(), &format!("create {name}")])
    }

    pub(crate) fn root_destroy(&self, name: &str) -> String {
        self.probe(Who::root(), &["write", &self.ctl(), &format!("destroy {name}")])
    }
}

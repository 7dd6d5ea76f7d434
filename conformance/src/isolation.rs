//! Issue 11, "a compromised guest must never be host root" (vmmfs(8)
//! ISOLATION): a member's VM runs in a worker process of its own that is
//! neither root nor the member, has no capabilities, a seccomp filter,
//! no_new_privs, its own namespaces and an empty root; a worker that makes
//! a forbidden system call, or dies any other way, ends only its VM. Checked
//! from /proc as an administrator would, with real bhyve runs.

use crate::harness::{Who, MEMBER1};
use crate::suite::Suite;
use crate::tools::{bhyve_args, guests, message, strs};
use std::path::Path;
use std::time::{Duration, Instant};

const READY: Duration = Duration::from_secs(20);
/// SPEC.md: a VM gone is gone within 1 s; the daemon lets a broken VM's
/// client read the cause for half a second first.
const GONE: Duration = Duration::from_millis(1500);
/// What multi.rom prints after its PCI walk (command 'c').
const PCI_DONE: &str = "pci done";

/// The worker process of VM `name`: a child of the daemon whose command
/// name is `vm:NAME` (set by the worker when it creates the VM).
fn worker_of(daemon: u32, name: &str) -> Option<u32> {
    let comm = format!("vm:{name}");
    let comm: String = comm.chars().take(15).collect();
    let end = Instant::now() + Duration::from_secs(2);
    loop {
        let found = std::fs::read_dir("/proc").ok()?.flatten().find_map(|d| {
            let pid: u32 = d.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (head, rest) = stat.rsplit_once(')')?;
            let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
            let c = head.split_once('(')?.1;
            (ppid == daemon && c == comm).then_some(pid)
        });
        if found.is_some() || Instant::now() >= end {
            return found;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn status_field(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(':')).map(|v| v.trim().to_string()))
        })
        .unwrap_or_else(|| format!("no {key}"))
}

fn ns(pid: &str, which: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{which}")).map(|p| p.display().to_string()).unwrap_or_default()
}

pub fn worker_isolation(s: &mut Suite) {
    let Some(g) = guests(s) else { return };
    let rom = g.join("multi.rom");
    let Some(daemon) = s.env.daemon_pid() else {
        s.check("Worker isolation: the daemon runs", "running", "no daemon");
        return;
    };
    let member = Who::user(MEMBER1);
    let member_uid = s.env.users.m1.uid;
    let start = |s: &Suite, name: &str| {
        let mut t = s.env.tool(member, "bhyve", &strs(&bhyve_args(&["-M"], &rom, name)))?;
        if t.wait_output("ready", 1, READY) {
            Ok(t)
        } else {
            Err(format!("no prompt: {}; {}", t.wait(Duration::from_secs(1)), message(&t.stderr())))
        }
    };
    let mut a = match start(s, "wi-a") {
        Ok(t) => t,
        Err(e) => return s.check("Worker isolation: vmmtest1 runs bhyve -M multi.rom", "at the prompt", e),
    };
    let Some(w) = worker_of(daemon, "wi-a") else {
        s.check("Worker isolation: vmmtest1's VM runs in a worker process, a child of the daemon", "found", "none");
        return;
    };
    s.check("Worker isolation: vmmtest1's VM runs in a worker process, a child of the daemon", "found", "found");
    let uid: Option<u32> = status_field(w, "Uid").split_whitespace().next().and_then(|u| u.parse().ok());
    s.check(
        "Worker isolation: the worker's uid is neither 0 nor vmmtest1's",
        "another uid",
        match uid {
            Some(0) => "uid 0".to_string(),
            Some(u) if u == member_uid => format!("vmmtest1's uid {u}"),
            Some(_) => "another uid".to_string(),
            None => "no uid".to_string(),
        },
    );
    for (key, want) in
        [("CapEff", "0000000000000000"), ("CapBnd", "0000000000000000"), ("Seccomp", "2"), ("NoNewPrivs", "1")]
    {
        s.check(&format!("Worker isolation: the worker's {key}"), want, status_field(w, key));
    }
    let own: Vec<String> = ["mnt", "net", "ipc", "uts", "pid"]
        .iter()
        .filter(|n| ns(&w.to_string(), n) != ns(&daemon.to_string(), n))
        .map(|n| n.to_string())
        .collect();
    s.check("Worker isolation: the worker has its own namespaces", "mnt,net,ipc,uts,pid", own.join(","));
    let root = std::fs::read_dir(format!("/proc/{w}/root")).map(|d| d.count());
    s.check(
        "Worker isolation: the worker's root directory is empty",
        "empty",
        match root {
            Ok(0) => "empty".to_string(),
            Ok(n) => format!("{n} entries"),
            Err(e) => e.to_string(),
        },
    );

    // A forbidden system call (the test hook stands for a compromised
    // device model) ends only that VM.
    let mut b = match start(s, "wi-b") {
        Ok(t) => t,
        Err(e) => return s.check("Worker isolation: a second VM at its prompt", "at the prompt", e),
    };
    let _ = s.probe(member, &["timed-write", &s.env.vm("wi-a"), "set x-test-forbidden-syscall=1"]);
    let end = a.wait(Duration::from_secs(10));
    let says = if a.stderr().contains("seccomp") { "names seccomp" } else { "no cause" };
    s.check(
        "Worker isolation: a forbidden system call in wi-a's worker -> bhyve exits 4 with the cause",
        "status 4; names seccomp",
        format!("{end}; {says}"),
    );
    s.check("Worker isolation: ... wi-a's node goes away", "gone", s.env.gone_within(&s.env.vm("wi-a"), GONE));
    s.check(
        "Worker isolation: ... and its worker is gone",
        "gone",
        if Path::new(&format!("/proc/{w}/status")).exists() && status_field(w, "State").starts_with('S') {
            "still running".to_string()
        } else {
            "gone".to_string()
        },
    );
    // 'c': the guest walks its PCI bus, prints what it found and waits for
    // the next command.
    b.send("c");
    let answered = b.wait_output(PCI_DONE, 1, Duration::from_secs(5));
    s.check(
        "Worker isolation: ... another VM of the same user keeps running",
        "answers",
        if answered { "answers".to_string() } else { format!("no answer: {}", b.wait(Duration::from_secs(1))) },
    );

    // Any other death of a worker (here SIGKILL, as the OOM killer sends)
    // ends its VM the same way.
    let observed = match worker_of(daemon, "wi-b") {
        Some(wb) => {
            // The worker this case found.
            crate::harness::kill(wb, libc::SIGKILL);
            let end = b.wait(Duration::from_secs(10));
            let cause = if b.stderr().contains("SIGKILL") { "names SIGKILL" } else { "no cause" };
            format!("{end}; {cause}; {}", s.env.gone_within(&s.env.vm("wi-b"), GONE))
        }
        None => "no worker found".into(),
    };
    s.check(
        "Worker isolation: SIGKILL of a worker -> bhyve exits 4 with the cause, the VM is gone",
        "status 4; names SIGKILL; gone",
        observed,
    );
}

//! A seccomp program that finds a call's rules by binary search on its
//! number.
//!
//! seccompiler lays a filter out as one chain: a call's number is compared
//! with each allowed number in turn. The kernel runs every filter it
//! installs once per system call number (`seccomp_cache_prepare`, which
//! finds the calls allowed whatever their arguments), with interrupts off.
//! Against the main thread's chain of 344 instructions that took 300-400 us
//! per install (strace -T), paid by every worker and again by every thread
//! it starts, and it was the largest CPU cost of a create after the
//! network namespace. A search tree reaches any number in 2 log2(n) + 1
//! steps.
//!
//! Only the dispatch on the number is ours: each call's argument checks are
//! its `SeccompRule`s as seccompiler compiles them, laid out as seccompiler
//! lays out one call's chain (each rule followed by the match action, then
//! the mismatch action). The tests check the two programs agree for every
//! call number and the arguments the rules look at.

use seccompiler::{sock_filter, BpfProgram, SeccompAction, SeccompRule};
use std::collections::BTreeMap;

// Classic BPF opcodes (linux/bpf_common.h).
/// BPF_LD | BPF_W | BPF_ABS.
const LD_W_ABS: u16 = 0x20;
const JMP_JA: u16 = 0x05;
const JMP_JEQ_K: u16 = 0x05 | 0x10;
const JMP_JGE_K: u16 = 0x05 | 0x30;
const RET_K: u16 = 0x06;

/// `struct seccomp_data`: the call's number, then its architecture.
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;
/// AUDIT_ARCH_X86_64 (linux/audit.h).
const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
/// The kernel's limit on one program (BPF_MAXINSNS).
const MAX_LEN: usize = 4096;

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// Compile `rules` (each allowed call's number and its argument rules; no
/// rules means any arguments) for x86_64: `allow` where a call and its
/// arguments match, `deny` for everything else, other architectures
/// included.
///
/// Layout: the architecture check and the number's load; the search, one
/// instruction per node (a split jumps over its lower half when the number
/// is at least its pivot) and per leaf (a compare that goes to the shared
/// allow or deny, or to its call's rule chain); the shared `allow` and
/// `deny`; one jump per call with rules to its chain; the chains. A
/// conditional jump reaches at most 255 instructions ahead, so the search
/// and what its leaves reach must fit in that: about 120 calls, twice what
/// the largest list here has (an error, not a wrong program, past it).
pub fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    deny: SeccompAction,
    allow: SeccompAction,
) -> Result<BpfProgram, String> {
    let (deny, allow) = (u32::from(deny), u32::from(allow));
    let mut out = vec![
        stmt(LD_W_ABS, ARCH_OFFSET),
        jump(JMP_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        stmt(RET_K, deny),
    ];
    if rules.is_empty() {
        out.push(stmt(RET_K, deny));
        return Ok(out);
    }
    out.push(stmt(LD_W_ABS, NR_OFFSET));
    let tree = out.len();
    let allow_at = tree + 2 * rules.len() - 1;
    let deny_at = allow_at + 1;
    let mut leaves = Vec::with_capacity(rules.len());
    let mut chains = Vec::new();
    for (nr, chain) in rules {
        let nr = u32::try_from(nr).map_err(|_| format!("system call number {nr}"))?;
        if chain.is_empty() {
            leaves.push((nr, allow_at));
        } else {
            // Its jump to the chain, in the row after `deny`.
            leaves.push((nr, deny_at + 1 + chains.len()));
            chains.push(chain_of(chain, deny, allow));
        }
    }
    search(&leaves, deny_at, &mut out)?;
    out.push(stmt(RET_K, allow));
    out.push(stmt(RET_K, deny));
    let mut at = out.len() + chains.len();
    for c in &chains {
        let from = out.len();
        out.push(stmt(JMP_JA, offset(from, at)?));
        at += c.len();
    }
    for c in chains {
        out.extend(c);
    }
    // A seccompiler rule starts with a jump over a jump out of the rule,
    // past its chain's mismatch action. That second jump is never taken,
    // but the kernel refuses a program whose jumps leave it, so the last
    // chain's needs a row to land on.
    out.push(stmt(RET_K, deny));
    if out.len() > MAX_LEN {
        return Err(format!(
            "the filter has {} instructions (limit {MAX_LEN})",
            out.len()
        ));
    }
    Ok(out)
}

/// How far a jump at `from` goes to reach `to` (jumps go forward only).
fn offset(from: usize, to: usize) -> Result<u32, String> {
    u32::try_from(to - (from + 1)).map_err(|_| "a jump past 2^32".to_string())
}

/// A conditional jump's offset, which must fit in a byte.
fn short(from: usize, to: usize) -> Result<u8, String> {
    u8::try_from(to - (from + 1)).map_err(|_| {
        format!(
            "too many calls for one search: a jump of {}",
            to - (from + 1)
        )
    })
}

/// One call's chain: its rules, each followed by the match action (a rule
/// that fails jumps past its own end), then the mismatch action.
fn chain_of(rules: Vec<SeccompRule>, deny: u32, allow: u32) -> Vec<sock_filter> {
    let mut chain = Vec::new();
    for rule in rules {
        chain.extend(BpfProgram::from(rule));
        chain.push(stmt(RET_K, allow));
    }
    chain.push(stmt(RET_K, deny));
    chain
}

/// The search over `leaves` (sorted numbers, each with where a match
/// goes); a number matching none goes to `deny_at`. Takes 2n - 1 rows.
fn search(
    leaves: &[(u32, usize)],
    deny_at: usize,
    out: &mut Vec<sock_filter>,
) -> Result<(), String> {
    let pc = out.len();
    if let [(nr, to)] = leaves {
        out.push(jump(JMP_JEQ_K, *nr, short(pc, *to)?, short(pc, deny_at)?));
        return Ok(());
    }
    let mid = leaves.len() / 2;
    // nr >= the pivot: over the lower half (2 mid - 1 rows) to the upper.
    let over =
        u8::try_from(2 * mid - 1).map_err(|_| "too many calls for one search".to_string())?;
    out.push(jump(JMP_JGE_K, leaves[mid].0, over, 0));
    search(&leaves[..mid], deny_at, out)?;
    search(&leaves[mid..], deny_at, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use seccompiler::{
        SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, TargetArch,
    };

    /// A classic BPF interpreter for the instructions seccomp filters use
    /// here; `data` is a `struct seccomp_data`. Returns the action and the
    /// instructions run.
    fn run(prog: &[sock_filter], data: &[u8; 64]) -> (u32, usize) {
        let (mut pc, mut acc, mut steps) = (0usize, 0u32, 0usize);
        loop {
            let i = &prog[pc];
            steps += 1;
            let k = i.k;
            let (jt, jf) = (usize::from(i.jt), usize::from(i.jf));
            let k_at = usize::try_from(k).unwrap();
            pc = match i.code {
                LD_W_ABS => {
                    acc = u32::from_ne_bytes(data[k_at..k_at + 4].try_into().unwrap());
                    pc + 1
                }
                0x54 => {
                    // ALU AND K
                    acc &= k;
                    pc + 1
                }
                JMP_JA => pc + 1 + k_at,
                JMP_JEQ_K => pc + 1 + if acc == k { jt } else { jf },
                JMP_JGE_K => pc + 1 + if acc >= k { jt } else { jf },
                0x25 => pc + 1 + if acc > k { jt } else { jf },
                RET_K => return (k, steps),
                c => panic!("opcode {c:#x}"),
            };
        }
    }

    fn data(nr: u32, arch: u32, args: [u64; 6]) -> [u8; 64] {
        let mut d = [0u8; 64];
        d[0..4].copy_from_slice(&nr.to_ne_bytes());
        d[4..8].copy_from_slice(&arch.to_ne_bytes());
        for (i, a) in args.iter().enumerate() {
            d[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_ne_bytes());
        }
        d
    }

    fn rules() -> BTreeMap<i64, Vec<SeccompRule>> {
        let masked = SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(0xff00),
            0xAE00,
        )
        .unwrap();
        let eq =
            SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, 0x541B).unwrap();
        let qword = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(0x1_0000_0000_0100),
            0x1_0000_0000_0100,
        )
        .unwrap();
        let mut r = BTreeMap::new();
        for nr in [0, 1, 3, 9, 11, 60, 202, 230, 231, 318, 334, 435] {
            r.insert(nr, Vec::new());
        }
        r.insert(
            16,
            vec![
                SeccompRule::new(vec![masked]).unwrap(),
                SeccompRule::new(vec![eq]).unwrap(),
            ],
        );
        r.insert(56, vec![SeccompRule::new(vec![qword]).unwrap()]);
        r
    }

    fn linear(r: BTreeMap<i64, Vec<SeccompRule>>) -> BpfProgram {
        SeccompFilter::new(
            r,
            SeccompAction::KillProcess,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .unwrap()
        .try_into()
        .unwrap()
    }

    #[test]
    fn agrees_with_seccompilers_chain_for_every_number_and_argument() {
        let tree = compile(rules(), SeccompAction::KillProcess, SeccompAction::Allow).unwrap();
        let chain = linear(rules());
        let args = [
            0u64,
            0xAE41,
            0x12AE03,
            0x541B,
            0x541C,
            0xAF00,
            0x100,
            0x1_0000_0000_0100,
            0x1_0000_0000_0000,
            u64::MAX,
        ];
        let mut allowed = 0;
        for arch in [AUDIT_ARCH_X86_64, 0x4000_0003] {
            for nr in (0..600).chain([0x4000_0000, 0x4000_0010, u32::MAX]) {
                for a in args {
                    let d = data(nr, arch, [a, a, 0, 0, 0, 0]);
                    let (t, c) = (run(&tree, &d).0, run(&chain, &d).0);
                    assert_eq!(t, c, "nr {nr} arch {arch:#x} arg {a:#x}");
                    allowed += usize::from(t == u32::from(SeccompAction::Allow));
                }
            }
        }
        // Not a vacuous agreement: both allow and both deny.
        assert!(
            allowed > 100 && allowed < 2 * 603 * args.len() / 4,
            "{allowed}"
        );
    }

    #[test]
    fn worker_filters_agree_and_search_is_short() {
        use super::super::{rules_of, Kind};
        for kind in [Kind::Main, Kind::Vcpu, Kind::Device, Kind::Helper] {
            let tree = compile(
                rules_of(kind),
                SeccompAction::KillProcess,
                SeccompAction::Allow,
            )
            .unwrap();
            let chain = linear(rules_of(kind));
            let (mut worst_tree, mut worst_chain) = (0, 0);
            for nr in 0..600 {
                for a in [
                    0u64,
                    0xAE80,
                    libc::FIONREAD,
                    u64::try_from(libc::CLONE_THREAD).unwrap(),
                ] {
                    let d = data(nr, AUDIT_ARCH_X86_64, [a, a, a, 0, 0, 0]);
                    let (t, c) = (run(&tree, &d), run(&chain, &d));
                    assert_eq!(t.0, c.0, "{kind:?} nr {nr} arg {a:#x}");
                    worst_tree = worst_tree.max(t.1);
                    worst_chain = worst_chain.max(c.1);
                }
            }
            eprintln!("{kind:?}: at most {worst_tree} steps, {worst_chain} as a chain");
            // The point of the tree: a number is found in a few steps (the
            // search, then ioctl's argument rules), not after every listed
            // one.
            assert!(worst_tree <= 24, "{kind:?}: {worst_tree} steps");
            assert!(
                worst_chain > 3 * worst_tree,
                "{kind:?}: {worst_chain} vs {worst_tree}"
            );
        }
    }

    /// The kernel's own verdict: a child process installs the program.
    fn kernel_accepts(p: &BpfProgram) -> Result<(), i32> {
        // SAFETY: the child only makes system calls and exits; it touches
        // no lock the parent's other threads may hold.
        match unsafe { libc::fork() } {
            0 => {
                let r = seccompiler::apply_filter(p);
                let code = match r {
                    Ok(()) => 0,
                    Err(seccompiler::Error::Seccomp(e)) => e.raw_os_error().unwrap_or(99),
                    Err(_) => 98,
                };
                // SAFETY: ends the forked child without running the
                // parent's exit handlers.
                unsafe { libc::_exit(code) }
            }
            -1 => panic!("fork: {}", std::io::Error::last_os_error()),
            pid => {
                let mut st = 0;
                // SAFETY: waits for the child forked above.
                assert_eq!(unsafe { libc::waitpid(pid, &mut st, 0) }, pid);
                assert!(libc::WIFEXITED(st), "child status {st:#x}");
                match libc::WEXITSTATUS(st) {
                    0 => Ok(()),
                    e => Err(e),
                }
            }
        }
    }

    #[test]
    fn the_kernel_accepts_every_kinds_program() {
        use super::super::{rules_of, Kind};
        for kind in [Kind::Main, Kind::Vcpu, Kind::Device, Kind::Helper] {
            let p = compile(
                rules_of(kind),
                SeccompAction::KillProcess,
                SeccompAction::Allow,
            )
            .unwrap();
            assert_eq!(
                kernel_accepts(&p),
                Ok(()),
                "{kind:?}: {} instructions",
                p.len()
            );
        }
    }

    #[test]
    fn no_rules_denies_everything() {
        let p = compile(
            BTreeMap::new(),
            SeccompAction::KillProcess,
            SeccompAction::Allow,
        )
        .unwrap();
        for nr in 0..500 {
            let d = data(nr, AUDIT_ARCH_X86_64, [0; 6]);
            assert_eq!(run(&p, &d).0, u32::from(SeccompAction::KillProcess));
        }
    }
}

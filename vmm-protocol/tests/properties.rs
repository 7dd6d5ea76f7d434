//! Property tests of both parsers: whatever a client writes, parsing ends
//! in a value or a ParseError (never a panic, which in vmmfs would take a
//! FUSE worker thread down), in time linear in the input; and every value
//! parsed prints back as a line that parses to the same value.
//!
//! Case counts are fixed so `cargo test` stays within seconds; raise
//! PROPTEST_CASES for a longer run.

use proptest::prelude::*;
use vmm_protocol::command::{parse_size, parse_slot, Command};
use vmm_protocol::vmmctl::{
    parse_ioctl, parse_line, IOCTL_STRUCT_SIZE, VMMCTL_VM_CREATE, VMMCTL_VM_DESTROY,
};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Words the grammars know, so random lines get past the first check.
const WORDS: &[&str] = &[
    "memory",
    "cpus",
    "bootrom",
    "kernel",
    "initrd",
    "cmdline",
    "com1",
    "com2",
    "device",
    "set",
    "run",
    "reinit",
    "reset",
    "poweroff",
    "force-poweroff",
    "suspend",
    "create",
    "destroy",
    "destroy-on-close",
    "virtio-blk",
    "virtio-net",
    "fd=3",
    "ro",
    "slirp",
    "sockets=",
    "cores=",
    "threads=",
    "cpus=",
    "0",
    "1",
    "255",
    "256",
    "65535",
    "65536",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "-1",
    "+1",
    "3:0",
    "0:3:0",
    "9:99:9",
    "512M",
    "1G",
    "99999999999T",
    "K",
    "=",
    ":",
    ",",
    " ",
    "  ",
    "\n",
    "\t",
    "\0",
    "é",
    "x",
];

/// Lines made of known words, numbers, separators and arbitrary text.
fn line() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => proptest::sample::select(WORDS).prop_map(String::from),
        2 => any::<u64>().prop_map(|n| n.to_string()),
        1 => (any::<u16>(), any::<u16>()).prop_map(|(k, v)| format!("cores={k} threads={v}")),
        1 => ".{0,12}",
    ];
    proptest::collection::vec(piece, 0..10).prop_map(|v| v.join(" "))
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn command_parser_never_panics_and_round_trips(l in line()) {
        if let Ok(cmd) = Command::parse(&l) {
            let again = Command::parse(&cmd.to_string());
            prop_assert_eq!(again.as_ref(), Ok(&cmd), "printed as {:?}", cmd.to_string());
        }
    }

    #[test]
    fn command_parser_takes_arbitrary_text(l in "\\PC{0,64}") {
        let _ = Command::parse(&l);
        let _ = parse_size(&l);
        let _ = parse_slot(&l);
    }

    #[test]
    fn cpus_topology_never_overflows(c in any::<u16>(), s in any::<u16>(), k in any::<u16>(), t in any::<u16>()) {
        for l in [
            format!("cpus {c} sockets={s} cores={k} threads={t}"),
            format!("cpus sockets={s} cores={k} threads={t}"),
            format!("cpus {c} cores={k} threads={t}"),
        ] {
            if let Ok(Command::Cpus(top)) = Command::parse(&l) {
                prop_assert!(top.cpus >= 1 && top.cpus <= 255);
                let slots = u64::from(top.sockets) * u64::from(top.cores) * u64::from(top.threads);
                prop_assert!(slots >= u64::from(top.cpus), "{}: {:?}", l, top);
            }
        }
    }

    #[test]
    fn vmmctl_lines_never_panic_and_round_trip(l in line(), raw in proptest::collection::vec(any::<u8>(), 0..300)) {
        for data in [l.as_bytes(), &raw[..]] {
            if let Ok(req) = parse_line(data) {
                prop_assert_eq!(parse_line(req.to_string().as_bytes()), Ok(req));
            }
        }
    }

    #[test]
    fn vmmctl_ioctls_never_panic(
        name in proptest::collection::vec(any::<u8>(), 0..240),
        tail in proptest::collection::vec(0u8..3, 66),
        cmd in prop_oneof![Just(VMMCTL_VM_CREATE), Just(VMMCTL_VM_DESTROY), any::<u32>()],
        len in prop_oneof![Just(IOCTL_STRUCT_SIZE), 0usize..600],
    ) {
        let mut data = vec![0u8; len];
        let n = name.len().min(len);
        data[..n].copy_from_slice(&name[..n]);
        for (i, b) in tail.iter().enumerate() {
            if let Some(x) = data.get_mut(230 + i) {
                *x = *b;
            }
        }
        if let Ok(req) = parse_ioctl(cmd, &data) {
            // Whatever the ioctl accepted, the line protocol accepts too.
            prop_assert_eq!(parse_line(req.to_string().as_bytes()), Ok(req));
        }
    }
}

/// Parsing is linear: a megabyte of options is parsed in well under a
/// second (vmmfs bounds a write anyway).
#[test]
fn long_lines_parse_quickly() {
    let t = std::time::Instant::now();
    let opts = "ro,".repeat(300_000);
    let _ = Command::parse(&format!("device 3 virtio-blk {opts}"));
    let _ = Command::parse(&format!("cmdline {}", "x ".repeat(500_000)));
    let _ = parse_line("create ".repeat(100_000).as_bytes());
    assert!(
        t.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        t.elapsed()
    );
}

proptest! {
    #![proptest_config(config())]

    /// The hand-over messages come from any local user (and their answers
    /// from the daemon): parsing never panics, and what parses prints back
    /// as the same message.
    #[test]
    fn handover_messages_never_panic_and_round_trip(
        l in "\\PC{0,80}",
        labels in proptest::collection::vec(0i32..i32::MAX, 0..20),
        hex in "[0-9a-fA-F]{30,34}",
    ) {
        use vmm_protocol::handover::{attach_line, parse_attach, Ack, Fds, Greeting, Nonce};
        let fds = format!("fds {}", labels.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(" "));
        for text in [l.as_str(), fds.as_str(), &format!("attach {hex}"), &format!("vmmfs-handover 1 nonce={hex}")] {
            if let Ok(f) = Fds::parse(text) {
                prop_assert!(!f.0.is_empty() && f.0.len() <= vmm_protocol::handover::MAX_FDS_PER_MESSAGE);
                prop_assert_eq!(Fds::parse(&f.to_string()), Ok(f));
            }
            if let Ok(a) = Ack::parse(text) {
                prop_assert_eq!(Ack::parse(&a.to_string()), Ok(a));
            }
            if let Ok(g) = Greeting::parse(text) {
                prop_assert_eq!(Greeting::parse(&g.to_string()), Ok(g));
            }
            if let Some(Ok(n)) = parse_attach(text) {
                prop_assert_eq!(parse_attach(&attach_line(&n)), Some(Ok(n)));
                prop_assert_eq!(Nonce::parse(&n.to_string()), Ok(n));
            }
        }
    }
}

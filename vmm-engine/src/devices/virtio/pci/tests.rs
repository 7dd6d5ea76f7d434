//! The transport under hostile register traffic and broken activations.

use super::activate::ActivateError;
use super::*;
use crate::devices::virtio::queue::SetupError;
use crate::devices::virtio::test_utils::TestGuest;
use crate::devices::virtio::{S_ACKNOWLEDGE, S_DRIVER, S_FEATURES_OK};

fn kvm() -> Option<kvm_ioctls::Kvm> {
    let k = kvm_ioctls::Kvm::new().ok();
    if k.is_none() {
        eprintln!("skipping: no /dev/kvm");
    }
    k
}

/// An rng function over `g`'s RAM (declare `g` first: it must outlive the
/// device thread).
fn transport(kvm: &kvm_ioctls::Kvm, g: &TestGuest) -> (PciFunction, VirtioPci) {
    let vm = Arc::new(kvm.create_vm().unwrap());
    let router = Arc::new(GsiRouter::new(vm.clone()));
    VirtioPci::build(
        Box::new(crate::devices::virtio::rng::Rng),
        "test".into(),
        Wiring {
            vm,
            router,
            ram: g.ram.clone(),
        },
        Placement {
            bar_addr: 0xc000_0000,
            intx_pin: 0,
            intx_line: 16,
            source: 0,
        },
    )
    .unwrap()
}

/// Random register traffic from a "driver" that knows nothing: the
/// transport and the device thread must neither panic nor hang.
#[test]
fn random_register_traffic_is_survived() {
    let Some(kvm) = kvm() else { return };
    let g = TestGuest::new(1 << 20);
    let (f, mut v) = transport(&kvm, &g);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..4000 {
        let r = next();
        let size = [1usize, 2, 4, 8][(r & 3) as usize];
        let off = match (r >> 2) % 6 {
            0..=2 => (r >> 8) % 0x40,
            3 => NOTIFY + (r >> 8) % 16,
            4 => MSIX_TABLE + (r >> 8) % 0x60,
            _ => (r >> 8) % BAR_SIZE,
        };
        let off = off.min(BAR_SIZE - size as u64);
        let val = match (r >> 40) % 4 {
            // Plausible addresses in RAM, small numbers, status bits, junk.
            0 => (next() % (1 << 20)) & !0xf,
            1 => next() % 512,
            2 => [0u64, 1, 3, 11, 15, 0x4f][(next() % 6) as usize],
            _ => next(),
        };
        let mut data = val.to_le_bytes();
        if r & (1 << 60) != 0 {
            v.bar_read(0, off, &mut data[..size]);
        } else {
            v.bar_write(0, off, &data[..size]);
        }
        if r & (1 << 61) != 0 && r & (1 << 62) != 0 {
            let mut cfg = f.cfg;
            cfg[v.msix_cap + 3] = cast::low_u8(next()) & 0xc0;
            v.config_written(&cfg, 0xc000_0000 + (next() % 4) * 0x4000, next() & 1 == 0);
        }
    }
    v.shutdown();
}

/// DRIVER_OK starts the device only after FEATURES_OK, with every queue
/// enabled and set up in RAM; otherwise the error names the rule.
#[test]
fn activation_errors_name_the_rule() {
    let Some(kvm) = kvm() else { return };
    let g = TestGuest::new(1 << 20);
    let (_f, mut v) = transport(&kvm, &g);
    v.status = S_ACKNOWLEDGE | S_DRIVER;
    assert!(matches!(v.activate(), Err(ActivateError::NoFeaturesOk)));
    v.common_write(0x08, &1u32.to_le_bytes()); // driver_feature_select: high half
    v.common_write(0x0c, &1u32.to_le_bytes()); // VERSION_1
    v.common_write(0x14, &[S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK]);
    assert_ne!(v.status & S_FEATURES_OK, 0, "features refused");
    assert!(matches!(
        v.activate(),
        Err(ActivateError::QueueNotEnabled(0))
    ));
    v.common_write(0x20, &0x7fff_0000_0000u64.to_le_bytes()); // descriptor table
    v.common_write(0x1c, &1u16.to_le_bytes());
    assert!(matches!(
        v.activate(),
        Err(ActivateError::Queue(SetupError::NotInRam { queue: 0 }))
    ));
    v.common_write(0x20, &0x1_0000u64.to_le_bytes());
    v.common_write(0x28, &0x2_0000u64.to_le_bytes());
    v.common_write(0x30, &0x3_0000u64.to_le_bytes());
    v.activate().unwrap();
    v.shutdown();
    assert!(v.dev.is_some(), "the device came back from its thread");
}

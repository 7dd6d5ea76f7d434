//! Decoding the exits that carry data in kvm_run: port I/O (string I/O
//! split into accesses of its size), MMIO, and KVM's internal errors.

use super::trail::{Access, Trail};
use crate::cast;
use crate::devices::Platform;
use crate::events::ExitReason;
use kvm_bindings::{kvm_run, KVM_EXIT_IO_OUT};
use kvm_ioctls::VcpuFd;

pub(super) fn describe_internal_error(run: &kvm_run, rip: Option<u64>) -> String {
    // SAFETY: exit_reason said KVM_EXIT_INTERNAL_ERROR: `internal` is the active field.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    let what = match internal.suberror {
        1 => "emulation failure",
        2 => "simultaneous exceptions",
        3 => "delivery event",
        _ => "internal error",
    };
    let mut s = format!("KVM internal error suberror {} ({what})", internal.suberror);
    if let Some(rip) = rip {
        s.push_str(&format!(" at rip {rip:#x}"));
    }
    if internal.suberror == 1 && n >= 2 && internal.data[0] & 1 != 0 {
        // KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: the failing
        // instruction follows the flags word.
        // SAFETY: suberror 1 with that flag selects the `emulation_failure` view.
        let ef = unsafe {
            run.__bindgen_anon_1
                .emulation_failure
                .__bindgen_anon_1
                .__bindgen_anon_1
        };
        let len = usize::from(ef.insn_size).min(ef.insn_bytes.len());
        if len > 0 {
            s.push_str(", instruction");
            for b in &ef.insn_bytes[..len] {
                s.push_str(&format!(" {b:02x}"));
            }
        }
    } else if n > 0 {
        s.push_str(", data");
        for w in &internal.data[..n] {
            s.push_str(&format!(" {w:#x}"));
        }
    }
    s
}

/// Handle a port I/O exit: one access of `size` bytes, `count` times (string I/O).
pub(super) fn handle_io(
    vcpu: &mut VcpuFd,
    run_size: usize,
    platform: &Platform,
    trail: &mut Trail,
) -> Option<ExitReason> {
    let run = vcpu.get_kvm_run();
    // SAFETY: exit_reason said KVM_EXIT_IO: `io` is the active field.
    let io = unsafe { run.__bindgen_anon_1.io };
    let size = usize::from(io.size);
    let total = size.saturating_mul(io.count as usize);
    let off = cast::usize_from(io.data_offset);
    if size == 0 || off.checked_add(total).is_none_or(|e| e > run_size) {
        return Some(ExitReason::Error(format!(
            "malformed I/O exit (port {:#x} size {size} count {})",
            io.port, io.count
        )));
    }
    let base = run as *mut kvm_run as *mut u8;
    // SAFETY: [off, off+total) was checked to lie inside the kvm_run mapping
    // of run_size bytes, which the kernel shares with us for data exchange.
    let data = unsafe { std::slice::from_raw_parts_mut(base.add(off), total) };
    let out = u32::from(io.direction) == KVM_EXIT_IO_OUT;
    let access = Access::Io {
        out,
        port: io.port,
        size: io.size,
        count: io.count,
    };
    if out {
        // Before the device sees it: an OUT can end the run.
        trail.record(access, &data[..size]);
        for chunk in data.chunks(size) {
            if let Some(r) = platform.io_out(io.port, chunk) {
                return Some(r);
            }
        }
    } else {
        for chunk in data.chunks_mut(size) {
            platform.io_in(io.port, chunk);
        }
        trail.record(access, &data[..size]);
    }
    None
}

pub(super) fn handle_mmio(vcpu: &mut VcpuFd, platform: &Platform, trail: &mut Trail) {
    let run = vcpu.get_kvm_run();
    // SAFETY: exit_reason said KVM_EXIT_MMIO: `mmio` is the active field.
    let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
    let len = (mmio.len as usize).min(mmio.data.len());
    if mmio.is_write != 0 {
        platform.mmio_write(mmio.phys_addr, &mmio.data[..len]);
    } else {
        platform.mmio_read(mmio.phys_addr, &mut mmio.data[..len]);
    }
    let access = Access::Mmio {
        write: mmio.is_write != 0,
        addr: mmio.phys_addr,
        len: u8::try_from(len).unwrap_or(u8::MAX),
    };
    trail.record(access, &mmio.data[..len]);
}

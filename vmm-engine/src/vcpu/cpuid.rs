//! The CPUID a vCPU is given: the host's supported set with this vCPU's
//! APIC id, the configured topology and the hypervisor bit.

use crate::command::Topology;
use crate::error::{Error, Result};
use kvm_bindings::CpuId;

/// Ceiling of log2 for topology field widths.
pub(super) fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// CPUID for vCPU `id`: the host's supported set, with APIC ids, topology
/// and the hypervisor bit.
pub fn cpuid_for(base: &CpuId, id: u32, topo: &Topology) -> Result<CpuId> {
    let threads = u32::from(topo.threads.max(1));
    let cores = u32::from(topo.cores.max(1));
    let smt_bits = bits_for(threads);
    let core_bits = bits_for(cores);
    let per_pkg = threads * cores;
    let mut entries: Vec<_> = base.as_slice().to_vec();
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0xffff) | (id << 24) | (per_pkg.min(255) << 16);
                e.ecx |= 1 << 31; // hypervisor present
                if per_pkg > 1 {
                    e.edx |= 1 << 28; // HTT: the count above is valid
                }
            }
            4 => {
                e.eax = (e.eax & 0x03ff_ffff) | ((cores.min(64) - 1) << 26);
            }
            0xb | 0x1f => {
                let (shift, count, level) = match e.index {
                    0 => (smt_bits, threads, 1),
                    1 => (smt_bits + core_bits, per_pkg, 2),
                    _ => (0, 0, 0),
                };
                e.eax = shift;
                e.ebx = count;
                e.ecx = (level << 8) | (e.index & 0xff);
                e.edx = id;
            }
            _ => {}
        }
    }
    CpuId::from_entries(&entries)
        .map_err(|_| Error::kvm("CPUID entries", std::io::Error::other("too many")))
}

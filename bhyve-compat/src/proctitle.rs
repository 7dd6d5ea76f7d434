//! The process title, as FreeBSD's setproctitle(3): `ps` shows a running
//! bhyve as `bhyve: NAME`, which VM managers look for. Linux reads a
//! process's command line from the memory its arguments were passed in,
//! so the title is written over those strings (truncated to their length).
//! The command name (`comm`, what `pgrep -x bhyve` matches) stays, as on
//! FreeBSD.
//!
//! The argument vector is captured from glibc's call of the `.init_array`
//! functions, which pass (argc, argv, envp) as the C runtime does.

use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

static ARGC: AtomicUsize = AtomicUsize::new(0);
static ARGV: AtomicPtr<*mut libc::c_char> = AtomicPtr::new(std::ptr::null_mut());

extern "C" fn capture(
    argc: libc::c_int,
    argv: *mut *mut libc::c_char,
    _env: *mut *mut libc::c_char,
) {
    ARGC.store(usize::try_from(argc).unwrap_or(0), Ordering::Relaxed);
    ARGV.store(argv, Ordering::Relaxed);
}

#[used]
#[link_section = ".init_array"]
static CAPTURE: extern "C" fn(libc::c_int, *mut *mut libc::c_char, *mut *mut libc::c_char) =
    capture;

/// Set the title to `title`. Arguments read through `std::env::args` after
/// this see the title: read them first.
pub fn set(title: &str) {
    let argc = ARGC.load(Ordering::Relaxed);
    let argv = ARGV.load(Ordering::Relaxed);
    if argc > 0 && !argv.is_null() {
        // SAFETY: argv holds argc valid NUL-terminated strings (the C
        // runtime's contract); only the bytes of strings that follow each
        // other in memory are written, and the last byte stays NUL.
        unsafe {
            let start = *argv;
            let mut end = start.add(libc::strlen(start));
            for i in 1..argc {
                let a = *argv.add(i);
                if a != end.add(1) {
                    break;
                }
                end = a.add(libc::strlen(a));
            }
            // end >= start (it only moves forward from start).
            let room = usize::try_from(end.offset_from(start)).unwrap_or(0);
            let n = title.len().min(room);
            std::ptr::copy_nonoverlapping(title.as_ptr(), start.cast::<u8>(), n);
            std::ptr::write_bytes(start.add(n), 0, room - n + 1);
        }
    }
}

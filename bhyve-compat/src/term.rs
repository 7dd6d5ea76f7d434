//! `-l com1,stdio`: the terminal in raw mode while the guest owns it, restored
//! on every way out (normal exit, error, handled signal). Also restores the
//! file status flags of fds 0 and 1, which the daemon's copies share.

use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg, Termios};
use std::io::IsTerminal;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

struct Saved {
    termios: Option<Termios>,
    flags: [Option<i32>; 2],
}

static SAVED: Mutex<Option<Saved>> = Mutex::new(None);
/// In a forked child: the parent put the terminal in raw mode.
static RAW_INHERITED: AtomicBool = AtomicBool::new(false);

fn fd(n: i32) -> BorrowedFd<'static> {
    // SAFETY: fds 0 and 1 stay open for the life of the process.
    unsafe { BorrowedFd::borrow_raw(n) }
}

fn getfl(n: i32) -> Option<i32> {
    // SAFETY: F_GETFL on a descriptor number has no memory effects.
    let r = unsafe { libc::fcntl(n, libc::F_GETFL) };
    (r >= 0).then_some(r)
}

/// Save the state of fds 0/1 and, if stdin is a terminal, make it raw.
pub fn enter_stdio() -> nix::Result<()> {
    let mut saved = SAVED.lock().unwrap_or_else(|p| p.into_inner());
    if saved.is_some() {
        return Ok(());
    }
    let stdin = fd(0);
    let termios = if std::io::stdin().is_terminal() {
        let orig = tcgetattr(stdin)?;
        let mut raw = orig.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin, SetArg::TCSANOW, &raw)?;
        Some(orig)
    } else {
        None
    };
    *saved = Some(Saved {
        termios,
        flags: [getfl(0), getfl(1)],
    });
    Ok(())
}

/// Whether the terminal is in raw mode now.
pub fn is_raw() -> bool {
    RAW_INHERITED.load(Ordering::Relaxed)
        || SAVED
            .lock()
            .map(|s| s.as_ref().is_some_and(|s| s.termios.is_some()))
            .unwrap_or(false)
}

/// Put fds 0/1 back as they were. Idempotent; safe to call on any exit path.
pub fn restore() {
    let mut saved = SAVED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(s) = saved.take() {
        if let Some(t) = s.termios {
            let _ = tcsetattr(fd(0), SetArg::TCSAFLUSH, &t);
        }
        for (n, fl) in (0..).zip(s.flags.iter()) {
            if let Some(fl) = fl {
                // SAFETY: F_SETFL with flags previously read from the same fd.
                unsafe { libc::fcntl(n, libc::F_SETFL, *fl) };
            }
        }
    }
}

/// Forget the saved state without restoring (in a forked child, so that only
/// the parent restores the terminal).
pub fn forget() {
    let mut saved = SAVED.lock().unwrap_or_else(|p| p.into_inner());
    if saved.as_ref().is_some_and(|s| s.termios.is_some()) {
        RAW_INHERITED.store(true, Ordering::Relaxed);
    }
    *saved = None;
}

/// Restore the terminal, then exit with `code`.
pub fn exit(code: i32) -> ! {
    restore();
    std::process::exit(code)
}

//! errno numbers <-> names, as the probes print them.

/// Every errno the suite may meet, by name.
const NAMES: &[(i32, &str)] = &[
    (libc::EPERM, "EPERM"),
    (libc::ENOENT, "ENOENT"),
    (libc::ESRCH, "ESRCH"),
    (libc::EINTR, "EINTR"),
    (libc::EIO, "EIO"),
    (libc::ENXIO, "ENXIO"),
    (libc::E2BIG, "E2BIG"),
    (libc::EBADF, "EBADF"),
    (libc::ECHILD, "ECHILD"),
    (libc::EAGAIN, "EAGAIN"),
    (libc::ENOMEM, "ENOMEM"),
    (libc::EACCES, "EACCES"),
    (libc::EFAULT, "EFAULT"),
    (libc::EBUSY, "EBUSY"),
    (libc::EEXIST, "EEXIST"),
    (libc::EXDEV, "EXDEV"),
    (libc::ENODEV, "ENODEV"),
    (libc::ENOTDIR, "ENOTDIR"),
    (libc::EISDIR, "EISDIR"),
    (libc::EINVAL, "EINVAL"),
    (libc::ENFILE, "ENFILE"),
    (libc::EMFILE, "EMFILE"),
    (libc::ENOTTY, "ENOTTY"),
    (libc::EFBIG, "EFBIG"),
    (libc::ENOSPC, "ENOSPC"),
    (libc::ESPIPE, "ESPIPE"),
    (libc::EROFS, "EROFS"),
    (libc::EPIPE, "EPIPE"),
    (libc::ERANGE, "ERANGE"),
    (libc::EDEADLK, "EDEADLK"),
    (libc::ENAMETOOLONG, "ENAMETOOLONG"),
    (libc::ENOSYS, "ENOSYS"),
    (libc::ENOTEMPTY, "ENOTEMPTY"),
    (libc::ELOOP, "ELOOP"),
    (libc::ENODATA, "ENODATA"),
    (libc::EOVERFLOW, "EOVERFLOW"),
    (libc::EOPNOTSUPP, "EOPNOTSUPP"),
    (libc::ENOTCONN, "ENOTCONN"),
    (libc::ETIMEDOUT, "ETIMEDOUT"),
    (libc::ECONNREFUSED, "ECONNREFUSED"),
    (libc::ESTALE, "ESTALE"),
    (libc::ECANCELED, "ECANCELED"),
];

/// Symbolic name of an errno (`E123` for one not in the table).
pub fn name(errno: i32) -> String {
    NAMES.iter().find(|(n, _)| *n == errno).map(|(_, s)| s.to_string()).unwrap_or_else(|| format!("E{errno}"))
}

/// errno of a symbolic name (inverse of [`name`]).
#[cfg_attr(not(test), allow(dead_code))]
pub fn number(name: &str) -> Option<i32> {
    if let Some((n, _)) = NAMES.iter().find(|(_, s)| *s == name) {
        return Some(*n);
    }
    name.strip_prefix('E')?.parse().ok()
}

/// Name of the errno in an I/O error (`EIO` if it carries none).
pub fn of_io(e: &std::io::Error) -> String {
    name(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Name of the current `errno`.
pub fn last() -> String {
    of_io(&std::io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_the_spec_errnos() {
        assert_eq!(name(libc::EPERM), "EPERM");
        assert_eq!(name(libc::EACCES), "EACCES");
        assert_eq!(name(libc::EINVAL), "EINVAL");
        assert_eq!(name(libc::EEXIST), "EEXIST");
        assert_eq!(name(libc::ENOMEM), "ENOMEM");
        assert_eq!(name(libc::ENXIO), "ENXIO");
        assert_eq!(name(libc::ENOENT), "ENOENT");
    }

    #[test]
    fn unknown_numbers_round_trip() {
        assert_eq!(name(4000), "E4000");
        assert_eq!(number("E4000"), Some(4000));
        assert_eq!(number("bogus"), None);
    }

    #[test]
    fn table_is_consistent() {
        for (n, s) in NAMES {
            assert_eq!(number(s), Some(*n), "{s}");
            assert_eq!(name(*n), *s);
        }
        let mut nums: Vec<i32> = NAMES.iter().map(|(n, _)| *n).collect();
        nums.sort();
        nums.dedup();
        assert_eq!(nums.len(), NAMES.len(), "duplicate errno in table");
    }

    #[test]
    fn io_errors() {
        assert_eq!(of_io(&std::io::Error::from_raw_os_error(libc::ENXIO)), "ENXIO");
        assert_eq!(of_io(&std::io::Error::other("x")), "EIO");
    }
}

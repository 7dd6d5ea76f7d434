//! Memory sizes as FreeBSD's tools read them (`vm_parse_memsize` over
//! libutil's `expand_number`): a plain number in C notation (decimal, 0x
//! hex, 0 octal) below one megabyte counts megabytes, as it always has for
//! `-m`; otherwise a number with an optional unit k, m, g, t, p or e (any
//! case), which may be followed by b or B (`256MB`, `1GB`); a bare `b`
//! means bytes.

/// C's strtoumax with base 0 on the whole leading number: the value and
/// the rest of the string. None without digits or on overflow.
fn c_number(s: &str) -> Option<(u64, &str)> {
    let (radix, digits) = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (16, h)
    } else if s.len() > 1 && s.starts_with('0') {
        (8, &s[1..])
    } else {
        (10, s)
    };
    let end = digits
        .find(|c: char| !c.is_digit(radix))
        .unwrap_or(digits.len());
    if end == 0 {
        // "0x" alone is the number 0 followed by "x", as strtoumax reads it.
        return if radix == 10 {
            None
        } else {
            Some((0, &s[1..]))
        };
    }
    let n = u64::from_str_radix(&digits[..end], radix).ok()?;
    Some((n, &digits[end..]))
}

/// `expand_number`: a number and an optional unit.
pub fn expand_number(s: &str) -> Option<u64> {
    let (n, rest) = c_number(s)?;
    let mut chars = rest.chars();
    let shift = match chars.next().map(|c| c.to_ascii_lowercase()) {
        None => return Some(n),
        Some('b') => 0,
        Some('k') => 10,
        Some('m') => 20,
        Some('g') => 30,
        Some('t') => 40,
        Some('p') => 50,
        Some('e') => 60,
        Some(_) => return None,
    };
    let mut tail = chars.as_str();
    if shift != 0 {
        tail = tail
            .strip_prefix('b')
            .or_else(|| tail.strip_prefix('B'))
            .unwrap_or(tail);
    }
    if !tail.is_empty() || (n << shift) >> shift != n {
        return None;
    }
    Some(n << shift)
}

/// `vm_parse_memsize`: bhyve's `-m` and bhyveload's `-m`.
pub fn parse_memsize(s: &str) -> Option<u64> {
    const MB: u64 = 1 << 20;
    match c_number(s) {
        Some((n, "")) => Some(if n < MB { n.checked_mul(MB)? } else { n }),
        _ => expand_number(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freebsd_memsizes() {
        let g = 1u64 << 30;
        for (s, v) in [
            ("256", 256 << 20),
            ("2048", 2048 << 20),
            ("1048576", 1 << 20),
            ("0x10000000", 256 << 20),
            ("0x100", 256 << 20),
            ("256M", 256 << 20),
            ("256MB", 256 << 20),
            ("256mb", 256 << 20),
            ("1G", g),
            ("1GB", g),
            ("1g", g),
            ("4096K", 4 << 20),
            ("2T", 2 << 40),
            ("536870912", 512 << 20),
            ("536870912b", 512 << 20),
            ("010", 8 << 20),
        ] {
            assert_eq!(parse_memsize(s), Some(v), "{s}");
        }
        for s in [
            "",
            "M",
            "1Q",
            "1GBB",
            "1BB",
            "-1",
            " 1G",
            "1 G",
            "0x",
            "99999999999999999999",
            "16E",
        ] {
            assert_eq!(parse_memsize(s), None, "{s}");
        }
    }
}

//! The vmmctl protocols: text lines on write(2) and FreeBSD's two ioctls.

use crate::{ParseError, Result};

/// `_IOWR('V', 0, struct vmmctl_vm_create)`.
pub const VMMCTL_VM_CREATE: u32 = 0xc128_5600;
/// `_IOWR('V', 1, struct vmmctl_vm_destroy)`.
pub const VMMCTL_VM_DESTROY: u32 = 0xc128_5601;
/// Size of both ioctl structures.
pub const IOCTL_STRUCT_SIZE: usize = 296;
/// `VMMCTL_CREATE_DESTROY_ON_CLOSE`.
pub const CREATE_DESTROY_ON_CLOSE: u32 = 0x1;
/// Bytes of the name field (`VM_MAX_NAMELEN + 1`).
pub const NAME_FIELD: usize = 230;

/// One vmmctl request, whichever interface it came through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CtlRequest {
    /// Create a VM; `transient` = destroy when the creating handle is released.
    Create { name: String, transient: bool },
    /// Destroy a VM.
    Destroy { name: String },
}

impl std::fmt::Display for CtlRequest {
    /// The line that [`parse_line`] reads back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CtlRequest::Create {
                name,
                transient: false,
            } => write!(f, "create {name}"),
            CtlRequest::Create {
                name,
                transient: true,
            } => write!(f, "create {name} destroy-on-close"),
            CtlRequest::Destroy { name } => write!(f, "destroy {name}"),
        }
    }
}

/// Check a VM name as FreeBSD does, plus the characters that cannot appear
/// in a file name or in our line protocol.
pub fn validate_name(name: &str) -> Result<()> {
    let bad = |why: &str| Err(ParseError(format!("bad VM name: {why}")));
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() >= NAME_FIELD {
        return bad("longer than 229 bytes");
    }
    if name == "." || name == ".." {
        return bad("'.' and '..' are reserved");
    }
    if name
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '/')
    {
        return bad("whitespace, control characters, '\"' and '/' are not allowed");
    }
    Ok(())
}

/// Parse one write(2) to vmmctl: `create NAME`, `create NAME destroy-on-close`, `destroy NAME`.
pub fn parse_line(data: &[u8]) -> Result<CtlRequest> {
    let text = std::str::from_utf8(data).map_err(|_| ParseError("command is not UTF-8".into()))?;
    let text = text.strip_suffix('\n').unwrap_or(text);
    if text.contains('\n') {
        return Err(ParseError("one command per write".into()));
    }
    let words: Vec<&str> = text.split(' ').collect();
    let req = match words.as_slice() {
        ["create", name] => CtlRequest::Create {
            name: name.to_string(),
            transient: false,
        },
        ["create", name, "destroy-on-close"] => CtlRequest::Create {
            name: name.to_string(),
            transient: true,
        },
        ["destroy", name] => CtlRequest::Destroy {
            name: name.to_string(),
        },
        _ => {
            return Err(ParseError(
                "usage: create NAME [destroy-on-close] | destroy NAME".into(),
            ))
        }
    };
    match &req {
        CtlRequest::Create { name, .. } | CtlRequest::Destroy { name } => validate_name(name)?,
    }
    Ok(req)
}

fn c_name(field: &[u8]) -> Result<String> {
    let len = field
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| ParseError("name is not NUL-terminated".into()))?;
    let name = std::str::from_utf8(&field[..len])
        .map_err(|_| ParseError("name is not UTF-8".into()))?
        .to_string();
    validate_name(&name)?;
    Ok(name)
}

fn all_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

/// Decode an ioctl's input structure.
pub fn parse_ioctl(cmd: u32, data: &[u8]) -> Result<CtlRequest> {
    if data.len() != IOCTL_STRUCT_SIZE {
        return Err(ParseError(format!(
            "ioctl argument of {} bytes",
            data.len()
        )));
    }
    let name = &data[..NAME_FIELD];
    match cmd {
        VMMCTL_VM_CREATE => {
            // char name[230]; (2 bytes padding) uint32_t flags; int reserved[15]
            let flags = u32::from_ne_bytes(data[232..236].try_into().expect("4 bytes"));
            if !all_zero(&data[236..]) {
                return Err(ParseError("reserved fields must be zero".into()));
            }
            if flags & !CREATE_DESTROY_ON_CLOSE != 0 {
                return Err(ParseError(format!("unknown flags {flags:#x}")));
            }
            Ok(CtlRequest::Create {
                name: c_name(name)?,
                transient: flags & CREATE_DESTROY_ON_CLOSE != 0,
            })
        }
        VMMCTL_VM_DESTROY => {
            // char name[230]; (2 bytes padding) int reserved[16]
            if !all_zero(&data[232..]) {
                return Err(ParseError("reserved fields must be zero".into()));
            }
            Ok(CtlRequest::Destroy {
                name: c_name(name)?,
            })
        }
        _ => Err(ParseError(format!("unknown ioctl {cmd:#x}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create_struct(name: &[u8], flags: u32) -> Vec<u8> {
        let mut v = vec![0u8; IOCTL_STRUCT_SIZE];
        v[..name.len()].copy_from_slice(name);
        v[232..236].copy_from_slice(&flags.to_ne_bytes());
        v
    }

    #[test]
    fn ioctl_numbers_match_freebsd_encoding() {
        // _IOWR = dir 3 << 30 | size << 16 | type << 8 | nr
        let size = u32::try_from(IOCTL_STRUCT_SIZE).unwrap();
        let iowr = |nr: u32| (3u32 << 30) | (size << 16) | (u32::from(b'V') << 8) | nr;
        assert_eq!(iowr(0), VMMCTL_VM_CREATE);
        assert_eq!(iowr(1), VMMCTL_VM_DESTROY);
    }

    #[test]
    fn lines() {
        assert_eq!(
            parse_line(b"create foo\n").unwrap(),
            CtlRequest::Create {
                name: "foo".into(),
                transient: false
            }
        );
        assert_eq!(
            parse_line(b"create foo destroy-on-close").unwrap(),
            CtlRequest::Create {
                name: "foo".into(),
                transient: true
            }
        );
        assert_eq!(
            parse_line(b"destroy foo").unwrap(),
            CtlRequest::Destroy { name: "foo".into() }
        );
        for bad in [
            &b"create"[..],
            b"create  foo",
            b"create foo bar",
            b"make foo",
            b"create foo\ncreate bar",
            b"create .",
            b"create ..",
            b"create a/b",
            b"create a\"b",
            b"create a\tb",
            b"\xff",
            b"",
        ] {
            assert!(parse_line(bad).is_err(), "{bad:?}");
        }
        let long = format!("create {}", "x".repeat(230));
        assert!(parse_line(long.as_bytes()).is_err());
        let ok = format!("create {}", "x".repeat(229));
        assert!(parse_line(ok.as_bytes()).is_ok());
    }

    #[test]
    fn lines_round_trip() {
        for req in [
            CtlRequest::Create {
                name: "a".into(),
                transient: false,
            },
            CtlRequest::Create {
                name: "b".into(),
                transient: true,
            },
            CtlRequest::Destroy { name: "c".into() },
        ] {
            assert_eq!(parse_line(req.to_string().as_bytes()).unwrap(), req);
        }
    }

    #[test]
    fn ioctls() {
        assert_eq!(
            parse_ioctl(VMMCTL_VM_CREATE, &create_struct(b"vm1", 1)).unwrap(),
            CtlRequest::Create {
                name: "vm1".into(),
                transient: true
            }
        );
        assert!(parse_ioctl(VMMCTL_VM_CREATE, &create_struct(b"vm1", 2)).is_err());
        let mut reserved = create_struct(b"vm1", 0);
        reserved[295] = 1;
        assert!(parse_ioctl(VMMCTL_VM_CREATE, &reserved).is_err());
        assert!(parse_ioctl(VMMCTL_VM_CREATE, &create_struct(b"", 0)).is_err());
        let unterminated = create_struct(&[b'a'; 230], 0);
        assert!(parse_ioctl(VMMCTL_VM_CREATE, &unterminated).is_err());
        let mut d = vec![0u8; IOCTL_STRUCT_SIZE];
        d[..3].copy_from_slice(b"vm1");
        assert_eq!(
            parse_ioctl(VMMCTL_VM_DESTROY, &d).unwrap(),
            CtlRequest::Destroy { name: "vm1".into() }
        );
        d[240] = 1;
        assert!(parse_ioctl(VMMCTL_VM_DESTROY, &d).is_err());
        assert!(parse_ioctl(0x1234, &d).is_err());
    }
}

//! Descriptor hand-over: how a client gives a VM its own open descriptors.
//!
//! A client never names a descriptor that the daemon then takes from it (a
//! set-id program holding the client's `vmm/NAME` descriptor would lend the
//! daemon its own files). Instead the client *sends* descriptors with
//! SCM_RIGHTS over a socket that the daemon binds to its `vmm/NAME` handle:
//!
//! 1. connect a `SOCK_SEQPACKET` socket to `vmm.sock` (next to `vmmctl`); the
//!    daemon's first message is the [greeting](Greeting) with a nonce;
//! 2. write `attach NONCE` to the `vmm/NAME` handle: the connection now
//!    belongs to that handle (the write, like every command, must come from a
//!    process with the credentials of the handle's opener);
//! 3. for each batch, send `fds N1 N2 ...` with the descriptors as SCM_RIGHTS,
//!    in the same order; the daemon answers with an [`Ack`]. Each descriptor
//!    is then known to the handle by its label `Ni` (normally the client's own
//!    descriptor number), which commands use as before (`bootrom 5`,
//!    `device 3 virtio-blk fd=6`).

use crate::{ParseError, Result};
use std::fmt;

/// Name of the hand-over socket in the vmmfs mount (and under `/dev`).
pub const SOCKET_NAME: &str = "vmm.sock";

/// Most descriptors in one `fds` message. A launch sends a command's
/// descriptors at a time (at most 2), so this is generous; it bounds the
/// control buffer the daemon reserves per message.
pub const MAX_FDS_PER_MESSAGE: usize = 16;

/// Largest message either side sends; anything longer is a protocol error.
pub const MAX_MESSAGE: usize = 256;

/// A random token naming one pending connection.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Nonce(pub [u8; 16]);

impl fmt::Display for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Nonce {
    /// Never printed in full: a log line must not hand out the token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Nonce({:02x}{:02x}..)", self.0[0], self.0[1])
    }
}

impl Nonce {
    /// Parse 32 lower- or upper-case hex digits.
    pub fn parse(s: &str) -> Result<Nonce> {
        let bad = || ParseError("bad nonce".into());
        if s.len() != 32 || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Nonce(out))
    }
}

/// The daemon's first message on a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting(pub Nonce);

const GREETING: &str = "vmmfs-handover 1 nonce=";

impl fmt::Display for Greeting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{GREETING}{}", self.0)
    }
}

impl Greeting {
    pub fn parse(s: &str) -> Result<Greeting> {
        s.strip_prefix(GREETING)
            .ok_or_else(|| ParseError("not a vmmfs hand-over greeting".into()))
            .and_then(Nonce::parse)
            .map(Greeting)
    }
}

/// `attach NONCE`, written to a `vmm/NAME` handle: binds the connection that
/// received this nonce to the handle. `None` if `line` is another command.
pub fn parse_attach(line: &str) -> Option<Result<Nonce>> {
    let line = line.strip_suffix('\n').unwrap_or(line);
    let rest = line.strip_prefix("attach")?;
    if !rest.is_empty() && !rest.starts_with(' ') {
        return None;
    }
    let words: Vec<&str> = rest.split_whitespace().collect();
    Some(match words.as_slice() {
        [n] => Nonce::parse(n),
        _ => Err(ParseError("usage: attach NONCE".into())),
    })
}

/// The line that [`parse_attach`] reads.
pub fn attach_line(nonce: &Nonce) -> String {
    format!("attach {nonce}")
}

/// `fds N1 N2 ...`: labels of the descriptors sent with this message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fds(pub Vec<i32>);

impl fmt::Display for Fds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fds")?;
        for n in &self.0 {
            write!(f, " {n}")?;
        }
        Ok(())
    }
}

impl Fds {
    pub fn parse(s: &str) -> Result<Fds> {
        let mut words = s.split(' ');
        if words.next() != Some("fds") {
            return Err(ParseError("expected 'fds N...'".into()));
        }
        let labels = words
            .map(|w| match w.parse::<i32>() {
                Ok(n) if n >= 0 && w.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
                _ => Err(ParseError(format!("bad descriptor label '{w}'"))),
            })
            .collect::<Result<Vec<i32>>>()?;
        if labels.is_empty() || labels.len() > MAX_FDS_PER_MESSAGE {
            return Err(ParseError(format!(
                "an fds message carries 1 to {MAX_FDS_PER_MESSAGE} descriptors"
            )));
        }
        Ok(Fds(labels))
    }
}

/// The daemon's answer to an `fds` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ack {
    Ok,
    /// The errno and why; none of the message's descriptors was kept.
    Error {
        errno: i32,
        message: String,
    },
}

impl fmt::Display for Ack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ack::Ok => write!(f, "ok"),
            Ack::Error { errno, message } => {
                write!(f, "error {errno} {}", message.replace('\n', " "))
            }
        }
    }
}

impl Ack {
    pub fn parse(s: &str) -> Result<Ack> {
        if s == "ok" {
            return Ok(Ack::Ok);
        }
        let bad = || ParseError("bad acknowledgement".into());
        let rest = s.strip_prefix("error ").ok_or_else(bad)?;
        let (errno, message) = rest.split_once(' ').unwrap_or((rest, ""));
        let errno = errno.parse::<i32>().map_err(|_| bad())?;
        Ok(Ack::Error {
            errno,
            message: message.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let n = Nonce([0xab; 16]);
        assert_eq!(
            Greeting::parse(&Greeting(n).to_string()).unwrap(),
            Greeting(n)
        );
        assert_eq!(parse_attach(&attach_line(&n)).unwrap().unwrap(), n);
        let f = Fds(vec![3, 0, 17]);
        assert_eq!(Fds::parse(&f.to_string()).unwrap(), f);
        for a in [
            Ack::Ok,
            Ack::Error {
                errno: 22,
                message: "not a regular file".into(),
            },
        ] {
            assert_eq!(Ack::parse(&a.to_string()).unwrap(), a);
        }
        assert!(!format!("{n:?}").contains(&n.to_string()));
    }

    #[test]
    fn malformed() {
        assert!(parse_attach("run").is_none());
        assert!(parse_attach("attachx 00").is_none());
        assert!(parse_attach("attach").unwrap().is_err());
        assert!(parse_attach("attach 00").unwrap().is_err());
        assert!(parse_attach(&format!("attach {} x", "0".repeat(32)))
            .unwrap()
            .is_err());
        assert!(Nonce::parse(&"g".repeat(32)).is_err());
        assert!(Nonce::parse(&"é".repeat(16)).is_err());
        for bad in [
            "",
            "fds",
            "fds -1",
            "fds +3",
            "fds 3  4",
            "fd 3",
            "fds 99999999999",
        ] {
            assert!(Fds::parse(bad).is_err(), "{bad}");
        }
        assert!(Fds::parse(&format!("fds{}", " 1".repeat(MAX_FDS_PER_MESSAGE + 1))).is_err());
        assert!(Ack::parse("error x y").is_err());
        assert!(Ack::parse("okay").is_err());
    }
}

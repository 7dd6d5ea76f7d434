//! A POSIX getopt(3) (FreeBSD flavour): options end at the first operand or `--`.

/// One parsed item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opt {
    /// A flag, with its argument if the option string says it takes one.
    Flag(char, Option<String>),
    /// An unknown option: "illegal option -- c".
    Illegal(char),
    /// An option missing its argument: "option requires an argument -- c".
    MissingArg(char),
}

/// Parse `args` (without argv\[0\]) against `optstring`; returns the options and
/// the operands that follow them.
pub fn getopt(args: &[String], optstring: &str) -> (Vec<Opt>, Vec<String>) {
    let takes_arg = |c: char| -> Option<bool> {
        if c == ':' {
            return None;
        }
        let i = optstring.find(c)?;
        Some(optstring[i + c.len_utf8()..].starts_with(':'))
    };
    let mut opts = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if a == "--" {
            i += 1;
            break;
        }
        if !a.starts_with('-') || a == "-" {
            break;
        }
        for (pos, c) in a[1..].char_indices() {
            match takes_arg(c) {
                None => opts.push(Opt::Illegal(c)),
                Some(false) => opts.push(Opt::Flag(c, None)),
                Some(true) => {
                    let rest = &a[1 + pos + c.len_utf8()..];
                    if !rest.is_empty() {
                        opts.push(Opt::Flag(c, Some(rest.to_string())));
                    } else if i + 1 < args.len() {
                        i += 1;
                        opts.push(Opt::Flag(c, Some(args[i].clone())));
                    } else {
                        opts.push(Opt::MissingArg(c));
                    }
                    break;
                }
            }
        }
        i += 1;
    }
    (opts, args[i..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn clusters_and_arguments() {
        let (o, rest) = getopt(
            &v(&["-AHm", "64M", "-c2", "-l", "com1,stdio", "vm1"]),
            "AHc:m:l:",
        );
        assert_eq!(
            o,
            vec![
                Opt::Flag('A', None),
                Opt::Flag('H', None),
                Opt::Flag('m', Some("64M".into())),
                Opt::Flag('c', Some("2".into())),
                Opt::Flag('l', Some("com1,stdio".into())),
            ]
        );
        assert_eq!(rest, v(&["vm1"]));
    }

    #[test]
    fn stops_at_operand_and_dashdash() {
        let (o, rest) = getopt(&v(&["vm1", "-A"]), "A");
        assert!(o.is_empty());
        assert_eq!(rest, v(&["vm1", "-A"]));
        let (o, rest) = getopt(&v(&["-A", "--", "-vm"]), "A");
        assert_eq!(o, vec![Opt::Flag('A', None)]);
        assert_eq!(rest, v(&["-vm"]));
    }

    #[test]
    fn errors() {
        let (o, _) = getopt(&v(&["-z", "-m"]), "m:");
        assert_eq!(o, vec![Opt::Illegal('z'), Opt::MissingArg('m')]);
        let (o, _) = getopt(&v(&["-:"]), "m:");
        assert_eq!(o, vec![Opt::Illegal(':')]);
        let (o, _) = getopt(&v(&["-é"]), "m:");
        assert_eq!(o, vec![Opt::Illegal('é')]);
    }
}

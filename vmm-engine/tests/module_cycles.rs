//! No module import cycle in any crate of the workspace: imports point down
//! (vm -> builder -> devices, boot, memory, events; nothing imports vm.rs).
//!
//! A module is a source file. `a` depends on `b` when `a` names `b` by a
//! path anywhere in its code (a `use` tree or an inline path): `crate::..`,
//! `super::..`, `self::..` or one of `a`'s own child modules. A path reaches
//! the deepest module file it names; items re-exported by the crate root
//! (lib.rs/main.rs, the facade), paths inside a file's own inline modules
//! (`mod tests { use super::*; }`) and the code of inline `#[cfg(test)]`
//! modules (tests may use any fixture) are not dependencies between files.
//!
//! Every crate is checked, and a cycle in any of them fails. In conformance
//! the runner's imports point main -> cases (the registry) -> the groups
//! (attack, bhyve, isolation; none imports another) -> tools (running
//! bhyve) -> suite -> harness -> leaves (lines, errno, ioctl, table), and the
//! child's main -> attack_probes -> probe -> the same leaves (main hands
//! probe.rs the attack probes; probe.rs imports no group).
//!
//! `cargo test -p vmm-engine --test module_cycles -- --nocapture` prints
//! each crate's cycles (strongly connected components) and their edges.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

type Module = Vec<String>;

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Path, // ::
    Open,
    Close,
    Semi,
    Comma,
    Star,
    Other,
}

/// Tokens of Rust source with comments, strings and chars removed.
fn lex(src: &str) -> Vec<Tok> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == b'r' && matches!(b.get(i + 1), Some(b'#') | Some(b'"')) {
            // Raw string r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push(Tok::Ident("r".into()));
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == b'"'
                    && b[j + 1..]
                        .iter()
                        .take(hashes)
                        .filter(|&&h| h == b'#')
                        .count()
                        == hashes
                {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            i = j;
            out.push(Tok::Other);
        } else if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push(Tok::Other);
        } else if c == b'\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
            if b.get(i + 1) == Some(&b'\\') {
                i += 2;
                while i < b.len() && b[i] != b'\'' {
                    i += 1;
                }
                i += 1;
            } else if b.get(i + 2) == Some(&b'\'') {
                i += 3;
            } else {
                i += 1;
            }
            out.push(Tok::Other);
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let s = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push(Tok::Ident(src[s..i].to_string()));
        } else if c == b':' && b.get(i + 1) == Some(&b':') {
            out.push(Tok::Path);
            i += 2;
        } else {
            out.push(match c {
                b'{' => Tok::Open,
                b'}' => Tok::Close,
                b';' => Tok::Semi,
                b',' => Tok::Comma,
                b'*' => Tok::Star,
                _ => Tok::Other,
            });
            i += 1;
        }
    }
    out
}

/// Expand a `use` tree starting at `t[*i]` into full paths (prefix included).
fn use_tree(t: &[Tok], i: &mut usize, prefix: &[String], out: &mut Vec<Vec<String>>) {
    let mut path = prefix.to_vec();
    loop {
        match t.get(*i) {
            Some(Tok::Ident(s)) if s == "as" => {
                *i += 2;
                break;
            }
            Some(Tok::Ident(s)) => {
                if s != "self" || path.is_empty() {
                    path.push(s.clone());
                }
                *i += 1;
            }
            Some(Tok::Path) => *i += 1,
            Some(Tok::Star) => {
                *i += 1;
                break;
            }
            Some(Tok::Open) => {
                *i += 1;
                while !matches!(t.get(*i), Some(Tok::Close) | None) {
                    use_tree(t, i, &path, out);
                    if t.get(*i) == Some(&Tok::Comma) {
                        *i += 1;
                    }
                }
                *i += 1;
                return;
            }
            _ => break,
        }
    }
    out.push(path);
}

/// Whether the tokens before `t[i]` (a `mod`) are `#[cfg(test)]` (with
/// an optional visibility).
fn cfg_test_before(t: &[Tok], i: usize) -> bool {
    let ident = |k: usize, w: &str| matches!(t.get(k), Some(Tok::Ident(s)) if s == w);
    let mut k = i;
    if k > 0 && ident(k - 1, "pub") {
        k -= 1;
    }
    k >= 5 && ident(k - 5, "cfg") && ident(k - 3, "test")
}

/// Every path named in a file, with the number of inline modules it sits in.
fn paths(src: &str) -> Vec<(usize, Vec<String>)> {
    let t = lex(src);
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut inline: Vec<usize> = Vec::new(); // brace depths of inline `mod x {`
    let mut test_depth: Option<usize> = None; // inside `#[cfg(test)] mod x {`
    let mut i = 0;
    while i < t.len() {
        match &t[i] {
            Tok::Open => {
                depth += 1;
                i += 1;
            }
            Tok::Close => {
                if inline.last() == Some(&depth) {
                    inline.pop();
                }
                if test_depth == Some(depth) {
                    test_depth = None;
                }
                depth = depth.saturating_sub(1);
                i += 1;
            }
            Tok::Ident(k) if k == "mod" => {
                if matches!(t.get(i + 1), Some(Tok::Ident(_))) && t.get(i + 2) == Some(&Tok::Open) {
                    inline.push(depth + 1);
                    if test_depth.is_none() && cfg_test_before(&t, i) {
                        test_depth = Some(depth + 1);
                    }
                }
                i += 2;
            }
            Tok::Ident(k) if k == "use" => {
                i += 1;
                let mut v = Vec::new();
                use_tree(&t, &mut i, &[], &mut v);
                if test_depth.is_some() {
                    continue;
                }
                out.extend(v.into_iter().map(|p| (inline.len(), p)));
            }
            Tok::Ident(first) => {
                let preceded = i > 0 && t[i - 1] == Tok::Path;
                let mut p = vec![first.clone()];
                i += 1;
                while t.get(i) == Some(&Tok::Path) {
                    match t.get(i + 1) {
                        Some(Tok::Ident(s)) => {
                            p.push(s.clone());
                            i += 2;
                        }
                        _ => break,
                    }
                }
                if p.len() > 1 && !preceded && test_depth.is_none() {
                    out.push((inline.len(), p));
                }
            }
            _ => i += 1,
        }
    }
    out
}

/// The module files of one crate, by module path, from `root` (the
/// directory of lib.rs/main.rs).
fn modules(root: &Path) -> BTreeMap<Module, PathBuf> {
    fn walk(dir: &Path, prefix: &Module, m: &mut BTreeMap<Module, PathBuf>, top: bool) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            if p.is_dir() {
                if top && name == "bin" {
                    continue;
                }
                let mut sub = prefix.clone();
                sub.push(name);
                walk(&p, &sub, m, false);
            } else if let Some(stem) = name.strip_suffix(".rs") {
                let mut mp = prefix.clone();
                if !(stem == "mod" || (top && (stem == "lib" || stem == "main"))) {
                    mp.push(stem.to_string());
                }
                m.insert(mp, p);
            }
        }
    }
    let mut m = BTreeMap::new();
    walk(root, &Vec::new(), &mut m, true);
    m
}

/// Dependency edges between module files of the crate rooted at `root`.
fn graph(root: &Path) -> BTreeMap<Module, BTreeSet<Module>> {
    let mods = modules(root);
    let mut g: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (m, file) in &mods {
        let src = fs::read_to_string(file).unwrap();
        let deps = g.entry(m.clone()).or_default();
        for (inl, p) in paths(&src) {
            let mut segs = p.as_slice();
            let mut base: Module = m.clone();
            match segs[0].as_str() {
                "crate" => {
                    base.clear();
                    segs = &segs[1..];
                }
                "self" => segs = &segs[1..],
                "super" => {
                    let mut ups = 0usize;
                    while segs.first().map(String::as_str) == Some("super") {
                        ups += 1;
                        segs = &segs[1..];
                    }
                    // The first supers leave the file's own inline modules.
                    for _ in 0..ups.saturating_sub(inl) {
                        base.pop();
                    }
                }
                first => {
                    let mut child = m.clone();
                    child.push(first.to_string());
                    if inl > 0 || !mods.contains_key(&child) {
                        continue;
                    }
                }
            }
            let mut target = base.clone();
            for s in segs {
                let mut next = target.clone();
                next.push(s.clone());
                if mods.contains_key(&next) {
                    target = next;
                } else {
                    break;
                }
            }
            // The crate root is the facade (re-exports), not a layer.
            if target != *m && !target.is_empty() && mods.contains_key(&target) {
                deps.insert(target);
            }
        }
    }
    g
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(g: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct St<'a> {
        g: &'a BTreeMap<Module, BTreeSet<Module>>,
        idx: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        on: BTreeSet<&'a Module>,
        stack: Vec<&'a Module>,
        out: Vec<Vec<Module>>,
    }
    fn visit<'a>(s: &mut St<'a>, v: &'a Module) {
        let n = s.idx.len();
        s.idx.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on.insert(v);
        for w in s.g.get(v).into_iter().flatten() {
            let Some((w, _)) = s.g.get_key_value(w) else {
                continue;
            };
            if !s.idx.contains_key(w) {
                visit(s, w);
                let l = s.low[w].min(s.low[v]);
                s.low.insert(v, l);
            } else if s.on.contains(w) {
                let l = s.idx[w].min(s.low[v]);
                s.low.insert(v, l);
            }
        }
        if s.low[v] == s.idx[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on.remove(w);
                comp.push(w.clone());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s = St {
        g,
        idx: BTreeMap::new(),
        low: BTreeMap::new(),
        on: BTreeSet::new(),
        stack: Vec::new(),
        out: Vec::new(),
    };
    for v in g.keys() {
        if !s.idx.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.out
}

fn name(m: &Module) -> String {
    if m.is_empty() {
        "<root>".into()
    } else {
        m.join("::")
    }
}

/// Crate roots of the workspace: each member's src/ and src/bin/NAME/ dirs.
fn crate_roots() -> Vec<PathBuf> {
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut roots = Vec::new();
    for e in fs::read_dir(ws).unwrap().flatten() {
        let src = e.path().join("src");
        if !e.path().join("Cargo.toml").exists() || !src.is_dir() {
            continue;
        }
        roots.push(src.clone());
        for b in fs::read_dir(src.join("bin"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if b.path().join("main.rs").exists() {
                roots.push(b.path());
            }
        }
    }
    roots.sort();
    roots
}

#[test]
fn no_module_import_cycles() {
    let mut found = Vec::new();
    for root in crate_roots() {
        let g = graph(&root);
        let edges: usize = g.values().map(BTreeSet::len).sum();
        let cs = cycles(&g);
        println!(
            "{}: {} modules, {} edges, {} cycle(s)",
            root.display(),
            g.len(),
            edges,
            cs.len()
        );
        for c in cs {
            let members: BTreeSet<&Module> = c.iter().collect();
            let mut text = format!("{}: cycle {{", root.display());
            for m in &c {
                let inner: Vec<String> = g[m]
                    .iter()
                    .filter(|d| members.contains(d))
                    .map(name)
                    .collect();
                text.push_str(&format!("\n  {} -> {}", name(m), inner.join(", ")));
            }
            text.push_str("\n}");
            println!("{text}");
            found.push(text);
        }
    }
    assert!(
        found.is_empty(),
        "module import cycles:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_checker_sees_paths() {
    let p = paths(
        "use crate::a::{b, c::{self, D}}; use super::x as y;\n\
         // use crate::comment::X;\n\
         fn f() { let s = \"crate::string::X\"; crate::z::f(); super::w::g(); }\n\
         mod inner { use super::*; }\n\
         #[cfg(test)] mod tests { use crate::fixture::X; crate::f::g(); }",
    );
    let want: Vec<(usize, Vec<String>)> = [
        (0, "crate a b"),
        (0, "crate a c"),
        (0, "crate a c D"),
        (0, "super x"),
        (0, "crate z f"),
        (0, "super w g"),
        (1, "super"),
    ]
    .iter()
    .map(|(d, s)| (*d, s.split(' ').map(String::from).collect()))
    .collect();
    assert_eq!(p, want);
}

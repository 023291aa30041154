//! The module layering of docs/architecture.md (*Layers*), checked against the source.
//!
//! Every `src/**/*.rs` file belongs to a top-level module (`src/quota/redis/layout.rs` →
//! `quota`, `src/engine/parse.rs` → `engine`). A module may use modules of lower layers only:
//! every `crate::<module>` path in code (`use` items, grouped `crate::{a, b}` imports and
//! fully qualified paths alike; `tollgate::<module>` in the binary, `src/main.rs`) that
//! names a module of the same or a higher layer is reported, and so is any use of a pingora
//! crate outside `src/proxy/` and `src/server.rs`. Comments and string literals are not
//! code and are skipped; so are test-only modules (`#[cfg(test)] mod …`, inline or in
//! their own file), which may reach any module to build fixtures.
//!
//! The layer table is read from docs/architecture.md itself, so the document and the check
//! cannot drift apart: a module missing from the table fails too.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const DOC: &str = "docs/architecture.md";
const LAYERS_HEADING: &str = "## Layers";

/// Module → layer (0 is the lowest), from the table under [`LAYERS_HEADING`]: rows of
/// `| <layer> | `a`, `b` | … |`.
fn layer_table(doc: &str) -> BTreeMap<String, usize> {
    let start = doc
        .lines()
        .position(|l| l.trim() == LAYERS_HEADING)
        .unwrap_or_else(|| panic!("{DOC} has no `{LAYERS_HEADING}` section"));
    let mut table = BTreeMap::new();
    let mut in_table = false;
    for line in doc.lines().skip(start + 1) {
        if line.starts_with("## ") {
            break;
        }
        let line = line.trim();
        if !line.starts_with('|') {
            if in_table {
                break;
            }
            continue;
        }
        in_table = true;
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let Ok(layer) = cells[0].parse::<usize>() else {
            continue; // the header and the separator row
        };
        for name in cells[1].split(',') {
            let name = name.trim().trim_matches('`');
            assert!(
                !name.is_empty(),
                "{DOC}: empty module name in layer {layer}"
            );
            if let Some(prev) = table.insert(name.to_string(), layer) {
                panic!("{DOC}: `{name}` is in layers {prev} and {layer}");
            }
        }
    }
    assert!(!table.is_empty(), "{DOC}: the layer table is empty");
    table
}

/// `src` with comments and the contents of string and char literals replaced by spaces
/// (newlines kept, so line numbers still hold).
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let blank = |out: &mut Vec<u8>, c: u8| out.push(if c == b'\n' { b'\n' } else { b' ' });
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == b'/' && next == Some(b'/') {
            while i < b.len() && b[i] != b'\n' {
                out.push(b' ');
                i += 1;
            }
        } else if c == b'/' && next == Some(b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
        } else if c == b'r'
            && matches!(next, Some(b'"') | Some(b'#'))
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
        {
            // A raw string: r"…", r#"…"#, …
            let mut j = i + 1;
            while b.get(j) == Some(&b'#') {
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push(c);
                i += 1;
                continue;
            }
            let hashes = j - i - 1;
            let mut close = vec![b'"'];
            close.extend(std::iter::repeat_n(b'#', hashes));
            out.extend(std::iter::repeat_n(b' ', j + 1 - i));
            i = j + 1;
            while i < b.len() && !b[i..].starts_with(&close) {
                blank(&mut out, b[i]);
                i += 1;
            }
            out.extend(std::iter::repeat_n(b' ', close.len()));
            i += close.len();
        } else if c == b'"' {
            out.push(b' ');
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    out.push(b' ');
                    i += 1;
                }
                if i < b.len() {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
            out.push(b' ');
            i += 1;
        } else if c == b'\'' {
            // A char literal ('"', '\'', '\u{..}'), else a lifetime: copy the quote.
            let lit_end = if next == Some(b'\\') {
                b[i + 2..]
                    .iter()
                    .position(|&x| x == b'\'')
                    .map(|p| i + 2 + p)
            } else if b.get(i + 2) == Some(&b'\'') {
                Some(i + 2)
            } else {
                None
            };
            match lit_end {
                Some(end) => {
                    out.extend(std::iter::repeat_n(b' ', end + 1 - i));
                    i = end + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8(out).expect("blanking keeps UTF-8 boundaries")
}

/// `code` without its inline `#[cfg(test)] mod name { … }` bodies (blanked, lines kept),
/// and the names of `#[cfg(test)] mod name;` declared there (their files are test-only).
fn strip_test_modules(code: &str) -> (String, Vec<String>) {
    let mut out = code.to_string();
    let mut external = Vec::new();
    let mut from = 0;
    while let Some(at) = code[from..].find("#[cfg(test)]") {
        let attr = from + at;
        from = attr + "#[cfg(test)]".len();
        let rest = code[from..].trim_start();
        let Some(item) = rest.strip_prefix("mod ") else {
            continue;
        };
        let name: String = item
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let after = item[name.len()..].trim_start();
        if after.starts_with(';') {
            external.push(name);
            continue;
        }
        if !after.starts_with('{') {
            continue;
        }
        let open = code.len() - after.len();
        let mut depth = 0usize;
        let mut end = code.len();
        for (k, ch) in code[open..].char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + k + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        let blanked: String = code[attr..end]
            .chars()
            .map(|c| if c == '\n' { '\n' } else { ' ' })
            .collect();
        out.replace_range(attr..end, &blanked);
        from = end;
    }
    (out, external)
}

/// The first segment of every path after `prefix` (`crate::`, `tollgate::`), with the
/// line it is on: `crate::a::b` → `a`; `crate::{a, b::c}` → `a`, `b`.
fn crate_paths(code: &str, prefix: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let line_of = |at: usize| code[..at].matches('\n').count() + 1;
    let mut from = 0;
    while let Some(at) = code[from..].find(prefix) {
        let start = from + at;
        from = start + prefix.len();
        let before = code[..start].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // `$crate::`, `mycrate::`
        }
        let rest = &code[from..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items of the group: split at commas outside nested braces.
            let mut depth = 0usize;
            let mut item_start = true;
            for (k, ch) in group.char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && (c.is_alphanumeric() || c == '_') => {
                        let name: String = group[k..]
                            .chars()
                            .take_while(|c| c.is_alphanumeric() || *c == '_')
                            .collect();
                        found.push((line_of(from + 1 + k), name));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.push((line_of(start), name));
            }
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The files of the test-only module `name` declared in `file`: `name.rs` or
/// `name/mod.rs` beside it (or in its own folder for a `mod.rs`/`lib.rs`/`main.rs`), and
/// everything under `name/`.
fn test_only_paths(file: &Path, name: &str) -> Vec<PathBuf> {
    let dir = file.parent().unwrap();
    let stem = file.file_stem().unwrap().to_str().unwrap();
    let base = if matches!(stem, "mod" | "lib" | "main") {
        dir.to_path_buf()
    } else {
        dir.join(stem)
    };
    vec![base.join(format!("{name}.rs")), base.join(name)]
}

#[test]
fn no_module_uses_one_of_its_own_or_a_higher_layer() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join(DOC)).unwrap();
    let layers = layer_table(&doc);
    let src = root.join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);

    let mut code_of = BTreeMap::new();
    let mut test_only: Vec<PathBuf> = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let (code, external) = strip_test_modules(&code_only(&text));
        for name in external {
            test_only.extend(test_only_paths(f, &name));
        }
        code_of.insert(f.clone(), code);
    }

    let mut problems = BTreeSet::new();
    let mut modules = BTreeSet::new();
    for (f, code) in &code_of {
        if test_only.iter().any(|t| f.starts_with(t)) {
            continue;
        }
        let rel = f.strip_prefix(&src).unwrap();
        let shown = Path::new("src").join(rel).display().to_string();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_str()
            .unwrap();
        let module = first.strip_suffix(".rs").unwrap_or(first).to_string();
        if module == "lib" {
            continue; // the module list itself
        }
        modules.insert(module.clone());
        let Some(&own) = layers.get(&module) else {
            problems.insert(format!(
                "{shown}: module `{module}` is not in {DOC}'s layer table"
            ));
            continue;
        };
        let prefix = if module == "main" {
            "tollgate::"
        } else {
            "crate::"
        };
        for (line, used) in crate_paths(code, prefix) {
            if used == module {
                continue;
            }
            match layers.get(&used) {
                None => problems.insert(format!(
                    "{shown}:{line}: uses `{used}`, which is not in {DOC}'s layer table"
                )),
                Some(&l) if l >= own => problems.insert(format!(
                    "{shown}:{line}: `{module}` (layer {own}) uses `{used}` (layer {l})"
                )),
                Some(_) => false,
            };
        }
        let pingora_allowed = rel.starts_with("proxy") || rel == Path::new("server.rs");
        if !pingora_allowed {
            for (n, l) in code.lines().enumerate() {
                let uses_pingora = l.match_indices("pingora").any(|(at, _)| {
                    let before = l[..at].chars().next_back();
                    let after = &l[at + "pingora".len()..];
                    !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
                        && (after.starts_with("::") || after.starts_with('_'))
                });
                if uses_pingora {
                    problems.insert(format!(
                        "{shown}:{}: pingora outside src/proxy/ and src/server.rs",
                        n + 1
                    ));
                }
            }
        }
    }
    for listed in layers.keys() {
        if !modules.contains(listed) {
            problems.insert(format!(
                "{DOC}: `{listed}` is in the layer table but not in src/"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "layering violations (see {DOC}, *Layers*):\n{}",
        problems.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn the_scanner_sees_code_only() {
    let code = code_only(
        "use crate::a; // crate::b\n/* crate::c */ let s = \"crate::d\"; let c = '\"'; let r = r#\"crate::e\"#; crate::f::g();",
    );
    let seen: Vec<String> = crate_paths(&code, "crate::")
        .into_iter()
        .map(|(_, m)| m)
        .collect();
    assert_eq!(seen, ["a", "f"]);
    let grouped = crate_paths("use crate::{x::Y, z, w::{self, V}};", "crate::");
    let names: Vec<&str> = grouped.iter().map(|(_, m)| m.as_str()).collect();
    assert_eq!(names, ["x", "z", "w"]);
    let (stripped, external) = strip_test_modules(
        "use crate::a;\n#[cfg(test)]\nmod tests {\n    use crate::b;\n}\n#[cfg(test)]\nmod more;\n",
    );
    assert_eq!(crate_paths(&stripped, "crate::"), [(1, "a".to_string())]);
    assert_eq!(external, ["more"]);
}

//! docs/architecture.md and the module map in src/lib.rs's doc comment name every top-level
//! module and every workspace crate there is, and nothing else: a module added, moved or
//! removed without its row fails here, with the names that are missing or extra.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::Path;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path))
        .unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// The words written in backticks in `text`.
fn backticked(text: &str) -> impl Iterator<Item = &str> {
    text.split('`').skip(1).step_by(2)
}

/// The first cells of the rows of the Markdown table whose header row is `header`, one
/// entry per row.
fn first_cells<'a>(lines: &[&'a str], header: &str) -> Vec<&'a str> {
    let at = lines
        .iter()
        .position(|l| l.trim() == header)
        .unwrap_or_else(|| panic!("no table headed `{header}`"));
    lines[at + 2..]
        .iter()
        .take_while(|l| l.trim_start().starts_with('|'))
        .map(|l| l.split('|').nth(1).unwrap_or(""))
        .collect()
}

/// The module names a module table lists: the backticked names of each row's first cell,
/// without a directory's trailing `/`.
fn listed_modules(lines: &[&str]) -> BTreeSet<String> {
    first_cells(lines, "| module | owns |")
        .into_iter()
        .flat_map(backticked)
        .map(|m| m.trim_end_matches('/').to_string())
        .collect()
}

/// The text of `//!` lines, without the marker.
fn inner_doc(source: &str) -> Vec<&str> {
    source
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect()
}

/// Top-level modules: those src/lib.rs declares, and those a file or directory under src/
/// holds (so a file nothing declares is not overlooked either).
fn tree_modules() -> BTreeSet<String> {
    let mut found: BTreeSet<String> = read("src/lib.rs")
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let rest = l
                .strip_prefix("pub mod ")
                .or_else(|| l.strip_prefix("pub(crate) mod "))
                .or_else(|| l.strip_prefix("mod "))?;
            Some(rest.strip_suffix(';')?.trim().to_string())
        })
        .collect();
    for entry in std::fs::read_dir(Path::new(ROOT).join("src")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if path.join("mod.rs").is_file() {
                found.insert(name);
            }
        } else if path.extension().is_some_and(|e| e == "rs") && name != "lib" && name != "main" {
            found.insert(name);
        }
    }
    found
}

/// Workspace crates beside the root package, as their directories: the `members` of the
/// root Cargo.toml and every directory under crates/ with a Cargo.toml.
fn tree_crates() -> BTreeSet<String> {
    let manifest = read("Cargo.toml");
    let members = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("members"))
        .expect("workspace members in Cargo.toml");
    let mut found: BTreeSet<String> = members
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|m| *m != ".")
        .map(str::to_string)
        .collect();
    if let Ok(dir) = std::fs::read_dir(Path::new(ROOT).join("crates")) {
        for entry in dir {
            let path = entry.unwrap().path();
            if path.join("Cargo.toml").is_file() {
                let name = path.file_name().unwrap().to_string_lossy();
                found.insert(format!("crates/{name}"));
            }
        }
    }
    found
}

fn names(set: &BTreeSet<&String>) -> String {
    set.iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What is wrong with `listed` (what `place` names) against `actual` (what exists): one
/// line naming the missing and the extra names, or nothing.
fn drift(place: &str, listed: &BTreeSet<String>, actual: &BTreeSet<String>) -> Option<String> {
    let missing: BTreeSet<_> = actual.difference(listed).collect();
    let extra: BTreeSet<_> = listed.difference(actual).collect();
    if missing.is_empty() && extra.is_empty() {
        return None;
    }
    let mut line = format!("{place}:");
    if !missing.is_empty() {
        line += &format!(" missing {} (exist in the tree)", names(&missing));
    }
    if !extra.is_empty() {
        line += &format!(" lists {} (no such thing in the tree)", names(&extra));
    }
    Some(line)
}

/// Where two lists disagree with each other, whatever the tree holds.
fn disagreement(
    (a_name, a): (&str, &BTreeSet<String>),
    (b_name, b): (&str, &BTreeSet<String>),
) -> Option<String> {
    let only_a: BTreeSet<_> = a.difference(b).collect();
    let only_b: BTreeSet<_> = b.difference(a).collect();
    if only_a.is_empty() && only_b.is_empty() {
        return None;
    }
    Some(format!(
        "{a_name} and {b_name} disagree: only in the first: [{}]; only in the second: [{}]",
        names(&only_a),
        names(&only_b)
    ))
}

fn check(problems: Vec<Option<String>>) {
    let problems: Vec<String> = problems.into_iter().flatten().collect();
    assert!(
        problems.is_empty(),
        "the module maps have drifted from the tree; update the tables:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_module_tables_list_every_top_level_module_and_no_other() {
    let arch = read("docs/architecture.md");
    let lib = read("src/lib.rs");
    let docs = listed_modules(&arch.lines().collect::<Vec<_>>());
    let map = listed_modules(&inner_doc(&lib));
    let tree = tree_modules();
    check(vec![
        drift("docs/architecture.md module table", &docs, &tree),
        drift("src/lib.rs module map", &map, &tree),
        disagreement(
            ("docs/architecture.md module table", &docs),
            ("src/lib.rs module map", &map),
        ),
    ]);
}

#[test]
fn the_crate_tables_list_every_workspace_crate_and_no_other() {
    let arch = read("docs/architecture.md");
    let lib = read("src/lib.rs");
    let crates_in = |cells: Vec<&str>| -> BTreeSet<String> {
        cells
            .into_iter()
            .flat_map(backticked)
            .filter(|w| w.starts_with("crates/"))
            .map(|w| w.trim_end_matches('/').to_string())
            .collect()
    };
    let docs = crates_in(first_cells(
        &arch.lines().collect::<Vec<_>>(),
        "| crate | owns | depends on |",
    ));
    let map = crates_in(inner_doc(&lib));
    let tree = tree_crates();
    assert!(!tree.is_empty(), "no workspace crate found beside the root");
    check(vec![
        drift("docs/architecture.md crate table", &docs, &tree),
        drift("src/lib.rs doc comment (crates)", &map, &tree),
        disagreement(
            ("docs/architecture.md crate table", &docs),
            ("src/lib.rs doc comment (crates)", &map),
        ),
    ]);
}

/// The check itself: a table that lacks a module, or names one that is gone, fails with
/// both names.
#[test]
fn drift_names_what_is_missing_and_what_is_extra() {
    let table = "intro\n| module | owns |\n|---|---|\n| `quota/` | limits |\n| [`billing`], [`money`] | prices |\n| `shared/` | outbox |\n\nafter\n| `journal` | not in the table |";
    let listed = listed_modules(&table.lines().collect::<Vec<_>>());
    let want: BTreeSet<String> = ["quota", "billing", "money", "shared"]
        .map(String::from)
        .into();
    assert_eq!(listed, want);
    let tree: BTreeSet<String> = ["quota", "billing", "money", "journal"]
        .map(String::from)
        .into();
    let line = drift("table", &listed, &tree).unwrap();
    assert!(line.contains("missing `journal`"), "{line}");
    assert!(line.contains("lists `shared`"), "{line}");
    assert_eq!(drift("table", &tree, &tree), None);
    let other: BTreeSet<String> = ["quota"].map(String::from).into();
    let line = disagreement(("a", &listed), ("b", &other)).unwrap();
    assert!(
        line.contains("`billing`") && line.contains("`shared`"),
        "{line}"
    );
}

//! `docs/configuration.md` documents exactly the keys the config parser accepts.
//!
//! The reference is read as the operator reads it: each section is a heading like
//! `` ## `[server]` `` and each key a table row starting with `` | `key` | ``. Two checks:
//!
//! 1. the documented keys of every section equal the parser's list for it
//!    ([`tollgate::config::SECTIONS`]), and every documented section exists;
//! 2. independently of those lists, the parser accepts every documented key (no
//!    "unknown key" issue) and rejects a key that is not documented.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};

use tollgate::config::{Config, ConfigError, ROOT_KEYS, SECTIONS};

/// Section name (as in `SECTIONS`) → documented keys.
fn documented() -> BTreeMap<String, BTreeSet<String>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md");
    let text = std::fs::read_to_string(path).unwrap();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            current = h
                .trim()
                .strip_prefix("`[")
                .and_then(|h| h.strip_suffix("]`"))
                .map(|name| {
                    name.trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_string()
                });
            if let Some(name) = &current {
                assert!(
                    out.insert(name.clone(), BTreeSet::new()).is_none(),
                    "section [{name}] is documented twice"
                );
            }
            continue;
        }
        let (Some(section), Some(row)) = (&current, line.strip_prefix("| `")) else {
            continue;
        };
        let key = row.split('`').next().unwrap().to_string();
        let keys = out.get_mut(section).unwrap();
        assert!(
            keys.insert(key.clone()),
            "[{section}] documents `{key}` twice"
        );
    }
    out
}

#[test]
fn every_accepted_key_is_documented_and_every_documented_key_is_accepted() {
    let docs = documented();
    let mut problems = Vec::new();
    for (section, keys) in SECTIONS {
        let Some(doc) = docs.get(*section) else {
            problems.push(format!(
                "section [{section}] has no `## `[{section}]`` heading"
            ));
            continue;
        };
        let parsed: BTreeSet<String> = keys.iter().map(|k| k.to_string()).collect();
        for k in parsed.difference(doc) {
            problems.push(format!("[{section}] `{k}` is accepted but not documented"));
        }
        for k in doc.difference(&parsed) {
            problems.push(format!(
                "[{section}] `{k}` is documented but the parser does not accept it"
            ));
        }
    }
    let known: BTreeSet<&str> = SECTIONS.iter().map(|(s, _)| *s).collect();
    for section in docs.keys() {
        if !known.contains(section.as_str()) {
            problems.push(format!(
                "section [{section}] is documented but the parser has no such section"
            ));
        }
    }
    // Every top-level key of the file is one of the sections.
    let roots: BTreeSet<&str> = SECTIONS
        .iter()
        .map(|(s, _)| s.split('.').next().unwrap())
        .collect();
    assert_eq!(roots, ROOT_KEYS.iter().copied().collect::<BTreeSet<_>>());
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A config with `key = 1` in `section` (plus what the section needs to exist).
fn config_with(section: &str, key: &str) -> String {
    match section {
        "upstreams" => {
            let mut t = String::from("[[upstreams]]\n");
            for (k, v) in [
                ("name", "\"u\""),
                ("kind", "\"openai\""),
                ("base_url", "\"http://127.0.0.1:1\""),
            ] {
                if k != key {
                    t.push_str(&format!("{k} = {v}\n"));
                }
            }
            t.push_str(&format!("{key} = 1\n"));
            t
        }
        "plans.NAME" => format!("[plans.basic]\n{key} = 1\n"),
        "prices.\"MODEL\"" => format!("[prices.\"some-model\"]\n{key} = 1\n"),
        s => format!("[{s}]\n{key} = 1\n"),
    }
}

/// Paths of "unknown key" issues the parser reports for `text`.
fn unknown_keys(text: &str) -> Vec<String> {
    let env = |_: &str| None;
    match Config::parse(text, "c.toml", &env) {
        Ok(_) => Vec::new(),
        Err(ConfigError::Invalid { issues, .. }) => issues
            .into_iter()
            .filter(|i| i.message.starts_with("unknown key"))
            .map(|i| i.path)
            .collect(),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn the_parser_accepts_each_documented_key_and_rejects_others() {
    let docs = documented();
    assert!(docs.len() >= SECTIONS.len());
    let mut checked = 0;
    for (section, keys) in &docs {
        for key in keys {
            // The value may be of the wrong type; only "unknown key" matters here.
            let unknown = unknown_keys(&config_with(section, key));
            assert!(
                unknown.is_empty(),
                "[{section}] `{key}` is documented but rejected: {unknown:?}"
            );
            checked += 1;
        }
        let unknown = unknown_keys(&config_with(section, "not_a_documented_key"));
        assert_eq!(
            unknown.len(),
            1,
            "[{section}] accepts an undocumented key: {unknown:?}"
        );
        assert!(unknown[0].ends_with(".not_a_documented_key"), "{unknown:?}");
    }
    assert!(checked > 30, "only {checked} keys found in the reference");
}

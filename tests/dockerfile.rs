//! The container image, checked without a container engine: the Dockerfile's builder stage
//! copies every file the build reads, and the image's baked-in config starts tollgate in
//! embedded mode under the image's environment.
//!
//! What the build reads: `Cargo.lock`, and for the root package and every workspace member
//! (`crates/*`; cargo loads the whole workspace even for one binary) its `Cargo.toml`, every
//! target it declares (a declared `[[bench]]` must exist even for `cargo build --bin`),
//! everything under its `src`, and every file an `include_str!`/`include_bytes!` there names
//! (Lua scripts, migrations, the price table, the admin page…).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use common::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// One instruction, continuation lines joined.
#[derive(Debug)]
struct Instruction {
    op: String,
    args: Vec<String>,
}

fn instructions(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if current.is_empty() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(line);
        let mut words = current.split_whitespace().map(str::to_string);
        if let Some(op) = words.next() {
            out.push(Instruction {
                op: op.to_ascii_uppercase(),
                args: words.collect(),
            });
        }
        current.clear();
    }
    out
}

/// A stage: its `FROM` name, working directory, copies and environment.
#[derive(Debug, Default)]
struct Stage {
    name: Option<String>,
    workdir: String,
    /// (source in the build context, destination as written, `--from` stage)
    copies: Vec<(String, String, Option<String>)>,
    env: BTreeMap<String, String>,
    runs: Vec<String>,
}

fn stages(text: &str) -> Vec<Stage> {
    let mut out: Vec<Stage> = Vec::new();
    for i in instructions(text) {
        if i.op == "FROM" {
            let name = i
                .args
                .iter()
                .position(|a| a.eq_ignore_ascii_case("as"))
                .and_then(|p| i.args.get(p + 1).cloned());
            out.push(Stage {
                name,
                workdir: "/".into(),
                ..Default::default()
            });
            continue;
        }
        let Some(stage) = out.last_mut() else {
            continue;
        };
        match i.op.as_str() {
            "WORKDIR" => stage.workdir = i.args.join(" "),
            "RUN" => stage.runs.push(i.args.join(" ")),
            "ENV" => {
                // Both `ENV K=V K2=V2` and `ENV K V`.
                if i.args.len() == 2 && !i.args[0].contains('=') {
                    stage.env.insert(i.args[0].clone(), i.args[1].clone());
                } else {
                    for a in &i.args {
                        if let Some((k, v)) = a.split_once('=') {
                            stage.env.insert(k.into(), v.trim_matches('"').into());
                        }
                    }
                }
            }
            "COPY" | "ADD" => {
                let from = i
                    .args
                    .iter()
                    .find_map(|a| a.strip_prefix("--from="))
                    .map(str::to_string);
                let paths: Vec<&String> = i.args.iter().filter(|a| !a.starts_with("--")).collect();
                let (dest, sources) = paths.split_last().unwrap();
                let many = sources.len() > 1 || dest.ends_with('/');
                for s in sources {
                    let landing = if many {
                        let base = Path::new(s.as_str()).file_name().unwrap();
                        Path::new(dest.as_str()).join(base).display().to_string()
                    } else {
                        dest.to_string()
                    };
                    stage.copies.push((s.to_string(), landing, from.clone()));
                }
            }
            _ => {}
        }
    }
    out
}

/// `a/./b/../c` → `a/c`.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Every file the release build of the `tollgate` binary reads, relative to the repo: the
/// root package's, and those of every workspace member (cargo loads them all).
fn build_inputs(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![PathBuf::from("Cargo.lock")];
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(root.join("Cargo.toml")).unwrap()).unwrap();
    let members: Vec<PathBuf> = manifest
        .get("workspace")
        .and_then(|w| w.get("members"))
        .and_then(|m| m.as_array())
        .into_iter()
        .flatten()
        .map(|m| normalize(Path::new(m.as_str().unwrap())))
        .collect();
    package_inputs(root, Path::new(""), &mut out);
    for member in members.iter().filter(|m| !m.as_os_str().is_empty()) {
        package_inputs(root, member, &mut out);
    }
    out.sort();
    out.dedup();
    out
}

/// The files one package (at `dir` under `root`) gives the build: its manifest, build
/// script, declared targets, and everything under its `src` with what those files embed.
fn package_inputs(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.join("Cargo.toml"));
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(root.join(dir).join("Cargo.toml")).unwrap())
            .unwrap();
    if let Some(build) = manifest
        .get("package")
        .and_then(|p| p.get("build"))
        .and_then(|b| b.as_str())
    {
        out.push(dir.join(build));
    } else if root.join(dir).join("build.rs").exists() {
        out.push(dir.join("build.rs"));
    }
    if let Some(lib) = manifest.get("lib") {
        out.push(
            dir.join(
                lib.get("path")
                    .and_then(|p| p.as_str())
                    .unwrap_or("src/lib.rs"),
            ),
        );
    }
    // Declared targets must exist for cargo to read the manifest at all.
    for (kind, target_dir) in [
        ("bin", "src/bin"),
        ("bench", "benches"),
        ("example", "examples"),
        ("test", "tests"),
    ] {
        for t in manifest
            .get(kind)
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            let path = t.get("path").and_then(|p| p.as_str()).map_or_else(
                || {
                    let name = t.get("name").and_then(|n| n.as_str()).unwrap();
                    PathBuf::from(format!("{target_dir}/{name}.rs"))
                },
                PathBuf::from,
            );
            out.push(dir.join(path));
        }
    }
    // Every source file of the package, and every file they embed.
    let mut stack = vec![root.join(dir).join("src")];
    while let Some(src) = stack.pop() {
        for entry in std::fs::read_dir(&src).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for target in embedded_files(&text) {
                    out.push(normalize(&rel.parent().unwrap().join(target)));
                }
            }
            out.push(rel);
        }
    }
}

/// Literal paths of `include_str!("…")` / `include_bytes!("…")` (those built with
/// `concat!(env!("OUT_DIR"), …)` name build output, not sources).
fn embedded_files(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for mac in ["include_str!(\"", "include_bytes!(\""] {
        let mut rest = text;
        while let Some(i) = rest.find(mac) {
            rest = &rest[i + mac.len()..];
            if let Some(end) = rest.find('"') {
                out.push(rest[..end].to_string());
            }
        }
    }
    out
}

/// Problems with `dockerfile` (and `dockerignore`) for the repo at `root`.
fn check(root: &Path, dockerfile: &str, dockerignore: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let stages = stages(dockerfile);
    let Some(builder) = stages
        .iter()
        .find(|s| s.runs.iter().any(|r| r.contains("cargo build")))
    else {
        return vec!["no stage runs `cargo build`".into()];
    };
    let workdir = PathBuf::from(&builder.workdir);
    // Where each copied source lands, relative to the builder's working directory.
    let mut copied: Vec<PathBuf> = Vec::new();
    for (source, dest, from) in &builder.copies {
        if from.is_some() {
            continue;
        }
        if !root.join(source).exists() {
            problems.push(format!("COPY {source}: no such file in the repository"));
        }
        let landing = normalize(&workdir.join(dest));
        let expected = normalize(&workdir.join(source));
        if landing != expected {
            problems.push(format!(
                "COPY {source} lands at {} instead of {} (relative paths in the build would break)",
                landing.display(),
                expected.display()
            ));
        }
        copied.push(normalize(Path::new(source)));
    }
    let ignored: Vec<&str> = dockerignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for input in build_inputs(root) {
        if !copied.iter().any(|c| input.starts_with(c)) {
            problems.push(format!(
                "{} is read by the build but no COPY line brings it",
                input.display()
            ));
        }
        let text = input.display().to_string();
        for pattern in &ignored {
            let hit = match pattern.strip_prefix("*") {
                Some(suffix) => text.ends_with(suffix),
                None => input.starts_with(pattern),
            };
            if hit {
                problems.push(format!(
                    "{text} is read by the build but .dockerignore excludes it ({pattern})"
                ));
            }
        }
    }
    // The final stage runs the binary the builder made.
    let Some(last) = stages.last() else {
        return problems;
    };
    let binary = normalize(&workdir.join("target/release/tollgate"));
    let brings_binary = last
        .copies
        .iter()
        .any(|(s, _, from)| from.as_deref() == builder.name.as_deref() && Path::new(s) == binary);
    if !brings_binary {
        problems.push(format!(
            "the final stage does not copy {} from the builder",
            binary.display()
        ));
    }
    for (source, _, from) in &last.copies {
        if from.is_none() && !root.join(source).exists() {
            problems.push(format!("COPY {source}: no such file in the repository"));
        }
    }
    problems
}

fn read(name: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(name)).unwrap_or_default()
}

#[test]
fn the_builder_copies_every_file_the_build_reads() {
    let problems = check(Path::new(ROOT), &read("Dockerfile"), &read(".dockerignore"));
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn the_check_catches_a_missing_copy() {
    let dockerfile = read("Dockerfile");
    for line in [
        "COPY lua ./lua",
        "COPY prices.toml ./",
        "COPY benches ./benches",
        "COPY crates ./crates",
    ] {
        assert!(dockerfile.contains(line), "{line}");
        let broken = dockerfile.replace(line, "");
        let problems = check(Path::new(ROOT), &broken, &read(".dockerignore"));
        assert!(!problems.is_empty(), "removing `{line}` went unnoticed");
    }
    let moved = dockerfile.replace("COPY src ./src", "COPY src ./source");
    assert!(!check(Path::new(ROOT), &moved, "").is_empty());
    let problems = check(Path::new(ROOT), &dockerfile, "migrations\n");
    assert!(
        problems.iter().any(|p| p.contains(".dockerignore")),
        "{problems:?}"
    );
    // The build inputs include what the sources embed.
    let inputs = build_inputs(Path::new(ROOT));
    for needed in [
        "lua/reserve_v1.lua",
        "prices.toml",
        "migrations/sqlite/0001_init.sql",
        "src/admin/page.html",
        "benches/meter.rs",
        "crates/mock-upstream/Cargo.toml",
        "crates/mock-upstream/src/lib.rs",
        "crates/tokens/src/split.rs",
    ] {
        assert!(inputs.contains(&PathBuf::from(needed)), "{needed}");
    }
}

/// The final stage's environment, and where its config is baked in.
fn image_env() -> (BTreeMap<String, String>, String) {
    let stages = stages(&read("Dockerfile"));
    let last = stages.last().unwrap();
    let config = last.env.get("TOLLGATE_CONFIG").cloned().unwrap();
    let baked = last
        .copies
        .iter()
        .find(|(_, dest, from)| from.is_none() && *dest == config)
        .map(|(source, _, _)| source.clone())
        .unwrap_or_else(|| panic!("nothing is copied to {config}"));
    (last.env.clone(), baked)
}

#[test]
fn the_baked_in_config_is_valid_and_embedded_under_the_image_environment() {
    let (env, baked) = image_env();
    let text = read(&baked);
    let c = tollgate::config::Config::parse(&text, &baked, &|k| env.get(k).cloned())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.storage.mode, tollgate::config::StorageMode::Embedded);
    assert_eq!(c.server.listen.to_string(), "0.0.0.0:8080");
    let volume = "/var/lib/tollgate";
    assert!(
        c.storage.journal_path.starts_with(volume),
        "the ledger lives on the volume: {:?}",
        c.storage.journal_path
    );
    assert!(c.server.admin_token.is_empty(), "no token baked in");
}

#[tokio::test]
async fn the_image_default_starts_and_serves() {
    // `docker run IMAGE` with no mount: the binary, the baked config, the image's
    // environment — with ports and the volume moved to this machine's free ones.
    let (env, baked) = image_env();
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("config.toml");
    std::fs::copy(Path::new(ROOT).join(&baked), &config).unwrap();
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("serve").env_clear();
    for (k, v) in &env {
        cmd.env(k, v);
    }
    cmd.env("TOLLGATE_CONFIG", &config)
        .env("TOLLGATE_DB", dir.path().join("tollgate.db"))
        .env("TOLLGATE_LISTEN", &listen)
        .env("TOLLGATE_ADMIN_LISTEN", &admin)
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Kill(cmd.spawn().unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("tollgate exited with the image's default config: {status}");
        }
        let health = client()
            .get(format!("http://{admin}/healthz").parse().unwrap())
            .await;
        if health.is_ok_and(|r| r.status() == 200)
            && tokio::net::TcpStream::connect(&listen).await.is_ok()
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not ready after 30 s");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    // It proxies: a request without a key is a 401 in OpenAI's shape.
    let r = send("GET", &format!("http://{listen}/v1/models"), &[], "").await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    assert!(
        dir.path().join("tollgate.db").exists(),
        "ledger on the volume"
    );
}

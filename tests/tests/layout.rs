//! The layout section of `agent/src/lib.rs` stays true: it lists every
//! top-level module of the agent, and no module imports one listed above it
//! ("dependencies point down this list"). An import is a `crate::NAME` path
//! in code (comments and doc links do not count), in any file of the module.
//! The tests at the bottom show that each check fails when it should.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn agent_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").join("agent/src")
}

/// The modules of the layout list, top first: lines `//! - [`name`] — …`
/// or `//! - `name` — …`.
fn layout(lib: &str) -> Vec<String> {
    lib.lines()
        .filter_map(|line| line.strip_prefix("//! - "))
        .filter_map(|item| {
            let name = item.split(" — ").next()?.trim_matches(|c| c == '[' || c == ']' || c == '`');
            (!name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_')).then(|| name.to_owned())
        })
        .collect()
}

/// The modules `lib.rs` declares (`mod name;`, any visibility).
fn declared(lib: &str) -> BTreeSet<String> {
    lib.lines()
        .filter_map(|line| line.trim().strip_suffix(';'))
        .filter_map(|line| line.rsplit_once("mod ").filter(|(vis, _)| vis.is_empty() || vis.ends_with(' ')))
        .map(|(_, name)| name.to_owned())
        .collect()
}

/// The Rust files of module `name`: `name.rs` and everything under `name/`.
fn files_of(src: &Path, name: &str) -> Vec<PathBuf> {
    let mut files = vec![];
    let file = src.join(format!("{name}.rs"));
    if file.is_file() {
        files.push(file);
    }
    let mut dirs = vec![src.join(name)];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files
}

/// The top-level modules a line of code names as `crate::NAME`.
fn imports(line: &str) -> Vec<&str> {
    let code = line.split("//").next().unwrap_or("");
    code.match_indices("crate::")
        .map(|(at, prefix)| {
            let rest = &code[at + prefix.len()..];
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
            &rest[..end]
        })
        .collect()
}

/// Every import of a module listed above the importer, as `file:line: a -> b`.
fn upward_imports(src: &Path, order: &[String]) -> Vec<String> {
    let mut found = vec![];
    for (rank, module) in order.iter().enumerate() {
        for file in files_of(src, module) {
            let text = std::fs::read_to_string(&file).unwrap();
            for (n, line) in text.lines().enumerate() {
                for dep in imports(line) {
                    if order[..rank].iter().any(|above| above == dep) {
                        found.push(format!("{}:{}: {module} -> {dep}", file.display(), n + 1));
                    }
                }
            }
        }
    }
    found
}

#[test]
fn the_layout_lists_every_module_and_no_import_points_up_it() {
    let src = agent_src();
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let order = layout(&lib);
    let listed: BTreeSet<String> = order.iter().cloned().collect();
    assert_eq!(listed.len(), order.len(), "a module is listed twice: {order:?}");
    assert_eq!(listed, declared(&lib), "lib.rs's layout section and its `mod` declarations differ");
    let upward = upward_imports(&src, &order);
    assert!(upward.is_empty(), "imports that point up lib.rs's layout:\n{}", upward.join("\n"));
}

// The checks themselves, on made-up input: each can fail.

#[test]
fn an_import_of_a_module_listed_above_is_found_and_comments_do_not_count() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("high.rs"), "use crate::low::Thing;\n").unwrap();
    std::fs::create_dir(dir.path().join("low")).unwrap();
    std::fs::write(dir.path().join("low/mod.rs"), "//! See [`crate::high`].\nmod inner;\n").unwrap();
    std::fs::write(dir.path().join("low/inner.rs"), "fn f() { crate::high::g() } // crate::high\n").unwrap();
    let order = vec!["high".to_owned(), "low".to_owned()];
    let found = upward_imports(dir.path(), &order);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].ends_with("inner.rs:1: low -> high"), "{found:?}");
}

#[test]
fn the_layout_and_declarations_are_read_from_lib_rs() {
    let lib = "//! # Layout\n//!\n//! - [`cli`] — the command line.\n//! - `demo` — the tour\n//!   (feature).\n\
               //! - not a module line\npub mod cli;\n#[cfg(feature = \"demo\")]\npub mod demo;\nmod private;\n";
    assert_eq!(layout(lib), ["cli", "demo"]);
    assert_eq!(declared(lib), BTreeSet::from(["cli".to_owned(), "demo".to_owned(), "private".to_owned()]));
}

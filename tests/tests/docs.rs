//! The docs cannot drift from the tree. Over the README, CONTRIBUTING.md,
//! everything under `docs/` and `firmware-targets/README.md`:
//! - every relative link names a file that exists, and every `#anchor` a
//!   heading of its target;
//! - every `ferry …` command, in a code block or inline code, names a real
//!   subcommand of the built binary: `ferry <command> --help` succeeds, and
//!   a second word is one of the subcommands that help lists, if it lists any;
//! - every `scripts/…` a code block or inline code runs exists;
//! - the README stays a front door of at most 250 lines.
//!
//! The Markdown reading is deliberately small (fences, code spans, inline
//! links, ATX headings), enough for how these files are written; the tests
//! at the bottom show that each check fails when it should.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_tests::ferry_bin;

/// The README's length budget (the issue that split it set it).
const README_MAX_LINES: usize = 250;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// The Markdown files whose links and commands are checked.
fn documents(root: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = ["README.md", "CONTRIBUTING.md", "firmware-targets/README.md"]
        .iter()
        .map(|f| root.join(f))
        .filter(|p| p.exists())
        .collect();
    let mut dirs = vec![root.join("docs")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// A Markdown file split the way the checks need it.
#[derive(Debug, Default)]
struct Doc {
    /// Fenced code block lines.
    code_lines: Vec<String>,
    /// Inline code spans of the prose.
    code_spans: Vec<String>,
    /// Link targets of the prose (`[text](target)`), code spans excluded.
    links: Vec<String>,
    /// Anchors of its headings, as GitHub makes them.
    anchors: BTreeSet<String>,
}

fn is_fence(line: &str) -> bool {
    let t = line.trim_start();
    t.starts_with("```") || t.starts_with("~~~")
}

fn parse(text: &str) -> Doc {
    let mut doc = Doc::default();
    let mut prose = String::new();
    let mut in_code = false;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for line in text.lines() {
        if is_fence(line) {
            in_code = !in_code;
            prose.push('\n');
            continue;
        }
        if in_code {
            doc.code_lines.push(line.to_string());
            prose.push('\n');
            continue;
        }
        if let Some(heading) = heading_text(line) {
            let slug = slug(heading);
            let n = seen.entry(slug.clone()).or_insert(0);
            doc.anchors.insert(if *n == 0 { slug.clone() } else { format!("{slug}-{n}") });
            *n += 1;
        }
        prose.push_str(line);
        prose.push('\n');
    }
    // Code spans may wrap lines; links never sit inside them.
    let mut outside = String::new();
    let mut rest = prose.as_str();
    while let Some(start) = rest.find('`') {
        let ticks = rest[start..].chars().take_while(|&c| c == '`').count();
        let fence = &rest[start..start + ticks];
        outside.push_str(&rest[..start]);
        let after = &rest[start + ticks..];
        match after.find(fence) {
            Some(end) => {
                doc.code_spans.push(after[..end].split_whitespace().collect::<Vec<_>>().join(" "));
                rest = &after[end + ticks..];
            }
            None => {
                outside.push_str(fence);
                rest = after;
            }
        }
    }
    outside.push_str(rest);
    let mut rest = outside.as_str();
    while let Some(i) = rest.find("](") {
        let after = &rest[i + 2..];
        let Some(end) = after.find(')') else { break };
        let target = after[..end].split_whitespace().next().unwrap_or("");
        doc.links.push(target.trim_matches(['<', '>']).to_string());
        rest = &after[end..];
    }
    doc
}

/// The text of an ATX heading (`## Title`), if the line is one.
fn heading_text(line: &str) -> Option<&str> {
    let hashes = line.chars().take_while(|&c| c == '#').count();
    if !(1..=6).contains(&hashes) {
        return None;
    }
    let rest = &line[hashes..];
    rest.starts_with(' ').then(|| rest.trim().trim_end_matches('#').trim())
}

/// GitHub's heading anchor: lower case, letters, digits, `-` and `_` kept,
/// spaces made `-`, everything else dropped.
fn slug(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Every relative link of `file` that does not resolve, as a message.
fn broken_links(root: &Path, file: &Path, doc: &Doc, parsed: &mut BTreeMap<PathBuf, Doc>) -> Vec<String> {
    let mut broken = Vec::new();
    for link in &doc.links {
        if link.is_empty() || link.contains("://") || link.starts_with("mailto:") {
            continue;
        }
        let (path, anchor) = link.split_once('#').unwrap_or((link, ""));
        let target = if path.is_empty() {
            file.to_path_buf()
        } else if let Some(abs) = path.strip_prefix('/') {
            root.join(abs)
        } else {
            file.parent().unwrap().join(path)
        };
        if !target.exists() {
            broken.push(format!("{}: link `{link}`: {} does not exist", file.display(), target.display()));
            continue;
        }
        if anchor.is_empty() {
            continue;
        }
        if target.extension().is_none_or(|e| e != "md") {
            broken.push(format!("{}: link `{link}`: an anchor into a file that is not Markdown", file.display()));
            continue;
        }
        let key = target.canonicalize().unwrap();
        let anchors =
            &parsed.entry(key.clone()).or_insert_with(|| parse(&std::fs::read_to_string(&key).unwrap())).anchors;
        if !anchors.contains(anchor) {
            broken.push(format!(
                "{}: link `{link}`: {} has no heading with anchor #{anchor}",
                file.display(),
                target.display()
            ));
        }
    }
    broken
}

/// The `ferry` command paths a command line names, e.g. `ferry dlq
/// list|show` → `[["dlq", "list"], ["dlq", "show"]]`. Only words that look
/// like subcommands are taken (at most two), so paths, flags and values end
/// the path. `cargo run --release -- ARGS` counts as `ferry ARGS`.
fn ferry_commands(line: &str) -> Vec<Vec<String>> {
    let line = line.replace("\\|", "|");
    let tokens: Vec<&str> = line.split_whitespace().collect();
    let mut found = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let at_command = i == 0 || matches!(tokens[i - 1], "|" | "&&" | ";" | "$");
        let args = if *token == "ferry" && at_command {
            &tokens[i + 1..]
        } else if *token == "cargo" && at_command && tokens[i + 1..].starts_with(&["run", "--release", "--"]) {
            &tokens[i + 4..]
        } else {
            continue;
        };
        let words: Vec<&str> =
            args.iter().take(2).take_while(|w| w.split('|').all(is_subcommand_word)).copied().collect();
        match words.as_slice() {
            [] => {}
            [one] => found.extend(one.split('|').map(|a| vec![a.to_string()])),
            [one, two] => {
                for a in one.split('|') {
                    found.extend(two.split('|').map(|b| vec![a.to_string(), b.to_string()]));
                }
            }
            _ => unreachable!(),
        }
    }
    found
}

fn is_subcommand_word(word: &str) -> bool {
    let mut chars = word.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// The scripts a command line runs (`scripts/NAME` at a command position;
/// the folder itself, `scripts/`, is not a command).
fn scripts(line: &str) -> Vec<String> {
    let tokens: Vec<&str> = line.split_whitespace().collect();
    tokens
        .iter()
        .enumerate()
        .filter(|(i, t)| {
            t.strip_prefix("scripts/").is_some_and(|name| !name.is_empty())
                && (*i == 0 || matches!(tokens[i - 1], "|" | "&&" | ";" | "$"))
        })
        .map(|(_, t)| t.to_string())
        .collect()
}

/// The subcommands `ferry <path> --help` lists, or the error if that fails.
fn help(path: &[String]) -> Result<BTreeSet<String>, String> {
    let out = Command::new(ferry_bin!()).args(path).arg("--help").output().expect("run the ferry binary");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut subcommands = BTreeSet::new();
    let mut in_commands = false;
    for line in text.lines() {
        if line.starts_with("Commands:") {
            in_commands = true;
        } else if in_commands && line.starts_with("  ") {
            if let Some(name) = line.split_whitespace().next() {
                subcommands.insert(name.to_string());
            }
        } else if in_commands && !line.trim().is_empty() {
            in_commands = false;
        }
    }
    Ok(subcommands)
}

/// Checks a command path against the binary: the first word must be a
/// command, and a second word must be one of its subcommands when it has
/// any (otherwise it is an argument, like `ferry publish` reading stdin).
fn unknown_command(
    path: &[String],
    cache: &mut BTreeMap<Vec<String>, Result<BTreeSet<String>, String>>,
) -> Option<String> {
    let first = path[..1].to_vec();
    let subs = cache.entry(first.clone()).or_insert_with(|| help(&first)).clone();
    match subs {
        Err(e) => Some(format!("`ferry {}` is not a command: {e}", first[0])),
        Ok(subs) if path.len() == 2 && !subs.is_empty() && !subs.contains(&path[1]) => {
            Some(format!("`ferry {} {}` is not a command (it has: {})", path[0], path[1], join(&subs)))
        }
        Ok(_) => None,
    }
}

fn join(set: &BTreeSet<String>) -> String {
    set.iter().cloned().collect::<Vec<_>>().join(", ")
}

#[test]
fn every_relative_link_and_anchor_in_the_docs_resolves() {
    let root = repo();
    let mut parsed = BTreeMap::new();
    let mut broken = Vec::new();
    let mut links = 0;
    for file in documents(&root) {
        let doc = parse(&std::fs::read_to_string(&file).unwrap());
        links += doc.links.len();
        broken.extend(broken_links(&root, &file, &doc, &mut parsed));
    }
    assert!(links > 50, "only {links} links found: is the parser still reading the docs?");
    assert!(broken.is_empty(), "{} broken links:\n{}", broken.len(), broken.join("\n"));
}

#[test]
fn every_ferry_command_and_script_the_docs_name_exists() {
    let root = repo();
    let mut cache = BTreeMap::new();
    let mut problems = BTreeSet::new();
    let mut checked = BTreeSet::new();
    for file in documents(&root) {
        let doc = parse(&std::fs::read_to_string(&file).unwrap());
        let spans = doc.code_spans.iter().filter(|s| s.starts_with("ferry ") || s.starts_with("scripts/"));
        for line in doc.code_lines.iter().chain(spans) {
            let line = line.trim().trim_start_matches("$ ");
            for path in ferry_commands(line) {
                if let Some(problem) = unknown_command(&path, &mut cache) {
                    problems.insert(format!("{}: {problem}", file.display()));
                }
                checked.insert(path.join(" "));
            }
            for script in scripts(line) {
                if !root.join(&script).is_file() {
                    problems.insert(format!("{}: `{script}` does not exist", file.display()));
                }
                checked.insert(script);
            }
        }
    }
    for expected in ["demo", "run", "publish", "status", "plugin check", "fleet sign", "scripts/test.sh"] {
        assert!(checked.contains(expected), "`{expected}` was not found in the docs; checked: {checked:?}");
    }
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn the_readme_stays_within_its_line_budget() {
    let lines = std::fs::read_to_string(repo().join("README.md")).unwrap().lines().count();
    assert!(
        lines <= README_MAX_LINES,
        "README.md has {lines} lines, more than {README_MAX_LINES}: move detail to docs/"
    );
}

// The checks themselves, on made-up input: each can fail.

#[test]
fn a_missing_file_or_heading_is_reported_as_a_broken_link() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("other.md"), "# Other\n\n## Some `code` here: yes\n").unwrap();
    let file = dir.path().join("a.md");
    let text = "See [ok](other.md#some-code-here-yes), [gone](missing.md), [bad](other.md#nope),\n\
                [self](#top), `[not a link](x.md)` and [web](https://example.com).\n\n# Top\n\n\
                ```\n[in code](nowhere.md)\n```\n";
    std::fs::write(&file, text).unwrap();
    let doc = parse(text);
    assert_eq!(
        doc.links,
        ["other.md#some-code-here-yes", "missing.md", "other.md#nope", "#top", "https://example.com"]
    );
    let broken = broken_links(dir.path(), &file, &doc, &mut BTreeMap::new());
    assert_eq!(broken.len(), 2, "{broken:#?}");
    assert!(broken[0].contains("missing.md") && broken[1].contains("#nope"), "{broken:#?}");
}

#[test]
fn anchors_follow_github_including_repeated_headings() {
    let doc = parse("# The price of `opt-level = \"z\"`\n## x86-64 musl: 7.21 MB, now 5.75 MB\n## Notes\n## Notes\n");
    let expected = ["notes", "notes-1", "the-price-of-opt-level--z", "x86-64-musl-721-mb-now-575-mb"];
    assert_eq!(doc.anchors, expected.iter().map(|s| s.to_string()).collect());
}

#[test]
fn command_paths_are_read_from_command_lines_and_inline_alternatives() {
    let paths = |line| ferry_commands(line).into_iter().map(|p| p.join(" ")).collect::<Vec<_>>();
    assert_eq!(paths("ferry plugin check plugins/build/x.wasm --config a=b"), ["plugin check"]);
    assert_eq!(paths("printf 'x' | ferry publish    # NDJSON"), ["publish"]);
    assert_eq!(paths("cargo run --release -- demo     # see"), ["demo"]);
    assert_eq!(paths("ferry dlq list\\|show"), ["dlq list", "dlq show"]);
    assert_eq!(paths("ferry fleet push a.bundle --broker mqtt://b"), ["fleet push"]);
    assert!(paths("# ferry status is shown as a comment").is_empty());
    assert_eq!(scripts("scripts/test.sh   # all"), ["scripts/test.sh"]);
    assert!(scripts("scripts/").is_empty());
}

#[test]
fn a_subcommand_the_binary_does_not_have_is_reported() {
    let mut cache = BTreeMap::new();
    let path = |words: &[&str]| words.iter().map(|w| w.to_string()).collect::<Vec<_>>();
    assert_eq!(unknown_command(&path(&["store", "inspect"]), &mut cache), None);
    assert_eq!(unknown_command(&path(&["publish", "extra"]), &mut cache), None, "publish has no subcommands");
    assert!(unknown_command(&path(&["store", "fix"]), &mut cache).unwrap().contains("inspect"));
    assert!(unknown_command(&path(&["frobnicate"]), &mut cache).is_some());
}

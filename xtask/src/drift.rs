//! Checks that keep the docs and the code from drifting apart, run by `cargo xtask test` before
//! the build:
//!
//! - every test the docs or the code's comments name as `suite::test` is a function of
//!   SUITE.rs in tests/tests or bench/tests (a name that ends in `...` is a prefix);
//! - every repository path the docs name (`tests/src/load.rs`, `examples/*.service`) exists, and
//!   every bare file name (`vm.rs`) is some file's name (docs/PEERS.md, which cites other
//!   projects' files, aside);
//! - every item the docs or comments name as `Type::member`, where the workspace defines
//!   `Type`, is a function, constant or variant of the workspace;
//! - every item they name as `module::item`, where a source file of the workspace is
//!   `module.rs`, is defined in that file (a function, module, static or field) or is a
//!   submodule of it;
//! - no string literal in the Rust sources has a run of spaces between two words, which is how a
//!   line continuation after a space (`"word \` then an indented line with a space) reads in
//!   `--help`. A literal laid out on purpose (a table, a config file, a Debian changelog) says
//!   so in a comment containing `spaces:` on its line or the line before.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};
use regex::Regex;

use crate::root;

/// The repository's tracked files (git ls-files), relative to the root.
fn tracked(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["ls-files", "-z"])
        .output()
        .context("git ls-files")?;
    if !out.status.success() {
        bail!(
            "git ls-files failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out
        .stdout
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| PathBuf::from(String::from_utf8_lossy(p).into_owned()))
        .collect())
}

pub fn check() -> anyhow::Result<()> {
    let root = root();
    let files = tracked(&root)?;
    let read = |p: &Path| std::fs::read_to_string(root.join(p)).unwrap_or_default();
    let rust: Vec<(PathBuf, String)> = files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .map(|p| (p.clone(), read(p)))
        .collect();
    let docs: Vec<(PathBuf, String)> = files
        .iter()
        .filter(|p| {
            p.extension().is_some_and(|e| e == "md")
                || p.starts_with("examples")
                || p.starts_with(".ci")
                || p.file_name().is_some_and(|n| n == "Cargo.toml")
        })
        .map(|p| (p.clone(), read(p)))
        .collect();
    // What the docs say, and what the code's comments say.
    let mut prose: Vec<(PathBuf, String)> = docs.clone();
    for (p, src) in &rust {
        let comments: String = src
            .lines()
            .map(|l| match l.find("//") {
                Some(i) => &l[i..],
                None => "",
            })
            .collect::<Vec<_>>()
            .join("\n");
        prose.push((p.clone(), comments));
    }

    let mut problems = Vec::new();
    tests_named(&files, &rust, &prose, &mut problems)?;
    paths_named(&root, &files, &docs, &mut problems)?;
    items_named(&rust, &prose, &mut problems)?;
    module_items_named(&rust, &prose, &mut problems)?;
    for (p, src) in &rust {
        for (line, what) in spaced_literals(src) {
            problems.push(format!(
                "{}:{line}: a string literal with a run of spaces ({what:?}): a line \
                 continuation after a space? Write one space, or say why in a comment with \
                 `spaces:`",
                p.display()
            ));
        }
    }
    if !problems.is_empty() {
        bail!(
            "the docs and the code disagree ({} problems):\n  {}",
            problems.len(),
            problems.join("\n  ")
        );
    }
    Ok(())
}

/// Where the suites live: tests/tests (the test suites) and bench/tests (the short benchmarks).
const SUITE_DIRS: [&str; 2] = ["tests/tests", "bench/tests"];
/// Where the modules of those names live, which a comment may mean.
const MODULE_DIRS: [&str; 2] = ["tests/src", "bench/src"];

/// `suite::test` in the prose: a function of SUITE.rs in one of [`SUITE_DIRS`] (or of the
/// module of that name in one of [`MODULE_DIRS`]).
fn tests_named(
    files: &[PathBuf],
    rust: &[(PathBuf, String)],
    prose: &[(PathBuf, String)],
    problems: &mut Vec<String>,
) -> anyhow::Result<()> {
    let suites: BTreeSet<String> = files
        .iter()
        .filter(|p| {
            SUITE_DIRS.iter().any(|d| p.starts_with(d)) && p.extension().is_some_and(|e| e == "rs")
        })
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    let fns = Regex::new(r"\bfn\s+([a-z0-9_]+)")?;
    let fns_of = |path: &str| -> BTreeSet<String> {
        rust.iter()
            .filter(|(p, _)| p.to_string_lossy() == path)
            .flat_map(|(_, src)| fns.captures_iter(src).map(|c| c[1].to_string()))
            .collect()
    };
    let named = Regex::new(r"\b([a-z_]+)::([a-z0-9_]+)(\.\.\.)?")?;
    for (p, text) in prose {
        for c in named.captures_iter(text) {
            let (suite, test) = (&c[1], &c[2]);
            // `core::` in code comments is Rust's core crate.
            if !suites.contains(suite)
                || (suite == "core" && p.extension().is_some_and(|e| e == "rs"))
            {
                continue;
            }
            let known: BTreeSet<String> = SUITE_DIRS
                .iter()
                .chain(&MODULE_DIRS)
                .flat_map(|d| fns_of(&format!("{d}/{suite}.rs")))
                .collect();
            let prefix = c.get(3).is_some() || test.ends_with('_');
            let found = known
                .iter()
                .any(|f| f == test || (prefix && f.starts_with(test.trim_end_matches('_'))));
            if !found {
                problems.push(format!(
                    "{}: names `{suite}::{test}`, which is no test of the suite {suite}",
                    p.display()
                ));
            }
        }
    }
    Ok(())
}

/// Repository paths in backticks in the docs exist; bare file names are some file's name.
fn paths_named(
    root: &Path,
    files: &[PathBuf],
    docs: &[(PathBuf, String)],
    problems: &mut Vec<String>,
) -> anyhow::Result<()> {
    let tops = r"(?:\.ci|ansible|bench|demo|docs|examples|tests|xtask|zdt-ctl|zdt-ebpf|zdt-common|zdt-plan)";
    let path = Regex::new(&format!(r"`({tops}/[^`\s]*?)(?::\d+)?`"))?;
    let bare = Regex::new(r"`([A-Za-z0-9_-]+\.(?:rs|md|sh|py|js|go))`")?;
    let placeholder = Regex::new(r"\b[A-Z][A-Z_]{2,}\b")?;
    let names: BTreeSet<String> = files
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    // docs/PEERS.md cites the files of other projects.
    for (p, text) in docs.iter().filter(|(p, _)| !p.ends_with("PEERS.md")) {
        for c in path.captures_iter(text) {
            let named = &c[1];
            // NAME, PORT, VERSION...: a placeholder, which any file matches.
            let escaped = regex::escape(named);
            let pattern = placeholder.replace_all(&escaped, "[^/]*");
            let pattern = Regex::new(&format!("^{}$", pattern.replace(r"\*", "[^/]*")))?;
            let exists = root.join(named).exists()
                || files.iter().any(|f| {
                    let f = f.to_string_lossy();
                    pattern.is_match(&f)
                        || f.starts_with(&format!("{}/", named.trim_end_matches('/')))
                });
            if !exists {
                problems.push(format!(
                    "{}: names `{named}`, which does not exist",
                    p.display()
                ));
            }
        }
        for c in bare.captures_iter(text) {
            if !names.contains(&c[1]) {
                problems.push(format!(
                    "{}: names `{}`, which is no file of the repository",
                    p.display(),
                    &c[1]
                ));
            }
        }
    }
    Ok(())
}

/// `Type::member` in the prose, for a `Type` the workspace defines: `member` is one of its
/// functions, constants or variants.
fn items_named(
    rust: &[(PathBuf, String)],
    prose: &[(PathBuf, String)],
    problems: &mut Vec<String>,
) -> anyhow::Result<()> {
    let defined = Regex::new(r"\b(?:struct|enum|trait|type)\s+([A-Z][A-Za-z0-9]*)")?;
    let types: BTreeSet<String> = rust
        .iter()
        .flat_map(|(_, src)| defined.captures_iter(src).map(|c| c[1].to_string()))
        .collect();
    // Functions, constants, and fields or variants (an identifier that starts a line).
    let member_res = [
        Regex::new(r"\b(?:fn|const|static)\s+([A-Za-z_][A-Za-z0-9_]*)")?,
        Regex::new(r"(?m)^\s*(?:pub(?:\([a-z]+\))?\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*[,:({=]")?,
    ];
    let members: BTreeSet<String> = rust
        .iter()
        .flat_map(|(_, src)| {
            member_res
                .iter()
                .flat_map(|r| r.captures_iter(src).map(|c| c[1].to_string()))
                .collect::<Vec<_>>()
        })
        .collect();
    let named = Regex::new(r"\b([A-Z][A-Za-z0-9]*)::([A-Za-z_][A-Za-z0-9_]*)")?;
    for (p, text) in prose {
        for c in named.captures_iter(text) {
            if types.contains(&c[1]) && !members.contains(&c[2]) {
                problems.push(format!(
                    "{}: names `{}::{}`, which the workspace does not define",
                    p.display(),
                    &c[1],
                    &c[2]
                ));
            }
        }
    }
    Ok(())
}

/// `module::item` in the prose, for a `module` that is some source file's name (`program` for
/// zdt-ctl/src/program.rs; suites are [`tests_named`]'s): `item` is defined in a file of that
/// name, or is a submodule of it. Unit tests are named `module::tests::test`.
fn module_items_named(
    rust: &[(PathBuf, String)],
    prose: &[(PathBuf, String)],
    problems: &mut Vec<String>,
) -> anyhow::Result<()> {
    let stem = |p: &Path| p.file_stem().map(|s| s.to_string_lossy().into_owned());
    let in_suite_dir = |p: &Path| SUITE_DIRS.iter().any(|d| p.starts_with(d));
    let suites: BTreeSet<String> = rust
        .iter()
        .filter(|(p, _)| in_suite_dir(p))
        .filter_map(|(p, _)| stem(p))
        .collect();
    let modules: BTreeSet<String> = rust
        .iter()
        .filter(|(p, _)| p.components().any(|c| c.as_os_str() == "src") && !in_suite_dir(p))
        .filter_map(|(p, _)| stem(p))
        .filter(|m| {
            !suites.contains(m)
                && !["main", "lib", "mod", "core", "std", "tests"].contains(&m.as_str())
        })
        .collect();
    let defined = Regex::new(
        r"(?m)\b(?:fn|mod|static|macro_rules!)\s+([a-z_][a-z0-9_]*)|^\s*(?:pub(?:\([a-z]+\))?\s+)?([a-z_][a-z0-9_]*)\s*:",
    )?;
    // What each module name defines, read once: the items of the files of that name, and the
    // files in a directory of that name (its submodules).
    let mut defs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (q, src) in rust {
        let Some(name) = stem(q) else { continue };
        if let Some(dir) = q.parent().and_then(|d| d.file_name()) {
            let dir = dir.to_string_lossy().into_owned();
            defs.entry(dir).or_default().insert(name.clone());
        }
        let items = defined
            .captures_iter(src)
            .filter_map(|d| d.get(1).or(d.get(2)).map(|m| m.as_str().to_string()));
        defs.entry(name).or_default().extend(items);
    }
    let named = Regex::new(r"\b([a-z_][a-z0-9_]*)::([a-z_][a-z0-9_]*)")?;
    for (p, text) in prose {
        for c in named.captures_iter(text) {
            let (module, item) = (&c[1], &c[2]);
            if !modules.contains(module) || item == "tests" {
                continue;
            }
            let found = defs.get(module).is_some_and(|d| d.contains(item));
            if !found {
                problems.push(format!(
                    "{}: names `{module}::{item}`, which {module}.rs does not define",
                    p.display()
                ));
            }
        }
    }
    Ok(())
}

/// The string literals of `src` (not raw ones) with a run of spaces between two characters of a
/// line, unless a comment on that line or the line before says `spaces:`: (line, the run with
/// its neighbours).
pub fn spaced_literals(src: &str) -> Vec<(usize, String)> {
    let lines: Vec<&str> = src.lines().collect();
    let excused = |line: usize| {
        (line.saturating_sub(2)..line)
            .filter_map(|i| lines.get(i))
            .any(|l| l.contains("spaces:"))
    };
    let b = src.as_bytes();
    let (mut i, mut line) = (0, 1);
    let mut out = Vec::new();
    while i < b.len() {
        match b[i] {
            b'\n' => line += 1,
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let end = src[i..].find("*/").map_or(b.len(), |e| i + e + 2);
                line += src[i..end].matches('\n').count();
                i = end;
                continue;
            }
            b'r' if !prev_is_ident(b, i) && matches!(b.get(i + 1), Some(b'"' | b'#')) => {
                let hashes = b[i + 1..].iter().take_while(|c| **c == b'#').count();
                if b.get(i + 1 + hashes) == Some(&b'"') {
                    let close = format!("\"{}", "#".repeat(hashes));
                    let start = i + 2 + hashes;
                    let end = src[start..]
                        .find(&close)
                        .map_or(b.len(), |e| start + e + close.len());
                    line += src[i..end].matches('\n').count();
                    i = end;
                    continue;
                }
            }
            b'\'' => {
                // A char literal ('"', '\'', '\u{..}'); a lifetime has no closing quote.
                if let Some(len) = char_literal(&src[i..]) {
                    i += len;
                    continue;
                }
            }
            b'"' => {
                let start_line = line;
                let mut j = i + 1;
                let mut text = String::new();
                while j < b.len() && b[j] != b'"' {
                    if b[j] == b'\\' {
                        match b.get(j + 1) {
                            // A line continuation: the next line's leading whitespace is not
                            // part of the string.
                            Some(b'\n') => {
                                j += 2;
                                line += 1;
                                while j < b.len() && b[j].is_ascii_whitespace() {
                                    if b[j] == b'\n' {
                                        line += 1;
                                    }
                                    j += 1;
                                }
                                continue;
                            }
                            Some(b'n') => text.push('\n'),
                            _ => text.push('E'),
                        }
                        j += 2;
                        continue;
                    }
                    if b[j] == b'\n' {
                        line += 1;
                    }
                    text.push(b[j] as char);
                    j += 1;
                }
                if let Some(run) = word_gap(&text) {
                    if !excused(start_line) {
                        out.push((start_line, run));
                    }
                }
                i = j + 1;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

fn prev_is_ident(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')
}

fn char_literal(s: &str) -> Option<usize> {
    let rest = &s[1..];
    let body = if let Some(esc) = rest.strip_prefix('\\') {
        if esc.starts_with("u{") {
            esc.find('}')? + 2
        } else {
            2
        }
    } else {
        rest.chars().next()?.len_utf8()
    };
    (rest.as_bytes().get(body) == Some(&b'\'')).then_some(body + 2)
}

/// Two or more spaces between two non-space characters of one line of `text`.
fn word_gap(text: &str) -> Option<String> {
    for l in text.lines() {
        let trimmed = l.trim_start();
        if let Some(at) = trimmed.find("  ") {
            let after = trimmed[at..].trim_start();
            if !after.is_empty() {
                let from = at.saturating_sub(12);
                return Some(trimmed[from..(at + 2 + 12).min(trimmed.len())].to_string());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::spaced_literals;

    #[test]
    fn a_run_of_spaces_in_a_literal_is_found_unless_excused() {
        let src = "let a = \"one \\\n    two\";\nlet b = \"one  two\";\n// spaces: a table\nlet c = \"a  |  b\";\nlet d = r\"x  y\";\nlet e = '\"';\nlet f = \"\\n  indented\";\n";
        let found = spaced_literals(src);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, 3);
    }
}

//! The documentation against the repository and the binaries: every relative link in `README.md`
//! and `docs/*.md` resolves (a file that exists, and a `#anchor` a heading of it), and every setting
//! a service's `--help` lists has a row, with its flag and default, in `docs/configuration.md`.
//! No broker needed: these read files and run `--help`.

use crate::helpers::{bin_path, repo_root};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// The service binaries whose settings the configuration reference must cover.
const SERVICES: [&str; 4] = ["features", "model", "metric", "trainer"];

/// `README.md` and every page of `docs/`.
fn markdown_pages() -> Vec<PathBuf> {
    let root = repo_root();
    let mut pages = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/ exists")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// The text outside fenced code blocks (``` ... ```), where links and headings are meant literally.
fn prose_lines(text: &str) -> Vec<&str> {
    let mut in_fence = false;
    let mut lines = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if !in_fence {
            lines.push(line);
        }
    }
    lines
}

/// Removes inline code spans, so `a[i](x)` inside backticks is not taken for a link.
fn without_code_spans(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_code = false;
    for c in text.chars() {
        if c == '`' {
            in_code = !in_code;
            out.push(c);
        } else if !in_code {
            out.push(c);
        }
    }
    out
}

/// The targets of every `[text](target)` and `![alt](target)` in the prose; the link text may
/// span lines.
fn link_targets(text: &str) -> Vec<String> {
    let prose = without_code_spans(&prose_lines(text).join("\n"));
    let mut targets = Vec::new();
    let mut rest = prose.as_str();
    while let Some(close) = rest.find("](") {
        let after = &rest[close + 2..];
        // Only a `](` that closes a `[` counts.
        if rest[..close].contains('[')
            && let Some(end) = after.find(')')
        {
            let target = after[..end].split_whitespace().next().unwrap_or("");
            targets.push(target.to_owned());
            rest = &after[end..];
        } else {
            rest = after;
        }
    }
    targets
}

/// GitHub's anchor of a heading: lower case, punctuation dropped (letters, digits, `_`, `-` and
/// spaces kept), spaces to `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '_' || *c == '-' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Every anchor a page has: one per heading, `-1`, `-2` ... appended to repeats, as GitHub does.
fn anchors(text: &str) -> HashSet<String> {
    let mut seen = HashSet::new();
    for line in prose_lines(text) {
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
            continue;
        }
        let base = slug(&line[hashes..]);
        let mut anchor = base.clone();
        let mut n = 0;
        while seen.contains(&anchor) {
            n += 1;
            anchor = format!("{base}-{n}");
        }
        seen.insert(anchor);
    }
    seen
}

/// What is wrong with one relative link of `page`, if anything.
fn broken(page: &Path, target: &str) -> Option<String> {
    if target.contains("://") || target.starts_with("mailto:") || target.is_empty() {
        return None;
    }
    let (path, anchor) = match target.split_once('#') {
        Some((path, anchor)) => (path, Some(anchor)),
        None => (target, None),
    };
    let file = if path.is_empty() {
        page.to_path_buf()
    } else {
        page.parent().unwrap().join(path)
    };
    if !file.exists() {
        return Some(format!("{} does not exist", file.display()));
    }
    if let Some(anchor) = anchor
        && file.extension().is_some_and(|ext| ext == "md")
    {
        let text = std::fs::read_to_string(&file).unwrap();
        if !anchors(&text).contains(anchor) {
            return Some(format!("{} has no heading for #{anchor}", file.display()));
        }
    }
    None
}

/// Every broken relative link in `pages`, as `page: target: why`.
fn broken_links(pages: &[PathBuf]) -> Vec<String> {
    let mut broken_links = Vec::new();
    for page in pages {
        let text = std::fs::read_to_string(page).unwrap();
        for target in link_targets(&text) {
            if let Some(why) = broken(page, &target) {
                broken_links.push(format!("{}: ({target}): {why}", page.display()));
            }
        }
    }
    broken_links
}

/// One setting as `--help` lists it.
#[derive(Debug)]
struct Setting {
    env: String,
    flag: String,
    default: Option<String>,
}

/// The settings of one binary's `--help`: each option with an `[env: NAME]`, its flag and default.
fn settings_in_help(help: &str) -> Vec<Setting> {
    let mut settings = Vec::new();
    let mut flag: Option<String> = None;
    let mut env: Option<String> = None;
    let mut default: Option<String> = None;
    let mut finish =
        |flag: &mut Option<String>, env: &mut Option<String>, default: &mut Option<String>| {
            if let (Some(f), Some(e)) = (flag.take(), env.take()) {
                settings.push(Setting {
                    env: e,
                    flag: f,
                    default: default.take(),
                });
            }
            *default = None;
        };
    for line in help.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('-') && line.starts_with("  ") && !line.starts_with("          ") {
            finish(&mut flag, &mut env, &mut default);
            flag = trimmed
                .split([' ', ','])
                .find(|word| word.starts_with("--"))
                .map(str::to_owned);
        } else if let Some(rest) = trimmed.strip_prefix("[env: ") {
            let name = rest.trim_end_matches(']');
            env = Some(name.split('=').next().unwrap().to_owned());
        } else if let Some(rest) = trimmed.strip_prefix("[default: ") {
            default = Some(rest.trim_end_matches(']').to_owned());
        }
    }
    finish(&mut flag, &mut env, &mut default);
    settings
}

/// The rows of every table in `text` whose first cell names `name` in backticks.
fn rows_for<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    let wanted = format!("`{name}`");
    prose_lines(text)
        .into_iter()
        .filter(|line| {
            line.starts_with('|')
                && line
                    .split('|')
                    .nth(1)
                    .is_some_and(|first| first.split(['/', ',', ' ']).any(|w| w == wanted))
        })
        .collect()
}

/// What `docs/configuration.md` lacks for the settings of one binary's `--help`.
fn undocumented(binary: &str, help: &str, reference: &str) -> Vec<String> {
    let mut missing = Vec::new();
    for setting in settings_in_help(help) {
        let rows = rows_for(reference, &setting.env);
        if rows.is_empty() {
            missing.push(format!("{binary}: {} has no row", setting.env));
            continue;
        }
        let flag = format!("`{}`", setting.flag);
        if !rows.iter().any(|row| row.contains(&flag)) {
            missing.push(format!("{binary}: no row of {} names {flag}", setting.env));
        }
        // An empty default (`""`) is written in words ("empty").
        if let Some(default) = setting.default.filter(|d| d != "\"\"") {
            let default = format!("`{default}`");
            if !rows.iter().any(|row| row.contains(&default)) {
                missing.push(format!(
                    "{binary}: no row of {} gives its default {default}",
                    setting.env
                ));
            }
        }
    }
    missing
}

fn help_of(binary: &str) -> String {
    let output = std::process::Command::new(bin_path(binary))
        .arg("--help")
        .output()
        .unwrap();
    assert!(output.status.success(), "{binary} --help failed");
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn every_relative_link_in_the_docs_resolves() {
    let pages = markdown_pages();
    assert!(
        pages.len() > 5,
        "expected README.md and the docs/ pages: {pages:?}"
    );
    let broken = broken_links(&pages);
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn every_setting_in_help_is_in_the_configuration_reference() {
    let reference = std::fs::read_to_string(repo_root().join("docs/configuration.md")).unwrap();
    let mut missing = Vec::new();
    for binary in SERVICES {
        let help = help_of(binary);
        let settings = settings_in_help(&help);
        assert!(
            settings
                .iter()
                .any(|s| s.env == "AMQP_URL" && s.flag == "--amqp-url"),
            "{binary} --help was not understood: {settings:?}"
        );
        missing.extend(undocumented(binary, &help, &reference));
    }
    assert!(
        missing.is_empty(),
        "docs/configuration.md is missing:\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_checks_catch_a_broken_link_and_an_undocumented_setting() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("page.md");
    std::fs::write(
        dir.path().join("other.md"),
        "# Other page\n\n## A `code` heading\n",
    )
    .unwrap();
    std::fs::write(
        &page,
        "# Page\n\n[ok](other.md) [ok](other.md#a-code-heading) [ok](#page) [web](https://x.y/z)\n\
         [gone](missing.md) [no anchor](other.md#nowhere)\n\n```\n[in code](nowhere.md)\n```\n",
    )
    .unwrap();
    let broken = broken_links(&[page]);
    assert_eq!(broken.len(), 2, "{broken:?}");
    assert!(broken[0].contains("missing.md"), "{broken:?}");
    assert!(broken[1].contains("#nowhere"), "{broken:?}");

    let help = "Options:\n      --rate <RATE>\n          Samples per second\n          \n          \
                [env: RATE=]\n          [default: 10]\n\n      --seed <SEED>\n          Seed\n          \
                \n          [env: SEED=]\n\n  -h, --help\n          Print help\n";
    let documented = "| variable | flag | default | meaning |\n|---|---|---|---|\n\
                      | `RATE` | `--rate` | `10` | samples per second |\n\
                      | `SEED` | `--seed` | none | seed |\n";
    assert_eq!(
        undocumented("features", help, documented),
        Vec::<String>::new()
    );
    let without_seed = documented.replace("| `SEED` | `--seed` | none | seed |\n", "");
    assert_eq!(
        undocumented("features", help, &without_seed),
        vec!["features: SEED has no row".to_owned()]
    );
    let old_default = documented.replace("`10`", "`20`");
    assert_eq!(undocumented("features", help, &old_default).len(), 1);
}

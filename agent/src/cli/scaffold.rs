//! `ferry plugin new` (feature `scaffold`): writes a starter plugin from the
//! templates in `templates/`, with its own copy of the WIT contract (and for
//! Rust the SDK's sources) so it builds outside this repository. Device
//! builds leave it out: the templates are plugin authors' tools, and about
//! 60 KB of a runtime-only binary.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};

use super::plugin::WorldArg;
use crate::plugin::World;

/// A language `plugin new` can scaffold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Lang {
    /// Rust with wit-bindgen, target wasm32-wasip2.
    Rust,
    /// C with wit-bindgen c, clang and wasi-libc.
    C,
    /// Python with componentize-py.
    Python,
    /// JavaScript with componentize-js.
    Js,
}

/// `ferry plugin new`.
#[derive(Debug, Args)]
pub struct NewArgs {
    /// The language.
    #[arg(long, value_enum)]
    pub lang: Lang,
    /// The world it targets: a filter (and transform) or a merge function.
    #[arg(long, value_enum, default_value = "filter")]
    pub world: WorldArg,
    /// The plugin's name (letters, digits, `-`); also the new directory.
    pub name: String,
    /// Where to create the directory (default: the current one).
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
}

/// The WIT contract, embedded so a scaffold builds anywhere.
const WIT: [(&str, &str); 3] = [
    ("types.wit", include_str!("../../../wit/types.wit")),
    ("host.wit", include_str!("../../../wit/host.wit")),
    ("worlds.wit", include_str!("../../../wit/worlds.wit")),
];

/// The Rust SDK's sources, vendored into a Rust scaffold's `sdk/` so it
/// builds anywhere; its `path: "../../../wit"` becomes the scaffold's `wit/`.
const SDK: [(&str, &str); 6] = [
    ("sdk/src/lib.rs", include_str!("../../../plugins/rust/sdk/src/lib.rs")),
    ("sdk/src/bindings.rs", include_str!("../../../plugins/rust/sdk/src/bindings.rs")),
    ("sdk/src/config.rs", include_str!("../../../plugins/rust/sdk/src/config.rs")),
    ("sdk/src/events.rs", include_str!("../../../plugins/rust/sdk/src/events.rs")),
    ("sdk/src/export.rs", include_str!("../../../plugins/rust/sdk/src/export.rs")),
    ("sdk/src/log.rs", include_str!("../../../plugins/rust/sdk/src/log.rs")),
];

/// (path in the new directory, template) per language and world;
/// `{{name}}`, `{{crate}}`, `{{world}}` and `{{stage_line}}` are replaced.
/// Each scaffold has its logic apart from the WIT glue, a unit test of that
/// logic in the language's own runner, and `samples.json` for `check`.
fn templates(lang: Lang, world: World) -> Vec<(&'static str, &'static str)> {
    let filter = world == World::Filter;
    let pick = |f: &'static str, m: &'static str| if filter { f } else { m };
    let mut files = vec![("samples.json", include_str!("templates/samples.json.tmpl"))];
    match lang {
        Lang::Rust => {
            files.extend([
                ("Cargo.toml", include_str!("templates/rust/Cargo.toml.tmpl")),
                (
                    "src/lib.rs",
                    pick(include_str!("templates/rust/lib.rs.tmpl"), include_str!("templates/rust/merge.rs.tmpl")),
                ),
                ("README.md", include_str!("templates/rust/README.md.tmpl")),
                ("sdk/Cargo.toml", include_str!("templates/rust/sdk.Cargo.toml.tmpl")),
            ]);
            files.extend(SDK);
        }
        Lang::C => files.extend([
            ("{{crate}}.c", pick(include_str!("templates/c/plugin.c.tmpl"), include_str!("templates/c/merge.c.tmpl"))),
            ("logic.h", pick(include_str!("templates/c/logic.h.tmpl"), include_str!("templates/c/merge_logic.h.tmpl"))),
            ("test.c", pick(include_str!("templates/c/test.c.tmpl"), include_str!("templates/c/merge_test.c.tmpl"))),
            ("build.sh", include_str!("templates/c/build.sh.tmpl")),
            ("README.md", include_str!("templates/c/README.md.tmpl")),
        ]),
        Lang::Python => files.extend([
            (
                "app.py",
                pick(include_str!("templates/python/app.py.tmpl"), include_str!("templates/python/merge.py.tmpl")),
            ),
            (
                "logic.py",
                pick(
                    include_str!("templates/python/logic.py.tmpl"),
                    include_str!("templates/python/merge_logic.py.tmpl"),
                ),
            ),
            (
                "test_logic.py",
                pick(
                    include_str!("templates/python/test_logic.py.tmpl"),
                    include_str!("templates/python/test_merge_logic.py.tmpl"),
                ),
            ),
            ("build.sh", include_str!("templates/python/build.sh.tmpl")),
            ("README.md", include_str!("templates/python/README.md.tmpl")),
        ]),
        Lang::Js => files.extend([
            (
                "plugin.js",
                pick(include_str!("templates/js/plugin.js.tmpl"), include_str!("templates/js/merge.js.tmpl")),
            ),
            (
                "logic.js",
                pick(include_str!("templates/js/logic.js.tmpl"), include_str!("templates/js/merge_logic.js.tmpl")),
            ),
            (
                "logic.test.js",
                pick(
                    include_str!("templates/js/logic.test.js.tmpl"),
                    include_str!("templates/js/merge_logic.test.js.tmpl"),
                ),
            ),
            // ES modules for `node --test`; componentize-js reads them as such anyway.
            ("package.json", "{ \"name\": \"{{name}}\", \"private\": true, \"type\": \"module\" }\n"),
            ("build.sh", include_str!("templates/js/build.sh.tmpl")),
            ("README.md", include_str!("templates/js/README.md.tmpl")),
        ]),
    }
    files
}

/// Writes the scaffold for `args` and returns its directory.
pub fn scaffold(args: &NewArgs) -> anyhow::Result<PathBuf> {
    let name = &args.name;
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !valid {
        bail!("`{name}` is not a plugin name: use lowercase letters, digits and `-`, starting with a letter");
    }
    let root = args.dir.join(name);
    if root.exists() {
        bail!("{} already exists", root.display());
    }
    let crate_name = name.replace('-', "_");
    let world = args.world.into();
    // Filters need a stage in the agent config; merge plugins have none.
    let stage_line = if world == World::Filter { "stage = \"ingest\"          # or a destination name\n" } else { "" };
    for (file, text) in templates(args.lang, world) {
        let path = root.join(file.replace("{{crate}}", &crate_name));
        let text = if file.starts_with("sdk/src/") {
            // Rust source: `{{` there is format syntax, not a placeholder.
            text.replace("\"../../../wit\"", "\"../wit\"")
        } else {
            text.replace("{{name}}", name)
                .replace("{{crate}}", &crate_name)
                .replace("{{world}}", world.as_str())
                .replace("{{stage_line}}", stage_line)
        };
        write_file(&path, &text)?;
    }
    for (file, text) in WIT {
        write_file(&root.join("wit").join(file), text)?;
    }
    #[cfg(unix)]
    if let Ok(meta) = std::fs::metadata(root.join("build.sh")) {
        use std::os::unix::fs::PermissionsExt;
        let mut perms = meta.permissions();
        perms.set_mode(0o755);
        std::fs::set_permissions(root.join("build.sh"), perms)?;
    }
    Ok(root)
}

fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Runs `ferry plugin new`.
pub fn run(args: &NewArgs) -> anyhow::Result<()> {
    let root = scaffold(args)?;
    let world: World = args.world.into();
    outln!(
        "created {} ({:?} {} plugin); see its README.md to build and check it",
        root.display(),
        args.lang,
        world.as_str()
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_writes_every_language_template_with_the_name_filled_in_and_the_wit() {
        let dir = tempfile::tempdir().unwrap();
        for lang in [Lang::Rust, Lang::C, Lang::Python, Lang::Js] {
            for world in [WorldArg::Filter, WorldArg::Merge] {
                let name = format!("my-{lang:?}-{world:?}").to_lowercase();
                let root = scaffold(&NewArgs { lang, world, name: name.clone(), dir: dir.path().into() }).unwrap();
                for (file, _) in WIT {
                    assert!(root.join("wit").join(file).is_file());
                }
                let world: World = world.into();
                for (file, _) in templates(lang, world) {
                    let path = root.join(file.replace("{{crate}}", &name.replace('-', "_")));
                    let text = std::fs::read_to_string(&path).unwrap();
                    if file.starts_with("sdk/src/") {
                        assert!(!text.contains("../../../wit"), "{} points outside the scaffold", path.display());
                    } else {
                        assert!(!text.contains("{{"), "{} keeps a placeholder", path.display());
                    }
                }
                assert!(root.join("samples.json").is_file());
                assert!(std::fs::read_to_string(root.join("README.md")).unwrap().contains(&name));
            }
        }
    }

    #[test]
    fn new_refuses_bad_names_and_existing_directories() {
        let dir = tempfile::tempdir().unwrap();
        let args = |name: &str| NewArgs {
            lang: Lang::Rust,
            world: WorldArg::Filter,
            name: name.into(),
            dir: dir.path().into(),
        };
        assert!(scaffold(&args("Bad Name")).is_err());
        assert!(scaffold(&args("../escape")).is_err());
        scaffold(&args("ok")).unwrap();
        assert!(scaffold(&args("ok")).is_err(), "never overwrites");
    }
}

//! The fleet topic names, below a configurable root (`ferry/fleet`):
//!
//! | topic | retained | what |
//! | --- | --- | --- |
//! | `{root}/plugin/{name}/manifest/{devices}` | yes | the signed manifest for devices matching the glob `{devices}` |
//! | `{root}/plugin/{name}/v{version}/{index}` | yes | one chunk of that version's component |
//! | `{root}/status/{device}/{name}` | yes | the device's report for that plugin |
//!
//! Retained manifests and chunks are what lets a device that was offline
//! during a push, or that lost its link mid-download, fetch them later.

/// Filter matching every manifest under `root`.
pub fn manifests(root: &str) -> String {
    format!("{root}/plugin/+/manifest/+")
}

/// Where the manifest of `name` for `devices` is published.
pub fn manifest(root: &str, name: &str, devices: &str) -> String {
    format!("{root}/plugin/{name}/manifest/{devices}")
}

/// Filter matching every chunk of `name` at `version`.
pub fn chunks(root: &str, name: &str, version: u64) -> String {
    format!("{root}/plugin/{name}/v{version}/+")
}

/// Where chunk `index` of `name` at `version` is published.
pub fn chunk(root: &str, name: &str, version: u64, index: u32) -> String {
    format!("{root}/plugin/{name}/v{version}/{index}")
}

/// Where `device` reports on plugin `name`.
pub fn status(root: &str, device: &str, name: &str) -> String {
    format!("{root}/status/{device}/{name}")
}

/// Filter matching every device's reports.
pub fn statuses(root: &str) -> String {
    format!("{root}/status/+/+")
}

/// What a topic under `root` carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetTopic<'a> {
    /// A manifest of plugin `name` for devices matching `devices`.
    Manifest {
        /// Plugin name.
        name: &'a str,
        /// Device glob.
        devices: &'a str,
    },
    /// A chunk of plugin `name` at `version`.
    Chunk {
        /// Plugin name.
        name: &'a str,
        /// Version.
        version: u64,
    },
}

/// Parses a topic under `root`; `None` for anything else.
pub fn parse<'a>(root: &str, topic: &'a str) -> Option<FleetTopic<'a>> {
    let rest = topic.strip_prefix(root)?.strip_prefix("/plugin/")?;
    let levels: Vec<&str> = rest.split('/').collect();
    match levels.as_slice() {
        [name, "manifest", devices] => Some(FleetTopic::Manifest { name, devices }),
        [name, version, _index] => Some(FleetTopic::Chunk { name, version: version.strip_prefix('v')?.parse().ok()? }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_parse_back_to_what_they_carry() {
        let r = "ferry/fleet";
        assert_eq!(parse(r, &manifest(r, "th", "gw-*")), Some(FleetTopic::Manifest { name: "th", devices: "gw-*" }));
        assert_eq!(parse(r, &chunk(r, "th", 7, 3)), Some(FleetTopic::Chunk { name: "th", version: 7 }));
        assert_eq!(parse(r, &status(r, "gw", "th")), None);
        assert_eq!(parse(r, "ferry/fleet/plugin/th/x/1"), None);
        assert_eq!(parse(r, "other/plugin/th/manifest/x"), None);
    }
}

//! The `ferry` binary as a user runs it: config errors before start-up,
//! `publish` and `status` against a running agent, clean exit on SIGTERM.

use std::process::Command;

use ferry_tests::{FerryProcess, ferry_bin, write_config};

#[test]
fn a_config_mistake_names_file_key_and_reason_and_nothing_starts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        format!(
            "[agent]\ndata_dir = {:?}\n[store]\nfull_policy = \"drop-newest\"\n",
            dir.path().join("data").display().to_string()
        ),
    )
    .unwrap();
    let out = Command::new(ferry_bin!()).args(["run", "--config"]).arg(&path).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml") && err.contains("store.full_policy") && err.contains("drop-newest"), "{err}");
    assert!(!dir.path().join("data").exists(), "a refused config must not create the store");
}

#[test]
fn publish_and_status_talk_to_a_running_agent_which_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let agent = FerryProcess::start(ferry_bin!(), &write_config(dir.path(), "")).unwrap();
    let ferry = |args: &[&str], stdin: Option<&str>| {
        use std::io::Write;
        let mut child = Command::new(ferry_bin!())
            .args(args)
            .env("FERRY_URL", agent.url())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = ferry(&["publish", "--topic", "telemetry/temp", "--data", r#"{"c":20}"#, "--id", "r-1"], None);
    assert!(ok && out.contains("accepted r-1 sequence 1"), "{out}");
    let (ok, out) = ferry(&["publish", "--topic", "telemetry/temp", "--data", "20", "--id", "r-1"], None);
    assert!(ok && out.contains("duplicate"), "{out}");
    let (ok, out) = ferry(&["publish"], Some("{\"topic\":\"a\",\"data\":1}\n{\"topic\":\"b\",\"data\":2}\n"));
    assert!(ok && out.contains("accepted 2"), "{out}");
    let (ok, out) = ferry(&["publish"], Some("{\"topic\":\"a\",\"data\":1}\n{\"topic\":\"b/#\",\"data\":2}\n"));
    assert!(!ok && out.contains("line 2") && out.contains("topic"), "{out}");
    let (ok, out) = ferry(&["status"], None);
    assert!(ok && out.contains("3 events"), "{out}");
    let (ok, out) = ferry(&["status", "--json"], None);
    assert!(ok && out.contains("\"last_sequence\": 3"), "{out}");

    let (status, log) = agent.terminate();
    assert!(status.success(), "exit status {status}; log: {log:?}");
    assert!(log.iter().any(|l| l.contains("stopped cleanly")), "{log:?}");
}

#[test]
fn every_firmware_targets_shipped_config_passes_config_check() {
    let root = ferry_tests::repo_root().join("firmware-targets");
    let mut checked = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let config = entry.unwrap().path().join("ferry.toml");
        if !config.exists() {
            continue;
        }
        let out = Command::new(ferry_bin!()).args(["config", "check", "--config"]).arg(&config).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{}: {text}", config.display());
        checked += 1;
    }
    assert!(checked >= 4, "expected a ferry.toml per firmware target, found {checked}");
}

#[test]
fn the_default_config_is_printed_whole_and_output_to_a_full_disk_is_a_clear_error() {
    let out = Command::new(ferry_bin!()).args(["config", "default"]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), ferry::config::DEFAULT_TOML);

    let full = std::fs::File::create("/dev/full").unwrap();
    let out = Command::new(ferry_bin!()).args(["config", "default"]).stdout(full).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("writing the default config to standard output"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // Every other command's output too.
    let full = std::fs::File::create("/dev/full").unwrap();
    let out = Command::new(ferry_bin!()).args(["config", "check"]).stdout(full).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("writing to standard output"), "{err}");
}

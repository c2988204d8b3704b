//! The `vcfed` binary as a user drives it: init, run, status, SIGTERM,
//! SIGHUP, and the refusals that must leave everything untouched.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{Site, free_port, stderr, vcfed};

#[test]
fn init_run_status_capacity_and_sigterm() {
    let site = Site::init("site-a", 6);
    for key in ["federation.key", "tunnel.key", "api.token"] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(site.data_dir().join(key))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    let mut agent = site.spawn();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(common::wait_ready(&site.client()));

    let out = vcfed(&["status", "--config", site.config_arg()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("site        site-a"), "{text}");
    assert!(text.contains("capacity    6 nodes"), "{text}");

    let out = vcfed(&["status", "--json", "--config", site.config_arg()]);
    let status: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("status --json prints JSON");
    assert_eq!(status["name"], "site-a");
    assert_eq!(status["free_now"], 6);
    assert!(status["peer_id"].as_str().unwrap().starts_with("12D3KooW"));

    let out = vcfed(&[
        "reservation",
        "hold",
        "--config",
        site.config_arg(),
        "--nodes",
        "2",
        "--start",
        "+1h",
        "--duration",
        "2h",
        "--key",
        "k1",
        "--commit",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let held: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(held[0]["state"], "committed");

    let out = vcfed(&[
        "capacity",
        "--config",
        site.config_arg(),
        "--from",
        "now",
        "--to",
        "+4h",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let free: Vec<u64> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["free"].as_u64().unwrap())
        .collect();
    assert_eq!(free, [6, 4, 6]);
    assert_eq!(report["min_free"], 4);

    let out = vcfed(&["capacity", "--config", site.config_arg(), "--to", "+4h"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("6 nodes in all; at least 4 free"), "{text}");

    let status = agent.terminate(Duration::from_secs(10));
    assert!(
        status.success(),
        "agent exit {status:?}; log:\n{}",
        agent.log()
    );
    let log = agent.log();
    assert!(
        log.contains("SIGTERM") && log.contains("agent stopped"),
        "{log}"
    );

    let out = vcfed(&["status", "--config", site.config_arg()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot reach the vcfed agent"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn one_agent_per_data_dir_and_a_killed_agent_holds_no_lock() {
    let site = Site::init("site-a", 2);
    let mut agent = site.spawn();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(common::wait_ready(&site.client()));
    let lock_path = site.data_dir().join("agent.lock");
    let holder = std::fs::read_to_string(&lock_path).unwrap();
    assert_eq!(holder.trim(), agent.pid().to_string());

    // An impostor: site-a's config with another API port (its federation
    // port is 0, so only the data dir is shared).
    let config = site.config();
    let impostor_api = format!("127.0.0.1:{}", free_port());
    let text = std::fs::read_to_string(&site.config_path).unwrap();
    let impostor_text = text.replace(&config.api.listen.to_string(), &impostor_api);
    assert_ne!(impostor_text, text, "the config names its API address");
    let impostor_path = site.dir.path().join("impostor.toml");
    std::fs::write(&impostor_path, impostor_text).unwrap();
    let mut impostor = common::spawn_agent(&impostor_path, site.dir.path().join("impostor.log"));
    let status = impostor.wait(Duration::from_secs(15));
    let log = impostor.log();
    assert_eq!(status.code(), Some(2), "{log}");
    let expected = format!(
        "error: the data dir {} is in use by another vcfed agent (pid {}); one agent per site",
        config.site.data_dir.display(),
        agent.pid()
    );
    assert!(log.contains(&expected), "{log}");
    assert!(
        std::net::TcpStream::connect(&impostor_api).is_err(),
        "the impostor's API must not listen"
    );
    let out = vcfed(&["status", "--config", site.config_arg()]);
    assert!(out.status.success(), "{}", stderr(&out));

    // SIGKILL leaves the lock file with a dead pid in it; that is no lock.
    common::signal(agent.pid(), "KILL");
    agent.wait(Duration::from_secs(10));
    let mut agent = site.spawn();
    runtime.block_on(common::wait_ready(&site.client()));
    let holder = std::fs::read_to_string(&lock_path).unwrap();
    assert_eq!(holder.trim(), agent.pid().to_string());
    let status = agent.terminate(Duration::from_secs(10));
    assert!(status.success(), "{status:?}; log:\n{}", agent.log());
}

#[test]
fn a_taken_federation_port_is_a_start_up_error() {
    let listen = format!("/ip4/127.0.0.1/tcp/{}", free_port());
    let first = Site::init_with("site-a", 2, &listen, &[]);
    let mut agent = first.spawn();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(common::wait_ready(&first.client()));

    // Another site (own data dir, own API port) told to listen on the same
    // federation address.
    let second = Site::init_with("site-b", 2, &listen, &[]);
    let mut other = second.spawn();
    let status = other.wait(Duration::from_secs(15));
    let log = other.log();
    assert_eq!(status.code(), Some(1), "{log}");
    let expected = format!(
        "binding the federation listener to {listen} (federation.listen in {}): Address already in use",
        second.config_path.display()
    );
    assert!(log.contains(&expected), "{log}");
    assert!(
        std::net::TcpStream::connect(second.config().api.listen).is_err(),
        "site-b's API must not listen"
    );

    let out = vcfed(&["status", "--config", first.config_arg()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status = agent.terminate(Duration::from_secs(10));
    assert!(status.success(), "{status:?}; log:\n{}", agent.log());
}

#[test]
fn sighup_rereads_the_config_and_never_stops_the_agent() {
    let site = Site::init("site-a", 2);
    let mut agent = site.spawn();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(common::wait_ready(&site.client()));
    let within = Duration::from_secs(10);
    let reloading = "reloading the configuration";
    let text = std::fs::read_to_string(&site.config_path).unwrap();

    common::signal(agent.pid(), "HUP");
    agent.wait_for_log("configuration unchanged", 1, within);
    agent.wait_for_log(reloading, 1, within);

    let edited = text.replace("vlans = \"100-199\"", "vlans = \"200-299\"");
    assert_ne!(edited, text, "the template has a vlans line");
    std::fs::write(&site.config_path, &edited).unwrap();
    common::signal(agent.pid(), "HUP");
    agent.wait_for_log(reloading, 2, within);
    agent.wait_for_log("need a restart", 1, within);
    let log = agent.log();
    let line = log.lines().find(|l| l.contains("need a restart")).unwrap();
    assert!(
        line.contains("WARN") && line.contains("clusters.vlans"),
        "{line}"
    );

    std::fs::write(&site.config_path, text.replace("100-199", "300-200")).unwrap();
    common::signal(agent.pid(), "HUP");
    agent.wait_for_log(reloading, 3, within);
    agent.wait_for_log("does not load", 1, within);
    let log = agent.log();
    let line = log.lines().find(|l| l.contains("does not load")).unwrap();
    assert!(
        line.contains("ERROR") && line.contains("clusters.vlans"),
        "{line}"
    );

    // Still the site it started as, on the configuration it started with.
    std::fs::write(&site.config_path, &edited).unwrap();
    let out = vcfed(&["status", "--json", "--config", site.config_arg()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["name"], "site-a");
    assert_eq!(status["vlans"], "100-199");

    let status = agent.terminate(within);
    assert_eq!(status.code(), Some(0), "log:\n{}", agent.log());
    assert!(agent.log().contains("agent stopped"));
}

#[test]
fn init_refuses_to_overwrite_without_force() {
    let site = Site::init("site-a", 2);
    let key_path = site.data_dir().join("federation.key");
    let before = std::fs::read(&key_path).unwrap();
    let data_dir = site.data_dir();
    let args = [
        "init",
        "--site",
        "site-a",
        "--data-dir",
        data_dir.to_str().unwrap(),
    ];

    let out = vcfed(&args);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("already exists; pass --force"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read(&key_path).unwrap(),
        before,
        "keys must be untouched"
    );

    let out = vcfed(&[&args[..], &["--force"]].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    assert_ne!(
        std::fs::read(&key_path).unwrap(),
        before,
        "--force makes a new identity"
    );
}

#[test]
fn init_with_bad_flags_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let out = vcfed(&[
        "init",
        "--site",
        "Bad_Name",
        "--data-dir",
        data_dir.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--site:"), "{}", stderr(&out));
    assert!(!data_dir.exists(), "nothing may be written");

    let out = vcfed(&[
        "init",
        "--site",
        "ok",
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--vlans",
        "0-5000",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(!data_dir.exists(), "nothing may be written");
}

#[test]
fn a_bad_config_is_refused_before_anything_starts() {
    let site = Site::init("site-a", 2);
    let text = std::fs::read_to_string(&site.config_path).unwrap();
    let bad = text.replace("vlans = \"100-199\"", "vlans = \"300-200\"");
    assert_ne!(bad, text, "the template has a vlans line");
    std::fs::write(&site.config_path, &bad).unwrap();
    let line = bad.lines().position(|l| l.starts_with("vlans")).unwrap() + 1;

    let out = vcfed(&["run", "--config", site.config_arg()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{}:{line}:", site.config_path.display())),
        "{err}"
    );
    assert!(err.contains("clusters.vlans"), "{err}");
    assert!(
        !site.data_dir().join("ledger.db").exists(),
        "nothing may be written"
    );
}

#[test]
fn usage_errors_exit_2() {
    let out = vcfed(&["status"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("pass --config FILE or set VCFED_CONFIG"),
        "{}",
        stderr(&out)
    );
    let out = vcfed(&["no-such-command"]);
    assert_eq!(out.status.code(), Some(2));
    let out = vcfed(&["run", "--config", "/nonexistent/vcfed.toml"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("/nonexistent/vcfed.toml"),
        "{}",
        stderr(&out)
    );
}

/// Runs `vcfed args...` with its stdout on a pipe whose reader is gone, as
/// after `vcfed ... | head -1`: every write to stdout fails with EPIPE.
fn vcfed_into_closed_pipe(args: &[&str]) -> std::process::Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    std::process::Command::new(common::vcfed_bin())
        .args(args)
        .env_remove("VCFED_CONFIG")
        .env_remove("RUST_LOG")
        .stdout(writer)
        .output()
        .expect("the vcfed binary runs")
}

#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    let site = Site::init("site-a", 4);
    let _agent = site.spawn();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(common::wait_ready(&site.client()));
    let out = vcfed(&[
        "cluster",
        "create",
        "--config",
        site.config_arg(),
        "--name",
        "c1",
        "--nodes",
        "1",
        "--duration",
        "1h",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    let config = site.config_arg();
    let commands: [&[&str]; 7] = [
        &["sites", "--config", config],
        &["sites", "--json", "--config", config],
        &["status", "--config", config],
        &["cluster", "list", "--config", config],
        &["cluster", "list", "--json", "--config", config],
        &["reservation", "list", "--all", "--config", config],
        &["simnet", "--sites", "3", "--seed", "1", "--duration", "1m"],
    ];
    for args in commands {
        let out = vcfed_into_closed_pipe(args);
        let err = stderr(&out);
        // Exit 0: the reader had what it wanted (see `cli::main`).
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(!err.contains("Broken pipe"), "{args:?}: {err}");
    }
}

#[test]
fn keys_and_names_with_a_slash_reach_the_agent_and_empty_ones_are_refused() {
    let site = Site::init("site-a", 4);
    let _agent = site.spawn();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(common::wait_ready(&site.client()));
    // The shape of a worker-side key, and one that needs more escaping.
    for key in ["c-00ff/1", "a b%2F?#"] {
        let out = vcfed(&[
            "reservation",
            "hold",
            "--config",
            site.config_arg(),
            "--nodes",
            "1",
            "--start",
            "+1h",
            "--duration",
            "1h",
            "--key",
            key,
            "--commit",
            "--json",
        ]);
        assert!(out.status.success(), "{key}: {}", stderr(&out));
        let held: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            (held[0]["key"].as_str(), held[0]["state"].as_str()),
            (Some(key), Some("committed"))
        );
        let out = vcfed(&[
            "reservation",
            "release",
            key,
            "--json",
            "--config",
            site.config_arg(),
        ]);
        assert!(out.status.success(), "{key}: {}", stderr(&out));
        let released: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(released[0]["state"], "released", "{key}");
    }
    // A name with a slash reaches the agent's cluster lookup, which does
    // not know it: the user typed a wrong name, exit 2.
    let out = vcfed(&["cluster", "show", "a/b", "--config", site.config_arg()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(r#"no cluster with id or name "a/b""#),
        "{}",
        stderr(&out)
    );

    for args in [
        &["cluster", "show", ""][..],
        &["cluster", "delete", ""],
        &["reservation", "release", ""],
        &["reservation", "commit", ""],
    ] {
        let mut args = args.to_vec();
        args.extend(["--config", site.config_arg()]);
        let out = vcfed(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("must not be empty"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn a_hold_in_the_past_is_refused() {
    let site = Site::init("site-a", 4);
    let _agent = site.spawn();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(common::wait_ready(&site.client()));
    let hold = |start: &str| {
        vcfed(&[
            "reservation",
            "hold",
            "--config",
            site.config_arg(),
            "--nodes",
            "1",
            "--start",
            start,
            "--duration",
            "2h",
        ])
    };
    // A year alone is a usage error, with the hint.
    let out = hold("2026");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            r#""2026" looks like a year; write a date like 2026-11-24T10:00:00Z, or +2h"#
        ),
        "{}",
        stderr(&out)
    );
    // Unix ms of 1970 reach the agent, which refuses a window in the past:
    // what the user typed is wrong, exit 2.
    for start in ["100000", "2020-01-01T00:00:00Z"] {
        let out = hold(start);
        assert_eq!(out.status.code(), Some(2), "{start}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("the window starts in the past"),
            "{start}: {}",
            stderr(&out)
        );
    }
    let out = vcfed(&[
        "reservation",
        "list",
        "--all",
        "--json",
        "--config",
        site.config_arg(),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    assert!(hold("now").status.success());
}

#[test]
fn the_single_site_demo_runs_and_cleans_up() {
    // The federated demo (root) is tests/demo.rs.
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(common::vcfed_bin())
        .args(["demo", "--local"])
        .env("TMPDIR", dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "refused: only 1 node is free",
        "expired",
        "commitments survive",
        "demo finished",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "the demo removes its directory"
    );
}

#[test]
fn a_lease_out_of_range_names_the_flag() {
    let site = Site::init("site-a", 2);
    let out = vcfed(&[
        "reservation",
        "hold",
        "--config",
        site.config_arg(),
        "--nodes",
        "1",
        "--duration",
        "2h",
        "--lease",
        "2days",
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--lease 2days: a hold's lease must be from 1s to 1day"),
        "{err}"
    );
    assert!(!err.contains("lease_s"), "{err}");
}

#[test]
fn a_bad_site_name_says_what_names_are_allowed_and_names_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let out = vcfed(&[
        "init",
        "--site",
        "Site_C",
        "--data-dir",
        data_dir.to_str().unwrap(),
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(r#"--site: invalid site name "Site_C": 'S' is not a lowercase letter"#),
        "{err}"
    );
    assert!(err.contains("lowercase letters, digits and '-'"), "{err}");
    assert!(
        !err.contains("vcfed.toml"),
        "the file is not written: {err}"
    );
    assert!(!data_dir.exists(), "nothing may be written");
}

#[test]
fn an_agent_that_is_not_running_is_reported_in_plain_words() {
    let site = Site::init("site-a", 2);
    let out = vcfed(&["status", "--config", site.config_arg()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(": connection refused (is it running?"),
        "{err}"
    );
    assert!(!err.contains("client error"), "{err}");
    assert_eq!(err.matches("connection refused").count(), 1, "{err}");

    std::fs::remove_file(site.data_dir().join("api.token")).unwrap();
    let out = vcfed(&["status", "--config", site.config_arg()]);
    let err = stderr(&out);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

#[test]
fn the_demo_help_says_what_the_demo_does() {
    let out = vcfed(&["demo", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("three sites"), "{text}");
    assert!(!text.contains("demo of one site"), "{text}");
}

#[test]
fn completions_and_the_man_page_cover_every_command() {
    let bash = vcfed(&["completions", "bash"]);
    let script = String::from_utf8_lossy(&bash.stdout);
    assert!(
        bash.status.success(),
        "{}",
        String::from_utf8_lossy(&bash.stderr)
    );
    assert!(script.contains("_vcfed()"), "{script}");
    assert!(script.contains("complete -F _vcfed"), "{script}");
    let zsh = vcfed(&["completions", "zsh"]);
    assert!(String::from_utf8_lossy(&zsh.stdout).starts_with("#compdef vcfed"));
    let unknown = vcfed(&["completions", "cmd.exe"]);
    assert_eq!(
        unknown.status.code(),
        Some(2),
        "an unknown shell is bad usage"
    );

    let man = vcfed(&["man"]);
    let page = String::from_utf8_lossy(&man.stdout);
    assert!(
        man.status.success(),
        "{}",
        String::from_utf8_lossy(&man.stderr)
    );
    assert!(page.contains(".TH vcfed 1"), "{page}");
    for command in [
        "init",
        "run",
        "status",
        "cluster",
        "reservation",
        "sites",
        "simnet",
    ] {
        assert!(script.contains(command), "completions lack {command}");
        assert!(page.contains(command), "the man page lacks {command}");
    }
}

/// Under systemd (`Type=notify`): the agent says READY=1 once it serves,
/// RELOADING=1 then READY=1 around a SIGHUP, and STOPPING=1 on SIGTERM, on
/// the socket `NOTIFY_SOCKET` names.
#[test]
fn the_agent_tells_systemd_when_it_is_ready_reloading_and_stopping() {
    let site = Site::init("site-a", 2);
    let socket_path = site.dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let log = std::fs::File::create(site.dir.path().join("agent.log")).unwrap();
    let child = std::process::Command::new(common::vcfed_bin())
        .args(["run", "--config", site.config_arg()])
        .env_remove("VCFED_CONFIG")
        .env("NOTIFY_SOCKET", &socket_path)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut agent = common::Agent {
        child: Some(child),
        log_path: site.dir.path().join("agent.log"),
    };
    let next = || {
        let mut buffer = [0u8; 4096];
        let n = socket
            .recv(&mut buffer)
            .expect("a notification within 30 s");
        String::from_utf8_lossy(&buffer[..n]).into_owned()
    };
    let ready = next();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    assert!(ready.contains("STATUS=site site-a, API on "), "{ready}");
    // It serves by then.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(common::wait_ready(&site.client()));

    common::signal(agent.pid(), "HUP");
    assert_eq!(next().trim(), "RELOADING=1");
    assert_eq!(next().trim(), "READY=1");
    common::signal(agent.pid(), "TERM");
    assert_eq!(next().trim(), "STOPPING=1");
    assert!(agent.wait(Duration::from_secs(30)).success());
}

/// The systemd unit in the repository is one systemd accepts, with the
/// binary under test in place of the installed one.
#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/vcfed.service"
    ))
    .unwrap();
    assert!(unit.contains("Type=notify"));
    assert!(unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    let has_analyze = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok();
    if !has_analyze {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "systemd-analyze is missing in CI"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vcfed.service");
    std::fs::write(&path, unit.replace("/usr/bin/vcfed", common::vcfed_bin())).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        stderr(&out)
    );
}

/// One exit-code rule: 2 for what the user typed wrong, the agent's own
/// refusals of a request as invalid included; 1 for what went wrong
/// otherwise (here: not enough capacity in the federation).
#[test]
fn requests_the_agent_refuses_as_invalid_exit_2_and_other_failures_1() {
    let site = Site::init("site-a", 2);
    let _agent = site.spawn();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(common::wait_ready(&site.client()));
    let config = site.config_arg();
    // Invalid at the agent: a node count of 0.
    let out = vcfed(&[
        "cluster",
        "create",
        "--config",
        config,
        "--name",
        "x",
        "--nodes",
        "0",
        "--duration",
        "1h",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("at least 1 node"), "{}", stderr(&out));
    // Valid, but the federation (this one site) has no room for it.
    let out = vcfed(&[
        "cluster",
        "create",
        "--config",
        config,
        "--name",
        "x",
        "--nodes",
        "50",
        "--duration",
        "1h",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("insufficient_capacity"),
        "{}",
        stderr(&out)
    );
    // With --json, the error is JSON on stdout too.
    let out = vcfed(&["cluster", "show", "nope", "--json", "--config", config]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let error: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(error["error"]["status"], 404, "{error}");
    assert_eq!(error["error"]["code"], "not_found", "{error}");
    assert_eq!(error["error"]["exit"], 2, "{error}");
    assert!(
        error["error"]["message"].as_str().unwrap().contains("nope"),
        "{error}"
    );
    // Nothing the agent logged to a file (not a terminal) is coloured.
    let log = std::fs::read_to_string(site.dir.path().join("agent.log")).unwrap();
    assert!(!log.contains('\u{1b}'), "ANSI escapes in a log file: {log}");
}

/// The manual page and shell completions the Debian package ships
/// (`node/agent/share/`) are what the binary generates: regenerate them
/// with `vcfed man > node/agent/share/vcfed.1` and `vcfed completions SHELL`
/// when the CLI changes.
#[test]
fn the_packaged_manual_page_and_completions_are_current() {
    let share = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("share");
    for (args, file) in [
        (&["man"][..], "vcfed.1"),
        (&["completions", "bash"], "completions/vcfed.bash"),
        (&["completions", "zsh"], "completions/_vcfed"),
        (&["completions", "fish"], "completions/vcfed.fish"),
    ] {
        let out = vcfed(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let packaged = std::fs::read_to_string(share.join(file)).unwrap();
        assert!(
            packaged == String::from_utf8_lossy(&out.stdout),
            "node/agent/share/{file} is stale: regenerate it with `vcfed {}`",
            args.join(" ")
        );
    }
}

/// With `--json`, an error without an agent's answer is JSON too.
#[test]
fn json_errors_are_json() {
    let site = Site::init("site-a", 2);
    // No agent runs.
    let out = vcfed(&["status", "--json", "--config", site.config_arg()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let error: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(error["error"]["exit"], 1);
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot reach the vcfed agent"),
        "{error}"
    );
    // Without --json, stdout stays empty.
    let out = vcfed(&["status", "--config", site.config_arg()]);
    assert!(out.stdout.is_empty());
}

/// `vcfed events`: the log, one cluster's part of it, and `--follow`.
#[test]
fn events_show_the_log_a_clusters_part_of_it_and_follow_it() {
    let site = Site::init("site-a", 8);
    let _agent = site.spawn();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(common::wait_ready(&site.client()));
    let config = site.config_arg();
    let create = |name: &str| {
        let out = vcfed(&[
            "cluster",
            "create",
            "--config",
            config,
            "--name",
            name,
            "--nodes",
            "1",
            "--duration",
            "1h",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
    };
    create("one");
    create("two");
    let id_of = |name: &str| {
        let out = vcfed(&["cluster", "show", name, "--json", "--config", config]);
        let detail: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        detail["id"].as_str().unwrap().to_owned()
    };
    let (one, two) = (id_of("one"), id_of("two"));

    let events = |args: &[&str]| -> Vec<serde_json::Value> {
        let mut all = vec!["events", "--json", "--config", config];
        all.extend_from_slice(args);
        let out = vcfed(&all);
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let all = events(&[]);
    let of_one = events(&["--cluster", "one"]);
    assert!(!of_one.is_empty() && of_one.len() < all.len(), "{of_one:?}");
    let about = |e: &serde_json::Value, id: &str| {
        let subject = e["subject"].as_str().unwrap();
        subject == id || subject.starts_with(&format!("{id}/")) || e["detail"]["cluster"] == id
    };
    assert!(of_one.iter().all(|e| about(e, &one)), "{of_one:?}");
    assert!(all.iter().any(|e| about(e, &two)));
    assert_eq!(events(&["--last", "1"]).len(), 1);
    // A cluster it does not know: exit 2.
    let out = vcfed(&["events", "--cluster", "nope", "--config", config]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    // --follow prints what happens next.
    let mut follow = std::process::Command::new(common::vcfed_bin())
        .args([
            "events", "--follow", "--json", "--last", "0", "--config", config,
        ])
        .env_remove("VCFED_CONFIG")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(700));
    create("three");
    let three = id_of("three");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut seen = false;
    while !seen && std::time::Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
            let event: serde_json::Value = serde_json::from_str(&line).unwrap();
            seen = about(&event, &three);
        }
    }
    common::signal(follow.id(), "TERM");
    let status = follow.wait().unwrap();
    assert!(seen, "no event of the new cluster while following");
    assert!(status.success(), "{status}");
}

/// `-c/--config` goes before or after the subcommand, and VCFED_CONFIG
/// stands in for it; `init -c` writes where it is told.
#[test]
fn the_config_flag_is_global() {
    let site = Site::init("site-a", 2);
    let _agent = site.spawn();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(common::wait_ready(&site.client()));
    for args in [
        vec!["-c", site.config_arg(), "status"],
        vec!["--config", site.config_arg(), "cluster", "list"],
        vec!["status", "-c", site.config_arg()],
    ] {
        let out = vcfed(&args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
    let out = std::process::Command::new(common::vcfed_bin())
        .arg("status")
        .env("VCFED_CONFIG", site.config_arg())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    let dir = tempfile::tempdir().unwrap();
    let elsewhere = dir.path().join("elsewhere.toml");
    let out = vcfed(&[
        "-c",
        elsewhere.to_str().unwrap(),
        "init",
        "--site",
        "site-b",
        "--data-dir",
        dir.path().join("data").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(elsewhere.exists());
    assert!(!dir.path().join("data/vcfed.toml").exists());
}

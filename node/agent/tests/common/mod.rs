//! Helpers shared by the agent's integration tests: sites in temporary
//! directories, agent processes that are always killed, polling with bounds.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vcfed::client::ApiClient;
use vcfed::config::Config;

/// The `vcfed` binary under test.
pub(crate) fn vcfed_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vcfed")
}

/// Runs `vcfed args...` to completion.
pub(crate) fn vcfed(args: &[&str]) -> Output {
    Command::new(vcfed_bin())
        .args(args)
        .env_remove("VCFED_CONFIG")
        .env_remove("RUST_LOG")
        .output()
        .expect("the vcfed binary runs")
}

/// A site initialised in its own temporary directory.
pub(crate) struct Site {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

impl Site {
    /// `vcfed init` of a site with `nodes` node slots and its API on a free
    /// loopback port.
    pub(crate) fn init(name: &str, nodes: u32) -> Site {
        Site::init_with(name, nodes, "/ip4/127.0.0.1/tcp/0", &[])
    }

    /// `vcfed init` with a federation listen address and more flags.
    pub(crate) fn init_with(name: &str, nodes: u32, listen: &str, extra: &[&str]) -> Site {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let data_dir = dir.path().join("data");
        let api = format!("127.0.0.1:{}", free_port());
        let nodes = nodes.to_string();
        let mut args = vec![
            "init",
            "--site",
            name,
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--api-listen",
            &api,
            "--listen",
            listen,
            "--nodes",
            &nodes,
        ];
        args.extend_from_slice(extra);
        let out = vcfed(&args);
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Site {
            config_path: data_dir.join("vcfed.toml"),
            dir,
        }
    }

    /// Adds lines to the `[federation]` table of the site's config.
    pub(crate) fn add_federation_settings(&self, lines: &str) {
        let text = std::fs::read_to_string(&self.config_path).unwrap();
        let text = text.replacen("[federation]\n", &format!("[federation]\n{lines}\n"), 1);
        std::fs::write(&self.config_path, text).unwrap();
    }

    /// Adds lines to the `[clusters]` table of the site's config.
    pub(crate) fn add_clusters_settings(&self, lines: &str) {
        let text = std::fs::read_to_string(&self.config_path).unwrap();
        let text = text.replacen("[clusters]\n", &format!("[clusters]\n{lines}\n"), 1);
        std::fs::write(&self.config_path, text).unwrap();
    }

    pub(crate) fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub(crate) fn config(&self) -> Config {
        Config::load(&self.config_path).expect("the site's config loads")
    }

    pub(crate) fn config_arg(&self) -> &str {
        self.config_path.to_str().unwrap()
    }

    /// Starts `vcfed run` for this site; stderr goes to `agent.log`.
    pub(crate) fn spawn(&self) -> Agent {
        spawn_agent(&self.config_path, self.dir.path().join("agent.log"))
    }

    pub(crate) fn client(&self) -> ApiClient {
        vcfed::cli::client_from_config(&self.config()).expect("a client for the site")
    }
}

/// Starts `vcfed run --config config`; stderr goes to `log_path`.
pub(crate) fn spawn_agent(config: &Path, log_path: PathBuf) -> Agent {
    let log = std::fs::File::create(&log_path).expect("the log file opens");
    let child = Command::new(vcfed_bin())
        .arg("run")
        .arg("--config")
        .arg(config)
        .env_remove("VCFED_CONFIG")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("vcfed run starts");
    Agent {
        child: Some(child),
        log_path,
    }
}

/// An agent process, SIGKILLed on drop if still running.
pub(crate) struct Agent {
    pub child: Option<Child>,
    pub log_path: PathBuf,
}

impl Agent {
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().expect("the agent runs").id()
    }

    /// Sends SIGTERM and waits (bounded) for the exit.
    pub(crate) fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        signal(self.pid(), "TERM");
        self.wait(within)
    }

    /// Sends SIGKILL and reaps the process.
    pub(crate) fn kill(&mut self) {
        let mut child = self.child.take().expect("the agent runs");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Waits at most `within` for the process to exit.
    pub(crate) fn wait(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut().expect("the agent runs");
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit within {within:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits at most `within` until the log holds `needle` `count` times;
    /// fails at once if the agent exits meanwhile.
    pub(crate) fn wait_for_log(&mut self, needle: &str, count: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if self.log().matches(needle).count() >= count {
                return;
            }
            let child = self.child.as_mut().expect("the agent runs");
            if let Some(status) = child.try_wait().expect("try_wait") {
                panic!(
                    "agent exited ({status}) before logging {needle:?}; log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the log within {within:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends a signal by name with kill(1).
pub(crate) fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{name} {pid} failed");
}

/// A loopback port that is free for TCP and UDP, for an agent to bind soon.
///
/// Ports come from below the kernel's ephemeral range, so that no `bind` to
/// port 0 and no outgoing connection (of this or a concurrent test) can take
/// one between this check and the agent's own bind; a counter shared by the
/// tests of one binary keeps them from handing out a port twice, and the
/// process id spreads concurrent binaries apart.
pub(crate) fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (first, count) = (10_000, ephemeral_low.saturating_sub(10_000).min(20_000));
    assert!(
        count >= 1000,
        "the ephemeral port range starts at {ephemeral_low}: no room below it for test ports"
    );
    let start = std::process::id().wrapping_mul(7919) % count;
    for _ in 0..count {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(first + (start + n) % count).unwrap();
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {first}..{}", first + count);
}

/// Waits until the agent answers, at most 15 s.
pub(crate) async fn wait_ready(client: &ApiClient) {
    if let Err(e) = try_wait_ready(client).await {
        panic!("{e}");
    }
}

/// Like [`wait_ready`], with the failure as a value.
pub(crate) async fn try_wait_ready(client: &ApiClient) -> Result<(), String> {
    match tokio::time::timeout(
        Duration::from_secs(15),
        vcfed::demo::local::wait_ready(client),
    )
    .await
    {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("the agent does not answer: {e:#}")),
        Err(_) => Err("the agent does not answer within 15 s".to_owned()),
    }
}

/// Text of a process's stderr.
pub(crate) fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub(crate) fn exists(path: &Path) -> bool {
    path.exists()
}

/// A running agent with its site and API client.
pub(crate) struct Member {
    pub site: Site,
    pub agent: Option<Agent>,
    pub client: ApiClient,
    pub peer_id: String,
}

/// Starts the agent of `site` and waits until its API answers.
pub(crate) async fn start(site: Site) -> Member {
    let mut agent = site.spawn();
    let client = site.client();
    if let Err(e) = try_wait_ready(&client).await {
        let exit = agent
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        panic!("{e} (exit: {exit:?}); its log:\n{}", agent.log());
    }
    let info: vcfed::api::SiteInfo = client.get("/v1/site").await.unwrap();
    Member {
        site,
        agent: Some(agent),
        client,
        peer_id: info.peer_id,
    }
}

/// The federation view of one agent.
pub(crate) async fn view(client: &ApiClient) -> vcfed::federation::SitesReport {
    client.get("/v1/sites").await.unwrap()
}

/// Polls `check` every 100 ms until it holds or `within` passes; returns
/// how long it took.
pub(crate) async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Gossip timing for test federations (short, so tests are quick).
pub(crate) const FAST_GOSSIP: &str =
    "advert_ttl = \"3s\"\nadvert_refresh = \"1s\"\nanti_entropy = \"500ms\"";

/// Starts a federation of sites `(name, nodes)` on loopback, every site
/// bootstrapped from the first, and waits until every agent sees all of
/// them alive.
pub(crate) async fn start_federation(specs: &[(&str, u32)]) -> Vec<Member> {
    start_federation_with(specs, "").await
}

/// [`start_federation`] with `clusters` added to every site's `[clusters]`.
pub(crate) async fn start_federation_with(specs: &[(&str, u32)], clusters: &str) -> Vec<Member> {
    let port = free_port();
    let first = Site::init_with(
        specs[0].0,
        specs[0].1,
        &format!("/ip4/127.0.0.1/tcp/{port}"),
        &[],
    );
    first.add_federation_settings(FAST_GOSSIP);
    first.add_clusters_settings(clusters);
    let first = start(first).await;
    let bootstrap = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{}", first.peer_id);
    let mut members = vec![first];
    for (name, nodes) in &specs[1..] {
        let listen = format!("/ip4/127.0.0.1/tcp/{}", free_port());
        let site = Site::init_with(name, *nodes, &listen, &["--bootstrap", &bootstrap]);
        site.add_federation_settings(FAST_GOSSIP);
        site.add_clusters_settings(clusters);
        members.push(start(site).await);
    }
    let count = members.len();
    eventually(
        "every agent sees every site",
        Duration::from_secs(20),
        || async {
            for member in &members {
                let report = view(&member.client).await;
                let alive = report
                    .sites
                    .iter()
                    .filter(|s| s.state == vcfed_registry::SiteState::Alive)
                    .count();
                if alive != count {
                    return false;
                }
            }
            true
        },
    )
    .await;
    members
}

/// The samples of an OpenMetrics text exposition, by `name{labels}`, after
/// checking every line: `# HELP`, `# TYPE` and `# UNIT` lines of the family
/// named, samples of a family whose type was declared, and `# EOF` last.
pub(crate) fn parse_exposition(text: &str) -> std::collections::BTreeMap<String, f64> {
    let mut families = std::collections::BTreeMap::<String, String>::new();
    let mut helped = std::collections::BTreeSet::<String>::new();
    let mut samples = std::collections::BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "the exposition ends in # EOF");
    let is_name = |name: &str| {
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !name.starts_with(|c: char| c.is_ascii_digit())
    };
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap();
            assert!(is_name(name) && !help.is_empty(), "{line}");
            helped.insert(name.to_owned());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(is_name(name), "{line}");
            assert!(["counter", "gauge"].contains(&kind), "{line}");
            assert!(helped.contains(name), "TYPE before HELP: {line}");
            families.insert(name.to_owned(), kind.to_owned());
        } else if let Some(rest) = line.strip_prefix("# UNIT ") {
            let (name, unit) = rest.split_once(' ').unwrap();
            assert!(name.ends_with(&format!("_{unit}")), "{line}");
        } else {
            assert!(!line.starts_with('#'), "unexpected comment: {line}");
            let (series, value) = line.rsplit_once(' ').unwrap();
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value: {line}"));
            let name = series.split('{').next().unwrap();
            assert!(is_name(name), "{line}");
            if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
                let labels = labels.strip_prefix('{').unwrap().strip_suffix('}').unwrap();
                for label in labels.split(',') {
                    let (key, quoted) = label.split_once('=').unwrap();
                    assert!(is_name(key), "{line}");
                    assert!(quoted.starts_with('"') && quoted.ends_with('"'), "{line}");
                }
            }
            let family = match families.get(name) {
                Some(_) => name,
                None => name.strip_suffix("_total").unwrap_or(name),
            };
            let kind = families
                .get(family)
                .unwrap_or_else(|| panic!("no # TYPE for {line}"));
            if kind == "counter" {
                assert!(
                    name.ends_with("_total"),
                    "a counter's sample ends in _total: {line}"
                );
                assert!(value >= 0.0, "{line}");
            }
            assert!(name.starts_with("vcfed_"), "{line}");
            assert!(
                samples.insert(series.to_owned(), value).is_none(),
                "a repeated series: {line}"
            );
        }
    }
    samples
}

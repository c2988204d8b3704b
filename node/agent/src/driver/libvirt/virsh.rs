//! `virsh`, the libvirt client, as the driver runs it: one command per
//! call against one connection URI, with a bounded run time, and the few
//! outputs the driver reads parsed here (so they are tested without a
//! libvirtd).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::driver::DriverError;

/// How long one `virsh` call may take before it is killed.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A libvirt connection: `virsh -c URI`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Virsh {
    /// The connection URI.
    pub(super) uri: String,
}

impl Virsh {
    /// Runs `virsh -c URI ARGS`, returning its stdout, or an error that
    /// carries virsh's own message.
    pub(super) fn run(&self, args: &[&str]) -> Result<String, DriverError> {
        let command = format!("virsh -c {} {}", self.uri, args.join(" "));
        let mut child = Command::new("virsh")
            .arg("-q")
            .args(["-c", &self.uri])
            // Its answers are parsed: untranslated.
            .env("LC_ALL", "C")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| DriverError::Command {
                command: command.clone(),
                detail: if e.kind() == std::io::ErrorKind::NotFound {
                    "virsh is not installed (Debian: apt-get install libvirt-clients)".to_owned()
                } else {
                    e.to_string()
                },
            })?;
        // Read both pipes on their own threads so neither fills up.
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let out = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text);
            text
        });
        let err = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().map_err(|e| DriverError::Command {
                command: command.clone(),
                detail: e.to_string(),
            })? {
                break status;
            }
            if started.elapsed() > CALL_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(DriverError::Command {
                    command,
                    detail: format!("no answer within {} s", CALL_TIMEOUT.as_secs()),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let out = out.join().unwrap_or_default();
        let err = err.join().unwrap_or_default();
        if !status.success() {
            return Err(DriverError::Command {
                command,
                detail: virsh_error(&err),
            });
        }
        Ok(out)
    }

    /// Whether this connection reaches a hypervisor on another machine
    /// (the URI names a host), so that its VMs cannot sit on this
    /// machine's bridges.
    pub(super) fn is_remote(&self) -> bool {
        uri_host(&self.uri).is_some()
    }

    /// Whether this is libvirt's built-in fake hypervisor (`test://`),
    /// which runs nothing.
    pub(super) fn is_fake(&self) -> bool {
        self.uri.starts_with("test:")
    }
}

/// The host a libvirt URI names, if any (`qemu+ssh://root@hv2:22/system`
/// → `hv2`).
pub(super) fn uri_host(uri: &str) -> Option<&str> {
    let rest = uri.split_once("://")?.1;
    let authority = rest.split('/').next().unwrap_or_default();
    let host = authority.rsplit('@').next().unwrap_or_default();
    let host = host.split(':').next().unwrap_or_default();
    (!host.is_empty()).then_some(host)
}

/// virsh's own message from its stderr: `error: ...` lines, without the
/// prefix, joined.
pub(super) fn virsh_error(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .map(|l| l.strip_prefix("error: ").unwrap_or(l))
        .collect();
    if lines.is_empty() {
        "failed without a message".to_owned()
    } else {
        lines.join(": ")
    }
}

/// What `virsh nodeinfo` says of a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct NodeInfo {
    /// CPUs.
    pub(super) cpus: u32,
    /// Memory, MiB.
    pub(super) memory_mib: u64,
}

/// Parses `virsh nodeinfo`.
pub(super) fn parse_nodeinfo(text: &str) -> Option<NodeInfo> {
    let mut cpus = None;
    let mut memory_kib = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "CPU(s)" => cpus = value.parse().ok(),
            "Memory size" => {
                memory_kib = value
                    .strip_suffix("KiB")
                    .and_then(|v| v.trim().parse::<u64>().ok());
            }
            _ => {}
        }
    }
    Some(NodeInfo {
        cpus: cpus?,
        memory_mib: memory_kib? / 1024,
    })
}

/// A domain's state as `virsh domstate --reason` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DomState {
    /// `running`, `paused`, `shut off`, `crashed`, ...
    pub(super) state: String,
    /// Why, as libvirt says (`booted`, `destroyed`, `crashed`, `unknown`).
    pub(super) reason: String,
}

impl DomState {
    /// Whether the VM runs.
    pub(super) fn is_running(&self) -> bool {
        self.state == "running"
    }
}

/// Parses `virsh domstate --reason` (`running (booted)`).
pub(super) fn parse_domstate(text: &str) -> DomState {
    let text = text.trim();
    match text.split_once(" (") {
        Some((state, reason)) => DomState {
            state: state.to_owned(),
            reason: reason.trim_end_matches(')').to_owned(),
        },
        None => DomState {
            state: text.to_owned(),
            reason: String::new(),
        },
    }
}

/// The names in a `virsh list --name` or `vol-list` style output: one per
/// line, first column.
pub(super) fn parse_names(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// The `type` attribute of the root element of a libvirt XML document
/// (`<pool type='dir'>` → `dir`).
pub(super) fn root_type(xml: &str) -> Option<&str> {
    let start = xml.find('<')?;
    let end = start + xml[start..].find('>')?;
    let tag = &xml[start..end];
    let at = tag.find("type=")? + "type=".len();
    let quote = tag[at..].chars().next()?;
    let rest = &tag[at + 1..];
    Some(&rest[..rest.find(quote)?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_uris() {
        assert_eq!(uri_host("qemu:///system"), None);
        assert_eq!(uri_host("test:///default"), None);
        assert_eq!(uri_host("qemu+ssh://root@hv2:22/system"), Some("hv2"));
        assert_eq!(
            uri_host("qemu+tls://hv3.example/system?no_verify=1"),
            Some("hv3.example")
        );
        assert!(
            Virsh {
                uri: "test:///default".into()
            }
            .is_fake()
        );
        assert!(
            !Virsh {
                uri: "qemu:///system".into()
            }
            .is_remote()
        );
    }

    #[test]
    fn virsh_outputs_parse() {
        let info = "CPU model:           x86_64\nCPU(s):              2\nCPU frequency:       2000 MHz\nMemory size:         24576000 KiB\n";
        assert_eq!(
            parse_nodeinfo(info),
            Some(NodeInfo {
                cpus: 2,
                memory_mib: 24000
            })
        );
        assert_eq!(parse_nodeinfo("nothing"), None);
        assert_eq!(
            parse_domstate("running (booted)\n"),
            DomState {
                state: "running".into(),
                reason: "booted".into()
            }
        );
        assert_eq!(parse_domstate("shut off (destroyed)").state, "shut off");
        assert!(!parse_domstate("paused (unknown)").is_running());
        assert_eq!(parse_names("a\n\nb  x\n"), vec!["a", "b"]);
        assert_eq!(root_type("<pool type='dir'>\n<name>p</name>"), Some("dir"));
        assert_eq!(root_type("<pool type=\"logical\">"), Some("logical"));
        assert_eq!(
            virsh_error("error: failed to connect\nerror: Connection refused\n"),
            "failed to connect: Connection refused"
        );
    }
}

/// One row of `virsh list --all`: a domain's name and state.
pub(super) fn parse_list(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let _id = words.next()?;
            let name = words.next()?;
            let state = words.collect::<Vec<_>>().join(" ");
            Some((name.to_owned(), state))
        })
        .collect()
}

#[cfg(test)]
mod list_tests {
    use super::*;

    #[test]
    fn list_rows_parse() {
        let text = " 3    vcf-a-b-1   running\n -    vcf-a-b-2   shut off\n\n";
        assert_eq!(
            parse_list(text),
            vec![
                ("vcf-a-b-1".to_owned(), "running".to_owned()),
                ("vcf-a-b-2".to_owned(), "shut off".to_owned())
            ]
        );
    }
}

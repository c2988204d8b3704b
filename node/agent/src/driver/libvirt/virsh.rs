//! `virsh`, the libvirt client, as the driver runs it: one long-lived
//! `virsh` shell per host, so that every call reuses its connection (no
//! process, ssh session or TLS handshake per call, and the state of
//! libvirt's `test://` hypervisor lives as long as the driver), with a
//! bounded time per call; and the few outputs the driver reads, parsed
//! here (so they are tested without a libvirtd).
//!
//! The shell reads commands on stdin and writes answers and errors to one
//! pipe. After each command the client sends `echo <marker>`: what comes
//! before the marker's echo is the command's answer, `error:` lines in it
//! its failure. A shell that does not answer in time, or dies, is killed
//! and started again at the next call.

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::driver::DriverError;

/// How long one call may take before its shell is killed.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// The prompt the shell writes before it reads a command.
const PROMPT: &str = "virsh # ";

/// A libvirt connection: a `virsh -c URI` shell.
#[derive(Debug)]
pub(crate) struct Virsh {
    /// The connection URI.
    pub(super) uri: String,
    shell: Mutex<Option<Shell>>,
}

/// A running `virsh` shell.
#[derive(Debug)]
struct Shell {
    child: Child,
    stdin: ChildStdin,
    /// What it writes (answers and errors), as it comes.
    output: Receiver<Vec<u8>>,
    /// Written and not yet taken by a call.
    pending: String,
    /// Number of the last marker sent.
    calls: u64,
}

impl Drop for Shell {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Shell {
    fn start(uri: &str) -> Result<Shell, String> {
        let (reader, writer) = std::io::pipe().map_err(|e| e.to_string())?;
        let errors = writer.try_clone().map_err(|e| e.to_string())?;
        let mut child = Command::new("virsh")
            .arg("-q")
            .args(["-c", uri])
            // Its answers are parsed: untranslated.
            .env("LC_ALL", "C")
            .stdin(Stdio::piped())
            .stdout(writer)
            .stderr(errors)
            .spawn()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    "virsh is not installed (Debian: apt-get install libvirt-clients)".to_owned()
                } else {
                    e.to_string()
                }
            })?;
        let stdin = child.stdin.take().expect("piped");
        let (tx, output) = channel();
        std::thread::spawn(move || {
            let mut reader = reader;
            let mut buffer = [0u8; 8192];
            // Ends when the shell exits (the pipe's last writer closes).
            while let Ok(n) = reader.read(&mut buffer) {
                if n == 0 || tx.send(buffer[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Ok(Shell {
            child,
            stdin,
            output,
            pending: String::new(),
            calls: 0,
        })
    }

    /// Sends one command and returns what the shell wrote for it.
    fn call(&mut self, line: &str, deadline: Instant) -> Result<String, String> {
        self.calls += 1;
        let marker = format!("VCFED-END-{}", self.calls);
        let request = format!("{line}\necho {marker}\n");
        self.stdin
            .write_all(request.as_bytes())
            .and_then(|()| self.stdin.flush())
            .map_err(|e| format!("the virsh shell is gone: {e}"))?;
        // The shell echoes each command line after its prompt; the marker's
        // own answer follows the echo of `echo <marker>`.
        let end = format!("{PROMPT}echo {marker}\n{marker}");
        loop {
            if let Some(at) = self.pending.find(&end) {
                let answer = self.pending[..at].to_owned();
                self.pending.drain(..at + end.len());
                return Ok(strip_echo(&answer, line));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok(bytes) => self.pending.push_str(&String::from_utf8_lossy(&bytes)),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("no answer within {} s", CALL_TIMEOUT.as_secs()));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!(
                        "virsh exited: {}",
                        self.pending
                            .trim()
                            .lines()
                            .last()
                            .unwrap_or("without a message")
                    ));
                }
            }
        }
    }
}

/// A command's answer without the shell's prompt and its echo of the
/// command line.
fn strip_echo(answer: &str, line: &str) -> String {
    let answer = answer.strip_prefix(PROMPT).unwrap_or(answer);
    let answer = answer
        .strip_prefix(line)
        .and_then(|rest| rest.strip_prefix('\n'))
        .unwrap_or(answer);
    answer.to_owned()
}

/// One argument as the virsh shell reads it: in double quotes, with `\`
/// and `"` escaped. A newline cannot be sent.
fn quote(arg: &str) -> Result<String, String> {
    if arg.contains('\n') || arg.contains('\r') {
        return Err(format!("{arg:?}: a newline in an argument"));
    }
    Ok(format!(
        "\"{}\"",
        arg.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}

impl Virsh {
    /// A connection to `uri`; its shell starts at the first call.
    pub(crate) fn new(uri: &str) -> Virsh {
        Virsh {
            uri: uri.to_owned(),
            shell: Mutex::new(None),
        }
    }

    /// Runs one virsh command (`ARGS`), returning its answer, or an error
    /// that carries virsh's own message.
    pub(crate) fn run(&self, args: &[&str]) -> Result<String, DriverError> {
        let command = format!("virsh -c {} {}", self.uri, args.join(" "));
        let failed = |detail: String| DriverError::Command {
            command: command.clone(),
            detail,
        };
        let line = args
            .iter()
            .map(|arg| quote(arg))
            .collect::<Result<Vec<_>, _>>()
            .map_err(&failed)?
            .join(" ");
        let mut shell = self.shell.lock().unwrap_or_else(PoisonError::into_inner);
        if shell.is_none() {
            *shell = Some(Shell::start(&self.uri).map_err(&failed)?);
        }
        let answer = shell
            .as_mut()
            .expect("started above")
            .call(&line, Instant::now() + CALL_TIMEOUT);
        let answer = match answer {
            Ok(answer) => answer,
            Err(detail) => {
                // Killed; the next call starts a new one.
                *shell = None;
                return Err(failed(detail));
            }
        };
        let (errors, out): (Vec<&str>, Vec<&str>) =
            answer.lines().partition(|l| l.starts_with("error: "));
        if !errors.is_empty() {
            return Err(failed(virsh_error(&errors.join("\n"))));
        }
        Ok(out.join("\n"))
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
pub(crate) fn parse_names(text: &str) -> Vec<String> {
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
        assert!(Virsh::new("test:///default").is_fake());
        assert!(!Virsh::new("qemu:///system").is_remote());
    }

    /// The shell against libvirt's built-in fake hypervisor, which needs
    /// no daemon (only virsh): answers, errors, quoting, and state kept
    /// between calls.
    #[test]
    fn a_shell_answers_call_after_call_on_one_connection() {
        if std::process::Command::new("virsh")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "virsh is missing in CI"
            );
            return;
        }
        let virsh = Virsh::new("test:///default");
        let info = parse_nodeinfo(&virsh.run(&["nodeinfo"]).unwrap()).unwrap();
        assert!(info.cpus > 0);
        let error = virsh
            .run(&["domstate", "no such \"vm\""])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("failed to get domain 'no such \"vm\"'"),
            "{error}"
        );
        // State lives as long as the shell: the fake host's own domain is
        // destroyed, and stays so at the next call.
        virsh.run(&["destroy", "test"]).unwrap();
        assert_eq!(
            parse_domstate(&virsh.run(&["domstate", "test"]).unwrap()).state,
            "shut off"
        );
        assert_eq!(virsh.run(&["echo", "a b", "c"]).unwrap(), "a b c");
        assert!(virsh.run(&["echo", "x\ny"]).is_err());
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

/// The capacity in `virsh vol-info --bytes` (`Capacity: 1073741824 bytes`).
pub(super) fn parse_capacity(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.trim().strip_prefix("Capacity:"))
        .and_then(|rest| rest.trim().strip_suffix("bytes"))
        .and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod capacity_tests {
    use super::*;

    #[test]
    fn capacities_parse() {
        let info = "Name:           unit:0:0:1\nType:           network\nCapacity:       1073741824 bytes\nAllocation:     1073741824 bytes\n";
        assert_eq!(parse_capacity(info), Some(1 << 30));
        assert_eq!(parse_capacity("Capacity: 1.00 GiB"), None);
    }
}

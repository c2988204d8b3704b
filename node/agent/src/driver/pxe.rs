//! What a cluster's frontend serves to machines that network-boot with
//! iPXE (the boot ROM of QEMU's NICs), and what they print on their serial
//! console while they run it: the frontend writes [`BOOT_SCRIPT`], the
//! libvirt driver reads the console with [`console_state`]. Both sides of
//! that contract are here, so they cannot drift apart.
//!
//! The script fetches the install file the netns nodes fetch (over TFTP,
//! from the server DHCP named) and says so in lines that start with
//! [`MARKER`]; then it idles until the node is stopped.

use std::net::Ipv4Addr;

use crate::driver::NodeState;

/// File name of the iPXE script in the frontend's TFTP root.
pub const BOOT_SCRIPT: &str = "boot.ipxe";
/// DHCP option 175 is sent by iPXE only: the frontend gives the script to
/// those clients and the plain install file to everyone else.
pub const IPXE_OPTION: u8 = 175;
/// Start of every line the script prints for the driver.
pub const MARKER: &str = "VCFED-NODE";
/// What a frontend image prints on its serial console once it serves the
/// cluster network (libvirt driver, `frontend_image`).
pub const FRONTEND_MARKER: &str = "VCFED-FRONTEND serving";

/// Whether a frontend image said it serves (anywhere in a line: the
/// firmware's own text may precede it on the same line).
pub fn frontend_serving(console: &str) -> bool {
    console.lines().any(|line| line.contains(FRONTEND_MARKER))
}

/// The iPXE script: ask the frontend's installer what to boot (the
/// installer, or this node's own disk once it is installed: `exit` hands
/// the boot back to the firmware, which boots the disk); a frontend
/// without one has the node fetch `install_file` over TFTP instead.
pub fn boot_script(install_file: &str) -> String {
    format!(
        "#!ipxe\n\
         echo {MARKER} leased ${{net0/ip}} ${{next-server}} ${{net0/mac}}\n\
         chain http://${{next-server}}/cgi-bin/boot?mac=${{net0/mac:hexhyp}} && exit ||\n\
         imgfetch tftp://${{next-server}}/{install_file} || goto failed\n\
         imgstat\n\
         echo {MARKER} installed ${{net0/ip}} ${{next-server}}\n\
         :idle\n\
         sleep 3600\n\
         goto idle\n\
         :failed\n\
         echo {MARKER} failed fetching {install_file} from ${{next-server}}\n\
         goto idle\n"
    )
}

/// A node's state from its serial console so far (`None`: nothing the
/// script prints yet, the VM is still in its firmware or asking for a
/// lease).
pub fn console_state(console: &str) -> Option<NodeState> {
    let mut state = None;
    for line in console.lines() {
        // A kernel resets the terminal before its first line.
        let line = strip_escapes(line);
        let Some(rest) = line.trim().strip_prefix(MARKER) else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let ip = |w: Option<&str>| w.and_then(|w| w.parse::<Ipv4Addr>().ok());
        state = match words.next() {
            Some("leased") => match (ip(words.next()), ip(words.next())) {
                (Some(ip), Some(server)) => Some(NodeState::Leased { ip, server }),
                _ => state,
            },
            Some("installing") => match (ip(words.next()), ip(words.next()), words.next()) {
                (Some(ip), Some(server), Some(bytes)) => bytes
                    .parse()
                    .ok()
                    .map(|bytes| NodeState::Installing { ip, server, bytes })
                    .or(state),
                _ => state,
            },
            Some("up") => match ip(words.next()) {
                Some(ip) => Some(NodeState::Up { ip }),
                None => state,
            },
            Some("installed") => match (ip(words.next()), ip(words.next())) {
                (Some(ip), Some(server)) => Some(NodeState::Installed { ip, server }),
                _ => state,
            },
            Some("failed") => Some(NodeState::Failed {
                reason: words.collect::<Vec<_>>().join(" "),
            }),
            _ => state,
        };
    }
    state
}

/// Whether the VM is still in its boot firmware (the BIOS, or iPXE
/// running the boot script, which idles): nothing on it could answer an
/// ACPI shutdown. An OS that booted prints on after the script's lines.
pub fn in_firmware(console: &str) -> bool {
    let last = last_console_line(console);
    last.is_empty() || last.starts_with(MARKER) || last.contains("iPXE")
}

/// The last non-empty line of a console, without escape sequences and
/// control characters, for a failure's reason.
pub fn last_console_line(console: &str) -> String {
    console
        .lines()
        .map(strip_escapes)
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// `text` without ANSI escape sequences and control characters.
fn strip_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // A control sequence: parameters, then one final byte in @..~;
            // any other escape is two bytes (`ESC c`, a reset).
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else if !c.is_control() {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_and_the_parser_agree() {
        let script = boot_script("install.cfg");
        assert!(script.starts_with("#!ipxe\n"));
        // What iPXE prints when it runs the script, variables expanded.
        let console = "iPXE initialising devices...ok\r\n\
            tftp://198.18.7.1/boot.ipxe... ok\r\n\
            VCFED-NODE leased 198.18.7.84 198.18.7.1 02:11:22:33:44:55\r\n";
        assert_eq!(
            console_state(console),
            Some(NodeState::Leased {
                ip: "198.18.7.84".parse().unwrap(),
                server: "198.18.7.1".parse().unwrap()
            })
        );
        let installed = format!(
            "{console}install.cfg : 33 bytes\r\nVCFED-NODE installed 198.18.7.84 198.18.7.1\r\n"
        );
        assert!(matches!(
            console_state(&installed),
            Some(NodeState::Installed { .. })
        ));
        assert_eq!(console_state("Booting from ROM...\n"), None);
        // A marker line cut short (the console is read while written).
        assert_eq!(console_state("VCFED-NODE leased 198.18"), None);
        assert_eq!(
            console_state("VCFED-NODE failed fetching install.cfg from 198.18.7.1\n"),
            Some(NodeState::Failed {
                reason: "fetching install.cfg from 198.18.7.1".into()
            })
        );
        assert_eq!(
            console_state("VCFED-NODE installing 198.18.7.84 198.18.7.1 8388608\r\n"),
            Some(NodeState::Installing {
                ip: "198.18.7.84".parse().unwrap(),
                server: "198.18.7.1".parse().unwrap(),
                bytes: 8_388_608
            })
        );
        assert_eq!(
            console_state(
                "VCFED-NODE installed 198.18.7.84 198.18.7.1 9\n\u{1b}c\u{1b}[?7l\u{1b}[2JVCFED-NODE up 198.18.7.84\n"
            ),
            Some(NodeState::Up {
                ip: "198.18.7.84".parse().unwrap()
            })
        );
        for marker in ["leased", "installed", "failed"] {
            assert!(script.contains(&format!("{MARKER} {marker} ")), "{marker}");
        }
    }

    #[test]
    fn last_lines_lose_escapes() {
        assert_eq!(
            last_console_line("a\n\u{1b}[0;1miPXE 1.0\u{1b}[0m -- Open\r\n\n"),
            "iPXE 1.0 -- Open"
        );
        assert_eq!(last_console_line(""), "");
    }

    #[test]
    fn a_frontend_says_it_serves() {
        assert!(frontend_serving(
            "Booting from Hard Disk..VCFED-FRONTEND serving\r\n."
        ));
        assert!(!frontend_serving("Booting from Hard Disk..\r\n"));
    }

    #[test]
    fn firmware_is_told_from_an_os() {
        assert!(in_firmware(""));
        assert!(in_firmware(
            "Booting from ROM...\niPXE initialising devices...ok\n"
        ));
        assert!(in_firmware(
            "VCFED-NODE leased 198.18.7.84 198.18.7.1 m\nVCFED-NODE installed 198.18.7.84 198.18.7.1\n"
        ));
        assert!(!in_firmware(
            "VCFED-NODE installed 198.18.7.84 198.18.7.1\n[    0.000000] Linux version 6.1.0\nlogin:\n"
        ));
    }
}

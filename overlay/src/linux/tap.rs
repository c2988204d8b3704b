//! TAP devices: whole Ethernet frames between the kernel and the gateway.
//!
//! A TAP is opened through `/dev/net/tun` with the `TUNSETIFF` ioctl, as an
//! Ethernet device (`IFF_TAP`) without the 4-byte packet-information header
//! (`IFF_NO_PI`): every `read` returns one frame and every `write` sends
//! one. The device is not persistent, so it disappears when the last file
//! descriptor closes, including when the process dies.

// The one place of the workspace that needs unsafe code: the TUNSETIFF ioctl
// and the `ifreq` it reads, which the standard library does not wrap.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use std::task::{Context, Poll};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::IFNAME_LEN_MAX;

/// An open TAP device.
#[derive(Debug)]
pub(crate) struct Tap {
    file: AsyncFd<File>,
    name: String,
}

impl Tap {
    /// Opens (creating it if needed) the TAP device `name`, non-blocking.
    /// Needs CAP_NET_ADMIN. Must run inside a tokio runtime.
    pub(crate) fn open(name: &str) -> io::Result<Tap> {
        let request = ifreq_for(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        let mut request = request;
        // SAFETY: `file` is an open descriptor of /dev/net/tun for the whole
        // call, and `request` is a valid, initialized `ifreq` that outlives
        // it; TUNSETIFF reads the name and flags from it and writes back the
        // device name, within the struct.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let name = name_of(&request);
        // SAFETY: the `File` owns its descriptor and never swaps it, and the
        // `AsyncFd` owns the `File` until it drops, so the descriptor stays
        // open and the same for the registration's whole life.
        let file = unsafe { AsyncFd::register(file) }?;
        Ok(Tap { file, name })
    }

    /// The device's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Polls until the device has a frame to read (or an error). The
    /// readiness stays set until [`Tap::try_recv`] finds nothing.
    pub(crate) fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.file.poll_read_ready(cx).map_ok(|_guard| ())
    }

    /// Reads one frame into `buf` without waiting; `WouldBlock` when there
    /// is none (and the readiness is cleared). A frame longer than `buf` is
    /// cut to its length by the kernel.
    pub(crate) fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.file
            .try_io(Interest::READABLE, |mut file| file.read(buf))
    }

    /// Writes one frame without waiting. A TAP queues into the kernel's
    /// receive path and does not block; `WouldBlock` means the frame was
    /// not taken.
    pub(crate) fn try_send(&self, frame: &[u8]) -> io::Result<usize> {
        self.file.get_ref().write(frame)
    }
}

/// An `ifreq` asking TUNSETIFF for the TAP device `name`.
fn ifreq_for(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() > IFNAME_LEN_MAX || name.bytes().any(|b| b == 0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not an interface name of 1 to {IFNAME_LEN_MAX} bytes"),
        ));
    }
    // SAFETY: `ifreq` is a C struct of integers, arrays and a union of
    // those; all-zero bytes are a valid value of each.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = libc::c_char::from_ne_bytes([byte]);
    }
    let flags = libc::IFF_TAP | libc::IFF_NO_PI;
    request.ifr_ifru.ifru_flags =
        libc::c_short::try_from(flags).expect("IFF_TAP | IFF_NO_PI fits a short");
    Ok(request)
}

/// The interface name the kernel wrote back into `request`.
fn name_of(request: &libc::ifreq) -> String {
    let bytes: Vec<u8> = request
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| c.to_ne_bytes()[0])
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_carries_the_name_and_tap_flags() {
        let request = ifreq_for("vcft7").unwrap();
        assert_eq!(name_of(&request), "vcft7");
        // SAFETY: `ifreq_for` wrote the flags member of the union.
        let flags = unsafe { request.ifr_ifru.ifru_flags };
        assert_eq!(
            i32::from(flags),
            libc::IFF_TAP | libc::IFF_NO_PI,
            "an Ethernet device without packet information"
        );
        assert!(ifreq_for("").is_err());
        assert!(ifreq_for("sixteen-bytes-xx").is_err());
        assert!(ifreq_for("fifteen-bytes-x").is_ok());
    }
}

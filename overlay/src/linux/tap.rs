//! TAP devices: whole Ethernet frames between the kernel and the gateway.
//!
//! A TAP is opened through `/dev/net/tun` with the `TUNSETIFF` ioctl, as an
//! Ethernet device (`IFF_TAP`) without the 4-byte packet-information header
//! (`IFF_NO_PI`) but with a 10-byte `virtio_net_hdr` before each frame
//! (`IFF_VNET_HDR`): every `read` returns one frame with its offload
//! metadata and every `write` sends one. `TUNSETOFFLOAD` then tells the
//! kernel that the gateway takes unfinished checksums and TCP super-frames
//! (TSO over IPv4 and IPv6), so a VM's 64 KiB TCP send reaches the gateway
//! as one read, and a super-frame written to the TAP is cut into segments
//! by the kernel (or passed whole to a VM). The device is not persistent,
//! so it disappears when the last file descriptor closes, including when
//! the process dies.
//!
//! The device has two queues (`IFF_MULTI_QUEUE`, one descriptor each), one
//! per lane ([`crate::lane`]): the kernel hands a frame to the queue on
//! which the gateway last wrote a frame of the same flow (either way, by a
//! symmetric hash), so the gateway writes the frames that came on the
//! interactive lane to the interactive queue, and the site's side of those
//! flows (a ping's next request) does not queue behind a transfer's
//! super-frames in the bulk queue. A flow the gateway has not written to
//! lately goes to a queue by its hash.

// Unsafe code (with `udp.rs`, the only places of the workspace): the
// TUNSETIFF ioctl and the `ifreq` it reads, which the standard library does
// not wrap.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use std::task::{Context, Poll};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::IFNAME_LEN_MAX;
use crate::offload::{self, Offload};

/// An open TAP device, with one or two queues.
#[derive(Debug)]
pub(crate) struct Tap {
    queues: Vec<AsyncFd<File>>,
    name: String,
    offloads: bool,
}

/// The queue of a TAP for bulk frames.
pub(crate) const BULK_QUEUE: usize = 0;
/// The queue for the interactive lane's frames.
pub(crate) const INTERACTIVE_QUEUE: usize = 1;

impl Tap {
    /// Opens (creating it if needed) the TAP device `name`, non-blocking,
    /// with two queues ([`BULK_QUEUE`] and [`INTERACTIVE_QUEUE`]), or one if
    /// the kernel refuses the second. Needs CAP_NET_ADMIN. Must run inside a
    /// tokio runtime.
    pub(crate) fn open(name: &str) -> io::Result<Tap> {
        let first = attach_queue(name)?;
        let name = first.1;
        let features = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
        // SAFETY: `first.0` is an open descriptor of /dev/net/tun attached
        // to the device; TUNSETOFFLOAD takes its argument by value.
        let rc = unsafe {
            libc::ioctl(
                first.0.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(features),
            )
        };
        let offloads = rc == 0;
        if !offloads {
            // Frames still flow, one MTU-sized frame per read.
            tracing::warn!(tap = %name, error = %io::Error::last_os_error(), "TAP offloads refused by the kernel");
        }
        let mut files = vec![first.0];
        match attach_queue(&name) {
            Ok((second, _)) => files.push(second),
            Err(e) => {
                tracing::warn!(tap = %name, error = %e, "no interactive TAP queue: both lanes share one");
            }
        }
        let queues = files
            .into_iter()
            // SAFETY: the `File` owns its descriptor and never swaps it,
            // and the `AsyncFd` owns the `File` until it drops, so the
            // descriptor stays open and the same for the registration's
            // whole life.
            .map(|file| unsafe { AsyncFd::register(file) }.map_err(io::Error::from))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Tap {
            queues,
            name,
            offloads,
        })
    }

    /// Whether the kernel hands this TAP super-frames.
    pub(crate) fn offloads(&self) -> bool {
        self.offloads
    }

    /// The device's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// How many queues the device has (1 or 2).
    pub(crate) fn queues(&self) -> usize {
        self.queues.len()
    }

    fn queue(&self, queue: usize) -> &AsyncFd<File> {
        &self.queues[queue.min(self.queues.len() - 1)]
    }

    /// Polls until `queue` has a frame to read (or an error). The readiness
    /// stays set until [`Tap::try_recv`] finds nothing.
    pub(crate) fn poll_readable(&self, queue: usize, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.queue(queue).poll_read_ready(cx).map_ok(|_guard| ())
    }

    /// Reads one frame with its offload metadata from `queue` into `buf`
    /// without waiting; `WouldBlock` when there is none (and the readiness
    /// is cleared). With `direct`, the read is made even if the reactor has
    /// not said that the queue is readable. Returns the metadata and the
    /// frame's length; the frame starts at `buf[offload::WIRE_LEN]`. A
    /// frame longer than the buffer is cut to its length by the kernel.
    pub(crate) fn try_recv(
        &self,
        queue: usize,
        direct: bool,
        buf: &mut [u8],
    ) -> io::Result<(Offload, usize)> {
        let file = self.queue(queue);
        let len = if direct {
            file.get_ref().read(buf)?
        } else {
            file.try_io(Interest::READABLE, |mut file| file.read(buf))?
        };
        if len < offload::WIRE_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a TAP read shorter than its virtio header",
            ));
        }
        let header: [u8; offload::WIRE_LEN] =
            buf[..offload::WIRE_LEN].try_into().expect("ten bytes");
        Ok((Offload::from_virtio(header), len - offload::WIRE_LEN))
    }

    /// Writes one frame with its offload metadata on `queue` without
    /// waiting. A TAP queues into the kernel's receive path and does not
    /// block; `WouldBlock` means the frame was not taken. The kernel sends
    /// the frames of the other way of the flow to the queue it was written
    /// on.
    pub(crate) fn try_send(
        &self,
        queue: usize,
        offload: Offload,
        frame: &[u8],
    ) -> io::Result<usize> {
        let header = offload.to_virtio();
        let parts = [IoSlice::new(&header), IoSlice::new(frame)];
        self.queue(queue).get_ref().write_vectored(&parts)
    }
}

/// Opens /dev/net/tun and attaches it as a queue of the multi-queue TAP
/// device `name` (creating the device if needed); returns the file and the
/// device's name as the kernel has it.
fn attach_queue(name: &str) -> io::Result<(File, String)> {
    let mut request = ifreq_for(name)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    // SAFETY: `file` is an open descriptor of /dev/net/tun for the whole
    // call, and `request` is a valid, initialized `ifreq` that outlives
    // it; TUNSETIFF reads the name and flags from it and writes back the
    // device name, within the struct.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((file, name_of(&request)))
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
    let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE;
    request.ifr_ifru.ifru_flags =
        libc::c_short::try_from(flags).expect("the TAP flags fit a short");
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
            libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE,
            "an Ethernet device without packet information, with virtio headers and queues"
        );
        assert!(ifreq_for("").is_err());
        assert!(ifreq_for("sixteen-bytes-xx").is_err());
        assert!(ifreq_for("fifteen-bytes-x").is_ok());
    }
}

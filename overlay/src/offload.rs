//! Offload metadata of a frame: what Linux's `virtio_net_hdr` says about
//! a frame read from, or written to, a TAP device with `IFF_VNET_HDR`.
//!
//! With offloads on, the kernel hands the gateway TCP "super-frames" of up
//! to 64 KiB that it has not cut into MTU-sized segments yet (GSO), with a
//! checksum it has not finished (`NEEDS_CSUM`). The gateway carries such a
//! frame through the tunnel whole, with this metadata, and writes it to the
//! far site's TAP with the same metadata: the receiving kernel segments it
//! (or hands it to a VM whole) and finishes the checksum. No TCP segment is
//! ever cut or checksummed in user space, and one read, one frame's worth
//! of switching and a handful of system calls carry 64 KiB.
//!
//! On the wire (see [`crate::encap`]) the metadata travels big-endian in
//! [`WIRE_LEN`] bytes; at the TAP it is the host's byte order, as legacy
//! virtio defines it.

/// Bytes of the metadata, at the TAP and on the wire alike.
pub const WIRE_LEN: usize = 10;
/// Largest super-frame carried, bytes: a 64 KiB GSO packet with its
/// Ethernet header and a VLAN tag, with room to spare (frames the kernel
/// coalesced by GRO before a bridge forwarded them reach 65 549).
pub const SUPER_FRAME_LEN_MAX: usize = 65_600;

/// `flags`: the checksum at `csum_start + csum_offset` is to be finished.
pub const F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum was verified.
pub const F_DATA_VALID: u8 = 2;
/// `gso_type`: one frame, no segmentation.
pub const GSO_NONE: u8 = 0;
/// `gso_type`: TCP over IPv4.
pub const GSO_TCPV4: u8 = 1;
/// `gso_type`: TCP over IPv6.
pub const GSO_TCPV6: u8 = 4;
/// `gso_type` flag: the TCP stream uses ECN (CWR set on the first segment).
pub const GSO_ECN: u8 = 0x80;

/// The offload metadata of one frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offload {
    /// [`F_NEEDS_CSUM`], [`F_DATA_VALID`].
    pub flags: u8,
    /// [`GSO_NONE`], [`GSO_TCPV4`] or [`GSO_TCPV6`], maybe with [`GSO_ECN`].
    pub gso_type: u8,
    /// Length of the headers (Ethernet, IP, TCP) of a super-frame; a hint
    /// (the kernel gives the length of the frame's first buffer, which may
    /// be the whole frame).
    pub hdr_len: u16,
    /// Payload bytes of each segment the super-frame is cut into.
    pub gso_size: u16,
    /// Where the checksummed data starts, from the frame's first byte.
    pub csum_start: u16,
    /// Where the checksum field is, from `csum_start`.
    pub csum_offset: u16,
}

/// Why offload metadata does not fit its frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    /// A flag or GSO type the gateway does not carry.
    #[error("unknown offload flags {flags:#x} or GSO type {gso_type:#x}")]
    Unknown {
        /// The flags.
        flags: u8,
        /// The GSO type.
        gso_type: u8,
    },
    /// The checksum field lies outside the frame, or a GSO frame has no
    /// segment size.
    #[error("offload metadata that does not fit a frame of {0} bytes")]
    Misfit(usize),
    /// The frame is larger than [`SUPER_FRAME_LEN_MAX`].
    #[error("super-frame of {0} bytes is too long")]
    TooLong(usize),
}

impl Offload {
    /// A plain frame: nothing to finish, nothing to segment.
    pub const NONE: Offload = Offload {
        flags: 0,
        gso_type: GSO_NONE,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
    };

    /// Whether the frame is plain (it then travels as plain GRE-TEB).
    pub fn is_none(&self) -> bool {
        self.flags & F_NEEDS_CSUM == 0 && self.gso_type == GSO_NONE
    }

    /// Whether the frame is to be cut into segments.
    pub fn is_gso(&self) -> bool {
        self.gso_type != GSO_NONE
    }

    /// Reads a `virtio_net_hdr` as a TAP device gives it (host order).
    pub fn from_virtio(bytes: [u8; WIRE_LEN]) -> Offload {
        Offload::decode(bytes, u16::from_ne_bytes)
    }

    /// The `virtio_net_hdr` a TAP device takes (host order).
    pub fn to_virtio(&self) -> [u8; WIRE_LEN] {
        self.encode(u16::to_ne_bytes)
    }

    /// Reads the metadata as it travels in the tunnel (big-endian).
    pub fn from_wire(bytes: [u8; WIRE_LEN]) -> Offload {
        Offload::decode(bytes, u16::from_be_bytes)
    }

    /// The metadata as it travels in the tunnel (big-endian).
    pub fn to_wire(&self) -> [u8; WIRE_LEN] {
        self.encode(u16::to_be_bytes)
    }

    fn decode(bytes: [u8; WIRE_LEN], order: fn([u8; 2]) -> u16) -> Offload {
        let u16_at = |i: usize| order([bytes[i], bytes[i + 1]]);
        Offload {
            flags: bytes[0],
            gso_type: bytes[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        }
    }

    fn encode(&self, order: fn(u16) -> [u8; 2]) -> [u8; WIRE_LEN] {
        let mut out = [0; WIRE_LEN];
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&order(self.hdr_len));
        out[4..6].copy_from_slice(&order(self.gso_size));
        out[6..8].copy_from_slice(&order(self.csum_start));
        out[8..10].copy_from_slice(&order(self.csum_offset));
        out
    }

    /// Checks the metadata against its frame of `frame_len` bytes: known
    /// flags and types, a checksum field inside the frame, a segment size
    /// for a super-frame, and the length limit. What came from a peer is
    /// checked before it reaches the kernel.
    pub fn check(&self, frame_len: usize) -> Result<(), OffloadError> {
        let known_type = matches!(self.gso_type & !GSO_ECN, GSO_NONE | GSO_TCPV4 | GSO_TCPV6)
            && (self.gso_type & GSO_ECN == 0 || self.is_gso());
        if self.flags & !(F_NEEDS_CSUM | F_DATA_VALID) != 0 || !known_type {
            return Err(OffloadError::Unknown {
                flags: self.flags,
                gso_type: self.gso_type,
            });
        }
        if frame_len > SUPER_FRAME_LEN_MAX {
            return Err(OffloadError::TooLong(frame_len));
        }
        let csum_end = usize::from(self.csum_start) + usize::from(self.csum_offset) + 2;
        let csum_fits = self.flags & F_NEEDS_CSUM == 0 || csum_end <= frame_len;
        // Segmentation needs the checksum to finish and something to cut.
        let gso_fits = !self.is_gso()
            || (self.flags & F_NEEDS_CSUM != 0
                && self.gso_size > 0
                && usize::from(self.hdr_len) <= frame_len);
        if csum_fits && gso_fits {
            Ok(())
        } else {
            Err(OffloadError::Misfit(frame_len))
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The metadata of a TCP/IPv4 super-frame with timestamps.
    pub(crate) fn tcp_super_frame() -> Offload {
        Offload {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 66,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        }
    }

    #[test]
    fn plain_frames_and_super_frames_are_told_apart() {
        assert!(Offload::NONE.is_none());
        assert!(Offload::default().is_none());
        let data_valid = Offload {
            flags: F_DATA_VALID,
            ..Offload::NONE
        };
        assert!(data_valid.is_none(), "nothing left to do to that frame");
        assert!(!tcp_super_frame().is_none());
        assert!(tcp_super_frame().is_gso());
    }

    #[test]
    fn checks_refuse_what_the_kernel_would_misread() {
        assert_eq!(tcp_super_frame().check(60_000), Ok(()));
        assert_eq!(Offload::NONE.check(60), Ok(()));
        let unknown = Offload {
            gso_type: 3, // UDP fragmentation offload
            ..tcp_super_frame()
        };
        assert!(matches!(
            unknown.check(60_000),
            Err(OffloadError::Unknown { .. })
        ));
        assert!(matches!(
            Offload {
                flags: 0x80,
                ..Offload::NONE
            }
            .check(60),
            Err(OffloadError::Unknown { .. })
        ));
        assert_eq!(
            tcp_super_frame().check(40),
            Err(OffloadError::Misfit(40)),
            "the checksum field lies beyond the frame"
        );
        let no_size = Offload {
            gso_size: 0,
            ..tcp_super_frame()
        };
        assert_eq!(no_size.check(60_000), Err(OffloadError::Misfit(60_000)));
        let no_csum = Offload {
            flags: 0,
            ..tcp_super_frame()
        };
        assert_eq!(no_csum.check(60_000), Err(OffloadError::Misfit(60_000)));
        assert_eq!(
            tcp_super_frame().check(SUPER_FRAME_LEN_MAX + 1),
            Err(OffloadError::TooLong(SUPER_FRAME_LEN_MAX + 1))
        );
    }

    #[test]
    fn the_wire_is_big_endian_and_the_tap_host_order() {
        let offload = tcp_super_frame();
        let wire = offload.to_wire();
        assert_eq!(wire[4..6], 1448u16.to_be_bytes());
        assert_eq!(Offload::from_wire(wire), offload);
        let virtio = offload.to_virtio();
        assert_eq!(virtio[4..6], 1448u16.to_ne_bytes());
        assert_eq!(Offload::from_virtio(virtio), offload);
    }

    proptest! {
        #[test]
        fn any_metadata_survives_both_encodings(bytes in any::<[u8; WIRE_LEN]>()) {
            prop_assert_eq!(Offload::from_wire(bytes).to_wire(), bytes);
            prop_assert_eq!(Offload::from_virtio(bytes).to_virtio(), bytes);
        }
    }
}

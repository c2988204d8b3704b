//! Ethernet frames as the switch sees them: addresses, EtherType and
//! 802.1Q tags.

use std::fmt;

/// Length of an Ethernet header without a VLAN tag.
pub const ETH_HEADER_LEN: usize = 14;
/// Length of an 802.1Q tag.
pub const VLAN_TAG_LEN: usize = 4;
/// EtherType of an 802.1Q tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// Largest frame the overlay carries: a 1500-byte payload, an Ethernet
/// header and one 802.1Q tag (no FCS: TAP devices do not pass it).
pub const FRAME_LEN_MAX: usize = 1500 + ETH_HEADER_LEN + VLAN_TAG_LEN;

/// An Ethernet (MAC) address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The broadcast address.
    pub const BROADCAST: Mac = Mac([0xff; 6]);

    /// Whether the address is a group (broadcast or multicast) address.
    pub fn is_group(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// Why bytes are not an Ethernet frame the overlay carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Shorter than an Ethernet header (or a tagged one).
    #[error("frame of {0} bytes is too short")]
    TooShort(usize),
    /// Longer than [`FRAME_LEN_MAX`].
    #[error("frame of {0} bytes is too long")]
    TooLong(usize),
}

/// A parsed view of an Ethernet frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameInfo {
    /// Destination address.
    pub dst: Mac,
    /// Source address.
    pub src: Mac,
    /// VLAN id of an 802.1Q tag, if the frame has one.
    pub vlan: Option<u16>,
    /// EtherType of the payload (after any tag).
    pub ethertype: u16,
}

/// Parses the header of `frame`, refusing frames longer than
/// [`FRAME_LEN_MAX`].
pub fn parse(frame: &[u8]) -> Result<FrameInfo, FrameError> {
    if frame.len() > FRAME_LEN_MAX {
        return Err(FrameError::TooLong(frame.len()));
    }
    parse_header(frame)
}

/// Parses the header of `frame` of any length (a super-frame's length is
/// checked with its offload metadata).
pub fn parse_header(frame: &[u8]) -> Result<FrameInfo, FrameError> {
    if frame.len() < ETH_HEADER_LEN {
        return Err(FrameError::TooShort(frame.len()));
    }
    let dst = Mac(frame[0..6].try_into().expect("six bytes"));
    let src = Mac(frame[6..12].try_into().expect("six bytes"));
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    if ethertype != ETHERTYPE_VLAN {
        return Ok(FrameInfo {
            dst,
            src,
            vlan: None,
            ethertype,
        });
    }
    if frame.len() < ETH_HEADER_LEN + VLAN_TAG_LEN {
        return Err(FrameError::TooShort(frame.len()));
    }
    let tci = u16::from_be_bytes([frame[14], frame[15]]);
    let inner = u16::from_be_bytes([frame[16], frame[17]]);
    Ok(FrameInfo {
        dst,
        src,
        vlan: Some(tci & 0x0fff),
        ethertype: inner,
    })
}

/// Removes an 802.1Q tag (in place of a trunk port's frame), returning the
/// untagged frame. A frame without a tag is returned unchanged.
pub fn strip_vlan(frame: &[u8]) -> Vec<u8> {
    if frame.len() < ETH_HEADER_LEN + VLAN_TAG_LEN
        || u16::from_be_bytes([frame[12], frame[13]]) != ETHERTYPE_VLAN
    {
        return frame.to_vec();
    }
    let mut out = Vec::with_capacity(frame.len() - VLAN_TAG_LEN);
    out.extend_from_slice(&frame[..12]);
    out.extend_from_slice(&frame[16..]);
    out
}

/// Adds an 802.1Q tag with `vlan` (priority 0) after the addresses.
pub fn tag_vlan(frame: &[u8], vlan: u16) -> Vec<u8> {
    assert!(
        frame.len() >= ETH_HEADER_LEN,
        "a frame has a full Ethernet header"
    );
    assert!((1..=4094).contains(&vlan), "VLAN ids are 1 to 4094");
    let mut out = Vec::with_capacity(frame.len() + VLAN_TAG_LEN);
    out.extend_from_slice(&frame[..12]);
    out.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
    out.extend_from_slice(&vlan.to_be_bytes());
    out.extend_from_slice(&frame[12..]);
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A frame from `src` to `dst` with an IPv4 EtherType and `len` bytes of payload.
    pub(crate) fn frame(dst: Mac, src: Mac, len: usize) -> Vec<u8> {
        let mut frame = Vec::with_capacity(ETH_HEADER_LEN + len);
        frame.extend_from_slice(&dst.0);
        frame.extend_from_slice(&src.0);
        frame.extend_from_slice(&0x0800u16.to_be_bytes());
        frame.extend((0..len).map(|i| u8::try_from(i % 251).expect("below 251")));
        frame
    }

    pub(crate) fn mac(last: u8) -> Mac {
        Mac([0x02, 0, 0, 0, 0, last])
    }

    #[test]
    fn parses_plain_and_tagged_frames() {
        let plain = frame(Mac::BROADCAST, mac(1), 46);
        let info = parse(&plain).unwrap();
        assert_eq!(
            (info.dst, info.src, info.vlan, info.ethertype),
            (Mac::BROADCAST, mac(1), None, 0x0800)
        );
        assert!(info.dst.is_group());
        assert!(!info.src.is_group());

        let tagged = tag_vlan(&plain, 123);
        let info = parse(&tagged).unwrap();
        assert_eq!((info.vlan, info.ethertype), (Some(123), 0x0800));
        assert_eq!(strip_vlan(&tagged), plain);
        assert_eq!(strip_vlan(&plain), plain);
    }

    #[test]
    fn refuses_runts_and_giants() {
        assert_eq!(parse(&[0; 13]), Err(FrameError::TooShort(13)));
        let mut tagged_runt = frame(mac(1), mac(2), 0);
        tagged_runt[12..14].copy_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
        assert_eq!(parse(&tagged_runt), Err(FrameError::TooShort(14)));
        assert_eq!(
            parse(&vec![0; FRAME_LEN_MAX + 1]),
            Err(FrameError::TooLong(FRAME_LEN_MAX + 1))
        );
        assert_eq!(mac(7).to_string(), "02:00:00:00:00:07");
    }
}

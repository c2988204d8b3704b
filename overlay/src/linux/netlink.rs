//! Link setup over rtnetlink: segment bridges, 802.1Q sub-interfaces, TAPs
//! into bridges, and the cleanup rules of the module docs.
//!
//! The messages are built by pure functions so that the trunk-mode path,
//! which needs the kernel's 8021q module, is tested without a kernel.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::{LinkBridge, LinkUnspec, LinkVlan};

use super::{SegmentLinkNames, ShellError, SiteLink};

/// Longest wait for the kernel to answer one netlink request.
const REQUEST_TIMEOUT_MS: u64 = 5_000;
/// `EEXIST`, as netlink reports it (negated errno).
const EEXIST_NEGATED: i32 = -17;

/// One link as the kernel lists it, reduced to what setup and cleanup need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LinkState {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// IFLA_IFALIAS, if set.
    pub alias: Option<String>,
    /// The link kind (bridge, vlan, tun, ...), when the kernel reports one.
    pub kind: Option<InfoKind>,
}

/// A netlink connection and the gateway's marks for the links it owns.
pub(crate) struct Links {
    handle: rtnetlink::Handle,
    connection: tokio::task::JoinHandle<()>,
    prefix: String,
    tag: String,
}

impl Drop for Links {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl Links {
    /// Opens a netlink connection (its driver runs as a task). Links the
    /// gateway creates are marked with `prefix`'s owner tag.
    pub(crate) fn connect(prefix: &str) -> Result<Links, ShellError> {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(ShellError::NetlinkSocket)?;
        Ok(Links {
            handle,
            connection: tokio::spawn(connection),
            prefix: prefix.to_owned(),
            tag: owner_tag(prefix),
        })
    }

    /// Every link of the network namespace.
    pub(crate) async fn list(&self) -> Result<Vec<LinkState>, ShellError> {
        let messages: Vec<LinkMessage> = bounded(
            "listing links",
            self.handle.link().get().execute().try_collect(),
        )
        .await?;
        Ok(messages.iter().map(link_state).collect())
    }

    /// Deletes the links this gateway's prefix owns that `keep` does not
    /// name: the leftovers of a configuration that changed while the
    /// gateway was down, or of a crash. Returns their names.
    pub(crate) async fn remove_stale(
        &self,
        keep: &BTreeSet<String>,
    ) -> Result<Vec<String>, ShellError> {
        let links = self.list().await?;
        let mut removed = Vec::new();
        for link in stale_links(&links, &self.prefix, &self.tag, keep) {
            self.delete(link).await?;
            removed.push(link.name.clone());
        }
        Ok(removed)
    }

    /// Sets up the site side of one segment and puts its (open) TAP in the
    /// segment's bridge. Idempotent: links that exist are reused.
    pub(crate) async fn attach(
        &self,
        names: &SegmentLinkNames,
        site_link: &SiteLink,
    ) -> Result<(), ShellError> {
        let bridge = match site_link {
            SiteLink::Bridge(name) => {
                let links = self.list().await?;
                let bridge = find(&links, name, "site bridge")?;
                expect_kind(bridge, &InfoKind::Bridge, "bridge")?;
                bridge.index
            }
            SiteLink::Trunk { .. } | SiteLink::SegmentBridge => {
                self.ensure_segment_bridge(&names.bridge).await?
            }
        };
        if let (SiteLink::Trunk { trunk, vlan }, Some(vlan_name)) = (site_link, &names.vlan) {
            self.ensure_vlan(vlan_name, trunk, *vlan, bridge).await?;
        }
        let links = self.list().await?;
        let tap = find(&links, &names.tap, "TAP device")?;
        bounded(
            &format!("putting {} in bridge {}", names.tap, names.bridge),
            self.handle
                .link()
                .set(port_message(tap.index, bridge, None))
                .execute(),
        )
        .await
    }

    /// Deletes the links of `plan` that this gateway owns (never a site
    /// bridge, a trunk or a sub-interface it found already there). Best
    /// effort: failures are logged. Returns the names deleted.
    pub(crate) async fn teardown(&self, plan: &[SegmentLinkNames]) -> Vec<String> {
        let links = match self.list().await {
            Ok(links) => links,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot list links to tear down");
                return Vec::new();
            }
        };
        let mut removed = Vec::new();
        for names in plan {
            let candidates = std::iter::once(&names.bridge).chain(names.vlan.as_ref());
            for name in candidates {
                let Some(link) = links.iter().find(|l| &l.name == name) else {
                    continue;
                };
                if !is_owned(link, &self.prefix, &self.tag) {
                    continue;
                }
                match self.delete(link).await {
                    Ok(()) => removed.push(link.name.clone()),
                    Err(e) => {
                        tracing::warn!(link = %link.name, error = %format!("{e:#}"), "cannot delete link")
                    }
                }
            }
        }
        removed
    }

    /// The index of the segment bridge `name`, created (marked, up) if
    /// missing.
    async fn ensure_segment_bridge(&self, name: &str) -> Result<u32, ShellError> {
        let links = self.list().await?;
        let index = match links.iter().find(|l| l.name == name) {
            Some(bridge) => {
                expect_kind(bridge, &InfoKind::Bridge, "bridge")?;
                bridge.index
            }
            None => {
                self.create(bridge_message(name), &format!("creating bridge {name}"))
                    .await?;
                let links = self.list().await?;
                find(&links, name, "segment bridge")?.index
            }
        };
        bounded(
            &format!("marking bridge {name}"),
            self.handle
                .link()
                .set(mark_message(index, &self.tag))
                .execute(),
        )
        .await?;
        Ok(index)
    }

    /// Creates (or reuses) the 802.1Q sub-interface `name` of `trunk` for
    /// `vlan` and puts it, up, in bridge `bridge`. Only a sub-interface
    /// the gateway created is marked (and so deleted later).
    async fn ensure_vlan(
        &self,
        name: &str,
        trunk: &str,
        vlan: u16,
        bridge: u32,
    ) -> Result<(), ShellError> {
        let links = self.list().await?;
        let trunk_index = find(&links, trunk, "trunk")?.index;
        let (index, mark) = match links.iter().find(|l| l.name == name) {
            Some(existing) => {
                expect_kind(existing, &InfoKind::Vlan, "vlan")?;
                let ours = existing.alias.as_deref() == Some(self.tag.as_str());
                (existing.index, ours)
            }
            None => {
                self.create(
                    vlan_message(name, trunk_index, vlan),
                    &format!("creating VLAN sub-interface {name} of {trunk}"),
                )
                .await?;
                let links = self.list().await?;
                (find(&links, name, "VLAN sub-interface")?.index, true)
            }
        };
        let tag = mark.then_some(self.tag.as_str());
        bounded(
            &format!("putting {name} in its segment bridge"),
            self.handle
                .link()
                .set(port_message(index, bridge, tag))
                .execute(),
        )
        .await
    }

    /// Sends a create request; a link that appeared meanwhile is not an
    /// error (the caller looks it up again).
    async fn create(&self, message: LinkMessage, what: &str) -> Result<(), ShellError> {
        match bounded(what, self.handle.link().add(message).execute()).await {
            Err(ShellError::Netlink {
                source: rtnetlink::Error::NetlinkError(e),
                ..
            }) if e.raw_code() == EEXIST_NEGATED => Ok(()),
            other => other,
        }
    }

    async fn delete(&self, link: &LinkState) -> Result<(), ShellError> {
        bounded(
            &format!("deleting {}", link.name),
            self.handle.link().del(link.index).execute(),
        )
        .await
    }
}

/// Runs one netlink request with a time limit.
async fn bounded<T>(
    what: &str,
    request: impl Future<Output = Result<T, rtnetlink::Error>>,
) -> Result<T, ShellError> {
    match tokio::time::timeout(Duration::from_millis(REQUEST_TIMEOUT_MS), request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(ShellError::Netlink {
            what: what.to_owned(),
            source,
        }),
        Err(_elapsed) => Err(ShellError::Netlink {
            what: format!("{what} (no answer within {REQUEST_TIMEOUT_MS} ms)"),
            source: rtnetlink::Error::RequestFailed,
        }),
    }
}

/// The alias that marks the links of gateways with `prefix`.
pub(crate) fn owner_tag(prefix: &str) -> String {
    format!("vcfed-gateway:{prefix}")
}

/// Whether `link` belongs to the gateway with `prefix`: it carries the
/// owner tag, or it is a bridge named like a segment bridge of the prefix
/// (a crash between creating and marking leaves only the name).
pub(crate) fn is_owned(link: &LinkState, prefix: &str, tag: &str) -> bool {
    link.alias.as_deref() == Some(tag)
        || (link.kind == Some(InfoKind::Bridge) && is_segment_bridge_name(&link.name, prefix))
}

/// Whether `name` is `<prefix>b<digits>`.
fn is_segment_bridge_name(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('b'))
        .is_some_and(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
}

/// The owned links that `keep` does not name. TAP devices are left out:
/// they vanish with the process that holds them, so one that exists
/// belongs to a running process.
pub(crate) fn stale_links<'a>(
    links: &'a [LinkState],
    prefix: &str,
    tag: &str,
    keep: &BTreeSet<String>,
) -> Vec<&'a LinkState> {
    links
        .iter()
        .filter(|link| is_owned(link, prefix, tag))
        .filter(|link| link.kind != Some(InfoKind::Tun))
        .filter(|link| !keep.contains(&link.name))
        .collect()
}

/// A request to create bridge `name` (up).
pub(crate) fn bridge_message(name: &str) -> LinkMessage {
    LinkBridge::new(name).build()
}

/// A request to create the 802.1Q sub-interface `name` of the link with
/// index `trunk` for VLAN id `vlan` (`ip link add link TRUNK name NAME type
/// vlan id VLAN`).
pub(crate) fn vlan_message(name: &str, trunk: u32, vlan: u16) -> LinkMessage {
    LinkVlan::new(name, trunk, vlan).build()
}

/// A request to set link `index` up, marked with `tag`.
pub(crate) fn mark_message(index: u32, tag: &str) -> LinkMessage {
    LinkUnspec::new_with_index(index)
        .up()
        .append_extra_attribute(LinkAttribute::IfAlias(tag.to_owned()))
        .build()
}

/// A request to put link `index` in bridge `bridge` and set it up, marked
/// with `tag` if given.
pub(crate) fn port_message(index: u32, bridge: u32, tag: Option<&str>) -> LinkMessage {
    let mut builder = LinkUnspec::new_with_index(index).controller(bridge).up();
    if let Some(tag) = tag {
        builder = builder.append_extra_attribute(LinkAttribute::IfAlias(tag.to_owned()));
    }
    builder.build()
}

/// What setup and cleanup need of a kernel link message.
pub(crate) fn link_state(message: &LinkMessage) -> LinkState {
    let mut state = LinkState {
        index: message.header.index,
        name: String::new(),
        alias: None,
        kind: None,
    };
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::IfName(name) => state.name = name.clone(),
            LinkAttribute::IfAlias(alias) => state.alias = Some(alias.clone()),
            LinkAttribute::LinkInfo(infos) => {
                state.kind = infos.iter().find_map(|info| match info {
                    LinkInfo::Kind(kind) => Some(kind.clone()),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    state
}

fn find<'a>(
    links: &'a [LinkState],
    name: &str,
    what: &'static str,
) -> Result<&'a LinkState, ShellError> {
    links
        .iter()
        .find(|link| link.name == name)
        .ok_or_else(|| ShellError::MissingLink {
            name: name.to_owned(),
            what,
        })
}

fn expect_kind(
    link: &LinkState,
    kind: &InfoKind,
    expected: &'static str,
) -> Result<(), ShellError> {
    if link.kind.as_ref() == Some(kind) {
        return Ok(());
    }
    Err(ShellError::WrongKind {
        name: link.name.clone(),
        expected,
        found: link
            .kind
            .as_ref()
            .map_or_else(|| "unknown".to_owned(), |kind| kind.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use rtnetlink::packet_core::Emitable;
    use rtnetlink::packet_route::link::{InfoData, InfoVlan, LinkFlags};

    use super::*;

    fn link(index: u32, name: &str, alias: Option<&str>, kind: InfoKind) -> LinkState {
        LinkState {
            index,
            name: name.to_owned(),
            alias: alias.map(str::to_owned),
            kind: Some(kind),
        }
    }

    fn link_infos(message: &LinkMessage) -> &[LinkInfo] {
        message
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::LinkInfo(infos) => Some(infos.as_slice()),
                _ => None,
            })
            .expect("a link info attribute")
    }

    #[test]
    fn the_vlan_request_names_the_trunk_and_the_id() {
        let message = vlan_message("eth1.100", 4, 100);
        assert!(
            message
                .attributes
                .contains(&LinkAttribute::IfName("eth1.100".into()))
        );
        assert!(message.attributes.contains(&LinkAttribute::Link(4)));
        assert_eq!(
            link_infos(&message),
            [
                LinkInfo::Kind(InfoKind::Vlan),
                LinkInfo::Data(InfoData::Vlan(vec![InfoVlan::Id(100)])),
            ]
        );
        // The wire form carries IFLA_VLAN_ID (1) = 100 inside IFLA_INFO_DATA
        // inside IFLA_LINKINFO, as `ip link add ... type vlan id 100` sends.
        let mut bytes = vec![0; message.buffer_len()];
        message.emit(&mut bytes);
        let vlan_id_nla = [6u8, 0, 1, 0, 100, 0];
        assert!(
            bytes.windows(6).any(|w| w == vlan_id_nla),
            "IFLA_VLAN_ID in {bytes:?}"
        );
        assert!(bytes.windows(4).any(|w| w == b"vlan"), "IFLA_INFO_KIND");
        // A parsed copy round-trips.
        let parsed = link_state(&message);
        assert_eq!(parsed.name, "eth1.100");
        assert_eq!(parsed.kind, Some(InfoKind::Vlan));
    }

    #[test]
    fn bridges_are_created_up_and_ports_join_up_and_marked() {
        let bridge = bridge_message("vcfb7");
        assert!(bridge.header.flags.contains(LinkFlags::Up));
        assert_eq!(link_infos(&bridge), [LinkInfo::Kind(InfoKind::Bridge)]);

        let port = port_message(9, 3, Some("vcfed-gateway:vcf"));
        assert_eq!(port.header.index, 9);
        assert!(port.header.flags.contains(LinkFlags::Up));
        assert!(port.header.change_mask.contains(LinkFlags::Up));
        assert!(port.attributes.contains(&LinkAttribute::Controller(3)));
        assert!(
            port.attributes
                .contains(&LinkAttribute::IfAlias("vcfed-gateway:vcf".into()))
        );
        let unmarked = port_message(9, 3, None);
        assert!(
            !unmarked
                .attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::IfAlias(_)))
        );
        let mark = mark_message(3, "vcfed-gateway:vcf");
        assert!(
            mark.attributes
                .contains(&LinkAttribute::IfAlias("vcfed-gateway:vcf".into()))
        );
    }

    #[test]
    fn only_owned_unconfigured_links_are_stale() {
        let tag = owner_tag("vcf");
        let links = [
            // Ours by name, configured: kept.
            link(1, "vcfb7", None, InfoKind::Bridge),
            // Ours by name, no longer configured: stale.
            link(2, "vcfb8", None, InfoKind::Bridge),
            // Ours by tag (a VLAN sub-interface we made): stale.
            link(3, "eth1.100", Some(&tag), InfoKind::Vlan),
            // The operator's sub-interface, no tag: never touched.
            link(4, "eth1.200", None, InfoKind::Vlan),
            // The site bridge.
            link(5, "br-site", None, InfoKind::Bridge),
            // Looks like ours but is no bridge / not our pattern.
            link(6, "vcfbx", None, InfoKind::Bridge),
            link(7, "vcfb9", None, InfoKind::Veth),
            // A TAP of a running gateway.
            link(8, "vcft8", Some(&tag), InfoKind::Tun),
            // Another prefix's bridge.
            link(9, "othb8", Some("vcfed-gateway:oth"), InfoKind::Bridge),
        ];
        let keep: BTreeSet<String> = ["vcfb7".to_owned()].into();
        let stale: Vec<&str> = stale_links(&links, "vcf", &tag, &keep)
            .iter()
            .map(|l| l.name.as_str())
            .collect();
        assert_eq!(stale, ["vcfb8", "eth1.100"]);
    }
}

//! A node's libvirt domain: its XML, and where it goes among the site's
//! hosts. Pure functions, tested without a libvirtd.

use std::path::Path;

/// Namespace of the node metadata the driver puts in its domains.
pub(super) const METADATA_NS: &str = "https://vcfed.dev/xmlns/node/1";

/// CPU virtualization of the VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Virt {
    /// Hardware (`<domain type='kvm'>`).
    Kvm,
    /// Software emulation (`<domain type='qemu'>`, TCG).
    Tcg,
}

impl Virt {
    /// The domain type libvirt expects.
    pub(super) fn domain_type(self) -> &'static str {
        match self {
            Virt::Kvm => "kvm",
            Virt::Tcg => "qemu",
        }
    }
}

/// How the VM's NIC reaches the cluster network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Nic {
    /// A tap the driver puts on the cluster bridge itself (a host on this
    /// machine): libvirt makes it with this name.
    Tap(String),
    /// An existing bridge on the VM's host that carries the cluster's VLAN
    /// from the site trunk (another hypervisor host).
    Bridge(String),
}

/// Everything that goes into a node's domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DomainSpec<'a> {
    /// Domain name.
    pub(super) name: &'a str,
    /// Site, cluster and node, for the metadata and the title.
    pub(super) site: &'a str,
    /// Cluster id.
    pub(super) cluster: &'a str,
    /// Node number.
    pub(super) index: u32,
    /// Virtualization.
    pub(super) virt: Virt,
    /// Memory, MiB.
    pub(super) memory_mib: u64,
    /// Virtual CPUs.
    pub(super) vcpus: u32,
    /// The disk: pool, volume, and the volume's format (`qcow2`, `raw`).
    pub(super) pool: &'a str,
    /// Volume name.
    pub(super) volume: &'a str,
    /// Volume format.
    pub(super) volume_format: &'a str,
    /// NIC.
    pub(super) nic: Nic,
    /// MAC address.
    pub(super) mac: [u8; 6],
    /// Serial console log file (on the VM's host).
    pub(super) console: &'a Path,
    /// Boot from the network first (a compute node), or only from its
    /// disk (a frontend VM).
    pub(super) network_boot: bool,
    /// SMBIOS OEM strings the guest can read (`dmidecode -t 11`).
    pub(super) oem_strings: &'a [String],
}

/// The domain XML of a node: boots from the network, then from its disk;
/// its serial console goes to a file, and the firmware's screen goes to
/// the serial port too (`-machine graphics=off`), so the boot ROM's output
/// is in that file.
pub(super) fn domain_xml(spec: &DomainSpec<'_>) -> String {
    let mac = mac_text(&spec.mac);
    let nic = match &spec.nic {
        Nic::Tap(tap) => format!(
            "    <interface type='ethernet'>\n      <target dev='{}' managed='yes'/>\n",
            escape(tap)
        ),
        Nic::Bridge(bridge) => format!(
            "    <interface type='bridge'>\n      <source bridge='{}'/>\n",
            escape(bridge)
        ),
    };
    let console = escape(&spec.console.display().to_string());
    format!(
        "<domain type='{virt}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\n\
         \x20 <name>{name}</name>\n\
         \x20 <title>vcfed node {index} of cluster {cluster} at site {site}</title>\n\
         \x20 <metadata>\n\
         \x20   <vcfed:node xmlns:vcfed='{METADATA_NS}' site='{site}' cluster='{cluster}' index='{index}'/>\n\
         \x20 </metadata>\n\
         \x20 <memory unit='MiB'>{memory}</memory>\n\
         \x20 <vcpu>{vcpus}</vcpu>\n\
         {sysinfo}\
         \x20 <os>\n\
         \x20   <type arch='x86_64' machine='pc'>hvm</type>\n\
         {boot}\
         \x20   <boot dev='hd'/>\n\
         {smbios}\
         \x20 </os>\n\
         \x20 <features><acpi/></features>\n\
         \x20 <on_poweroff>destroy</on_poweroff>\n\
         \x20 <on_reboot>restart</on_reboot>\n\
         \x20 <on_crash>destroy</on_crash>\n\
         \x20 <devices>\n\
         \x20   <disk type='volume' device='disk'>\n\
         \x20     <driver name='qemu' type='{format}'/>\n\
         \x20     <source pool='{pool}' volume='{volume}'/>\n\
         \x20     <target dev='vda' bus='virtio'/>\n\
         \x20   </disk>\n\
         {nic}\
         \x20     <mac address='{mac}'/>\n\
         \x20     <model type='virtio'/>\n\
         \x20   </interface>\n\
         \x20   <serial type='file'>\n\
         \x20     <source path='{console}'/>\n\
         \x20     <target port='0'/>\n\
         \x20   </serial>\n\
         \x20   <console type='file'>\n\
         \x20     <source path='{console}'/>\n\
         \x20     <target type='serial' port='0'/>\n\
         \x20   </console>\n\
         \x20 </devices>\n\
         \x20 <qemu:commandline>\n\
         \x20   <qemu:arg value='-machine'/>\n\
         \x20   <qemu:arg value='graphics=off'/>\n\
         \x20 </qemu:commandline>\n\
         </domain>\n",
        boot = if spec.network_boot {
            "    <boot dev='network'/>\n"
        } else {
            ""
        },
        sysinfo = if spec.oem_strings.is_empty() {
            String::new()
        } else {
            let entries: String = spec
                .oem_strings
                .iter()
                .map(|s| format!("      <entry>{}</entry>\n", escape(s)))
                .collect();
            format!(
                "  <sysinfo type='smbios'>\n    <oemStrings>\n{entries}    </oemStrings>\n  </sysinfo>\n"
            )
        },
        smbios = if spec.oem_strings.is_empty() {
            ""
        } else {
            "    <smbios mode='sysinfo'/>\n"
        },
        virt = spec.virt.domain_type(),
        name = escape(spec.name),
        index = spec.index,
        cluster = escape(spec.cluster),
        site = escape(spec.site),
        memory = spec.memory_mib,
        vcpus = spec.vcpus,
        format = escape(spec.volume_format),
        pool = escape(spec.pool),
        volume = escape(spec.volume),
    )
}

/// The XML of a `dir` storage pool at `path`.
pub(super) fn dir_pool_xml(name: &str, path: &Path) -> String {
    format!(
        "<pool type='dir'>\n  <name>{}</name>\n  <target>\n    <path>{}</path>\n  </target>\n</pool>\n",
        escape(name),
        escape(&path.display().to_string())
    )
}

/// The XML of a volume of `size_bytes`: in `format` (`qcow2` or `raw`),
/// over a backing file (path, format) if given.
pub(super) fn volume_xml(
    name: &str,
    size_bytes: u64,
    format: &str,
    backing: Option<(&Path, &str)>,
) -> String {
    let backing = backing.map_or_else(String::new, |(path, format)| {
        format!(
            "  <backingStore>\n    <path>{}</path>\n    <format type='{}'/>\n  </backingStore>\n",
            escape(&path.display().to_string()),
            escape(format)
        )
    });
    format!(
        "<volume>\n  <name>{}</name>\n  <capacity unit='bytes'>{size_bytes}</capacity>\n  <target>\n    <format type='{}'/>\n  </target>\n{backing}</volume>\n",
        escape(name),
        escape(format)
    )
}

/// `aa:bb:..` of a MAC address.
pub(super) fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `text` safe in XML text and in single- or double-quoted attributes.
pub(super) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// What a host has, and what the driver already placed on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct HostLoad {
    /// CPUs of the host.
    pub(super) cpus: u32,
    /// Memory of the host, MiB.
    pub(super) memory_mib: u64,
    /// Virtual CPUs of this site's VMs on it.
    pub(super) placed_vcpus: u32,
    /// Memory of this site's VMs on it, MiB.
    pub(super) placed_mib: u64,
}

impl HostLoad {
    fn free_mib(&self) -> u64 {
        self.memory_mib.saturating_sub(self.placed_mib)
    }

    fn free_cpus(&self) -> u32 {
        self.cpus.saturating_sub(self.placed_vcpus)
    }
}

/// The host (index into `hosts`) for a VM of `vcpus` and `memory_mib`: the
/// one with the most free memory among those with room for it, then the
/// most free CPUs, then the first listed. CPUs may be shared by VMs (they
/// are time-sliced), so a host without a free CPU still takes a VM when
/// none has one; memory is never overcommitted.
pub(super) fn place(hosts: &[HostLoad], vcpus: u32, memory_mib: u64) -> Option<usize> {
    let fits = |h: &HostLoad| h.free_mib() >= memory_mib;
    let best = |with_cpus: bool| {
        hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| fits(h) && (!with_cpus || h.free_cpus() >= vcpus))
            .max_by(|(ia, a), (ib, b)| {
                (a.free_mib(), a.free_cpus())
                    .cmp(&(b.free_mib(), b.free_cpus()))
                    // The first listed wins a tie.
                    .then(ib.cmp(ia))
            })
            .map(|(i, _)| i)
    };
    best(true).or_else(|| best(false))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn the_domain_boots_from_the_network_with_its_mac_on_the_cluster_network() {
        let console = PathBuf::from("/var/lib/vcfed/consoles/vcf-a-b-1.log");
        let spec = DomainSpec {
            name: "vcf-0a0b0c0d-01020304-1",
            site: "site-a",
            cluster: "c-1<&>",
            index: 1,
            virt: Virt::Tcg,
            memory_mib: 256,
            vcpus: 1,
            pool: "vcfed-0a0b0c0d",
            volume: "vcf-0a0b0c0d-01020304-1.qcow2",
            volume_format: "qcow2",
            nic: Nic::Tap("vt0102030401".into()),
            mac: [0x02, 1, 2, 3, 4, 5],
            console: &console,
            network_boot: true,
            oem_strings: &[],
        };
        let xml = domain_xml(&spec);
        assert!(xml.starts_with("<domain type='qemu'"));
        assert!(xml.contains("<boot dev='network'/>\n    <boot dev='hd'/>"));
        assert!(xml.contains("<mac address='02:01:02:03:04:05'/>"));
        assert!(xml.contains("<target dev='vt0102030401' managed='yes'/>"));
        assert!(xml.contains("cluster='c-1&lt;&amp;&gt;'"));
        assert!(xml.contains("<source path='/var/lib/vcfed/consoles/vcf-a-b-1.log'/>"));
        assert!(xml.contains("<memory unit='MiB'>256</memory>"));
        assert!(!xml.contains("c-1<&>"));
        let remote = domain_xml(&DomainSpec {
            nic: Nic::Bridge("br100".into()),
            virt: Virt::Kvm,
            ..spec
        });
        assert!(remote.starts_with("<domain type='kvm'"));
        assert!(remote.contains("<interface type='bridge'>\n      <source bridge='br100'/>"));
        let oem = ["vcfed.address=198.19.7.1/24".to_owned()];
        let frontend = domain_xml(&DomainSpec {
            network_boot: false,
            oem_strings: &oem,
            ..spec
        });
        assert!(!frontend.contains("<boot dev='network'/>"));
        assert!(frontend.contains("<entry>vcfed.address=198.19.7.1/24</entry>"));
        assert!(frontend.contains("<smbios mode='sysinfo'/>"));
        assert!(dir_pool_xml("p", Path::new("/d/pool")).contains("<path>/d/pool</path>"));
        let volume = volume_xml(
            "v.qcow2",
            1 << 30,
            "qcow2",
            Some((Path::new("/i/b.img"), "raw")),
        );
        assert!(volume.contains("<capacity unit='bytes'>1073741824</capacity>"));
        assert!(
            volume.contains("<backingStore>\n    <path>/i/b.img</path>\n    <format type='raw'/>")
        );
        assert!(!volume_xml("v", 1, "raw", None).contains("backingStore"));
    }

    #[test]
    fn placement_prefers_free_memory_and_never_overcommits_it() {
        let host = |cpus, memory_mib, placed_vcpus, placed_mib| HostLoad {
            cpus,
            memory_mib,
            placed_vcpus,
            placed_mib,
        };
        let hosts = [host(4, 8192, 0, 6144), host(4, 8192, 2, 1024)];
        assert_eq!(place(&hosts, 1, 1024), Some(1));
        // Only the first has room.
        let hosts = [host(4, 8192, 0, 0), host(4, 8192, 0, 7680)];
        assert_eq!(place(&hosts, 1, 1024), Some(0));
        // A tie goes to the first listed.
        let hosts = [host(4, 4096, 0, 0), host(4, 4096, 0, 0)];
        assert_eq!(place(&hosts, 1, 1024), Some(0));
        // No memory anywhere.
        assert_eq!(place(&[host(64, 512, 0, 0)], 1, 1024), None);
        // CPUs are time-sliced when every host is busy.
        assert_eq!(place(&[host(1, 4096, 1, 0)], 2, 1024), Some(0));
        // A host with free CPUs beats one with more memory but none.
        let hosts = [host(2, 8192, 2, 0), host(4, 4096, 0, 0)];
        assert_eq!(place(&hosts, 1, 1024), Some(1));
        assert_eq!(place(&[], 1, 1), None);
    }
}

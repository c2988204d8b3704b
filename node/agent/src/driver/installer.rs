//! The built-in network installer a cluster's frontend serves to its VMs.
//!
//! Built by the agent from what the master host has: the kernel (a Debian
//! `linux-image-*` package's `/boot/vmlinuz-*`, or a configured path), its
//! modules, `busybox-static` and `extlinux`. The frontend serves three
//! files over HTTP (see [`super::pxe`] for the boot script that chooses):
//!
//! - `vmlinuz`: the kernel;
//! - `installer.img`: an initramfs (a `newc` cpio written here) whose init
//!   brings the NIC up by DHCP, partitions and formats the node's disk,
//!   fetches the OS from the frontend, makes the disk bootable with
//!   `extlinux`, reports `installed` to the frontend and reboots;
//! - `os.img`: the OS the node then runs from its own disk (the kernel and
//!   this initramfs, loaded by `extlinux`): it configures the address the
//!   node was given at install time and says it is `up`, with or without a
//!   frontend.
//!
//! Each step prints a `VCFED-NODE` line on the serial console, which the
//! libvirt driver reads for the node's state (installing, with the bytes
//! written; installed; up; or failed with the step that failed).

use std::path::{Path, PathBuf};

use crate::driver::pxe::MARKER;

/// Kernel modules both images load, with their dependencies.
const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "crc32c_generic",
    "ext4",
];
/// Where Debian's syslinux puts the MBR boot code.
const MBR: &str = "/usr/lib/syslinux/mbr/mbr.bin";

/// What a cluster's frontend serves VMs to install them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Installer {
    /// The built-in installer and node OS, built from this machine.
    BuiltIn(InstallerSource),
    /// An operator's own installer (a Debian netboot initrd with a
    /// preseed, a kickstart, a Rocks-style installer): its kernel, initrd
    /// and kernel command line, in which `{frontend}` is the frontend's
    /// address.
    Own {
        /// The kernel.
        kernel: PathBuf,
        /// The installer's initrd.
        initrd: PathBuf,
        /// Its kernel command line.
        args: String,
    },
}

impl Installer {
    /// The installer the site config asks for: the operator's own with an
    /// `initrd`, else the built-in one from `kernel` (or the newest in
    /// `/boot`).
    pub fn from_config(
        kernel: Option<&Path>,
        initrd: Option<&Path>,
        args: Option<&str>,
    ) -> Result<Installer, String> {
        match (kernel, initrd) {
            (Some(kernel), Some(initrd)) => {
                for path in [kernel, initrd] {
                    if !path.is_file() {
                        return Err(format!("{}: no such file", path.display()));
                    }
                }
                Ok(Installer::Own {
                    kernel: kernel.to_owned(),
                    initrd: initrd.to_owned(),
                    args: args.unwrap_or_default().to_owned(),
                })
            }
            (_, Some(_)) => Err("an own installer needs its kernel too".to_owned()),
            (kernel, None) => InstallerSource::find(kernel).map(Installer::BuiltIn),
        }
    }

    /// Writes what the frontend serves into its web root `dir`: `vmlinuz`
    /// and `installer.img` (and the built-in installer's `os.img`).
    /// Returns the bytes a node fetches.
    pub fn write(&self, dir: &Path) -> Result<u64, String> {
        match self {
            Installer::BuiltIn(source) => source.write(dir),
            Installer::Own { kernel, initrd, .. } => {
                let mut bytes = 0;
                for (from, to) in [(kernel, "vmlinuz"), (initrd, "installer.img")] {
                    bytes += std::fs::copy(from, dir.join(to))
                        .map_err(|e| format!("{}: {e}", from.display()))?;
                }
                Ok(bytes)
            }
        }
    }

    /// The kernel command line of the installer served by the frontend at
    /// `frontend`.
    pub fn kernel_args(&self, frontend: std::net::Ipv4Addr) -> String {
        match self {
            Installer::BuiltIn(_) => format!("console=ttyS0 quiet vcfed.server={frontend}"),
            Installer::Own { args, .. } => args.replace("{frontend}", &frontend.to_string()),
        }
    }
}

/// What the built-in installer is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallerSource {
    /// The kernel.
    pub kernel: PathBuf,
    /// Its modules (`/lib/modules/<version>`).
    pub modules: PathBuf,
    /// A statically linked busybox.
    pub busybox: PathBuf,
    /// `extlinux` and the shared libraries it needs.
    pub extlinux: PathBuf,
    /// MBR boot code.
    pub mbr: PathBuf,
}

impl InstallerSource {
    /// Finds what the installer needs on this machine: `kernel`, or the
    /// newest `/boot/vmlinuz-*`; its modules; a static busybox; extlinux.
    /// The error says what is missing and which Debian package has it.
    pub fn find(kernel: Option<&Path>) -> Result<InstallerSource, String> {
        let kernel = match kernel {
            Some(kernel) => kernel.to_owned(),
            None => newest_kernel(Path::new("/boot")).ok_or(
                "no kernel in /boot (Debian: apt-get install linux-image-amd64), and none configured",
            )?,
        };
        let version = kernel
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .ok_or_else(|| format!("{}: not named vmlinuz-<version>", kernel.display()))?;
        let modules = PathBuf::from("/lib/modules").join(version);
        if !modules.join("modules.dep").exists() {
            return Err(format!(
                "{}: no modules.dep for the kernel {version}",
                modules.display()
            ));
        }
        let busybox = PathBuf::from("/bin/busybox");
        let bytes = std::fs::read(&busybox).map_err(|e| {
            format!(
                "{}: {e} (Debian: apt-get install busybox-static)",
                busybox.display()
            )
        })?;
        if is_dynamic(&bytes) {
            return Err(format!(
                "{} is dynamically linked; the installer needs busybox-static (Debian: apt-get install busybox-static)",
                busybox.display()
            ));
        }
        let extlinux = PathBuf::from("/usr/bin/extlinux");
        let mbr = PathBuf::from(MBR);
        if !extlinux.exists() || !mbr.exists() {
            return Err("extlinux or its MBR code is missing (Debian: apt-get install extlinux syslinux-common)".to_owned());
        }
        Ok(InstallerSource {
            kernel,
            modules,
            busybox,
            extlinux,
            mbr,
        })
    }

    /// Writes `vmlinuz`, `installer.img` and `os.img` into `dir`. Returns
    /// the bytes a node fetches to install (the kernel and the OS image).
    pub fn write(&self, dir: &Path) -> Result<u64, String> {
        let io = |path: &Path, e: std::io::Error| format!("{}: {e}", path.display());
        let kernel = dir.join("vmlinuz");
        std::fs::copy(&self.kernel, &kernel).map_err(|e| io(&self.kernel, e))?;
        let busybox = std::fs::read(&self.busybox).map_err(|e| io(&self.busybox, e))?;
        let modules = self.module_files()?;

        let mut installer = Cpio::default();
        base(&mut installer, &busybox, &modules, &self.modules)?;
        installer.file("init", 0o755, installer_init().into_bytes());
        installer.file(
            "mbr.bin",
            0o644,
            std::fs::read(&self.mbr).map_err(|e| io(&self.mbr, e))?,
        );
        installer.file(
            "bin/extlinux",
            0o755,
            std::fs::read(&self.extlinux).map_err(|e| io(&self.extlinux, e))?,
        );
        for library in shared_libraries(&self.extlinux)? {
            let data = std::fs::read(&library).map_err(|e| io(&library, e))?;
            let inside = library.strip_prefix("/").unwrap_or(&library);
            installer.file(&inside.display().to_string(), 0o755, data);
        }
        let path = dir.join("installer.img");
        std::fs::write(&path, installer.finish()).map_err(|e| io(&path, e))?;

        let mut os = Cpio::default();
        base(&mut os, &busybox, &modules, &self.modules)?;
        os.file("init", 0o755, os_init().into_bytes());
        let os_bytes = os.finish();
        let path = dir.join("os.img");
        std::fs::write(&path, &os_bytes).map_err(|e| io(&path, e))?;
        let kernel_len = std::fs::metadata(&kernel)
            .map_err(|e| io(&kernel, e))?
            .len();
        Ok(kernel_len + os_bytes.len() as u64)
    }

    /// The module files (relative to the modules dir) of [`MODULES`] and
    /// everything they depend on, from `modules.dep`.
    fn module_files(&self) -> Result<Vec<String>, String> {
        let path = self.modules.join("modules.dep");
        let dep = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut files = Vec::new();
        for module in MODULES {
            let line = dep
                .lines()
                .find(|line| {
                    line.split(':')
                        .next()
                        .and_then(|f| f.rsplit('/').next())
                        .is_some_and(|f| f == format!("{module}.ko"))
                })
                .ok_or_else(|| format!("{}: no module {module}", path.display()))?;
            let (file, deps) = line.split_once(':').unwrap_or((line, ""));
            for file in std::iter::once(file).chain(deps.split_whitespace()) {
                if !files.iter().any(|f| f == file) {
                    files.push(file.to_owned());
                }
            }
        }
        Ok(files)
    }
}

/// What both images hold: busybox, the mount points, the modules.
fn base(cpio: &mut Cpio, busybox: &[u8], modules: &[String], dir: &Path) -> Result<(), String> {
    for d in ["bin", "dev", "proc", "sys", "mnt", "tmp", "etc"] {
        cpio.dir(d);
    }
    cpio.file("bin/busybox", 0o755, busybox.to_vec());
    cpio.file("udhcpc.sh", 0o755, UDHCPC_HOOK.as_bytes().to_vec());
    let version = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_owned();
    for file in modules {
        let data = std::fs::read(dir.join(file)).map_err(|e| format!("{file}: {e}"))?;
        cpio.file(&format!("lib/modules/{version}/{file}"), 0o644, data);
    }
    let dep = std::fs::read(dir.join("modules.dep")).map_err(|e| format!("modules.dep: {e}"))?;
    cpio.file(&format!("lib/modules/{version}/modules.dep"), 0o644, dep);
    Ok(())
}

/// udhcpc's hook: the lease as shell variables in `/tmp/lease`.
const UDHCPC_HOOK: &str = "#!/bin/sh\n\
case \"$1\" in\n\
  bound|renew)\n\
    ip addr flush dev \"$interface\"\n\
    ip addr add \"$ip/${mask:-24}\" dev \"$interface\"\n\
    echo \"ip=$ip prefix=${mask:-24} dhcp_server=${serverid:-$siaddr}\" > /tmp/lease\n\
    ;;\n\
esac\n";

/// The shell functions both inits start with.
fn prelude() -> String {
    format!(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev\n\
         say() {{ echo \"{MARKER} $*\"; }}\n\
         fail() {{ say failed \"$*\"; while true; do sleep 3600; done; }}\n\
         for m in {modules}; do modprobe $m || fail \"loading the kernel module $m\"; done\n\
         ip link set lo up\n\
         ip link set eth0 up || fail \"no network interface\"\n",
        modules = MODULES.join(" ")
    )
}

/// The installer's init.
fn installer_init() -> String {
    format!(
        "{prelude}\
         server=$(sed -n 's/.*vcfed.server=\\([0-9.]*\\).*/\\1/p' /proc/cmdline)\n\
         udhcpc -i eth0 -q -n -t 10 -T 2 -s /udhcpc.sh >/dev/null 2>&1 || fail \"no DHCP lease\"\n\
         . /tmp/lease\n\
         say installing $ip $server 0\n\
         printf 'o\\nn\\np\\n1\\n\\n\\na\\n1\\nw\\n' | fdisk /dev/vda >/dev/null 2>&1\n\
         [ -b /dev/vda1 ] || fail \"partitioning /dev/vda\"\n\
         mke2fs -q /dev/vda1 >/dev/null 2>&1 || fail \"formatting /dev/vda1\"\n\
         mount -t ext2 /dev/vda1 /mnt || fail \"mounting /dev/vda1\"\n\
         mkdir -p /mnt/boot /mnt/etc\n\
         bytes=0\n\
         for file in vmlinuz os.img; do\n\
           wget -q -O /mnt/boot/$file http://$server/$file || fail \"fetching $file from $server\"\n\
           bytes=$((bytes + $(wc -c < /mnt/boot/$file)))\n\
           say installing $ip $server $bytes\n\
         done\n\
         echo \"ip=$ip prefix=$prefix server=$server\" > /mnt/etc/vcfed-node\n\
         extlinux --install /mnt/boot >/dev/null 2>&1 || fail \"installing extlinux\"\n\
         printf 'DEFAULT node\\nLABEL node\\n  KERNEL vmlinuz\\n  INITRD os.img\\n  APPEND console=ttyS0 quiet\\n' > /mnt/boot/extlinux.conf\n\
         dd if=/mbr.bin of=/dev/vda bs=440 count=1 conv=notrunc 2>/dev/null || fail \"writing the MBR\"\n\
         umount /mnt\n\
         sync\n\
         mac=$(tr : - < /sys/class/net/eth0/address)\n\
         wget -q -O /dev/null \"http://$server/cgi-bin/report?mac=$mac&state=installed&bytes=$bytes\" || fail \"reporting to $server\"\n\
         say installed $ip $server $bytes\n\
         reboot -f\n",
        prelude = prelude()
    )
}

/// The node OS's init: the address from install time, then `up`.
fn os_init() -> String {
    format!(
        "{prelude}\
         mount -t ext2 /dev/vda1 /mnt || fail \"mounting /dev/vda1\"\n\
         . /mnt/etc/vcfed-node || fail \"no /etc/vcfed-node on the disk\"\n\
         ip addr add $ip/$prefix dev eth0 || fail \"configuring $ip\"\n\
         say up $ip\n\
         while true; do sleep 3600; done\n",
        prelude = prelude()
    )
}

/// The newest `vmlinuz-*` in `dir`, by version order of its name.
fn newest_kernel(dir: &Path) -> Option<PathBuf> {
    let mut kernels: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort_by_key(|p| version_key(&p.display().to_string()));
    kernels.pop()
}

/// A sort key that orders `6.1.0-10` after `6.1.0-9`.
fn version_key(text: &str) -> Vec<(u64, String)> {
    let mut key = Vec::new();
    let mut number = String::new();
    let mut other = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            if !other.is_empty() {
                key.push((0, std::mem::take(&mut other)));
            }
            number.push(c);
        } else {
            if !number.is_empty() {
                key.push((number.parse().unwrap_or(u64::MAX), String::new()));
                number.clear();
            }
            other.push(c);
        }
    }
    if !number.is_empty() {
        key.push((number.parse().unwrap_or(u64::MAX), String::new()));
    }
    if !other.is_empty() {
        key.push((0, other));
    }
    key
}

/// Whether an ELF file asks for a dynamic loader (has a `PT_INTERP`).
fn is_dynamic(elf: &[u8]) -> bool {
    // 64-bit little-endian ELF: program headers at e_phoff (0x20), each
    // e_phentsize (0x36) bytes, e_phnum (0x38) of them; PT_INTERP is 3.
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u64_at = |at: usize| {
        elf.get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    };
    let (Some(phoff), Some(size), Some(count)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return true;
    };
    (0..usize::from(count)).any(|i| {
        let at = usize::try_from(phoff).unwrap_or(usize::MAX) + i * usize::from(size);
        elf.get(at..at + 4)
            .is_some_and(|t| u32::from_le_bytes([t[0], t[1], t[2], t[3]]) == 3)
    })
}

/// The shared libraries `program` loads, as `ldd` lists them.
fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>, String> {
    let out = std::process::Command::new("ldd")
        .arg(program)
        .output()
        .map_err(|e| format!("ldd {}: {e}", program.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            line.split_whitespace()
                .find(|word| word.starts_with('/'))
                .map(PathBuf::from)
        })
        .collect())
}

/// A `newc` cpio archive, as the kernel reads an initramfs.
#[derive(Debug, Default)]
struct Cpio {
    out: Vec<u8>,
    inode: u32,
    dirs: Vec<String>,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.inode += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.inode,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    /// A directory (and its parents, once each).
    fn dir(&mut self, path: &str) {
        let mut at = String::new();
        for part in path.split('/') {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(part);
            if !self.dirs.contains(&at) {
                self.dirs.push(at.clone());
                let name = at.clone();
                self.entry(&name, 0o040_755, &[]);
            }
        }
    }

    /// A regular file (its directories first).
    fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.entry(path, 0o100_000 | mode, &data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_newc_and_aligned() {
        let mut cpio = Cpio::default();
        cpio.file("bin/busybox", 0o755, vec![1, 2, 3]);
        let bytes = cpio.finish();
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(bytes.len() % 4, 0);
        let text = String::from_utf8_lossy(&bytes);
        // The directory comes before the file in it, and the trailer last.
        let (dir, file, end) = (
            text.find("bin\0").unwrap(),
            text.find("bin/busybox\0").unwrap(),
            text.find("TRAILER!!!\0").unwrap(),
        );
        assert!(dir < file && file < end);
        // Mode of the file: regular, 0755.
        let header = &text[file - 110..file];
        assert_eq!(&header[14..22], "000081ed");
        // Its size.
        assert_eq!(&header[54..62], "00000003");
    }

    #[test]
    fn kernels_sort_by_version() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "vmlinuz-6.1.0-9-amd64",
            "vmlinuz-6.1.0-10-amd64",
            "config-6.1.0-11",
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        assert_eq!(
            newest_kernel(dir.path()).unwrap().file_name().unwrap(),
            "vmlinuz-6.1.0-10-amd64"
        );
        assert_eq!(newest_kernel(&dir.path().join("none")), None);
    }

    #[test]
    fn static_and_dynamic_programs_are_told_apart() {
        // This test's own binary is dynamically linked.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(is_dynamic(&me));
        assert!(is_dynamic(b"not an ELF"));
    }

    #[test]
    fn the_scripts_report_every_state_the_driver_reads() {
        let installer = installer_init();
        for marker in ["installing", "installed", "failed"] {
            assert!(
                installer.contains(&format!("say {marker} "))
                    || installer.contains(&format!("say {marker} \"")),
                "{marker}"
            );
        }
        assert!(os_init().contains("say up $ip"));
    }
}

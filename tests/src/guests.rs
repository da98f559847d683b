//! Tiny QEMU guests that need no operating system (see `shared/libvirt-testing.md`): TCG
//! (`<domain type='qemu'>`), 32 MiB, 1 vCPU, a 1 MiB raw virtio disk, a bridgeless tap
//! (`<interface type='ethernet'>`, which gives network counters), a pty serial port, no
//! balloon, no graphics.
//!
//! | kind | disk | boot | counters |
//! |------|------|------|----------|
//! | [`GuestKind::Idle`] | empty | disk (not bootable: sits in SeaBIOS) | `wr.reqs` = 0, `tx.pkts` = 0 |
//! | [`GuestKind::DiskWriter`] | boot sector writing LBA 1 about once a second | disk | `block.0.wr.reqs` rises ≈ 1/s from ≈ 1.5 s |
//! | [`GuestKind::Pxe`] | empty | network first (iPXE DHCP), then disk | `net.0.tx.pkts` ≈ 10 in the first ≈ 15 s, then flat |

use crate::libvirtd::{read_kernel_uuid, write_file, PrivateLibvirtd};
use anyhow::{bail, Context, Result};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Size of every guest disk.
pub const DISK_SIZE: usize = 1 << 20;

/// The DiskWriter boot sector's code: `cli; xor ax,ax; mov ds/es/ss,ax; mov sp,0x7c00;
/// mov [0x7c2a],dl; sti; loop { int 13h AH=03 (write 1 sector from 0x7e00 to CHS 0/0/2 =
/// LBA 1 of the boot drive); hlt ×18 (≈ 1 s of timer ticks) }`; the last byte stores the
/// boot drive number.
pub const DISK_WRITER_BOOT_CODE: [u8; 43] = [
    0xfa, 0x31, 0xc0, 0x8e, 0xd8, 0x8e, 0xc0, 0x8e, 0xd0, 0xbc, 0x00, 0x7c, 0x88, 0x16, 0x2a, 0x7c,
    0xfb, 0xb8, 0x01, 0x03, 0xb9, 0x02, 0x00, 0x30, 0xf6, 0x8a, 0x16, 0x2a, 0x7c, 0xbb, 0x00, 0x7e,
    0xcd, 0x13, 0xb9, 0x12, 0x00, 0xf4, 0xe2, 0xfd, 0xeb, 0xe7, 0x00,
];

/// What a guest does; see the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GuestKind {
    /// Empty disk: an idle VM (no disk writes, no packets).
    Idle,
    /// Boot sector that writes one sector about once a second.
    DiskWriter,
    /// Boots from the network first: iPXE sends DHCP requests.
    Pxe,
    /// Powers itself off about 2 s after boot (ACPI S5), as an OS install does when done.
    PowersOff,
    /// Resets itself once about 2 s after boot, then stays up.
    Reboots,
    /// Reports a kernel panic on the pvpanic ISA port about 2 s after boot.
    Panics,
}

/// The boot sectors of shared/libvirt-testing.md, "Guests that act by themselves".
const POWERS_OFF_CODE: &str = "fa31c08ed88ed0bc007cfbb92400f4e2fdb80020ba0406efba04b0eff4ebfd";
const REBOOTS_CODE: &str =
    "fa31c08ed88ed0bc007cfbb034e670e4713c5a7412b034e670b05ae671b92400f4e2fdb0fee664f4ebfd";
const PANICS_CODE: &str = "fa31c08ed88ed0bc007cfbb92400f4e2fdba0505b001eef4ebfd";

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("the boot code is hex"))
        .collect()
}

impl GuestKind {
    /// All kinds, in declaration order.
    pub const ALL: [GuestKind; 3] = [GuestKind::Idle, GuestKind::DiskWriter, GuestKind::Pxe];
}

/// The 1 MiB raw disk image of `kind`.
pub fn disk_image(kind: GuestKind) -> Vec<u8> {
    let mut img = vec![0u8; DISK_SIZE];
    let code = match kind {
        GuestKind::DiskWriter => DISK_WRITER_BOOT_CODE.to_vec(),
        GuestKind::PowersOff => hex_bytes(POWERS_OFF_CODE),
        GuestKind::Reboots => hex_bytes(REBOOTS_CODE),
        GuestKind::Panics => hex_bytes(PANICS_CODE),
        GuestKind::Idle | GuestKind::Pxe => return img,
    };
    img[..code.len()].copy_from_slice(&code);
    img[510] = 0x55;
    img[511] = 0xaa;
    img
}

/// Writes the raw disk image of `kind` to `path` (plain file I/O, replaces the file).
pub fn write_disk(path: &Path, kind: GuestKind) -> Result<()> {
    let mut f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(&disk_image(kind))
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// The domain XML of a tiny guest; `disk` should be absolute (libvirt resolves it inside the
/// daemon). `name` and the path are XML-escaped.
pub fn domain_xml(name: &str, uuid: &str, disk: &Path, kind: GuestKind) -> String {
    let boot = match kind {
        GuestKind::Pxe => "<boot dev='network'/>\n    <boot dev='hd'/>",
        _ => "<boot dev='hd'/>",
    };
    // What the self-acting guests need (shared/libvirt-testing.md): ACPI for the power-off, a
    // pvpanic device and a preserved crash for the panic.
    let features = if kind == GuestKind::PowersOff {
        "\n  <features><acpi/></features>"
    } else {
        ""
    };
    let (on_crash, panic) = if kind == GuestKind::Panics {
        (
            "preserve",
            "\n    <panic model='isa'><address type='isa' iobase='0x505'/></panic>",
        )
    } else {
        ("destroy", "")
    };
    let name = xml_escape(name);
    let uuid = xml_escape(uuid);
    let disk = xml_escape(&disk.to_string_lossy());
    format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
    {boot}
  </os>{features}
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>{on_crash}</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='ethernet'>
      <model type='virtio'/>
    </interface>
    <serial type='pty'/>
    <memballoon model='none'/>{panic}
  </devices>
</domain>
"
    )
}

/// A random uuid (from `/proc/sys/kernel/random/uuid`).
pub fn random_uuid() -> Result<String> {
    read_kernel_uuid()
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
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

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

impl PrivateLibvirtd {
    /// Defines (does not start) a guest of `kind` with a random uuid; returns the uuid.
    pub fn define_guest(&self, name: &str, kind: GuestKind) -> Result<String> {
        let uuid = random_uuid()?;
        self.define_guest_with_uuid(name, &uuid, kind)?;
        Ok(uuid)
    }

    /// Defines (does not start) a guest with the given uuid: its disk is written to
    /// `images/<uuid>.img`, its XML to a temporary file for `virsh define`.
    pub fn define_guest_with_uuid(&self, name: &str, uuid: &str, kind: GuestKind) -> Result<()> {
        if !is_uuid(uuid) {
            bail!("define_guest_with_uuid({name:?}): {uuid:?} is not a uuid");
        }
        let uuid = uuid.to_ascii_lowercase();
        let disk = self.guest_disk_path(&uuid);
        write_disk(&disk, kind)?;
        let xml_path = self.images_dir().join(format!("{uuid}.xml"));
        write_file(&xml_path, &domain_xml(name, &uuid, &disk, kind))?;
        let xml_arg = xml_path.to_string_lossy().into_owned();
        let res = self.virsh(&["define", &xml_arg]);
        let _ = fs::remove_file(&xml_path);
        res.with_context(|| format!("defining guest {name:?} ({uuid}, {kind:?})"))?;
        Ok(())
    }

    /// Defines and starts a guest; returns the uuid.
    pub fn start_guest(&self, name: &str, kind: GuestKind) -> Result<String> {
        let uuid = self.define_guest(name, kind)?;
        self.virsh(&["start", &uuid])
            .with_context(|| format!("starting guest {name:?} ({uuid})"))?;
        Ok(uuid)
    }

    /// Where [`define_guest_with_uuid`](Self::define_guest_with_uuid) puts the disk.
    pub fn guest_disk_path(&self, uuid: &str) -> PathBuf {
        self.images_dir().join(format!("{uuid}.img"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_writer_image() {
        let img = disk_image(GuestKind::DiskWriter);
        assert_eq!(img.len(), DISK_SIZE);
        let hex: String = img[..43].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "fa31c08ed88ec08ed0bc007c88162a7cfbb80103b9020030f68a162a7cbb007ecd13b91200f4e2fdebe700"
        );
        assert_eq!(&img[510..512], &[0x55, 0xaa]);
        assert!(img[43..510].iter().all(|&b| b == 0));
        assert!(img[512..].iter().all(|&b| b == 0));
    }

    #[test]
    fn disk_writer_file_roundtrip() {
        let path =
            std::env::temp_dir().join(format!("vmwatch-guests-unit-{}.img", std::process::id()));
        write_disk(&path, GuestKind::DiskWriter).expect("write_disk");
        let back = fs::read(&path).expect("read back");
        let _ = fs::remove_file(&path);
        assert_eq!(back, disk_image(GuestKind::DiskWriter));
    }

    #[test]
    fn idle_and_pxe_disks_are_empty() {
        for kind in [GuestKind::Idle, GuestKind::Pxe] {
            let img = disk_image(kind);
            assert_eq!(img.len(), DISK_SIZE);
            assert!(img.iter().all(|&b| b == 0), "{kind:?}");
        }
    }

    #[test]
    fn xml_shape() {
        let uuid = "6695eb01-f6a4-8304-79aa-97f2502e193f";
        let x = domain_xml("a<b", uuid, Path::new("/d/x.img"), GuestKind::Pxe);
        assert!(x.contains("<name>a&lt;b</name>"));
        assert!(x.contains("<domain type='qemu'>"));
        assert!(x.contains("<memory unit='MiB'>32</memory>"));
        assert!(x.contains("<interface type='ethernet'>"));
        assert!(x.contains("<memballoon model='none'/>"));
        assert!(!x.contains("graphics"));
        let net = x.find("<boot dev='network'/>").expect("network boot");
        let hd = x.find("<boot dev='hd'/>").expect("hd boot");
        assert!(net < hd);
        let idle = domain_xml("i", uuid, Path::new("/d/x.img"), GuestKind::Idle);
        assert!(!idle.contains("network"));
        assert!(is_uuid(uuid));
        assert!(!is_uuid("not-a-uuid"));
    }
}

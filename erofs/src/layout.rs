//! EROFS on-disk structures, as the kernel defines them
//! (`fs/erofs/erofs_fs.h`), for the subset hyperbox writes: uncompressed
//! images with extended inodes, flat (plain or tail-inline) data, inline
//! xattrs. Raw little-endian structs with their sizes checked at compile time;
//! the writer fills them, nothing here interprets untrusted bytes.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{Immutable, IntoBytes, KnownLayout};

/// Where the superblock starts in the image.
pub const SUPER_OFFSET: u64 = 1024;
/// `EROFS_SUPER_MAGIC_V1`.
pub const MAGIC: u32 = 0xE0F5_E1E2;
/// Block size: 4 KiB, the page size the kernel reads with.
pub const BLKSZ_BITS: u8 = 12;
/// Block size in bytes.
pub const BLKSZ: u64 = 1 << BLKSZ_BITS;
/// Inodes are addressed in 32-byte slots (nid = offset / 32 in the metadata area).
pub const NID_SLOT: u64 = 32;

/// Data layouts (`i_format` bits 1–3).
pub mod datalayout {
    /// All data in consecutive blocks from `startblk`.
    pub const FLAT_PLAIN: u16 = 0;
    /// Full blocks from `startblk`, the last partial block right after the
    /// inode and its xattrs.
    pub const FLAT_INLINE: u16 = 2;
}

/// Directory entry file types (the kernel's `FT_*`).
pub mod ft {
    /// Regular file.
    pub const REG: u8 = 1;
    /// Directory.
    pub const DIR: u8 = 2;
    /// Character device.
    pub const CHR: u8 = 3;
    /// Block device.
    pub const BLK: u8 = 4;
    /// Named pipe.
    pub const FIFO: u8 = 5;
    /// Socket.
    pub const SOCK: u8 = 6;
    /// Symbolic link.
    pub const LNK: u8 = 7;
}

/// xattr name indexes: the prefix is stored as an index, the rest as name.
pub mod xattr_index {
    /// `user.`
    pub const USER: u8 = 1;
    /// `system.posix_acl_access` (no suffix)
    pub const POSIX_ACL_ACCESS: u8 = 2;
    /// `system.posix_acl_default` (no suffix)
    pub const POSIX_ACL_DEFAULT: u8 = 3;
    /// `trusted.`
    pub const TRUSTED: u8 = 4;
    /// `security.`
    pub const SECURITY: u8 = 6;
}

/// The superblock (the first 128 bytes; no extension slots).
#[derive(Debug, Default, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct SuperBlock {
    /// [`MAGIC`].
    pub magic: U32,
    /// crc32c of the block when `SB_CHKSUM` is set; unused here.
    pub checksum: U32,
    /// Compatible feature bits.
    pub feature_compat: U32,
    /// Block size as a shift.
    pub blkszbits: u8,
    /// Extension slots after the 128 bytes.
    pub sb_extslots: u8,
    /// nid of the root directory (16 bits without the 48-bit feature).
    pub root_nid: U16,
    /// Number of inodes.
    pub inos: U64,
    /// Base seconds of compact inodes' mtime (build time).
    pub epoch: U64,
    /// Nanoseconds of the above.
    pub fixed_nsec: U32,
    /// Total blocks of the image.
    pub blocks: U32,
    /// First block of the metadata (inode) area.
    pub meta_blkaddr: U32,
    /// First block of shared xattrs (none written).
    pub xattr_blkaddr: U32,
    /// Volume uuid.
    pub uuid: [u8; 16],
    /// Volume name.
    pub volume_name: [u8; 16],
    /// Incompatible feature bits (none needed by this subset).
    pub feature_incompat: U32,
    /// Compression configuration (unused).
    pub u1: U16,
    /// Extra devices (for chunk-based blobs; none yet).
    pub extra_devices: U16,
    /// Device table offset.
    pub devt_slotoff: U16,
    /// Directory block size shift beyond the block size.
    pub dirblkbits: u8,
    /// Long xattr prefixes.
    pub xattr_prefix_count: u8,
    /// Start of long xattr prefixes.
    pub xattr_prefix_start: U32,
    /// nid of the packed inode.
    pub packed_nid: U64,
    /// xattr filter settings.
    pub xattr_filter_reserved: u8,
    /// Reserved, zero.
    pub reserved: [u8; 23],
}

/// The 64-byte inode: 32-bit owners, 64-bit size, mtime with nanoseconds.
#[derive(Debug, Default, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct InodeExtended {
    /// Bit 0: 1 (extended); bits 1–3: data layout.
    pub i_format: U16,
    /// Inline xattr size in 4-byte units plus one (0: none).
    pub i_xattr_icount: U16,
    /// File type and permission bits.
    pub i_mode: U16,
    /// Block number MSB with the 48-bit feature; zero here.
    pub i_nb: U16,
    /// Size in bytes.
    pub i_size: U64,
    /// Start block (flat data) or device number (devices).
    pub i_u: U32,
    /// Inode number for 32-bit stat.
    pub i_ino: U32,
    /// Owner.
    pub i_uid: U32,
    /// Group.
    pub i_gid: U32,
    /// Modification time, seconds.
    pub i_mtime: U64,
    /// Modification time, nanoseconds.
    pub i_mtime_nsec: U32,
    /// Link count.
    pub i_nlink: U32,
    /// Reserved, zero.
    pub i_reserved2: [u8; 16],
}

/// Header of the inline xattr area.
#[derive(Debug, Default, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct XattrIbodyHeader {
    /// Name filter bits (only with the filter feature); zero.
    pub h_name_filter: U32,
    /// Shared xattrs referenced; none.
    pub h_shared_count: u8,
    /// Reserved, zero.
    pub h_reserved2: [u8; 7],
}

/// One xattr entry header; name and value follow, padded to 4 bytes.
#[derive(Debug, Default, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct XattrEntry {
    /// Length of the name suffix.
    pub e_name_len: u8,
    /// Prefix index.
    pub e_name_index: u8,
    /// Length of the value.
    pub e_value_size: U16,
}

/// A directory entry; names follow all entries of the block.
#[derive(Debug, Default, IntoBytes, Immutable, KnownLayout)]
#[repr(C, packed)]
pub struct Dirent {
    /// Target inode.
    pub nid: U64,
    /// Offset of the name from the start of the block.
    pub nameoff: U16,
    /// [`ft`] type.
    pub file_type: u8,
    /// Reserved, zero.
    pub reserved: u8,
}

const _: () = assert!(std::mem::size_of::<SuperBlock>() == 128);
const _: () = assert!(std::mem::size_of::<InodeExtended>() == 64);
const _: () = assert!(std::mem::size_of::<XattrIbodyHeader>() == 12);
const _: () = assert!(std::mem::size_of::<XattrEntry>() == 4);
const _: () = assert!(std::mem::size_of::<Dirent>() == 12);

/// The kernel's `new_encode_dev`: major and minor packed as in `i_u.rdev`.
pub fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers_encode_like_the_kernel() {
        assert_eq!(encode_dev(1, 3), 0x103);
        assert_eq!(encode_dev(0, 0), 0);
        assert_eq!(
            encode_dev(8, 0x1ff),
            0x1ff & 0xff | (8 << 8) | (0x100 << 12)
        );
    }
}

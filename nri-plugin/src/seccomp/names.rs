//! Syscall numbers to names and back, for x86_64 and its 32-bit entry.
//!
//! Through libseccomp, the library runc compiles profiles with: a name it
//! resolves here is a name runc accepts, for the same architecture.

use libseccomp::{ScmpArch, ScmpSyscall};

/// Which entry a syscall was made through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Arch {
    /// The 64-bit entry (`syscall`).
    X8664,
    /// The 32-bit entry (`int 0x80`, i386 numbering).
    X86,
}

impl Arch {
    /// The name reports and `hb` print.
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X8664 => "x86_64",
            Arch::X86 => "x86",
        }
    }

    /// The OCI spelling.
    pub fn oci(self) -> &'static str {
        match self {
            Arch::X8664 => "SCMP_ARCH_X86_64",
            Arch::X86 => "SCMP_ARCH_X86",
        }
    }

    fn scmp(self) -> ScmpArch {
        match self {
            Arch::X8664 => ScmpArch::X8664,
            Arch::X86 => ScmpArch::X86,
        }
    }

    /// The audit record's `arch=` value (AUDIT_ARCH_*), in hex.
    pub fn from_audit(hex: &str) -> Option<Arch> {
        match hex {
            "c000003e" => Some(Arch::X8664),
            "40000003" => Some(Arch::X86),
            _ => None,
        }
    }
}

/// The name of syscall `nr` of `arch`, or `None` when libseccomp does not
/// know it (a syscall newer than the library).
pub fn name(arch: Arch, nr: u32) -> Option<String> {
    let nr = i32::try_from(nr).ok()?;
    ScmpSyscall::from(nr).get_name_by_arch(arch.scmp()).ok()
}

/// The name to show for syscall `nr` of `arch`: its name, or `nr:<n>`.
pub fn display(arch: Arch, nr: u32) -> String {
    name(arch, nr).unwrap_or_else(|| format!("nr:{nr}"))
}

/// How reports, reviews and `hb trace` spell syscall `name` of `arch`:
/// the bare name for x86_64, `x86:<name>` for the 32-bit entry.
pub fn label(arch: Arch, name: &str) -> String {
    match arch {
        Arch::X8664 => name.to_string(),
        Arch::X86 => format!("x86:{name}"),
    }
}

/// The number of syscall `name` on `arch`, if it has one there.
pub fn number(arch: Arch, name: &str) -> Option<u32> {
    let s = ScmpSyscall::from_name_by_arch(name, arch.scmp()).ok()?;
    u32::try_from(i32::from(s)).ok()
}

/// A key of the tracer's counts (see `hyperbox_bpf::COMPAT`) as an
/// architecture and number.
pub fn split(key: u32) -> (Arch, u32) {
    if key & hyperbox_bpf::COMPAT != 0 {
        (Arch::X86, key & !hyperbox_bpf::COMPAT)
    } else {
        (Arch::X8664, key)
    }
}

/// Every syscall name libseccomp knows for `arch` with a number in
/// `range`.
pub fn known(arch: Arch, range: std::ops::Range<u32>) -> Vec<String> {
    range.filter_map(|nr| name(arch, nr)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_names_agree_with_the_kernel_tables() {
        assert_eq!(name(Arch::X8664, 272).as_deref(), Some("unshare"));
        assert_eq!(number(Arch::X8664, "openat"), Some(257));
        // i386 numbering differs: 20 is getpid there, writev on x86_64.
        assert_eq!(name(Arch::X86, 20).as_deref(), Some("getpid"));
        assert_eq!(name(Arch::X8664, 20).as_deref(), Some("writev"));
        assert_eq!(split(20 | hyperbox_bpf::COMPAT), (Arch::X86, 20));
        assert_eq!(display(Arch::X8664, 4000), "nr:4000");
        assert_eq!(label(Arch::X86, "read"), "x86:read");
        assert_eq!(label(Arch::X8664, "read"), "read");
        assert_eq!(number(Arch::X8664, "not_a_syscall"), None);
    }
}
